// Split-KV ("flash-decoding") set attention for a few queries over a long KV cache,
// torch-free. Grid: (split, batch * kv head, row chunk). A block holds the queries of all
// q heads that share its kv head (GQA packing), streams its key range through shared
// memory in tiles of 32, and keeps an online softmax per query row (one warp per row,
// one key per lane). A second kernel combines the splits by their lse.
// Compile-checked in CI; not yet registered as the op's CUDA kernel (see issue 4).
#include <cstdint>

#include "cuda/convert.cuh"
#include "sarkernels/mask.h"
#include "sarkernels/params.h"

namespace sarkernels::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kKeyTile = 32;
// Query rows (Lq x group) per block: 32, or 16 above head dim 64 to stay in 48 KB of
// static shared memory and keep the accumulators in registers.
template <int D>
__host__ __device__ constexpr int max_rows() {
  return D > 64 ? 16 : 32;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(SetAttentionParams p,
                                                                DecodeWorkspace w) {
  constexpr int kPerLane = (D + 31) / 32;
  constexpr int kMaxRows = max_rows<D>(), kRowsPerWarp = kMaxRows / kWarps;
  __shared__ float q_s[kMaxRows][D];
  __shared__ float k_s[kKeyTile][D + 1];  // +1: lanes read different keys without conflicts
  __shared__ float v_s[kKeyTile][D];
  __shared__ int64_t q_set[kMaxRows];
  __shared__ int64_t k_set[kKeyTile];

  const int split = blockIdx.x;
  const int64_t b = blockIdx.y / p.heads_kv, hk = blockIdx.y % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t rows = p.len_q * group, r0 = int64_t(blockIdx.z) * kMaxRows;
  const int n_rows = static_cast<int>(rows - r0 < kMaxRows ? rows - r0 : kMaxRows);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto head_of = [&](int64_t r) { return hk * group + r / p.len_q; };
  auto query_of = [&](int64_t r) { return r % p.len_q; };

  for (int idx = threadIdx.x; idx < n_rows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride +
                 head_of(r0 + r) * p.q_head_stride + query_of(r0 + r) * p.q_row_stride;
    q_s[r][d] = to_float(q[d]) * static_cast<float>(p.scale);
  }
  for (int r = threadIdx.x; r < n_rows; r += kThreads) {
    q_set[r] = p.q_sets[b * p.len_q + query_of(r0 + r)];
  }

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) acc[i][c] = 0.f;
  }
  const int64_t k_begin = split * w.split_len;
  const int64_t k_end = k_begin + w.split_len < p.len_k ? k_begin + w.split_len : p.len_k;
  const T* k_head = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  for (int64_t kt = k_begin; kt < k_end; kt += kKeyTile) {
    const int n_keys = static_cast<int>(k_end - kt < kKeyTile ? k_end - kt : kKeyTile);
    __syncthreads();  // the previous tile is consumed (and q_s is complete on the first)
    for (int idx = threadIdx.x; idx < kKeyTile * D; idx += kThreads) {
      const int j = idx / D, d = idx % D;
      const bool in = j < n_keys;
      k_s[j][d] = in ? to_float(k_head[(kt + j) * p.k_row_stride + d]) : 0.f;
      v_s[j][d] = in ? to_float(v_head[(kt + j) * p.v_row_stride + d]) : 0.f;
    }
    for (int j = threadIdx.x; j < kKeyTile; j += kThreads) {
      k_set[j] = j < n_keys ? p.k_sets[b * p.len_k + kt + j] : 0;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + i * kWarps;  // warp-uniform, so the shuffles below stay convergent
      float s = -INFINITY;
      if (r < n_rows && lane < n_keys && visible(q_set[r], k_set[lane], p.strict)) {
        s = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) s += q_s[r][d] * k_s[lane][d];
      }
      const float m_new = fmaxf(m[i], warp_max(s));
      if (m_new == -INFINITY) continue;  // nothing visible yet for this row
      const float prob = s == -INFINITY ? 0.f : __expf(s - m_new);
      const float corr = m[i] == -INFINITY ? 0.f : __expf(m[i] - m_new);
      l[i] = l[i] * corr + warp_sum(prob);
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) acc[i][c] *= corr;
      for (int j = 0; j < n_keys; ++j) {
        const float pj = __shfl_sync(0xffffffffu, prob, j);
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
          const int d = lane + 32 * c;
          if (d < D) acc[i][c] += pj * v_s[j][d];
        }
      }
      m[i] = m_new;
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp + i * kWarps;
    if (r >= n_rows) continue;
    const int64_t h = head_of(r0 + r), qi = query_of(r0 + r);
    const int64_t row = ((split * p.batch + b) * p.heads_q + h) * p.len_q + qi;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < D) w.out[row * D + d] = acc[i][c] * inv;
    }
    if (lane == 0) w.lse[row] = l[i] > 0.f ? m[i] + __logf(l[i]) : -INFINITY;
  }
}

