// Every warp-level and asynchronous primitive the kernels use, each with its device form
// (intrinsics / inline PTX) and its host emulation under the SIMT executor side by side.
// Kernels use nothing else: no raw asm, no __syncthreads or __shfl_* of their own.
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels/convert.cuh"
#include "kernels/platform.cuh"
#if SK_EMULATED
#include <atomic>
#include <source_location>
#endif

namespace sarkernels::kernels {

constexpr unsigned kFullMask = 0xffffffffu;

// Lane and warp of the calling thread (warps are consecutive runs of 32 thread ids). Every
// launch plan's block is one-dimensional: the y/z terms of a general rank would hold a
// register across whole kernels.
SK_DEVICE int thread_rank() { return int(threadIdx.x); }
SK_DEVICE int lane_id() { return thread_rank() % 32; }
SK_DEVICE int warp_id() { return thread_rank() / 32; }

// ---------------------------------------------------------------- barriers

#if !SK_EMULATED
SK_DEVICE void sync_threads() { __syncthreads(); }
SK_DEVICE void sync_warp(unsigned mask = kFullMask) { __syncwarp(mask); }
#else
inline void sync_threads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::sync_threads(file, line);
}
// The emulated collectives take their call site (for the executor's error messages).
using Site = std::source_location;
inline void sync_warp(unsigned mask = kFullMask, Site site = Site::current()) {
  simt::warp_collective("syncwarp", mask, nullptr, nullptr,
                        [](const void* const*, void* const*, unsigned) {}, site.file_name(),
                        int(site.line()));
}
#endif

// ---------------------------------------------------------------- shuffles and votes

#if !SK_EMULATED
template <typename T>
SK_DEVICE T shfl(T v, int src_lane, unsigned mask = kFullMask) {
  return __shfl_sync(mask, v, src_lane);
}
template <typename T>
SK_DEVICE T shfl_xor(T v, int lane_mask, unsigned mask = kFullMask) {
  return __shfl_xor_sync(mask, v, lane_mask);
}
SK_DEVICE unsigned ballot(bool pred, unsigned mask = kFullMask) { return __ballot_sync(mask, pred); }
SK_DEVICE bool vote_any(bool pred, unsigned mask = kFullMask) { return __any_sync(mask, pred); }
SK_DEVICE bool vote_all(bool pred, unsigned mask = kFullMask) { return __all_sync(mask, pred); }
#else
namespace emulated {
// Lane l reads the value of lane src[l] (mod 32), which must take part in the mask.
template <typename T>
struct ShflIn {
  T v;
  int src;
};
template <typename T>
void shfl_compute(const void* const* ins, void* const* outs, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    const int src = static_cast<const ShflIn<T>*>(ins[l])->src & 31;
    if (!(mask >> src & 1)) simt::fail("shfl: a lane reads a lane outside the mask");
    *static_cast<T*>(outs[l]) = static_cast<const ShflIn<T>*>(ins[src])->v;
  }
}
inline void ballot_compute(const void* const* ins, void* const* outs, unsigned mask) {
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) {
    if (mask >> l & 1 && *static_cast<const bool*>(ins[l])) bits |= 1u << l;
  }
  for (int l = 0; l < 32; ++l) {
    if (mask >> l & 1) *static_cast<unsigned*>(outs[l]) = bits;
  }
}
}  // namespace emulated

template <typename T>
T shfl(T v, int src_lane, unsigned mask = kFullMask, Site site = Site::current()) {
  const emulated::ShflIn<T> in{v, src_lane};
  T out;
  simt::warp_collective("shfl", mask, &in, &out, emulated::shfl_compute<T>, site.file_name(),
                        int(site.line()));
  return out;
}
template <typename T>
T shfl_xor(T v, int lane_mask, unsigned mask = kFullMask, Site site = Site::current()) {
  return shfl(v, lane_id() ^ lane_mask, mask, site);
}
inline unsigned ballot(bool pred, unsigned mask = kFullMask, Site site = Site::current()) {
  unsigned out;
  simt::warp_collective("ballot", mask, &pred, &out, emulated::ballot_compute, site.file_name(),
                        int(site.line()));
  return out;
}
inline bool vote_any(bool pred, unsigned mask = kFullMask, Site site = Site::current()) {
  return ballot(pred, mask, site) != 0;
}
inline bool vote_all(bool pred, unsigned mask = kFullMask, Site site = Site::current()) {
  return ballot(pred, mask, site) == mask;
}
#endif

