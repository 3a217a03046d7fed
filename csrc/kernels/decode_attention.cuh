// Split-KV ("flash-decoding") set attention, used for forward shapes of at most 16 queries
// (and for head dims the training kernel lacks). Grid: (batch * kv head, query-row chunk,
// split); a block holds the query rows of all q heads sharing its kv head (GQA packing)
// and streams its key range; a second kernel combines the splits by their lse.
//
// Two split kernels, one plan (decode_splits):
// * decode_mma_kernel, 16-bit inputs with 16-byte rows (head dim a multiple of 8, aligned
//   strides): 16 query rows per block on tensor cores. The block's 4 warps share the rows
//   and split the keys: warp w takes key tiles w, w + 4, ... of kKW keys, each warp with its
//   own double-buffered cp.async K/V stages (no block barrier in the loop), its own online
//   softmax (base 2, scale folded into one FFMA, ex2.approx, as the forward kernel), and the
//   four warps' states are merged in shared memory at the end, in warp order. So every warp
//   is busy however few the rows are (one query row: 15 of 16 MMA rows idle, which costs
//   nothing next to the loads).
// * decode_split_kernel, every other case: FP32/FP64 SIMT math, one warp per row.
//
// Head dims up to 256, each run by the smallest compiled maximum (64, 128, 256) that holds
// it. Computes in acc_t<T> (float, or double for float64).
// Empty rows: a row is empty iff no key is visible (l == 0 exactly): zeros and lse -inf.
// A NaN score is never mistaken for "empty": it propagates to out and lse. A key whose
// value row holds a NaN/inf scores NaN for the rows that see it and has its value row
// zeroed, so rows that do not see it never meet it as 0 * NaN (the reference's rule; the
// mma kernel looks for such values only in tiles some row does not see: where every row
// sees every key, the value reaches every row's accumulator, which the merge detects).
#pragma once
#include <cmath>
#include <cstdint>

#include "kernels/convert.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/launch.cuh"
#include "kernels/attention.h"
#include "kernels/attention_tiles.cuh"
#include "kernels/online_softmax.cuh"
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

// ---------------------------------------------------------------- the tensor-core kernel

namespace decode {
using namespace attention;

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kRows = 16;  // query rows per block: one mma slab, shared by the 4 warps

// Keys per warp per tile (a multiple of 16, the mma's k-step for P V): 32 up to head dim
// 64, 16 above (shared memory: 4 warps x 2 stages x K and V; registers at 256).
SK_HOST_DEVICE constexpr int kw_of(int d_max) { return d_max <= 64 ? 32 : 16; }

template <typename T, int D>
struct MmaLayout {
  static constexpr int kKW = kw_of(D), kLd = tile_ld<T, D>;
  static constexpr size_t kStage = tile_bytes<T, kKW, D>;  // one K or V stage of a warp
  // A warp's region: K stages, V stages; after the loop its o (16 x D float), m and l.
  static constexpr size_t kWarpBytes = 4 * kStage;
  static constexpr size_t kWarp0 = tile_bytes<T, kRows, D>;  // after the Q tile
  static constexpr size_t kBytes = kWarp0 + kWarps * kWarpBytes;
  static_assert(sizeof(float) * kRows * (D + 2) <= kWarpBytes, "the merge fits a warp's stages");
  static_assert(kBytes <= attention::kMaxSmem, "decode tiles exceed shared memory");
};

// A warp's cp.async copy of a Rows x Cols tile (rows `stride` apart) into a padded shared
// tile, the lane's offsets found once: each pass copies 32 / (Cols / 8) whole rows.
template <typename T, int Rows, int Cols>
class WarpCopy {
  static constexpr int kPer = 16 / int(sizeof(T)), kChunks = Cols / kPer;
  static constexpr int kStep = 32 / kChunks, kPasses = Rows / kStep;
  static_assert(32 % kChunks == 0 && Rows % kStep == 0, "passes of whole rows");
  static constexpr int kLd = tile_ld<T, Cols>;
  int64_t from_;
  int to_, row_;
  bool col_in_;

