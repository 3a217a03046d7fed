// Split-KV ("flash-decoding") set attention, used for every forward shape until the
// training kernel lands. Grid: (batch * kv head, query-row chunk, split). A block holds the
// query rows of all q heads sharing its kv head (GQA packing), streams its key range
// through shared memory in tiles of 32 keys, and keeps an online softmax per query row (one
// warp per row, one key per lane). A second kernel combines the splits by their lse.
//
// Head dims: multiples of 8 up to 256, each run by the smallest compiled maximum (64, 128,
// 256) that holds it. Computes in acc_t<T> (float, or double for float64).
// Empty rows: a row is empty iff no key is visible (l == 0 exactly): zeros and lse -inf.
// A NaN score is never mistaken for "empty": it propagates to out and lse. A key whose
// value row holds a NaN/inf scores NaN for the rows that see it and has its value row
// zeroed, so rows that do not see it never meet it as 0 * NaN (the reference's rule).
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/convert.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/launch.cuh"
#include "kernels/primitives.cuh"
#include "sarkernels/mask.h"
#include "sarkernels/params.h"

namespace sarkernels::kernels {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kKeyTile = 32;  // one key per lane
// Splits are sized so that about this many blocks run (two waves of a 132-SM GPU), with at
// least kMinSplitKeys keys each. A constant, not the device's SM count: the plan (and so
// the summation order) is the same on every GPU and under the SIMT executor.
constexpr int64_t kDecodeTargetBlocks = 264;
constexpr int64_t kMinSplitKeys = 64;
constexpr int kMaxSplits = 64;

// Query rows per block for a compiled head-dim maximum: the accumulators stay at 16
// registers per lane, and shared memory under 160 KB for float64 at D = 256.
SK_HOST_DEVICE constexpr int decode_rows(int d_max) { return d_max <= 64 ? 32 : d_max <= 128 ? 16 : 8; }

inline int decode_dmax(int64_t head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256; }

SK_DEVICE float acc_exp(float x) { return expf(x); }
SK_DEVICE double acc_exp(double x) { return exp(x); }
SK_DEVICE float acc_log(float x) { return logf(x); }
SK_DEVICE double acc_log(double x) { return log(x); }

// max that keeps a NaN (fmax would drop it and hide a NaN score).
template <typename A>
SK_DEVICE A nan_max(A a, A b) {
  return a > b || a != a ? a : b;
}

template <typename A>
SK_DEVICE bool is_finite(A x) {
  return x - x == A(0);  // NaN for inf and NaN
}

template <typename A>
SK_DEVICE A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, shfl_xor(x, o));
  return x;
}
template <typename A>
SK_DEVICE A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += shfl_xor(x, o);
  return x;
}

// The split kernel's shared memory, carved from the dynamic buffer (int64 ids first, so
// every array stays aligned for its type).
template <typename A>
struct DecodeSmem {
  int64_t* q_set;  // [rows]
  int64_t* k_set;  // [kKeyTile]
  int* v_bad;      // [kKeyTile]: the key's value row holds a NaN or inf
  A* q;            // [rows][D], pre-scaled
  A* k;            // [kKeyTile][D + 1]: +1 so lanes reading different keys avoid bank conflicts
  A* v;            // [kKeyTile][D]
  A* prob;         // [kDecodeWarps][kKeyTile]: each warp's probabilities of the current row

  SK_DEVICE DecodeSmem(unsigned char* base, int rows, int64_t d)
      : q_set(reinterpret_cast<int64_t*>(base)),
        k_set(q_set + rows),
        v_bad(reinterpret_cast<int*>(k_set + kKeyTile)),
        q(reinterpret_cast<A*>(k_set + 2 * kKeyTile)),
        k(q + rows * d),
        v(k + kKeyTile * (d + 1)),
        prob(v + kKeyTile * d) {}

  static size_t bytes(int rows, int64_t d) {
    return sizeof(int64_t) * (rows + 2 * kKeyTile) +
           sizeof(A) * (rows * d + kKeyTile * (2 * d + 1) + kDecodeWarps * kKeyTile);
  }
};

