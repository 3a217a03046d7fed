// Kernels that test the SIMT executor and the emulated primitives, written like the real
// kernels (they compile with nvcc too): probes of single primitives whose results the
// Python tests check against the PTX ISA's tables, a warp GEMM checked against
// torch.matmul, and kernels with planted bugs the executor must catch.
#pragma once
#include <cstdint>

#include "kernels/launch.cuh"
#include "kernels/primitives.cuh"

namespace sarkernels::kernels::selftest {

// ---------------------------------------------------------------- primitive probes

// One warp: lane l passes registers a[4l..], b[2l..], c[4l..] to mma.sync and stores d.
template <typename T>
__global__ void mma_probe(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int l = lane_id();
  const uint32_t ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
  const uint32_t rb[2] = {b[2 * l], b[2 * l + 1]};
  const float rc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  float rd[4];
  mma_16816<T>(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = rd[i];
}

// One warp: `rows` (16 bytes each) are copied to shared memory; lane l gives the address of
// row lane_row[l] to ldmatrix and stores what it receives in out[N l + j].
template <int N, bool Trans>
__global__ void ldmatrix_probe(const uint16_t* rows, int nrows, const int* lane_row,
                               uint32_t* out) {
  SK_DYNAMIC_SMEM(smem);
  const int l = lane_id();
  for (int i = l; i < nrows; i += 32) store16(smem + 16 * i, load16(rows + 8 * i));
  sync_threads();
  uint32_t r[N];
  ldmatrix<N, Trans>(r, smem + 16 * lane_row[l]);
  for (int j = 0; j < N; ++j) out[N * l + j] = r[j];
}
inline LaunchPlan ldmatrix_probe_plan(int nrows) {
  return {dim3(1), dim3(32), size_t(16) * nrows};
}

// Per thread of x (any number of whole warps): shuffles, votes, a butterfly sum and a
// shuffle under two disjoint half-warp masks, 7 ints per thread.
__global__ void warp_votes(const int* x, int* out) {
  const int t = blockIdx.x * blockDim.x + thread_rank(), l = lane_id();
  const int v = x[t];
  int* o = out + 7 * t;
  o[0] = shfl(v, (7 * l + 3) % 32);
  o[1] = shfl_xor(v, 5);
  o[2] = int(ballot(v > 0));
  o[3] = vote_any(v > 100);
  o[4] = vote_all(v > -100);
  int s = v;
  for (int m = 16; m > 0; m /= 2) s += shfl_xor(s, m);
  o[5] = s;
  o[6] = shfl(v, l ^ 3, l < 16 ? 0x0000ffffu : 0xffff0000u);
}

// A ballot where the block's last warp uses `tail_mask` (the others the full mask).
__global__ void tail_ballot(const int* x, int* out, unsigned tail_mask) {
  const int t = thread_rank();
  const bool tail = warp_id() == int(blockDim.x - 1) / 32;
  out[t] = int(ballot(x[t] > 0, tail ? tail_mask : kFullMask));
}

__global__ void atomic_count(int* counter) { atomic_add(counter, 1); }

// One warp; lane l owns shared slots k = 0..4 (4 floats each) and snapshots all of them
// into out[i][l][k] after each step: groups {slot 0, slot 4 zero-filled}, {1}, {2} are
// committed, slot 3's copy is issued uncommitted, then wait_group 2, 1, 0, and slot 3 is
// committed and waited for.
__global__ void cp_async_groups(const float* src, float* out) {
  SK_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  const int l = lane_id();
  auto slot = [&](int k) { return s + (32 * k + l) * 4; };
  auto snapshot = [&](int i) {
    for (int k = 0; k < 5; ++k) {
      for (int e = 0; e < 4; ++e) out[((32 * i + l) * 5 + k) * 4 + e] = slot(k)[e];
    }
  };
  cp_async16(slot(0), src + (32 * 0 + l) * 4);
  cp_async16(slot(4), src + 1, false);  // zero fill: the (misaligned) source is never read
  cp_async_commit();
  cp_async16(slot(1), src + (32 * 1 + l) * 4);
  cp_async_commit();
  cp_async16(slot(2), src + (32 * 2 + l) * 4);
  cp_async_commit();
  cp_async16(slot(3), src + (32 * 3 + l) * 4);
  snapshot(0);
  cp_async_wait<2>();
  snapshot(1);
  cp_async_wait<1>();
  snapshot(2);
  cp_async_wait<0>();
  snapshot(3);
  cp_async_commit();
  cp_async_wait<0>();
  snapshot(4);
}
inline LaunchPlan cp_async_groups_plan() { return {dim3(1), dim3(32), 5 * 32 * 16}; }

// The bytes of shared memory nobody wrote.
__global__ void read_unwritten_shared(unsigned char* out, int bytes) {
  SK_DYNAMIC_SMEM(smem);
  for (int i = thread_rank(); i < bytes; i += blockDim.x) out[i] = smem[i];
}

// Threads exchange values through shared memory; the barrier is optional so that tests
// can plant a missing one.
__global__ void shared_exchange(const float* x, float* out, bool barrier) {
  SK_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  const int t = thread_rank(), n = blockDim.x;
  s[t] = x[t];
  if (barrier) sync_threads();
  out[t] = s[(t + n / 2) % n];
}

__global__ void sync_warp_loop(int iters) {
  for (int i = 0; i < iters; ++i) sync_warp();
}

// ---------------------------------------------------------------- a warp GEMM

// One warp: D (16x8, float) = A (16x16, row-major) B (16x8, stored k-major: row k holds
// B[k][0..7]), staged in shared memory by cp.async and loaded by ldmatrix.
template <typename T>
__global__ void mma_tile(const T* a, const T* b, float* d) {
  SK_DYNAMIC_SMEM(smem);
  T* as = reinterpret_cast<T*>(smem);
  T* bs = as + 16 * 16;
  const int l = lane_id();
  cp_async16(as + 8 * l, a + 8 * l);  // 32 chunks of 8: two per row of A
  if (l < 16) cp_async16(bs + 8 * l, b + 8 * l);
  cp_async_commit();
  cp_async_wait<0>();
  sync_warp();
  uint32_t ra[4], rb[2];
  const int j = l / 8, r = l % 8;  // lanes 8j..8j+7 address the rows of matrix j
  ldmatrix<4, false>(ra, as + (r + 8 * (j & 1)) * 16 + 8 * (j >> 1));
  ldmatrix<2, true>(rb, bs + (l % 16) * 8);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma_16816<T>(acc, ra, rb, acc);
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 2; ++i) {
    d[g * 8 + 2 * t + i] = acc[i];
    d[(g + 8) * 8 + 2 * t + i] = acc[2 + i];
  }
}
inline LaunchPlan mma_tile_plan() { return {dim3(1), dim3(32), (16 * 16 + 16 * 8) * 2}; }

// C (MxN, float) = A (MxK) B (KxN), all row-major; M, N multiples of 64, K of 32. A block
// of 4 warps computes a 64x64 tile, each warp 16 rows; K advances in steps of 32 through
// two shared-memory stages filled by cp.async one step ahead.
constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 32, kGemmThreads = 128;

template <typename T>
__global__ void gemm(const T* a, const T* b, float* c, int M, int N, int K) {
  SK_DYNAMIC_SMEM(smem);
  constexpr int BM = kGemmBM, BN = kGemmBN, BK = kGemmBK;
  T* as = reinterpret_cast<T*>(smem);  // [2][BM][BK]
  T* bs = as + 2 * BM * BK;            // [2][BK][BN]
  const int tid = thread_rank(), warp = warp_id(), l = lane_id();
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  auto load = [&](int stage, int k0) {
    for (int i = tid; i < BM * BK / 8; i += kGemmThreads) {
      const int r = i / (BK / 8), col = i % (BK / 8) * 8;
      cp_async16(as + (stage * BM + r) * BK + col, a + size_t(m0 + r) * K + k0 + col);
    }
    for (int i = tid; i < BK * BN / 8; i += kGemmThreads) {
      const int r = i / (BN / 8), col = i % (BN / 8) * 8;
      cp_async16(bs + (stage * BK + r) * BN + col, b + size_t(k0 + r) * N + n0 + col);
    }
    cp_async_commit();
  };
  float acc[8][4] = {};
  const int steps = K / BK;
  load(0, 0);
  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) {
      load((step + 1) % 2, (step + 1) * BK);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    sync_threads();
    const T* at = as + (step % 2) * BM * BK;
    const T* bt = bs + (step % 2) * BK * BN;
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t ra[4];
      const int j = l / 8, r = l % 8;
      ldmatrix<4, false>(ra, at + (warp * 16 + r + 8 * (j & 1)) * BK + kk + 8 * (j >> 1));
      for (int nt = 0; nt < BN / 8; ++nt) {
        uint32_t rb[2];
        ldmatrix<2, true>(rb, bt + (kk + l % 16) * BN + nt * 8);
        mma_16816<T>(acc[nt], ra, rb, acc[nt]);
      }
    }
    sync_threads();  // the next step's load overwrites this stage
  }
  const int g = l / 4, t = l % 4;
  float* c0 = c + size_t(m0 + warp * 16 + g) * N + n0;
  for (int nt = 0; nt < BN / 8; ++nt) {
    for (int i = 0; i < 2; ++i) {
      c0[nt * 8 + 2 * t + i] = acc[nt][i];
      c0[size_t(8) * N + nt * 8 + 2 * t + i] = acc[nt][2 + i];
    }
  }
}
inline LaunchPlan gemm_plan(int M, int N) {
  return {dim3(N / kGemmBN, M / kGemmBM), dim3(kGemmThreads),
          2 * (kGemmBM * kGemmBK + kGemmBK * kGemmBN) * 2};
}

