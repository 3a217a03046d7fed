// One source, two targets: kernels include this and are compiled by nvcc for the GPU or
// by the host compiler for the SIMT executor (csrc/simt/), unchanged.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SK_EMULATED 0
// The block's dynamic shared memory (the only shared memory kernels use).
#define SK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#else
#include "simt/emulation.h"
#define SK_EMULATED 1
#define SK_DYNAMIC_SMEM(name) unsigned char* const name = ::sarkernels::simt::shared_memory()
#endif

#include "sarkernels/macros.h"

// Device functions of the kernels: inlined on the GPU, plain inline functions on the host.
#define SK_DEVICE __device__ __forceinline__

// Full unrolling of a loop over a register array (so it stays in registers on the GPU).
#if SK_EMULATED
#define SK_UNROLL
#else
#define SK_UNROLL _Pragma("unroll")
#endif
