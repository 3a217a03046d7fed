// The CPU kernels' element types for each DType (see sarkernels/dispatch.h).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "sarkernels/dispatch.h"

namespace sarkernels::cpu {

struct CpuTypes {
  using f32 = float;
  using f64 = double;
  using f16 = c10::Half;
  using bf16 = c10::BFloat16;
};

template <typename F>
void dispatch(DType dt, F&& f) {
  dispatch_dtype<CpuTypes>(dt, f);
}

}  // namespace sarkernels::cpu