 public:
  SK_DEVICE WarpCopy(int64_t stride, int64_t cols)
      : from_(lane_id() / kChunks * stride + lane_id() % kChunks * kPer),
        to_(lane_id() / kChunks * kLd + lane_id() % kChunks * kPer),
        row_(lane_id() / kChunks),
        col_in_(lane_id() % kChunks * kPer < cols) {}

  // Every row and column: a fixed run of cp.async, pointers advanced by increments.
  SK_DEVICE void operator()(T* dst, const T* src, int64_t stride) const {
    const T* from = src + from_;
    const int64_t step = kStep * stride;
    SK_UNROLL for (int i = 0; i < kPasses; ++i) {
      cp_async16(dst + to_ + i * kStep * kLd, from);
      from += step;
    }
  }
  // Every row and column of rows Cols elements apart (stride == Cols, e.g. a contiguous
  // cache): the offsets are immediates.
  SK_DEVICE void dense(T* dst, const T* src) const {
    const T* from = src + from_;
    SK_UNROLL for (int i = 0; i < kPasses; ++i) {
      cp_async16(dst + to_ + i * kStep * kLd, from + i * kStep * Cols);
    }
  }
  // Rows from `rows` on and columns from `cols` (the constructor's) on zero-filled.
  SK_DEVICE void operator()(T* dst, const T* src, int64_t stride, int rows) const {
    const T* from = src + from_;
    const int64_t step = kStep * stride;
    SK_UNROLL for (int i = 0; i < kPasses; ++i) {
      const bool in = col_in_ && row_ + i * kStep < rows;
      cp_async16(dst + to_ + i * kStep * kLd, in ? from : src, in);
      from += step;
    }
  }
};

// One block per (batch * kv head, 16-row chunk, split); see the header comment.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_mma_kernel(SetAttentionParams p,
                                                            DecodeWorkspace w) {
  using Lay = MmaLayout<T, D>;
  constexpr int KW = Lay::kKW, kLd = Lay::kLd, kChunks = D * int(sizeof(T)) / 16;
  SK_DYNAMIC_SMEM(smem);
  T* const q_tile = reinterpret_cast<T*>(smem);
  unsigned char* const mine = smem + Lay::kWarp0 + warp_id() * Lay::kWarpBytes;
  T* const k_st = reinterpret_cast<T*>(mine);  // [2][KW][kLd]
  T* const v_st = k_st + 2 * KW * kLd;         // [2][KW][kLd]
  const int lane = lane_id(), warp = warp_id();

  // Below the grid's limits: 32-bit block coordinates.
  const int b = int(blockIdx.x / p.heads_kv), hk = int(blockIdx.x % p.heads_kv);
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t r0 = int64_t(blockIdx.y) * kRows;
  const int n_rows = clamp_rows(p.len_q * group - r0, kRows);
  const int split = int(blockIdx.z);
  // Lane r % 16 of every warp finds row r's head and query (the only 64-bit divisions).
  const int qr = lane % kRows;
  const int64_t q_head = hk * group + (r0 + qr) / p.len_q, q_query = (r0 + qr) % p.len_q;

  // Q (raw; the scale goes into the exponent), rows past n_rows and columns past the head
  // dim zero-filled; a warp's chunks of a pass lie in one row (kChunks >= 8), whose
  // offset comes from the lane that holds it.
  const int64_t q_off = int64_t(b) * p.q_batch_stride + q_head * p.q_head_stride +
                        q_query * p.q_row_stride;
  static_assert(kRows * kChunks % kThreads == 0, "whole passes over the Q tile");
  SK_UNROLL for (int j = 0; j < kRows * kChunks / kThreads; ++j) {
    const int i = thread_rank() + j * kThreads;
    const int r = i / kChunks, c = i % kChunks * (16 / int(sizeof(T)));
    const int64_t off = shfl(q_off, r);
    const bool in = r < n_rows && c < p.head_dim;
    const T* q = static_cast<const T*>(p.q);
    cp_async16(q_tile + r * kLd + c, in ? q + off + c : q, in);
  }
  cp_async_commit();

  // Set ids: lane r % 16 holds row r's (INT64_MIN past n_rows: it sees nothing); the
  // warp's range over the valid rows, and this lane's fragment rows g and g + 8.
  const int64_t q_id = qr < n_rows ? p.q_sets[int64_t(b) * p.len_q + q_query] : INT64_MIN;
  int64_t q_lo = qr < n_rows ? q_id : INT64_MAX, q_hi = q_id;
  SK_UNROLL for (int o = 8; o > 0; o >>= 1) {
    const int64_t lo = shfl_xor(q_lo, o), hi = shfl_xor(q_hi, o);
    q_lo = lo < q_lo ? lo : q_lo;
    q_hi = hi > q_hi ? hi : q_hi;
  }
  const int64_t row_id[2] = {shfl(q_id, frag_row(0)), shfl(q_id, frag_row(2))};

  // This warp's key tiles: keys k_begin + (warp + kWarps i) KW + [0, KW) below k_end.
  const int64_t k_begin = int64_t(split) * w.split_len;
  const int64_t k_end = k_begin + w.split_len < p.len_k ? k_begin + w.split_len : p.len_k;
  const int split_keys = int(k_end - k_begin);  // <= split_len
  const int tiles = (split_keys + KW - 1) / KW;
  const int n_mine = tiles > warp ? (tiles - warp + kWarps - 1) / kWarps : 0;
  const int64_t first = k_begin + warp * KW;
  const T* k_from = static_cast<const T*>(p.k) + int64_t(b) * p.k_batch_stride +
                    hk * p.k_head_stride + first * p.k_row_stride;
  const T* v_from = static_cast<const T*>(p.v) + int64_t(b) * p.v_batch_stride +
                    hk * p.v_head_stride + first * p.v_row_stride;
  const int64_t* id_from = p.k_sets + int64_t(b) * p.len_k + first + lane % KW;
  const int64_t k_adv = int64_t(kWarps * KW) * p.k_row_stride;
  const int64_t v_adv = int64_t(kWarps * KW) * p.v_row_stride;
  const bool whole_cols = p.head_dim == D;
  const bool dense = whole_cols && p.k_row_stride == D && p.v_row_stride == D;
  const WarpCopy<T, KW, D> k_copy(p.k_row_stride, p.head_dim), v_copy(p.v_row_stride, p.head_dim);
  int keys_left = split_keys - warp * KW;  // keys from this warp's next tile on

  // Issues tile i's K/V copies into stage st (pointers then advanced to the next tile) and
  // returns this lane's key id (key lane % KW of the tile; 0 past the end).
  auto issue = [&](int st) {
    T* const k_to = k_st + st * KW * kLd;
    T* const v_to = v_st + st * KW * kLd;
    const int nk = keys_left < KW ? keys_left : KW;
    if (nk == KW && dense) {
      k_copy.dense(k_to, k_from);
      v_copy.dense(v_to, v_from);
    } else if (nk == KW && whole_cols) {
      k_copy(k_to, k_from, p.k_row_stride);
      v_copy(v_to, v_from, p.v_row_stride);
    } else {
      k_copy(k_to, k_from, p.k_row_stride, nk);
      v_copy(v_to, v_from, p.v_row_stride, nk);
    }
    const int64_t id = lane % KW < nk ? *id_from : 0;
    k_from += k_adv;
    v_from += v_adv;
    id_from += kWarps * KW;
    keys_left -= kWarps * KW;
    return id;
  };

  const float scale = float(p.scale) * ExpBase<float>::kPerNat;
  // Folding the scale into the exponent needs max(s) * scale = max(s * scale) and
  // -inf * scale = -inf (the hidden keys past a ragged end): a finite scale > 0.
  const bool foldable = scale > 0.f && scale < INFINITY;
  OnlineSoftmax<T, 1> sm;
  Frag<float, D> o[1];  // the warp's 16 rows
  o[0].zero();
  constexpr bool kQRegs = D <= 128;  // Q's A fragments in registers (at 256: ldmatrix)
  uint32_t qf[kQRegs ? D / 16 : 1][1][4];
  cp_async_wait<0>();
  sync_threads();  // Q landed
  if constexpr (kQRegs) {
    SK_UNROLL for (int k = 0; k < D / 16; ++k) {
      ldmatrix<4, false>(qf[k][0], q_tile + (lane % 16) * kLd + 16 * k + 8 * (lane / 16));
    }
  }

  int64_t id = n_mine > 0 ? issue(0) : 0;
  cp_async_commit();
  for (int i = 0; i < n_mine; ++i) {
    const int st = i & 1;
    const int left = split_keys - (warp + kWarps * i) * KW, nk = left < KW ? left : KW;
    const int64_t id_next = i + 1 < n_mine ? issue(st ^ 1) : 0;
    cp_async_commit();
    cp_async_wait<1>();  // this tile's copies (by this lane) have landed
    sync_warp();         // ... and every lane's are visible
    T* const k_tile = k_st + st * KW * kLd;
    T* const v_tile = v_st + st * KW * kLd;
    const bool in = lane % KW < nk;
    // Every valid row sees every key of the tile iff the lowest row id sees each; no row
    // sees a key iff the highest row id sees none.
    const bool all = vote_all(!in || visible(q_lo, id, p.strict));
    const bool any = vote_any(in && visible(q_hi, id, p.strict));
    if (any) {
      Frag<float, KW> s[1];
      s[0].zero();
      if constexpr (kQRegs) {
        SK_UNROLL for (int k = 0; k < D / 16; ++k) {
          detail::mma_k_step<T, KW, BFrom::kRowsN, 1>(slabs(s), qf[k], k_tile, kLd, 16 * k);
        }
      } else {
        gemm_smem_a<T, KW, D, BFrom::kRowsN>(s, q_tile, kLd, k_tile, kLd);
      }
      if (all && foldable) {
        // Every row sees every key: no mask and no scrub (a non-finite value reaches every
        // row's o, which the merge finds), only the keys past a ragged end hidden.
        if (nk < KW) {
          SK_UNROLL for (int n = 0; n < KW / 8; ++n) {
            SK_UNROLL for (int e = 0; e < 4; ++e) {
              if (frag_col(n, e) >= nk) s[0].x[n][e] = -INFINITY;
            }
          }
        }
        sm.update(s, o, scale, std::true_type{});
      } else {
        // Scrub: lane j % KW checks (a share of) key j's value row; a key with a NaN or
        // inf value gets a zero row and scores NaN for the rows that see it.
        constexpr int kShare = 32 / KW, kPerLane = kChunks / kShare;
        bool bad = false;
        SK_UNROLL for (int c = 0; c < kPerLane; ++c) {
          T* at = v_tile + (lane % KW) * kLd + (lane / KW + kShare * c) * (16 / int(sizeof(T)));
          if (!chunk_finite<T>(load16(at))) {
            store16(at, uint4{0, 0, 0, 0});
            bad = true;
          }
        }
        unsigned bad_keys = ballot(bad);
        if constexpr (KW < 32) bad_keys = (bad_keys | bad_keys >> KW) & ((1u << KW) - 1);
        uint32_t hidden = 0, nan = 0;
        SK_UNROLL for (int n = 0; n < KW / 8; ++n) {
          SK_UNROLL for (int e = 0; e < 2; ++e) {
            const int c = frag_col(n, e);
            const int64_t kid = shfl(id, c);
            SK_UNROLL for (int h = 0; h < 2; ++h) {
              const int bit = 4 * n + 2 * h + e;
              hidden |= uint32_t(!(c < nk && visible(row_id[h], kid, p.strict))) << bit;
              nan |= uint32_t(bad_keys >> c & 1) << bit;
            }
          }
        }
        scale_and_mask(s[0], scale, hidden, nan);
        sm.update(s, o, scale, std::false_type{});
        sync_warp();  // the scrub's stores precede every lane's reads of the V tile
      }
      sm.template pv<KW, D, kLd>(o, s, nullptr, v_tile);
    }
    sync_warp();  // every lane is done with the stage before the next issue refills it
    id = id_next;
  }
  cp_async_wait<0>();
  sync_warp();

  // The warp's state into its own region: o (16 x D), then the shift m and the sum l per
  // row, l NaN where o took a non-finite value (0 * x is 0 for every finite x).
  float* const o_s = reinterpret_cast<float*>(mine);
  float* const m_s = o_s + kRows * D;
  float* const l_s = m_s + kRows;
  SK_UNROLL for (int i = 0; i < 2; ++i) {
    float zero = 0;
    SK_UNROLL for (int n = 0; n < D / 8; ++n) {
      SK_UNROLL for (int j = 2 * i; j < 2 * i + 2; ++j) {
        o_s[frag_row(j) * D + frag_col(n, j)] = o[0].x[n][j];
        zero += o[0].x[n][j] * 0.f;
      }
    }
    zero += shfl_xor(zero, 1);
    zero += shfl_xor(zero, 2);
    if (lane % 4 == 0) {
      m_s[frag_row(2 * i)] = sm.m[0][i];
      l_s[frag_row(2 * i)] = zero == 0.f ? sm.sums[0].x[0][2 * i] : NAN;
    }
  }
  sync_threads();

  // The merge, warps in order: per row (warp 0, lane r), weights 2^(m_w - max m), 1 for a
  // warp without a finite score (its l and o are 0, or NaN from NaN scores, which must
  // pass), the factor that normalises the weighted sum and the lse; then every element.
  const float* const base = reinterpret_cast<const float*>(smem + Lay::kWarp0);
  constexpr int kWarpFloats = int(Lay::kWarpBytes / sizeof(float));
  float* const row_s = reinterpret_cast<float*>(smem);  // [kRows][kWarps + 1], over Q
  const int64_t split_rows = p.batch * p.heads_q * p.len_q;
  const int64_t w_row = split * split_rows + (b * p.heads_q + q_head) * p.len_q + q_query;
  if (warp == 0 && lane < kRows) {
    float mx = -INFINITY, wt[kWarps], l = 0;
    SK_UNROLL for (int v = 0; v < kWarps; ++v) mx = fmaxf(mx, base[v * kWarpFloats + kRows * D + lane]);
    SK_UNROLL for (int v = 0; v < kWarps; ++v) {
      const float mv = base[v * kWarpFloats + kRows * D + lane];
      wt[v] = mv == -INFINITY ? 1.f : exp2f(mv - mx);
      l += wt[v] * base[v * kWarpFloats + kRows * D + kRows + lane];
    }
    const bool empty = l == 0.f;  // never `l > 0`: NaN must pass
    SK_UNROLL for (int v = 0; v < kWarps; ++v) row_s[lane * (kWarps + 1) + v] = wt[v];
    row_s[lane * (kWarps + 1) + kWarps] = empty ? 0.f : 1.f / l;
    if (lane < n_rows) {
      static_cast<float*>(w.lse)[w_row] =
          empty ? -INFINITY : ((mx == -INFINITY ? 0.f : mx) + log2f(l)) / ExpBase<float>::kPerNat;
    }
  }
  sync_threads();
  float* const w_out = static_cast<float*>(w.out);
  static_assert(kRows * D % kThreads == 0 && D >= 32, "whole passes, one row per warp pass");
  SK_NO_UNROLL for (int j = 0; j < kRows * D / kThreads; ++j) {
    const int idx = thread_rank() + j * kThreads, r = idx / D, d = idx % D;
    const int64_t row = shfl(w_row, r);
    if (r >= n_rows || d >= p.head_dim) continue;
    const float* wt = row_s + r * (kWarps + 1);
    float o = 0;
    SK_UNROLL for (int v = 0; v < kWarps; ++v) o += wt[v] * base[v * kWarpFloats + r * D + d];
    w_out[row * p.head_dim + d] = o * wt[kWarps];
  }
}

template <typename T, int D>
LaunchPlan mma_plan(const SetAttentionParams& p, const DecodeWorkspace& w) {
  const int64_t chunks = (p.len_q * (p.heads_q / p.heads_kv) + kRows - 1) / kRows;
  return {dim3(grid_dim("decode_mma", p.batch * p.heads_kv, kMaxGridX),
               grid_dim("decode_mma", chunks, kMaxGridYZ),
               grid_dim("decode_mma", w.num_splits, kMaxGridYZ)),
          dim3(kThreads), MmaLayout<T, D>::kBytes};
}

}  // namespace decode

// Whether the tensor-core kernel takes p: 16-bit inputs whose rows are whole, aligned
// 16-byte chunks.
inline bool decode_takes_mma(const SetAttentionParams& p, DType dt) {
  if (dt != DType::kFloat16 && dt != DType::kBFloat16) return false;
  if (p.head_dim % 8 != 0 || p.head_dim > 256 || p.head_dim <= 0) return false;
  return rows_aligned(p.q, {p.q_batch_stride, p.q_head_stride, p.q_row_stride}, 2) &&
         rows_aligned(p.k, {p.k_batch_stride, p.k_head_stride, p.k_row_stride}, 2) &&
         rows_aligned(p.v, {p.v_batch_stride, p.v_head_stride, p.v_row_stride}, 2);
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
// GPU, never fewer than kMinSplitKeys keys (nor than one tile per warp) per split, split
// lengths a multiple of the kernel's key tile (all warps' tiles of the mma kernel). Depends
// on the shapes, the dtype and the rows' alignment only (never on the device).
inline DecodeWorkspace decode_splits(const SetAttentionParams& p, DType dt) {
  const bool mma = decode_takes_mma(p, dt);
  const int dmax = decode_dmax(p.head_dim);
  const int rows = mma ? decode::kRows : decode_rows(dmax);
  const int64_t unit = mma ? decode::kWarps * decode::kw_of(dmax) : kKeyTile;
  const int64_t min_keys = unit > kMinSplitKeys ? unit : kMinSplitKeys;
  const int64_t chunks = (p.len_q * (p.heads_q / p.heads_kv) + rows - 1) / rows;
  const int64_t blocks = p.batch * p.heads_kv * chunks;
  int64_t splits = blocks > 0 ? (kDecodeTargetBlocks + blocks - 1) / blocks : 1;
  const int64_t by_keys = (p.len_k + min_keys - 1) / min_keys;
  splits = splits < by_keys ? splits : by_keys;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  splits = splits > 1 ? splits : 1;
  const int64_t per_split = (p.len_k + splits - 1) / splits;
  const int64_t split_len = per_split > 0 ? (per_split + unit - 1) / unit * unit : unit;
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

template <typename T, int DMax>
void decode_mma_launch(const SetAttentionParams& p, const DecodeWorkspace& w, cudaStream_t stream) {
  launch("decode_mma", decode::mma_plan<T, DMax>(p, w), stream, decode::decode_mma_kernel<T, DMax>,
         p, w);
  launch("decode_combine", decode_combine_plan<T>(p, w), stream, decode_combine_kernel<T>, p, w);
}

// out in dt with p's strides; lse contiguous-by-row in acc_t of dt; w from decode_splits
// with out/lse pointing at decode_workspace_elems elements of acc_t.
inline void set_attention_decode(const SetAttentionParams& p, const DecodeWorkspace& w, DType dt,
                                 cudaStream_t stream) {
  const bool mma = decode_takes_mma(p, dt);
  dispatch(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (sizeof(T) == 2) {
      if (mma) {
        switch (decode_dmax(p.head_dim)) {
          case 64: return decode_mma_launch<T, 64>(p, w, stream);
          case 128: return decode_mma_launch<T, 128>(p, w, stream);
          default: return decode_mma_launch<T, 256>(p, w, stream);
        }
      }
    }
    switch (decode_dmax(p.head_dim)) {
      case 64: return decode_launch<T, 64>(p, w, stream);
      case 128: return decode_launch<T, 128>(p, w, stream);
      default: return decode_launch<T, 256>(p, w, stream);
    }
  });
}

}  // namespace sarkernels::kernels