// ---------------------------------------------------------------- bit counts, fast exp2

#if !SK_EMULATED
SK_DEVICE int popcount(unsigned x) { return __popc(x); }
// 2^x by the SFU's approximation (MUFU.EX2: relative error about 2^-22, denormal results
// flushed to 0), instead of exp2f's accurate sequence around it.
SK_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
#else
inline int popcount(unsigned x) { return __builtin_popcount(x); }
inline float exp2_approx(float x) { return exp2f(x); }
#endif

// ---------------------------------------------------------------- atomics

// atomic_add2(p, a, b): p[0] += a and p[1] += b (p global, 8-byte aligned for float), by
// one vector reduction where the GPU has it (red.global.add.v2.f32, sm_90), else two.
// thread_fence: this thread's writes (reductions included) are seen by every block before
// its writes after the fence, as __threadfence.
#if !SK_EMULATED
template <typename T>
SK_DEVICE T atomic_add(T* p, T v) { return atomicAdd(p, v); }
SK_DEVICE void thread_fence() { __threadfence(); }
SK_DEVICE int atomic_exch(int* p, int v) { return atomicExch(p, v); }
template <typename T>
SK_DEVICE void atomic_add2(T* p, T a, T b) {
#if __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<T, float>) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(__cvta_generic_to_global(p)),
                 "f"(a), "f"(b)
                 : "memory");
    return;
  }
#endif
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
}
#else
// Blocks may run on several OS threads: these are real atomics.
template <typename T>
T atomic_add(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
inline int atomic_exch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
inline void thread_fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
void atomic_add2(T* p, T a, T b) {
  if (reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) != 0) simt::fail("atomic_add2: misaligned address");
  atomic_add(p, a);
  atomic_add(p + 1, b);
}
#endif

// ---------------------------------------------------------------- 16-byte accesses

// load16_l2: a global load16 that bypasses L1 (ld.global.cg), for data that other blocks
// of the running kernel wrote: an SM's L1 is not coherent with them.
#if !SK_EMULATED
SK_DEVICE uint4 load16(const void* p) { return *static_cast<const uint4*>(p); }
SK_DEVICE uint4 load16_l2(const void* p) { return __ldcg(static_cast<const uint4*>(p)); }
SK_DEVICE void store16(void* p, uint4 v) { *static_cast<uint4*>(p) = v; }
#else
inline uint4 load16(const void* p) {
  simt::check_aligned16(p, "load16");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline uint4 load16_l2(const void* p) { return load16(p); }
inline void store16(void* p, uint4 v) {
  simt::check_aligned16(p, "store16");
  std::memcpy(p, &v, 16);
}
#endif

// ---------------------------------------------------------------- cp.async (sm_80+)
// cp_async16 copies 16 bytes global -> shared without blocking; when !valid it reads
// nothing (src may be any pointer) and writes zeros. The copies of a committed group land
// once cp_async_wait<N>() sees at most N newer groups pending; read them only after that
// (and after a barrier, for other threads' copies).

#if !SK_EMULATED
SK_DEVICE void cp_async16(void* smem, const void* gmem, bool valid = true) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(valid ? 16 : 0));
}
SK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
SK_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#else
inline void cp_async16(void* smem, const void* gmem, bool valid = true) {
  simt::cp_async16(smem, gmem, !valid);
}
inline void cp_async_commit() { simt::cp_async_commit(); }
template <int N>
void cp_async_wait() { simt::cp_async_wait(N); }
#endif

// ---------------------------------------------------------------- ldmatrix
// ldmatrix<N, Trans>: N (1, 2, 4) 8x8 matrices of 16-bit elements from shared memory.
// Lanes 8j..8j+7 give the addresses of matrix j's rows (16 bytes each, 16-byte aligned);
// lane l receives in r[j] the pair at row l/4, columns 2(l%4), 2(l%4)+1 of matrix j (of
// its transpose with Trans), the lower column in the low half.

