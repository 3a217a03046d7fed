// The one switch over DType. Each side names its element types (the CUDA kernels' __half,
// the CPU kernels' at::Half, ...) in a struct with members f32, f64, f16 and bf16, and gets
// a Type<T> tag for the operand's element type:
//   dispatch_dtype<MyTypes>(dt, [&](auto tag) { using T = typename decltype(tag)::type; ... });
#pragma once
#include <stdexcept>
#include <string>

#include "sarkernels/params.h"

namespace sarkernels {

template <typename T>
struct Type {
  using type = T;
};

template <typename Types, typename F>
decltype(auto) dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(Type<typename Types::f32>{});
    case DType::kFloat64: return f(Type<typename Types::f64>{});
    case DType::kFloat16: return f(Type<typename Types::f16>{});
    case DType::kBFloat16: return f(Type<typename Types::bf16>{});
  }
  throw std::invalid_argument("sarkernels: unknown DType " + std::to_string(static_cast<int>(dt)));
}

}  // namespace sarkernels