// One block per (batch, q head, query): weights the splits by exp(lse_s - max lse).
template <typename T, int D>
__global__ void decode_combine_kernel(SetAttentionParams p, DecodeWorkspace w) {
  const int64_t qi = blockIdx.x % p.len_q, h = blockIdx.x / p.len_q % p.heads_q;
  const int64_t b = blockIdx.x / (p.len_q * p.heads_q);
  const int64_t split_stride = p.batch * p.heads_q * p.len_q;
  const int64_t row = (b * p.heads_q + h) * p.len_q + qi;
  float m = -INFINITY;
  for (int s = 0; s < w.num_splits; ++s) m = fmaxf(m, w.lse[s * split_stride + row]);
  float denom = 0.f;
  for (int s = 0; s < w.num_splits; ++s) {
    denom += m == -INFINITY ? 0.f : __expf(w.lse[s * split_stride + row] - m);
  }
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
           qi * p.out_row_stride;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float x = 0.f;
    for (int s = 0; s < w.num_splits && denom > 0.f; ++s) {
      x += __expf(w.lse[s * split_stride + row] - m) * w.out[(s * split_stride + row) * D + d];
    }
    out[d] = from_float<T>(denom > 0.f ? x / denom : 0.f);
  }
  if (threadIdx.x == 0) {
    float* lse = static_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride + qi;
    *lse = denom > 0.f ? m + __logf(denom) : -INFINITY;
  }
}

template <typename T, int D>
void launch(const SetAttentionParams& p, const DecodeWorkspace& w, cudaStream_t stream) {
  const int64_t rows = p.len_q * (p.heads_q / p.heads_kv);
  const dim3 grid(w.num_splits, p.batch * p.heads_kv, (rows + max_rows<D>() - 1) / max_rows<D>());
  decode_split_kernel<T, D><<<grid, kThreads, 0, stream>>>(p, w);
  decode_combine_kernel<T, D><<<p.batch * p.heads_q * p.len_q, D < 128 ? D : 128, 0, stream>>>(p, w);
}

// dtype: 0 float, 1 half, 2 bfloat16; head_dim one of 32, 64, 96, 128 (returns false
// otherwise). lse is float32. Workspace holds num_splits * B * Hq * Lq rows.
bool set_attention_decode(const SetAttentionParams& p, const DecodeWorkspace& w, int dtype,
                          cudaStream_t stream) {
  if (p.batch * p.heads_q * p.len_q == 0) return true;
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (p.head_dim) {
      case 32: launch<T, 32>(p, w, stream); return true;
      case 64: launch<T, 64>(p, w, stream); return true;
      case 96: launch<T, 96>(p, w, stream); return true;
      case 128: launch<T, 128>(p, w, stream); return true;
      default: return false;
    }
  };
  switch (dtype) {
    case 0: return by_dim(float{});
    case 1: return by_dim(__half{});
    case 2: return by_dim(__nv_bfloat16{});
    default: return false;
  }
}

}  // namespace sarkernels::cuda