#if !SK_EMULATED
template <int N, bool Trans>
SK_DEVICE void ldmatrix(uint32_t (&r)[N], const void* row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (N == 1 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  } else if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  } else if constexpr (N == 2 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  } else if constexpr (!Trans) {
    static_assert(N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  } else {
    static_assert(N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  }
}
#else
namespace emulated {
template <int N, bool Trans>
void ldmatrix_compute(const void* const* ins, void* const* outs, unsigned) {
  uint16_t m[N][8][8];  // matrix, row, column
  for (int j = 0; j < N; ++j) {
    for (int row = 0; row < 8; ++row) {
      const void* addr = *static_cast<const void* const*>(ins[8 * j + row]);
      simt::check_aligned16(addr, "ldmatrix row address");
      simt::check_shared(addr, 16, "ldmatrix row address");
      std::memcpy(m[j][row], addr, 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t* r = static_cast<uint32_t*>(outs[l]);
    const int row = l / 4, col = 2 * (l % 4);
    for (int j = 0; j < N; ++j) {
      const uint16_t lo = Trans ? m[j][col][row] : m[j][row][col];
      const uint16_t hi = Trans ? m[j][col + 1][row] : m[j][row][col + 1];
      r[j] = uint32_t(lo) | uint32_t(hi) << 16;
    }
  }
}
}  // namespace emulated

template <int N, bool Trans>
void ldmatrix(uint32_t (&r)[N], const void* row, Site site = Site::current()) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  simt::warp_collective(Trans ? "ldmatrix.trans" : "ldmatrix", kFullMask, &row, r,
                        emulated::ldmatrix_compute<N, Trans>, site.file_name(), int(site.line()));
}
#endif

// ---------------------------------------------------------------- mma.sync m16n8k16
// D = A * B + C with A 16x16 (row), B 16x8 (col) of T (__half or __nv_bfloat16) and C/D
// 16x8 float. With g = lane/4 and t = lane%4 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"): a[0] holds A[g][2t..2t+1], a[1] A[g+8][2t..], a[2] A[g][2t+8..],
// a[3] A[g+8][2t+8..]; b[0] holds B[2t..2t+1][g], b[1] B[2t+8..2t+9][g]; c/d[0..1] are
// C[g][2t..2t+1] and c/d[2..3] C[g+8][2t..2t+1].

#if !SK_EMULATED
template <typename T>
SK_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_16816 takes __half or __nv_bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
}
#else
namespace emulated {
struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};
template <typename T>
void mma_compute(const void* const* ins, void* const* outs, unsigned) {
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaIn& in = *static_cast<const MmaIn*>(ins[l]);
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 2; ++i) {
      A[g][2 * t + i] = unpack<T>(in.a[0], i);
      A[g + 8][2 * t + i] = unpack<T>(in.a[1], i);
      A[g][2 * t + 8 + i] = unpack<T>(in.a[2], i);
      A[g + 8][2 * t + 8 + i] = unpack<T>(in.a[3], i);
      B[2 * t + i][g] = unpack<T>(in.b[0], i);
      B[2 * t + 8 + i][g] = unpack<T>(in.b[1], i);
      C[g][2 * t + i] = in.c[i];
      C[g + 8][2 * t + i] = in.c[2 + i];
    }
  }
  for (int l = 0; l < 32; ++l) {
    float* d = static_cast<float*>(outs[l]);
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
      float acc = 0.f;  // products of 16-bit values are exact in float
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[e] = acc + C[row][col];
    }
  }
}
}  // namespace emulated

template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
               const float (&c)[4], Site site = Site::current()) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "mma_16816 takes __half or __nv_bfloat16");
  emulated::MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  float out[4];
  simt::warp_collective(std::is_same_v<T, __half> ? "mma.f16" : "mma.bf16", kFullMask, &in,
                        out, emulated::mma_compute<T>, site.file_name(), int(site.line()));
  std::memcpy(d, out, sizeof out);
}
#endif

}  // namespace sarkernels::kernels
