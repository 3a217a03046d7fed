// What the fused set-attention kernels (attention_fwd.cuh, attention_bwd.cuh) share: the
// tile sizes of every kernel, shared-memory tiles and their cp.async loaders, set-id
// ranges and tile classes from mask.h, the double-buffered walk over visible tiles, score
// scaling and masking, the exponent base, and the host-side dispatch and argument checks.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/dispatch.cuh"
#include "kernels/launch.cuh"
#include "kernels/warp_gemm.cuh"
#include "sarkernels/mask.h"
#include "sarkernels/params.h"

namespace sarkernels::kernels::attention {

// ---------------------------------------------------------------- tile sizes
// Template parameters of every kernel, chosen here only: a GPU session measures others
// (e.g. 128-wide tiles) by editing these. Every size is a multiple of 16.

// Queries x keys per block: tensor-core tiles for 16-bit inputs, smaller ones for the
// scalar path (its shared tiles are 2-4x wider per element) and for head dims above 128
// (shared memory); 16 query rows per warp. Output columns per block (kCols < D: column
// splits, see QueryBlock): 32 for float64 above head dim 64, for registers.
template <typename T, int D>
struct FwdTiles {
  static constexpr int kM = kTensorCores<T> ? 64 : 32;
  static constexpr int kN =
      kTensorCores<T> ? (D > 128 ? 32 : 64) : sizeof(T) == 8 || D > 128 ? 16 : 32;
  static constexpr int kCols = sizeof(T) == 8 && D > 64 ? 32 : D;
};

// dK/dV blocks: keys per block (16 per warp) x queries per step, and the columns of dK and
// dV one block owns (kCols < D: several blocks per key tile, each recomputing P and dS,
// so that dK and dV fit in registers). Smaller query steps at large head dims keep S^T and
// dP^T in registers (tensor cores) and the Q and dO stages within an sm_80 block's shared
// memory (float32 at 256); float64 takes small tiles for shared memory.
template <typename T, int D>
struct BwdTiles {
  static constexpr bool kDouble = sizeof(T) == 8;
  static constexpr int kKeys = kTensorCores<T> ? 64 : 32;
  static constexpr int kQueries =
      kTensorCores<T> ? (D > 128 ? 16 : D > 64 ? 32 : 64) : kDouble || D > 128 ? 16 : 32;
  static constexpr int kCols = D < (kDouble ? 32 : 128) ? D : kDouble ? 32 : 128;
};

// Deterministic dQ blocks: queries x keys, as the forward's but narrower key tiles at
// large head dims (dQ, S and dP live in registers together).
template <typename T, int D>
struct DqTiles {
  static constexpr int kM = FwdTiles<T, D>::kM;
  static constexpr int kN = kTensorCores<T> && D > 64 ? 32 : FwdTiles<T, D>::kN;
  static constexpr int kCols = FwdTiles<T, D>::kCols;
};

// ---------------------------------------------------------------- operand rows
// Row i of head h in batch b of each [B, H, L, D] operand (dout shares out's strides).

template <typename T>
SK_DEVICE const T* q_row(const SetAttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
         i * p.q_row_stride;
}
template <typename T>
SK_DEVICE const T* k_row(const SetAttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride +
         i * p.k_row_stride;
}
template <typename T>
SK_DEVICE const T* v_row(const SetAttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride +
         i * p.v_row_stride;
}
SK_DEVICE int64_t out_offset(const SetAttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return b * p.out_batch_stride + h * p.out_head_stride + i * p.out_row_stride;
}
SK_DEVICE int64_t lse_offset(const SetAttentionParams& p, int64_t b, int64_t h, int64_t i) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + i;
}

// ---------------------------------------------------------------- shared-memory tiles
// Row-major tiles of Cols elements per row, padded by 16 bytes: the 8 row addresses of an
// ldmatrix then fall in distinct banks for every head dim, and each row stays 16-byte
// aligned for cp.async. Cols is the kernel's head-dim capacity; a smaller head dim fills
// the first head_dim columns and zeros the rest (zeros change no dot product).

