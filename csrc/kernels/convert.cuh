// Element conversions: kernels load T, compute in acc_t<T> (float, or double for double
// inputs) and store T; 16-bit pairs are packed into one 32-bit register for mma.sync.
#pragma once
#include <cstring>
#include <type_traits>

#include "kernels/platform.cuh"

namespace sarkernels::kernels {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

SK_DEVICE float to_float(float x) { return x; }
SK_DEVICE double to_float(double x) { return x; }
SK_DEVICE float to_float(__half x) { return __half2float(x); }
SK_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
SK_DEVICE T from_float(acc_t<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// Two 16-bit values in one register, `lo` in the low half (the lower-indexed element).
template <typename T>
SK_DEVICE uint32_t pack2(float lo, float hi) {
  static_assert(sizeof(T) == 2, "pack2 packs 16-bit types");
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return uint32_t(lb) | uint32_t(hb) << 16;
}

// The element of a packed pair (0: low half), as float.
template <typename T>
SK_DEVICE float unpack(uint32_t r, int half) {
  static_assert(sizeof(T) == 2, "unpack reads 16-bit types");
  const uint16_t b = uint16_t(half ? r >> 16 : r & 0xffff);
  T x;
  memcpy(&x, &b, 2);
  return to_float(x);
}

}  // namespace sarkernels::kernels
