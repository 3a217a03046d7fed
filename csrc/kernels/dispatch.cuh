// The kernels' element types for each DType: an entry function dispatches with
//   dispatch(dt, [&](auto tag) { using T = typename decltype(tag)::type; ... });
#pragma once
#include "kernels/platform.cuh"
#include "sarkernels/dispatch.h"

namespace sarkernels::kernels {

struct DeviceTypes {
  using f32 = float;
  using f64 = double;
  using f16 = __half;
  using bf16 = __nv_bfloat16;
};

template <typename F>
void dispatch(DType dt, F&& f) {
  dispatch_dtype<DeviceTypes>(dt, f);
}

}  // namespace sarkernels::kernels