template <typename T, int Cols>
inline constexpr int tile_ld = Cols + 16 / int(sizeof(T));

template <typename T, int Rows, int Cols>
inline constexpr size_t tile_bytes = size_t(Rows) * tile_ld<T, Cols> * sizeof(T);

// Issues (all Threads threads) cp.async copies of a Rows x Cols tile from src (row stride
// `stride`); rows from `rows` on and columns from `cols` on are zero-filled, so no read of
// the tile ever sees unwritten shared memory. Each thread copies the 16-byte chunks
// i = thread_rank() + k * Threads (scrub_rows relies on it).
template <int Threads, int Rows, int Cols, typename T>
SK_DEVICE void load_rows_async(T* dst, const T* src, int64_t stride, int rows, int cols) {
  constexpr int kPer = 16 / int(sizeof(T)), kChunks = Cols / kPer;
  static_assert(Cols % kPer == 0, "tile rows are whole 16-byte chunks");
  for (int i = thread_rank(); i < Rows * kChunks; i += Threads) {
    const int r = i / kChunks, c = i % kChunks * kPer;
    const bool in = r < rows && c < cols;
    cp_async16(dst + r * tile_ld<T, Cols> + c, in ? src + r * stride + c : src, in);
  }
}

// Copies the first `rows` rows and `cols` columns of a shared tile to dst (row stride
// `stride`).
template <int Threads, int Cols, typename T>
SK_DEVICE void store_rows(T* dst, int64_t stride, const T* src, int rows, int cols) {
  constexpr int kPer = 16 / int(sizeof(T));
  const int chunks = cols / kPer;
  for (int i = thread_rank(); i < rows * chunks; i += Threads) {
    const int r = i / chunks, c = i % chunks * kPer;
    store16(dst + r * stride + c, load16(src + r * tile_ld<T, Cols> + c));
  }
}

// Whether a 16-byte chunk of T holds no NaN or inf (exponent bits not all ones).
template <typename T>
SK_DEVICE bool chunk_finite(uint4 raw) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t,
                                  std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  constexpr Bits kExp = sizeof(T) == 8   ? Bits(0x7ff0000000000000ull)
                        : sizeof(T) == 4 ? Bits(0x7f800000u)
                        : std::is_same_v<T, __half> ? Bits(0x7c00)
                                                    : Bits(0x7f80);
  Bits x[16 / sizeof(T)];
  memcpy(x, &raw, 16);
  bool finite = true;
  SK_UNROLL for (int j = 0; j < int(16 / sizeof(T)); ++j) finite = finite && (x[j] & kExp) != kExp;
  return finite;
}

// Once this thread's copies of a tile (load_rows_async) have landed, before the barrier
// that publishes them: zeroes each of its chunks that holds a NaN or inf and flags the
// chunk's row (flags[r] = 1, and flags[Rows] = 1 for the tile). A value tile scrubbed so
// carries no NaN into rows whose weight for the key is 0; the flags make the key's score
// NaN for the rows that see it.
template <int Threads, int Rows, int Cols, typename T>
SK_DEVICE void scrub_rows(T* tile, int* flags) {
  constexpr int kPer = 16 / int(sizeof(T)), kChunks = Cols / kPer;
  for (int i = thread_rank(); i < Rows * kChunks; i += Threads) {
    const int r = i / kChunks, c = i % kChunks * kPer;
    T* at = tile + r * tile_ld<T, Cols> + c;
    if (!chunk_finite<T>(load16(at))) {
      store16(at, uint4{0, 0, 0, 0});
      flags[r] = 1;  // other threads may store the same 1: no order dependence
      flags[Rows] = 1;
    }
  }
}

