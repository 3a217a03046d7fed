// Function qualifiers shared by the CPU kernels, the CUDA kernels and their host emulation.
#pragma once

#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif
