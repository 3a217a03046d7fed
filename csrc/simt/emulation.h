// What nvcc gives a kernel for free, for the host compiler: CUDA's qualifiers, thread
// indices, vector and 16-bit float types and device math, mapped onto the SIMT executor.
// Included by csrc/kernels/platform.cuh only when not compiling with nvcc.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "simt/executor.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// __shared__ is deliberately missing: kernels take shared memory from SK_DYNAMIC_SMEM, so
// the executor can poison it per block.

using dim3 = ::sarkernels::simt::dim3;
using cudaStream_t = void*;
#define threadIdx (::sarkernels::simt::self().thread_idx)
#define blockIdx (::sarkernels::simt::self().block_idx)
#define blockDim (::sarkernels::simt::self().block_dim)
#define gridDim (::sarkernels::simt::self().grid_dim)

struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };

// IEEE binary16 and bfloat16 as 16-bit storage; conversions round to nearest even.
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.x & 0x8000) << 16, exp = (h.x >> 10) & 0x1f, man = h.x & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while ((m & 0x400) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((m & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) return {uint16_t(sign | 0x7c00 | (abs > 0x7f800000u ? 0x200 : 0))};
  if (abs >= 0x477ff000u) return {uint16_t(sign | 0x7c00)};  // rounds past 65504: inf
  if (abs < 0x38800000u) {  // subnormal or zero in half: scale by 2^24 and round
    const float scaled = std::fabs(f) * 16777216.0f;  // exact
    return {uint16_t(sign | uint16_t(std::nearbyint(scaled)))};
  }
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1);
  return {uint16_t(sign | ((rounded - 0x38000000u) >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = uint32_t(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {uint16_t((bits >> 16) | 0x40)};  // quiet NaN
  return {uint16_t((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16)};
}

// Device math: the fast intrinsics are exact library calls here.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// sincosf, exp2f, fmaxf, fminf: glibc's <math.h> has them with CUDA's semantics.