// Writes the warp's fragment (N columns), times a per-row factor, as T into rows 0..15 of
// a Cols-wide tile.
template <typename T, int Cols, int N>
SK_DEVICE void stage_frag(T* rows, const Frag<acc_t<T>, N>& f, const acc_t<T> (&factor)[2]) {
  SK_UNROLL for (int n = 0; n < N / 8; ++n) {
    SK_UNROLL for (int e = 0; e < 4; ++e) {
      rows[frag_row(e) * tile_ld<T, Cols> + frag_col(n, e)] =
          from_float<T>(f.x[n][e] * factor[e >> 1]);
    }
  }
}

// Plain (not cp.async) copy of the per-row values of a tile, `fill` past n up to Cap.
template <int Threads, int Cap, typename V>
SK_DEVICE void load_values(V* dst, const V* src, int n, V fill) {
  for (int i = thread_rank(); i < Cap; i += Threads) dst[i] = i < n ? src[i] : fill;
}

// ---------------------------------------------------------------- set ids and tile kinds

// Min and max of a run of set ids; lo > hi for an empty run.
struct IdRange {
  int64_t lo, hi;
};

// The range of ids[0, n), reduced over the warp (every lane gets it).
SK_DEVICE IdRange warp_id_range(const int64_t* ids, int n) {
  IdRange r{INT64_MAX, INT64_MIN};
  for (int j = lane_id(); j < n; j += 32) {
    r.lo = ids[j] < r.lo ? ids[j] : r.lo;
    r.hi = ids[j] > r.hi ? ids[j] : r.hi;
  }
  SK_UNROLL for (int o = 16; o > 0; o >>= 1) {
    const int64_t lo = shfl_xor(r.lo, o), hi = shfl_xor(r.hi, o);
    r.lo = lo < r.lo ? lo : r.lo;
    r.hi = hi > r.hi ? hi : r.hi;
  }
  return r;
}

// mask.h's class of a (queries x keys) tile; a tile without rows or keys is skipped.
SK_DEVICE TileKind classify(IdRange q, IdRange k, bool strict) {
  if (q.lo > q.hi || k.lo > k.hi) return TileKind::kSkip;
  return classify_tile(q.lo, q.hi, k.lo, k.hi, strict);
}

SK_DEVICE int clamp_rows(int64_t n, int cap) { return n <= 0 ? 0 : n < cap ? int(n) : cap; }
SK_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- the tile walk

// Calls body(tile, rep, stage, range) for rep in [0, repeats) of every tile in [0, count)
// whose set-id range (range_of(tile)) the block needs (needed(range)), in order. The
// loads of the next visit (issue(tile, rep, stage) into the other of two stages, one
// cp.async group) fly while body runs; skipped tiles cost a range reduction and nothing
// else. Every warp must compute the same ranges and decisions. Call after committing the
// block's own loads (they land before the first body); returns with every copy landed
// and a barrier passed.
// landed(stage) runs in every thread once its own copies of the visit have landed, before
// the barrier that makes everyone's visible; plain shared stores made by issue() are
// visible to every thread's landed() and body().
template <typename RangeFn, typename NeededFn, typename IssueFn, typename LandedFn,
          typename BodyFn>