// ---------------------------------------------------------------- planted bugs

// Writes t[0..n] of an n-element tensor: one element past its end.
__global__ void oob_write(float* t, int n) {
  const int i = blockIdx.x * blockDim.x + thread_rank();
  if (i <= n) t[i] = 1.0f;
}
inline LaunchPlan oob_write_plan(int n) { return {dim3((n + 1 + 63) / 64), dim3(64), 0}; }

// Writes one float past the 32 the launch gives (ASan sees it in the arena's redzone).
__global__ void shared_overflow(float* out) {
  SK_DYNAMIC_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  const int t = thread_rank();
  s[t + 1] = 1.0f;
  sync_threads();
  out[t] = s[t];
}

// Warp 1 skips the first barrier.
__global__ void divergent_barrier(int* out) {
  const int t = thread_rank();
  if (t < 32) sync_threads();
  sync_threads();
  out[t] = t;
}

// Only lanes 0-15 reach a full-mask shuffle; the others return or wait at a barrier.
__global__ void partial_shuffle(int* out, bool others_wait_at_barrier) {
  const int l = lane_id();
  if (l < 16) {
    out[l] = shfl(l, 15 - l);
  } else if (others_wait_at_barrier) {
    sync_threads();
  }
}

// Lanes of one warp call different collectives with the same mask.
__global__ void mixed_collectives(int* out) {
  const int l = lane_id();
  out[l] = l < 16 ? shfl(l, 0) : int(ballot(l > 20));
}

// A 16-byte load 4 bytes off alignment.
__global__ void misaligned16(const float* x, float* out) { store16(out, load16(x + 1)); }

// Recurses with 4 KiB frames until the fiber's stack runs out.
__device__ inline int recurse(int depth) {
  volatile char frame[4096];
  frame[depth % 4096] = char(depth);
  return depth <= 0 ? 0 : recurse(depth - 1) + frame[depth % 4096];
}
__global__ void stack_overflow(int* out) { out[thread_rank()] = recurse(1 << 20); }

// ldmatrix given global memory instead of shared memory.
__global__ void ldmatrix_from_global(const uint16_t* rows) {
  uint32_t r[1];
  ldmatrix<1, false>(r, rows + 8 * (lane_id() % 8));
}

}  // namespace sarkernels::kernels::selftest