template <typename T, int DMax>
__global__ void __launch_bounds__(kDecodeThreads, 1) decode_split_kernel(SetAttentionParams p,
                                                                      DecodeWorkspace w) {
  using A = acc_t<T>;
  constexpr int kRows = decode_rows(DMax), kRowsPerWarp = kRows / kDecodeWarps;
  constexpr int kPerLane = DMax / 32;
  const int64_t D = p.head_dim;
  SK_DYNAMIC_SMEM(smem_bytes);
  const DecodeSmem<A> sm(smem_bytes, kRows, D);

  const int64_t b = blockIdx.x / p.heads_kv, hk = blockIdx.x % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t rows = p.len_q * group, r0 = int64_t(blockIdx.y) * kRows;
  const int n_rows = static_cast<int>(rows - r0 < kRows ? rows - r0 : kRows);
  const int64_t split = blockIdx.z;
  const int tid = thread_rank(), warp = warp_id(), lane = lane_id();
  auto head_of = [&](int64_t r) { return hk * group + r / p.len_q; };
  auto query_of = [&](int64_t r) { return r % p.len_q; };

  for (int64_t idx = tid; idx < n_rows * D; idx += kDecodeThreads) {
    const int64_t r = idx / D, d = idx % D;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride +
                 head_of(r0 + r) * p.q_head_stride + query_of(r0 + r) * p.q_row_stride;
    sm.q[r * D + d] = A(to_float(q[d])) * static_cast<A>(p.scale);
  }
  for (int r = tid; r < n_rows; r += kDecodeThreads) {
    sm.q_set[r] = p.q_sets[b * p.len_q + query_of(r0 + r)];
  }

  A m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
  SK_UNROLL
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -A(INFINITY);
    l[i] = 0;
    SK_UNROLL
    for (int c = 0; c < kPerLane; ++c) acc[i][c] = 0;
  }
  const int64_t k_begin = split * w.split_len;
  const int64_t k_end = k_begin + w.split_len < p.len_k ? k_begin + w.split_len : p.len_k;
  const T* k_head = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  for (int64_t kt = k_begin; kt < k_end; kt += kKeyTile) {
    const int n_keys = static_cast<int>(k_end - kt < kKeyTile ? k_end - kt : kKeyTile);
    sync_threads();  // the previous tile is consumed (and the queries are in, on the first)
    for (int64_t idx = tid; idx < kKeyTile * D; idx += kDecodeThreads) {
      const int64_t j = idx / D, d = idx % D;
      const bool in = j < n_keys;
      sm.k[j * (D + 1) + d] = in ? A(to_float(k_head[(kt + j) * p.k_row_stride + d])) : A(0);
      sm.v[j * D + d] = in ? A(to_float(v_head[(kt + j) * p.v_row_stride + d])) : A(0);
    }
    for (int j = tid; j < kKeyTile; j += kDecodeThreads) {
      sm.k_set[j] = j < n_keys ? p.k_sets[b * p.len_k + kt + j] : 0;
    }
    sync_threads();
    if (warp == 0) {  // lane j scrubs key j's value row
      bool bad = false;
      for (int64_t d = 0; d < D; ++d) bad = bad || !is_finite(sm.v[lane * D + d]);
      if (bad) {
        for (int64_t d = 0; d < D; ++d) sm.v[lane * D + d] = A(0);
      }
      sm.v_bad[lane] = bad;
    }
    sync_threads();
    A* prob_s = sm.prob + warp * kKeyTile;
    SK_UNROLL
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + i * kDecodeWarps;  // warp-uniform: the collectives below converge
      A s = -A(INFINITY);
      if (r < n_rows && lane < n_keys && visible(sm.q_set[r], sm.k_set[lane], p.strict)) {
        s = 0;
        for (int64_t d = 0; d < D; ++d) s += sm.q[r * D + d] * sm.k[lane * (D + 1) + d];
        if (sm.v_bad[lane]) s = A(NAN);
      }
      const A m_new = nan_max(m[i], warp_max(s));
      if (m_new == -A(INFINITY)) continue;  // nothing visible to this row yet
      const A prob = s == -A(INFINITY) ? A(0) : acc_exp(s - m_new);
      const A corr = m[i] == -A(INFINITY) ? A(0) : acc_exp(m[i] - m_new);
      l[i] = l[i] * corr + warp_sum(prob);
      prob_s[lane] = prob;
      sync_warp();
      SK_UNROLL
      for (int c = 0; c < kPerLane; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) {
          A a = acc[i][c] * corr;
          for (int j = 0; j < n_keys; ++j) a += prob_s[j] * sm.v[j * D + d];
          acc[i][c] = a;
        }
      }
      sync_warp();  // prob_s is read by every lane before the next row overwrites it
      m[i] = m_new;
    }
  }

  const int64_t split_rows = p.batch * p.heads_q * p.len_q;
  A* w_out = static_cast<A*>(w.out);
  A* w_lse = static_cast<A*>(w.lse);
  SK_UNROLL
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp + i * kDecodeWarps;
    if (r >= n_rows) continue;
    const int64_t row = split * split_rows + (b * p.heads_q + head_of(r0 + r)) * p.len_q +
                        query_of(r0 + r);
    const bool empty = l[i] == 0;
    SK_UNROLL
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) w_out[row * D + d] = empty ? A(0) : acc[i][c] / l[i];
    }
    if (lane == 0) w_lse[row] = empty ? -A(INFINITY) : m[i] + acc_log(l[i]);
  }
}

template <typename T, int DMax>
LaunchPlan decode_split_plan(const SetAttentionParams& p, const DecodeWorkspace& w) {
  constexpr int kRows = decode_rows(DMax);
  const int64_t chunks = (p.len_q * (p.heads_q / p.heads_kv) + kRows - 1) / kRows;
  return {dim3(grid_dim("decode_split", p.batch * p.heads_kv, kMaxGridX),
               grid_dim("decode_split", chunks, kMaxGridYZ),
               grid_dim("decode_split", w.num_splits, kMaxGridYZ)),
          dim3(kDecodeThreads), DecodeSmem<acc_t<T>>::bytes(kRows, p.head_dim)};
}