SK_DEVICE void for_each_needed_tile(int64_t count, int repeats, RangeFn range_of,
                                    NeededFn needed, IssueFn issue, LandedFn landed,
                                    BodyFn body) {
  IdRange next_range{};
  auto next_tile = [&](int64_t t) {
    for (; t < count; ++t) {
      next_range = range_of(t);
      if (needed(next_range)) break;
    }
    return t;
  };
  int64_t tile = next_tile(0);
  IdRange range = next_range;
  int rep = 0, stage = 0;
  if (tile < count) issue(tile, 0, 0);
  cp_async_commit();
  sync_threads();  // plain stores of the first issue() precede every thread's landed()
  while (tile < count) {
    int64_t following = tile;
    int following_rep = rep + 1;
    IdRange following_range = range;
    if (following_rep == repeats) {
      following = next_tile(tile + 1);
      following_range = next_range;
      following_rep = 0;
    }
    if (following < count) issue(following, following_rep, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the group just issued has landed
    landed(stage);
    sync_threads();
    body(tile, rep, stage, range);
    sync_threads();  // the stage is free for the loads issued next
    tile = following;
    rep = following_rep;
    range = following_range;
    stage ^= 1;
  }
  cp_async_wait<0>();
  sync_threads();
}

// ---------------------------------------------------------------- scores

// Softmax runs in base 2 for float accumulators (ex2 on the GPU; scores are scaled by
// log2(e) up front) and in base e for double.
template <typename Acc>
struct ExpBase;
template <>
struct ExpBase<float> {
  static constexpr float kPerNat = 1.4426950408889634f;  // log2(e): base-2 units per nat
  static SK_DEVICE float exp(float x) { return exp2f(x); }
  static SK_DEVICE float log(float x) { return log2f(x); }
  static SK_DEVICE float max(float a, float b) { return fmaxf(a, b); }
};
template <>
struct ExpBase<double> {
  static constexpr double kPerNat = 1.0;
  static SK_DEVICE double exp(double x) { return ::exp(x); }
  static SK_DEVICE double log(double x) { return ::log(x); }
  static SK_DEVICE double max(double a, double b) { return fmax(a, b); }
};

// s <- s * scale; NaN in the columns flagged in nan_cols (nullable); and on partial tiles
// -inf where the set rule hides the pair or the column lies past n_cols. Rows are queries
// (RowsAreQueries) or keys: row_set holds the ids of this lane's two rows, col_sets
// (shared) those of the tile's columns. Masking last keeps every hidden pair at -inf,
// whatever the scale's sign or the column's flag.
template <bool RowsAreQueries, typename Acc, int N>
SK_DEVICE void scale_and_mask(Frag<Acc, N>& s, Acc scale, bool partial,
                              const int64_t (&row_set)[2], const int64_t* col_sets, int n_cols,
                              bool strict, const int* nan_cols) {
  SK_UNROLL for (int n = 0; n < N / 8; ++n) {
    SK_UNROLL for (int e = 0; e < 4; ++e) {
      s.x[n][e] *= scale;
      if (nan_cols != nullptr && nan_cols[frag_col(n, e)]) s.x[n][e] = Acc(NAN);
      if (partial) {
        const int c = frag_col(n, e);
        const int64_t row = row_set[e >> 1];
        const bool seen = c < n_cols && (RowsAreQueries ? visible(row, col_sets[c], strict)
                                                        : visible(col_sets[c], row, strict));
        if (!seen) s.x[n][e] = -INFINITY;
      }
    }
  }
}

// The kind of a warp's tile: partial whenever the tile has columns past the end.
SK_DEVICE TileKind warp_tile_kind(IdRange q, IdRange k, bool strict, bool ragged) {
  const TileKind kind = classify(q, k, strict);
  return kind == TileKind::kFull && ragged ? TileKind::kPartial : kind;
}

// ---------------------------------------------------------------- query-tile kernels
// The forward and the dQ kernel: one block per (query tile of BM rows, column split,
// batch, q head), 16 query rows per warp, walking the key tiles. A block writes the
// output columns [c0, c0 + D / splits): more than one split only where the accumulators
// of every column would not fit in registers (each split recomputes the scores).

struct QueryBlock {
  int64_t b, h, hk, q0;
  int c0;                   // first output column
  int nq;                   // valid rows of the tile
  IdRange block_q, warp_q;  // set ids of the block's and of this warp's rows
  int64_t row_set[2];       // ids of this lane's rows g and g + 8 (0 past the end)
};

template <int BM, int D, int DC>
SK_DEVICE QueryBlock query_block(const SetAttentionParams& p) {
  QueryBlock qb;
  const int64_t q_tiles = ceil_div(p.len_q, BM);
  const int64_t bh = blockIdx.x / (q_tiles * (D / DC));
  qb.c0 = int(blockIdx.x / q_tiles % (D / DC)) * DC;
  qb.b = bh / p.heads_q;
  qb.h = bh % p.heads_q;
  qb.hk = qb.h / (p.heads_q / p.heads_kv);
  qb.q0 = blockIdx.x % q_tiles * BM;
  qb.nq = clamp_rows(p.len_q - qb.q0, BM);
  const int64_t* q_sets = p.q_sets + qb.b * p.len_q + qb.q0;
  const int w = 16 * warp_id();
  qb.block_q = warp_id_range(q_sets, qb.nq);
  qb.warp_q = warp_id_range(q_sets + w, clamp_rows(qb.nq - w, 16));
  SK_UNROLL for (int i = 0; i < 2; ++i) {
    const int r = w + frag_row(2 * i);
    qb.row_set[i] = r < qb.nq ? q_sets[r] : 0;
  }
  return qb;
}

// Two stages each of K and V tiles (BN x D), of the key tiles' set ids and of the flags
// of keys whose value holds a NaN or inf (scrub_rows; BN + 1 per stage).
template <typename T, int D, int BN>
struct KeyStages {
  static constexpr size_t kBytes =
      4 * tile_bytes<T, BN, D> + 2 * BN * sizeof(int64_t) + 2 * (BN + 1) * sizeof(int);
  T* k;
  T* v;
  int64_t* sets;
  int* bad;

  SK_DEVICE explicit KeyStages(unsigned char* at)
      : k(reinterpret_cast<T*>(at)),
        v(reinterpret_cast<T*>(at + 2 * tile_bytes<T, BN, D>)),
        sets(reinterpret_cast<int64_t*>(at + 4 * tile_bytes<T, BN, D>)),
        bad(reinterpret_cast<int*>(at + 4 * tile_bytes<T, BN, D> + 2 * BN * sizeof(int64_t))) {}
};

// For each key tile this warp's rows see: s = the warp's scores (Q K^T in ExpBase units,
// hidden pairs -inf, NaN for keys whose value is not finite), then body(s, k_tile, v_tile)
// with the stage's shared tiles (the value tile scrubbed of non-finite values).
// q_rows: the warp's 16 rows of the block's Q tile in shared memory, already issued.
template <int Threads, typename T, int D, int BN, typename Body>
SK_DEVICE void for_each_key_tile(const SetAttentionParams& p, const QueryBlock& qb,
                                 const T* q_rows, KeyStages<T, D, BN> ks, Body body) {
  using Acc = acc_t<T>;
  constexpr int kLd = tile_ld<T, D>;
  const T* k = k_row<T>(p, qb.b, qb.hk, 0);
  const T* v = v_row<T>(p, qb.b, qb.hk, 0);
  const int64_t* k_sets = p.k_sets + qb.b * p.len_k;
  const Acc scale = Acc(p.scale) * ExpBase<Acc>::kPerNat;
  auto keys_in = [&](int64_t t) { return clamp_rows(p.len_k - t * BN, BN); };
  for_each_needed_tile(
      ceil_div(p.len_k, BN), 1,
      [&](int64_t t) { return warp_id_range(k_sets + t * BN, keys_in(t)); },
      [&](IdRange keys) { return classify(qb.block_q, keys, p.strict) != TileKind::kSkip; },
      [&](int64_t t, int, int st) {
        const int nk = keys_in(t);
        load_rows_async<Threads, BN, D>(ks.k + st * BN * kLd, k + t * BN * p.k_row_stride,
                                        p.k_row_stride, nk, int(p.head_dim));
        load_rows_async<Threads, BN, D>(ks.v + st * BN * kLd, v + t * BN * p.v_row_stride,
                                        p.v_row_stride, nk, int(p.head_dim));
        load_values<Threads, BN>(ks.sets + st * BN, k_sets + t * BN, nk, int64_t(0));
        load_values<Threads, BN + 1, int>(ks.bad + st * (BN + 1), nullptr, 0, 0);
      },
      [&](int st) { scrub_rows<Threads, BN, D>(ks.v + st * BN * kLd, ks.bad + st * (BN + 1)); },
      [&](int64_t t, int, int st, IdRange keys) {
        const int nk = keys_in(t);
        const TileKind kind = warp_tile_kind(qb.warp_q, keys, p.strict, nk < BN);
        if (kind == TileKind::kSkip) return;
        Frag<Acc, BN> s;
        s.zero();
        gemm_smem_a<T, BN, D, BFrom::kRowsN>(s, q_rows, kLd, ks.k + st * BN * kLd, kLd);
        const int* bad = ks.bad + st * (BN + 1);
        scale_and_mask<true>(s, scale, kind == TileKind::kPartial, qb.row_set,
                             ks.sets + st * BN, nk, p.strict, bad[BN] ? bad : nullptr);
        body(s, ks.k + st * BN * kLd, ks.v + st * BN * kLd);
      });
}

// ---------------------------------------------------------------- host side

// The most dynamic shared memory a block gets on an sm_80 A100 (sm_90 gives 227 KB): every
// configuration fits it, the largest being float64 dK/dV at head dim 128 (139 KB). GPUs
// with less (sm_86/sm_89: 99 KB) lack some of the head-dim-128 and 256 ones: launch()
// throws, naming the kernel and both sizes, instead of launching.
inline constexpr size_t kMaxSmem = 163 * 1024;

// Calls f(Type<T>{}, std::integral_constant<int, D>{}) for the dtype and the head-dim
// capacity D of the kernel that serves head_dim.
template <typename F>
void dispatch_head_dim(DType dtype, int64_t head_dim, const char* what, F&& f) {
  if (!set_attention_kernel_has_head_dim(dtype, head_dim)) {
    throw std::invalid_argument(std::string(what) + ": no kernel for head dim " +
                                std::to_string(head_dim) + " (a multiple of 8 up to " +
                                std::to_string(set_attention_kernel_max_head_dim(dtype)) +
                                " for this dtype)");
  }
  ::sarkernels::kernels::dispatch(dtype, [&](auto tag) {
    if (head_dim <= 32) return f(tag, std::integral_constant<int, 32>{});
    if (head_dim <= 64) return f(tag, std::integral_constant<int, 64>{});
    if (head_dim <= 96) return f(tag, std::integral_constant<int, 96>{});
    if (head_dim <= 128) return f(tag, std::integral_constant<int, 128>{});
    if constexpr (fused_attention_max_head_dim(sizeof(typename decltype(tag)::type)) > 128) {
      return f(tag, std::integral_constant<int, 256>{});
    }
  });
}

inline void check_rows_aligned(const char* fn, const char* name, const void* base,
                               std::initializer_list<int64_t> strides, size_t elem) {
  if (!rows_aligned(base, strides, elem)) {
    throw std::invalid_argument(std::string(fn) + ": " + name +
                                " must have 16-byte aligned rows (base and strides)");
  }
}

inline void check_attention_operands(const char* fn, const SetAttentionParams& p, DType dtype) {
  const size_t e = dtype_size(dtype);
  check_rows_aligned(fn, "q", p.q, {p.q_batch_stride, p.q_head_stride, p.q_row_stride}, e);
  check_rows_aligned(fn, "k", p.k, {p.k_batch_stride, p.k_head_stride, p.k_row_stride}, e);
  check_rows_aligned(fn, "v", p.v, {p.v_batch_stride, p.v_head_stride, p.v_row_stride}, e);
  check_rows_aligned(fn, "out", p.out,
                     {p.out_batch_stride, p.out_head_stride, p.out_row_stride}, e);
}

// One block per tile of a flattened (tile, batch * heads) grid, tiles fastest so the
// blocks of one head run together.
inline dim3 flat_grid(const char* fn, int64_t tiles, int64_t heads) {
  const int64_t n = tiles * heads;
  if (n >= (int64_t(1) << 31)) {
    throw std::invalid_argument(std::string(fn) + ": " + std::to_string(n) +
                                " blocks exceed the grid limit");
  }
  return dim3(unsigned(n));
}

}  // namespace sarkernels::kernels::attention