// One block per (batch, q head, query): weights the splits by exp(lse_s - max lse).
template <typename T>
__global__ void decode_combine_kernel(SetAttentionParams p, DecodeWorkspace w) {
  using A = acc_t<T>;
  SK_DYNAMIC_SMEM(smem_bytes);
  A* weight = reinterpret_cast<A*>(smem_bytes);  // [num_splits]
  const int64_t qi = blockIdx.x % p.len_q, h = blockIdx.x / p.len_q % p.heads_q;
  const int64_t b = blockIdx.x / (p.len_q * p.heads_q);
  const int64_t split_rows = p.batch * p.heads_q * p.len_q;
  const int64_t row = (b * p.heads_q + h) * p.len_q + qi;
  const A* w_out = static_cast<const A*>(w.out);
  const A* w_lse = static_cast<const A*>(w.lse);
  A m = -A(INFINITY);
  for (int s = 0; s < w.num_splits; ++s) m = nan_max(m, w_lse[s * split_rows + row]);
  const bool empty = m == -A(INFINITY);  // every split empty: no visible key at all
  for (int s = thread_rank(); s < w.num_splits; s += blockDim.x) {
    weight[s] = empty ? A(0) : acc_exp(w_lse[s * split_rows + row] - m);
  }
  sync_threads();
  A denom = 0;
  for (int s = 0; s < w.num_splits; ++s) denom += weight[s];
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
           qi * p.out_row_stride;
  for (int64_t d = thread_rank(); d < p.head_dim; d += blockDim.x) {
    A x = 0;
    for (int s = 0; s < w.num_splits; ++s) x += weight[s] * w_out[(s * split_rows + row) * p.head_dim + d];
    out[d] = from_float<T>(empty ? A(0) : x / denom);
  }
  if (thread_rank() == 0) {
    A* lse = static_cast<A*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride + qi;
    *lse = empty ? -A(INFINITY) : m + acc_log(denom);
  }
}

template <typename T>
LaunchPlan decode_combine_plan(const SetAttentionParams& p, const DecodeWorkspace& w) {
  return {dim3(grid_dim("decode_combine", p.batch * p.heads_q * p.len_q, kMaxGridX)),
          dim3(block_threads(p.head_dim)), sizeof(acc_t<T>) * w.num_splits};
}

// The splits of the key range (workspace pointers left null): enough blocks to fill the
// GPU, never fewer than kMinSplitKeys keys per split.
inline DecodeWorkspace decode_splits(const SetAttentionParams& p) {
  const int rows = decode_rows(decode_dmax(p.head_dim));
  const int64_t chunks = (p.len_q * (p.heads_q / p.heads_kv) + rows - 1) / rows;
  const int64_t blocks = p.batch * p.heads_kv * chunks;
  int64_t splits = blocks > 0 ? (kDecodeTargetBlocks + blocks - 1) / blocks : 1;
  const int64_t by_keys = (p.len_k + kMinSplitKeys - 1) / kMinSplitKeys;
  splits = splits < by_keys ? splits : by_keys;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  splits = splits > 1 ? splits : 1;
  const int64_t per_split = (p.len_k + splits - 1) / splits;
  const int64_t split_len = per_split > 0 ? (per_split + kKeyTile - 1) / kKeyTile * kKeyTile : kKeyTile;
  const int64_t num_splits = p.len_k > 0 ? (p.len_k + split_len - 1) / split_len : 1;
  return {nullptr, nullptr, static_cast<int>(num_splits), split_len};
}

// Elements of acc_t the workspace needs: out then lse of every split.
inline int64_t decode_workspace_elems(const SetAttentionParams& p, const DecodeWorkspace& w) {
  return w.num_splits * p.batch * p.heads_q * p.len_q * (p.head_dim + 1);
}

template <typename T, int DMax>
void decode_launch(const SetAttentionParams& p, const DecodeWorkspace& w, cudaStream_t stream) {
  launch("decode_split", decode_split_plan<T, DMax>(p, w), stream, decode_split_kernel<T, DMax>,
         p, w);
  launch("decode_combine", decode_combine_plan<T>(p, w), stream, decode_combine_kernel<T>, p, w);
}

// out in dt with p's strides; lse contiguous-by-row in acc_t of dt; w from decode_splits
// with out/lse pointing at decode_workspace_elems elements of acc_t.
inline void set_attention_decode(const SetAttentionParams& p, const DecodeWorkspace& w, DType dt,
                                 cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (decode_dmax(p.head_dim)) {
      case 64: return decode_launch<T, 64>(p, w, stream);
      case 128: return decode_launch<T, 128>(p, w, stream);
      default: return decode_launch<T, 256>(p, w, stream);
    }
  });
}

}  // namespace sarkernels::kernels
