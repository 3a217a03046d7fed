// What the fused set-attention kernels (attention_fwd.cuh, attention_bwd.cuh) share: the
// tile sizes of every kernel, shared-memory tiles and their cp.async loaders, set-id
// ranges and tile classes from mask.h, 32-bit set-id codes for the per-element mask of
// partial tiles, the double-buffered walk over visible tiles, score
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
// (shared memory). Query rows per warp (kRows): 32 on tensor cores, as FlashAttention-2
// (each K and V fragment loaded from shared memory feeds twice the MMAs and every per-tile
// cost is spread over twice the scores), where the accumulators fit in registers beside
// the scores: up to head dim 64 with 64-key tiles, and at 128 with 32-key tiles (64 spill
// 116 bytes; the 128x32 tile issues 0.454 instructions per score against 0.479 for 64x64,
// nvcc 13.0); 16 elsewhere (96 spills 12 bytes at 32, 256 does not fit). Output columns
// per block (kCols < D: column splits, see QueryBlock): 32 for float64 above head dim 64,
// for registers.
template <typename T, int D>
struct FwdTiles {
  static constexpr int kRows = kTensorCores<T> && (D <= 64 || D == 128) ? 32 : 16;
  static constexpr int kM = kTensorCores<T> ? 4 * kRows : 32;
  static constexpr int kN =
      kTensorCores<T> ? (D >= 128 ? 32 : 64) : sizeof(T) == 8 || D > 128 ? 16 : 32;
  static constexpr int kCols = sizeof(T) == 8 && D > 64 ? 32 : D;
};

// dK/dV blocks: keys per block (16 per warp) x queries per step, and the columns of dK and
// dV one block owns (kCols < D: several blocks per key tile, each recomputing P and dS,
// so that dK and dV fit in registers). Smaller query steps at large head dims keep S^T and
// dP^T in registers (tensor cores) and the Q and dO stages within an sm_80 block's shared
// memory (float32 at 256); float64 takes small tiles for shared memory. At head dim 128,
// 32 queries fit the deterministic kernel on tensor cores (255 registers); with atomic dQ
// (8 bytes spilled at sm_80 with nvcc 13.0) and in float32 they take 16.
template <typename T, int D, bool kAtomicDq>
struct BwdTiles {
  static constexpr bool kDouble = sizeof(T) == 8;
  static constexpr int kKeys = kTensorCores<T> ? 64 : 32;
  static constexpr int kQueries =
      kTensorCores<T> ? (D > 128 || (D > 96 && kAtomicDq) ? 16 : D > 64 ? 32 : 64)
                      : kDouble || D > 96 ? 16 : 32;
  static constexpr int kCols = D < (kDouble ? 32 : 128) ? D : kDouble ? 32 : 128;
};

// Deterministic dQ blocks: queries x keys, 16 query rows per warp, narrower key tiles than
// the forward's at large head dims (dQ, S and dP live in registers together), and at head
// dim 256 on tensor cores two column splits (all 256 spill 8 bytes with nvcc 13.0).
template <typename T, int D>
struct DqTiles {
  static constexpr int kM = kTensorCores<T> ? 64 : 32;
  static constexpr int kN = kTensorCores<T> && D > 64 ? 32 : FwdTiles<T, D>::kN;
  static constexpr int kCols = kTensorCores<T> && D > 128 ? 128 : FwdTiles<T, D>::kCols;
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

// Calls f(i) for each of this thread's shares i = thread_rank() + j * Threads of N items:
// unrolled, as thread_rank() < Threads bounds the count (a loop over i would not be), or,
// kUnroll false, a loop.
template <int Threads, int N, bool kUnroll = true, typename F>
SK_DEVICE void for_thread_shares(F f) {
  if constexpr (kUnroll) {
    SK_UNROLL for (int j = 0; j < (N + Threads - 1) / Threads; ++j) {
      const int i = thread_rank() + j * Threads;
      if (N % Threads == 0 || i < N) f(i);
    }
  } else {
    for (int i = thread_rank(); i < N; i += Threads) f(i);
  }
}

// Whether the tile copies and scrubs of a kernel are unrolled: the 16-bit kernels' up to
// head dim 128 (at 256, and in the float32 kernels, nvcc 13.0 spills with them unrolled).
template <typename T, int Cols>
inline constexpr bool kUnrolledTiles = sizeof(T) == 2 && Cols <= 128;

// Which 16-byte chunks of a Rows x Cols tile each thread copies and, once they have landed,
// scrubs (scrub_rows). Where the block's threads cover whole rows per pass (kRegular),
// thread t takes the column chunks t % kTpr + j * kTpr (j < kSpan) of rows t / kTpr +
// k * kStep: at most 8 threads a row, so that a warp's cp.async covers whole 128-byte lines
// of 4 rows and a thread's chunks of a row are one pointer plus immediates (at head dim
// 128 two chunks a row: 4 pointer steps a 64-row tile instead of 8; at 96 the second chunk
// is only the first 4 threads'). Otherwise the chunks i = thread_rank() + k * Threads in
// row-major order, by a loop.
template <int Threads, int Rows, int Cols, typename T>
struct ChunkMap {
  static constexpr int kPer = 16 / int(sizeof(T)), kChunks = Cols / kPer;
  static_assert(Cols % kPer == 0, "tile rows are whole 16-byte chunks");
  static constexpr int kTpr = kChunks < 8 ? kChunks : 8;     // threads a row
  static constexpr int kSpan = (kChunks + kTpr - 1) / kTpr;  // chunks a thread takes a row
  static constexpr int kStep = Threads / kTpr;                // rows a pass
  static constexpr bool kRegular = Threads % kTpr == 0 && Rows % kStep == 0;
  static SK_DEVICE int row0() { return thread_rank() / kTpr; }
  static SK_DEVICE int col0() { return thread_rank() % kTpr * kPer; }
  // Whether this thread's chunk j of a row lies in the row.
  static SK_DEVICE bool has(int j) {
    return kChunks % kTpr == 0 || thread_rank() % kTpr + j * kTpr < kChunks;
  }
  // f(r, c) for each of this thread's chunks (row r, first column c): unrolled, or, kUnroll
  // false, loops.
  template <bool kUnroll, typename F>
  static SK_DEVICE void for_each(F f) {
    if constexpr (kRegular && kUnroll) {
      SK_UNROLL for (int k = 0; k < Rows / kStep; ++k) {
        SK_UNROLL for (int j = 0; j < kSpan; ++j) {
          if (has(j)) f(row0() + k * kStep, col0() + j * kTpr * kPer);
        }
      }
    } else if constexpr (kRegular) {
      SK_NO_UNROLL for (int k = 0; k < Rows / kStep; ++k) {
        SK_NO_UNROLL for (int j = 0; j < kSpan; ++j) {
          if (has(j)) f(row0() + k * kStep, col0() + j * kTpr * kPer);
        }
      }
    } else {
      for_thread_shares<Threads, Rows * kChunks, kUnroll>(
          [&](int i) { f(i / kChunks, i % kChunks * kPer); });
    }
  }
};

// Issues (all Threads threads) cp.async copies of a Rows x Cols tile from src (row stride
// `stride`), this thread's chunks as ChunkMap assigns them; rows from `rows` on and columns
// from `cols` on are zero-filled, so no read of the tile ever sees unwritten shared memory.
// A loop: TileCopy's forms below are the fast ones.
template <int Threads, int Rows, int Cols, typename T>
SK_DEVICE void load_rows_loop(T* dst, const T* src, int64_t stride, int rows, int cols) {
  ChunkMap<Threads, Rows, Cols, T>::template for_each<false>([&](int r, int c) {
    const bool in = r < rows && c < cols;
    cp_async16(dst + r * tile_ld<T, Cols> + c, in ? src + r * stride + c : src, in);
  });
}

// load_rows_loop's copies with the thread's offsets found once (construct outside the
// loop that copies tiles). Where ChunkMap is regular, a copy is an unrolled run of cp.async
// with no index arithmetic (a pointer a row, stepped, its chunks at immediate offsets):
// operator() copies a whole tile, bounded() the same with one bound test a copy where
// registers allow (kUnrolledTiles), the loop otherwise. The stride is passed per copy (a
// kernel parameter costs no register).
template <int Threads, int Rows, int Cols, typename T>
class TileCopy {
  using Map = ChunkMap<Threads, Rows, Cols, T>;
  static constexpr int kStep = Map::kStep;
  int64_t from_;
  int to_;

  template <bool kBounded>
  SK_DEVICE void copy(T* dst, const T* src, int64_t stride, int rows, int cols) const {
    const T* from = src + from_;
    SK_UNROLL for (int k = 0; k < Rows / kStep; ++k) {
      SK_UNROLL for (int j = 0; j < Map::kSpan; ++j) {
        const int c = j * Map::kTpr * Map::kPer;
        // (past the rows the pointer is never read: cp_async16 reads nothing when invalid)
        if (Map::has(j)) {
          cp_async16(dst + to_ + k * kStep * tile_ld<T, Cols> + c, from + c,
                     !kBounded || (Map::col0() + c < cols && Map::row0() + k * kStep < rows));
        }
      }
      from += kStep * stride;
    }
  }

 public:
  SK_DEVICE explicit TileCopy(int64_t stride)
      : from_(Map::row0() * stride + Map::col0()),
        to_(Map::row0() * tile_ld<T, Cols> + Map::col0()) {}

  SK_DEVICE void operator()(T* dst, const T* src, int64_t stride) const {
    if constexpr (Map::kRegular) {
      copy<false>(dst, src, stride, Rows, Cols);
    } else {
      load_rows_loop<Threads, Rows, Cols>(dst, src, stride, Rows, Cols);
    }
  }

  // Rows from `rows` on and columns from `cols` on zero-filled.
  SK_DEVICE void bounded(T* dst, const T* src, int64_t stride, int rows, int cols) const {
    if constexpr (Map::kRegular && kUnrolledTiles<T, Cols>) {
      copy<true>(dst, src, stride, rows, cols);
    } else {
      load_rows_loop<Threads, Rows, Cols>(dst, src, stride, rows, cols);
    }
  }
};

// load_rows_loop's copies in TileCopy's bounded form, for a tile copied once.
template <int Threads, int Rows, int Cols, typename T>
SK_DEVICE void load_rows_async(T* dst, const T* src, int64_t stride, int rows, int cols) {
  TileCopy<Threads, Rows, Cols, T>(stride).bounded(dst, src, stride, rows, cols);
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
  if constexpr (sizeof(T) == 2) {
    // Two elements a word: m has a zero half where an element's exponent bits are all
    // ones, and m - 0x10001 then sets that half's top bit (m's are clear); any zero is
    // found even where a borrow crosses into the upper half.
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
    constexpr uint32_t kExp2 = uint32_t(kExp) * 0x10001u;
    uint32_t any = 0;
    SK_UNROLL for (int j = 0; j < 4; ++j) any |= (~w[j] & kExp2) - 0x10001u;
    return (any & 0x80008000u) == 0;
  } else {
    Bits x[16 / sizeof(T)];
    memcpy(x, &raw, 16);
    bool finite = true;
    SK_UNROLL for (int j = 0; j < int(16 / sizeof(T)); ++j) finite = finite && (x[j] & kExp) != kExp;
    return finite;
  }
}

// Once this thread's copies of a tile (load_rows_async) have landed, before the barrier
// that publishes them: zeroes each of its chunks that holds a NaN or inf and calls mark(r)
// with the chunk's row. A tile scrubbed so carries no NaN into rows whose weight for the
// row is 0; the mark makes the row's scores NaN where it is seen (flag_rows, or a NaN lse).
template <int Threads, int Rows, int Cols, typename T, typename MarkFn>
SK_DEVICE void scrub_rows(T* tile, MarkFn mark) {
  ChunkMap<Threads, Rows, Cols, T>::template for_each<kUnrolledTiles<T, Cols>>([&](int r, int c) {
    T* at = tile + r * tile_ld<T, Cols> + c;
    if (!chunk_finite<T>(load16(at))) {
      store16(at, uint4{0, 0, 0, 0});
      mark(r);
    }
  });
}

// scrub_rows' mark as flags: flags[r] = 1, and flags[Rows] = 1 for the tile (other threads
// may store the same 1: no order dependence).
template <int Rows>
SK_DEVICE auto flag_rows(int* flags) {
  return [flags](int r) {
    flags[r] = 1;
    flags[Rows] = 1;
  };
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

// stage_frag (factor 1) of columns 16k .. 16k + 15 from their packed A fragment (on_a of
// gemm_frag_a_each), which holds them rounded to T already.
template <typename T, int Cols>
SK_DEVICE void stage_packed(T* rows, int k, const uint32_t (&af)[4]) {
  SK_UNROLL for (int j = 0; j < 4; ++j) {  // af[j]: elements 2(j & 1), + 1 of n-tile 2k + j / 2
    const int n = 2 * k + j / 2, e = 2 * (j & 1);
    memcpy(rows + frag_row(e) * tile_ld<T, Cols> + frag_col(n, e), &af[j], 4);
  }
}

// Plain (not cp.async) copy of the per-row values of a tile, `fill` past n up to Cap.
template <int Threads, int Cap, typename V>
SK_DEVICE void load_values(V* dst, const V* src, int n, V fill) {
  for_thread_shares<Threads, Cap>([&](int i) { dst[i] = i < n ? src[i] : fill; });
}

// ---------------------------------------------------------------- set ids and tile kinds

// Min and max of a run of set ids; lo > hi for an empty run.
struct IdRange {
  int64_t lo, hi;
};

// The range of ids[0, n), n <= Cap, reduced over the warp (every lane gets it). A lane's
// Cap / 32 loads are issued at once, and no code is left for counts that never occur (a
// loop over n compiles to an unrolled body and remainder loops).
template <int Cap>
SK_DEVICE IdRange warp_id_range(const int64_t* ids, int n) {
  IdRange r{INT64_MAX, INT64_MIN};
  SK_UNROLL for (int k = 0; k < (Cap + 31) / 32; ++k) {
    if (const int j = lane_id() + 32 * k; j < n) {
      r.lo = ids[j] < r.lo ? ids[j] : r.lo;
      r.hi = ids[j] > r.hi ? ids[j] : r.hi;
    }
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

// mask.h's class of a tile, partial whenever the tile is ragged (has rows or columns past
// the end)
SK_DEVICE TileKind warp_tile_kind(IdRange q, IdRange k, bool strict, bool ragged) {
  const TileKind kind = classify(q, k, strict);
  return kind == TileKind::kFull && ragged ? TileKind::kPartial : kind;
}

SK_DEVICE int clamp_rows(int64_t n, int cap) { return n <= 0 ? 0 : n < cap ? int(n) : cap; }

// count * stride for a count known non-negative (tile, row and repeat counts: the launchers
// refuse 2^31 rows): zero-extended, its product with a 64-bit stride is two IMADs and no
// sign extension.
SK_DEVICE int64_t rows_offset(int count, int64_t stride) {
  return int64_t(uint32_t(count)) * stride;
}
SK_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- the tile walk

// Tiles whose set-id ranges the walk computes at once (into shared memory): a longer
// sequence is walked in chunks of this many tiles.
inline constexpr int kTileChunk = 64;

// Most warps of a block that walks tiles, and most rows of its block.
inline constexpr int kMaxWarps = 8;
inline constexpr int kMaxRows = 128;

// 32-bit stand-ins ("codes") for set ids, relative to a block's row ids, so that a partial
// tile's per-element test is one 32-bit compare. code() is an order-preserving map that
// keeps every order between a row id and any id: where the block's row ids span less than
// 2^30, the offset from their minimum, clamped to one past either end; otherwise (ids far
// apart: rare) counts over the block's row ids, exact for any ids but a loop over the rows
// per code. Codes do not wrap, so a key's code takes the strict rule's one step and the
// test is visible(query_code(q), key_code(k), false) == visible(q, k, strict).
struct SetCodes {
  IdRange rows;        // the block's row ids: their range,
  const int64_t* ids;  // the ids themselves
  int n;               // and how many
  int32_t top;         // rows.hi's code + 1 with offsets, else -1
  bool strict;

  SK_DEVICE SetCodes(IdRange rows, const int64_t* ids, int n, bool strict)
      : rows(rows), ids(ids), n(n), strict(strict) {
    const bool offsets =
        rows.lo <= rows.hi && uint64_t(rows.hi) - uint64_t(rows.lo) < (uint64_t(1) << 30);
    top = offsets ? int32_t(rows.hi - rows.lo) + 1 : -1;
  }
  // x <= y iff code(x) <= code(y), and x < y iff code(x) < code(y), where x or y is a row id.
  SK_DEVICE int32_t code(int64_t x) const {
    if (top >= 0) return x < rows.lo ? -1 : x > rows.hi ? top : int32_t(x - rows.lo);
    int32_t c = 0;  // (rows below x) + (rows not above x)
    SK_NO_UNROLL for (int r = 0; r < n; ++r) c += int32_t(ids[r] < x) + int32_t(ids[r] <= x);
    return c;
  }
  SK_DEVICE int32_t query_code(int64_t q) const { return code(q); }
  SK_DEVICE int32_t key_code(int64_t k) const { return code(k) + int32_t(strict); }
};

// Whether element (n, e) of a lane's share of a 16 x N fragment is hidden, from the codes
// of the lane's two rows (g, g + 8) and of the tile's columns (shared): rows are queries
// (RowsAreQueries) or keys.
template <bool RowsAreQueries>
struct HiddenPairs {
  int32_t row[2];
  const int32_t* cols;

  SK_DEVICE bool operator()(int n, int e) const {
    const int32_t r = row[e >> 1], c = cols[frag_col(n, e)];
    return !(RowsAreQueries ? visible(r, c, false) : visible(c, r, false));
  }
};

// A chunk's tile ranges and the list of the tiles the block needs with their tile_info, in
// shared memory; the set-id ranges of the block's and of each warp's rows, and the codes of
// the block's rows, which the block stores before walking (set_rows), so that they take no
// registers during the walk.
struct TileList {
  IdRange range[kTileChunk];
  unsigned info[kTileChunk];
  int tile[kTileChunk];  // indices into range and info, in order
  int count;
  IdRange block_rows, warp_rows[kMaxWarps];
  SetCodes codes;
  int32_t row_code[kMaxRows];

  // ids: the block's n row ids, queries (RowsAreQueries) or keys, of at most Rows rows.
  template <int Threads, int Rows, bool RowsAreQueries>
  SK_DEVICE void set_rows(IdRange block, IdRange warp, const int64_t* ids, int n, bool strict) {
    static_assert(Rows <= kMaxRows, "row_code has room for kMaxRows rows");
    if (lane_id() == 0) warp_rows[warp_id()] = warp;
    const SetCodes c(block, ids, n, strict);
    if (thread_rank() == 0) {
      block_rows = block;
      codes = c;
    }
    // Rows past n see nothing (the dK/dV kernel's dS K reads its ragged key rows' dS).
    for_thread_shares<Threads, Rows>([&](int r) {
      row_code[r] = r >= n ? (RowsAreQueries ? INT32_MIN : INT32_MAX)
                  : RowsAreQueries ? c.query_code(ids[r]) : c.key_code(ids[r]);
    });
  }

  // The codes of the tile's n_cols columns ids[0, n_cols) (keys: RowsAreQueries, or queries)
  // into codes[0, Cols), the columns past n_cols hidden from every row.
  template <int Threads, int Cols, bool RowsAreQueries>
  SK_DEVICE void load_codes(int32_t* dst, const int64_t* ids, int n_cols) const {
    const SetCodes c = codes;
    for_thread_shares<Threads, Cols>([&](int i) {
      dst[i] = RowsAreQueries ? (i < n_cols ? c.key_code(ids[i]) : INT32_MAX)
                              : (i < n_cols ? c.query_code(ids[i]) : INT32_MIN);
    });
  }

  // The hidden pairs of this lane's rows row0 + g, row0 + g + 8 against a tile's column
  // codes (load_codes).
  template <bool RowsAreQueries>
  SK_DEVICE HiddenPairs<RowsAreQueries> hidden(int row0, const int32_t* cols) const {
    return {{row_code[row0 + frag_row(0)], row_code[row0 + frag_row(2)]}, cols};
  }
};

// Bit 31 of a listed tile's info: its copies and stores need bounds (the tile is ragged, or
// the rows are narrower than the tiles).
inline constexpr unsigned kBoundedTile = 1u << 31;

// A tile's classes, found once per walk so that a visit takes no set-id comparison: the
// block's (bits 0-1) and each warp's (bits 2w + 2, 2w + 3) TileKind for its rows against
// the tile's ids (ids of queries x keys in mask.h's order: RowsAreQueries, or the tile's
// first), partial wherever the tile is ragged, and kBoundedTile where it is ragged or
// `narrow` (head dim below the tiles'); 0 when the block skips the tile.
template <bool RowsAreQueries, int Warps>
SK_DEVICE unsigned tile_info(const TileList& list, IdRange tile, bool strict, bool ragged,
                             bool narrow) {
  static_assert(Warps <= kMaxWarps, "tile_info has room for kMaxWarps warps");
  auto kind = [&](IdRange rows) {
    return unsigned(RowsAreQueries ? warp_tile_kind(rows, tile, strict, ragged)
                                   : warp_tile_kind(tile, rows, strict, ragged));
  };
  unsigned info = kind(list.block_rows);
  if (info == unsigned(TileKind::kSkip)) return 0;
  SK_UNROLL for (int w = 0; w < Warps; ++w) info |= kind(list.warp_rows[w]) << (2 + 2 * w);
  return ragged || narrow ? info | kBoundedTile : info;
}
SK_DEVICE TileKind block_kind(unsigned info) { return TileKind(info & 3); }
// Whether the tile takes the fixed copy (no bounds, every pair of the block seen): one
// test of the info.
SK_DEVICE bool fixed_copy(unsigned info) {
  return (info & (3u | kBoundedTile)) == unsigned(TileKind::kFull);
}
SK_DEVICE TileKind warp_kind(unsigned info) { return TileKind(info >> (2 + 2 * warp_id()) & 3); }

// Calls body(tile, rep, stage, info) for rep in [0, repeats) of every tile of TileLen
// of the `len` ids whose info = info_of(tile, set-id range) is not 0 (tile_info), in order.
// The ranges of a chunk of tiles are found once, by the block's warps together, and the
// needed tiles listed with their info, so a tile the block skips is never visited. The
// loads of the next visit (issue(tile, rep, stage, info) into the other of two stages,
// one cp.async group) fly while body runs. Call after committing the block's own loads
// (they land before the first body) and list.set_rows; returns with every copy
// landed and a barrier passed.
// landed(tile, rep, stage, info) runs in every thread once its own copies of the visit
// have landed, before the barrier that makes everyone's visible; plain shared stores made
// by issue() are visible to every thread's landed() and body().
// Tile indices are ints (check_attention_operands keeps lengths below 2^31), so that the
// callbacks' tile arithmetic is 32-bit up to the strides.
// kUnrolled: the visits of the two stages unrolled, each with its stage a constant, so
// that the callbacks' shared-memory addresses of a stage are the same registers plus
// immediates instead of being rederived from the stage on every visit (at 240-250
// registers nvcc does not keep both stages' addresses live). Not where registers are
// shorter still (float and double tiles): unrolled, those spill.
template <int Threads, int TileLen, bool kUnrolled, typename InfoFn, typename IssueFn,
          typename LandedFn, typename BodyFn>
SK_DEVICE void for_each_needed_tile(const int64_t* ids, int len, int repeats, TileList& list,
                                    InfoFn info_of, IssueFn issue, LandedFn landed, BodyFn body) {
  constexpr int kWarps = Threads / 32;
  const int tiles = (len + TileLen - 1) / TileLen;
  for (int t0 = 0; t0 < tiles; t0 += kTileChunk) {
    const int n = clamp_rows(tiles - t0, kTileChunk);
    for (int c = warp_id(); c < n; c += kWarps) {
      const int at = (t0 + c) * TileLen;
      const IdRange r = warp_id_range<TileLen>(ids + at, clamp_rows(len - at, TileLen));
      if (lane_id() == 0) list.range[c] = r;
    }
    sync_threads();
    if (warp_id() == 0) {
      int listed = 0;
      for (int c0 = 0; c0 < n; c0 += 32) {
        const int c = c0 + lane_id();
        const unsigned info = c < n ? info_of(t0 + c, list.range[c]) : 0;
        const unsigned votes = ballot(info != 0);
        if (info != 0) {
          list.tile[listed + popcount(votes & ((1u << lane_id()) - 1))] = c;
          list.info[c] = info;
        }
        listed += popcount(votes);
      }
      if (lane_id() == 0) list.count = listed;
    }
    sync_threads();
    // Visit (i, rep): repeat rep of the i-th listed tile; counted up, never divided. The
    // tile and its info are read from the list once a visit, by the issue of the next one,
    // and kept in registers for the landed() and body() that follow.
    const int listed = list.count;
    struct Visit {
      int t;
      unsigned info;
    };
    auto listed_at = [&](int i) {
      const int c = list.tile[i];
      return Visit{t0 + c, list.info[c]};
    };
    Visit now{0, 0};
    if (listed > 0) {
      now = listed_at(0);
      issue(now.t, 0, 0, now.info);
    }
    cp_async_commit();
    sync_threads();  // plain stores of the first issue() precede every thread's landed()
    int i = 0, rep = 0;
    auto visit = [&](auto stage) {
      const bool last_rep = rep + 1 == repeats;
      const int next_i = last_rep ? i + 1 : i, next_rep = last_rep ? 0 : rep + 1;
      Visit next = now;
      if (next_i < listed) {
        if (last_rep) next = listed_at(next_i);
        issue(next.t, next_rep, stage ^ 1, next.info);
      }
      cp_async_commit();
      cp_async_wait<1>();  // everything but the group just issued has landed
      landed(now.t, rep, stage, now.info);
      sync_threads();
      body(now.t, rep, stage, now.info);
      sync_threads();  // the stage is free for the loads issued next
      i = next_i;
      rep = next_rep;
      now = next;
    };
    if constexpr (kUnrolled) {
      while (i < listed) {
        visit(std::integral_constant<int, 0>{});
        if (i >= listed) break;
        visit(std::integral_constant<int, 1>{});
      }
    } else {
      for (int stage = 0; i < listed; stage ^= 1) visit(stage);
    }
  }
  cp_async_wait<0>();  // also the caller's own loads when there was no tile at all
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

// ExpBase's exponential of the kernels for inputs T: the SFU's approximation on tensor
// cores (16-bit inputs, whose probabilities are rounded to 16 bits before any use), the
// accurate one otherwise.
template <typename T>
SK_DEVICE acc_t<T> exp_for(acc_t<T> x) {
  if constexpr (kTensorCores<T>) {
    return exp2_approx(x);
  } else {
    return ExpBase<acc_t<T>>::exp(x);
  }
}

// Masks of a lane's share of a warp's 16 x N fragment (N <= 64): bit 4n + e stands for
// element (n, e).

// The elements whose column is flagged (scrub_rows' flags).
template <int N>
SK_DEVICE uint32_t flagged_bits(const int* flags) {
  static_assert(N <= 64, "a lane's share of the fragment fits 32 bits");
  uint32_t bits = 0;
  SK_UNROLL for (int n = 0; n < N / 8; ++n) {
    SK_UNROLL for (int e = 0; e < 4; ++e) bits |= uint32_t(flags[frag_col(n, e)] != 0) << (4 * n + e);
  }
  return bits;
}

// The elements of this lane's first row (frag_row(0)) if `first`, of its second if `second`.
template <int N>
SK_DEVICE uint32_t row_bits(bool first, bool second) {
  static_assert(N <= 64, "a lane's share of the fragment fits 32 bits");
  constexpr uint32_t kFirst = uint32_t((uint64_t(1) << (N / 2)) - 1) / 15 * 3;  // e = 0, 1
  return (first ? kFirst : 0) | (second ? kFirst << 2 : 0);
}

// s <- s * scale, NaN where `nan` has the element's bit, -inf where hidden(n, e) (a
// HiddenPairs, or NoPairs). Masking last keeps every hidden pair at -inf, whatever the
// scale's sign or the flag.
template <typename Acc, int N, typename Hidden>
SK_DEVICE void scale_and_mask(Frag<Acc, N>& s, Acc scale, Hidden hidden, uint32_t nan) {
  if (nan != 0) {  // rare: a key whose value is not finite
    SK_UNROLL for (int n = 0; n < N / 8; ++n) {
      SK_UNROLL for (int e = 0; e < 4; ++e) {
        if (nan >> (4 * n + e) & 1) s.x[n][e] = Acc(NAN);
      }
    }
  }
  SK_UNROLL for (int n = 0; n < N / 8; ++n) {
    SK_UNROLL for (int e = 0; e < 4; ++e) {
      s.x[n][e] = hidden(n, e) ? Acc(-INFINITY) : s.x[n][e] * scale;
    }
  }
}

// scale_and_mask with the hidden pairs as bits (bit 4n + e for element (n, e)).
template <typename Acc, int N>
SK_DEVICE void scale_and_mask(Frag<Acc, N>& s, Acc scale, uint32_t hidden, uint32_t nan) {
  scale_and_mask(s, scale, [hidden](int n, int e) { return (hidden >> (4 * n + e) & 1) != 0; },
                 nan);
}

// The hidden pairs of a tile every row of the warp sees: none.
struct NoPairs {
  SK_DEVICE bool operator()(int, int) const { return false; }
};

// ---------------------------------------------------------------- query-tile kernels
// The forward and the dQ kernel: one block per (query tile of BM rows, column split,
// batch, q head), 16 query rows per warp, walking the key tiles. A block writes the
// output columns [c0, c0 + D / splits): more than one split only where the accumulators
// of every column would not fit in registers (each split recomputes the scores).

// M: 16-row slabs per warp.
template <int M>
struct QueryBlock {
  int b, h, hk;  // below the grid's block count, so below 2^31
  int64_t q0;
  int c0;                   // first output column
  int nq;                   // valid rows of the tile
  IdRange block_q, warp_q;  // set ids of the block's and of this warp's rows
  const int64_t* q_sets;    // the set ids of the block's rows
};

// The block's place from blockIdx alone (no set-id ranges): cheap enough to derive again
// after a walk rather than keep live across it.
template <int BM, int D, int DC, int M>
SK_DEVICE QueryBlock<M> query_place(const SetAttentionParams& p) {
  QueryBlock<M> qb;
  // 32-bit division: flat_grid keeps every block count below 2^31.
  const unsigned q_tiles = unsigned(ceil_div(p.len_q, BM)), heads = unsigned(p.heads_q);
  const unsigned bh = blockIdx.x / (q_tiles * (D / DC));
  qb.c0 = int(blockIdx.x / q_tiles % (D / DC)) * DC;
  qb.b = int(bh / heads);
  qb.h = int(bh % heads);
  qb.hk = int(unsigned(qb.h) / (heads / unsigned(p.heads_kv)));
  qb.q0 = int64_t(blockIdx.x % q_tiles) * BM;
  qb.nq = clamp_rows(p.len_q - qb.q0, BM);
  qb.q_sets = p.q_sets + qb.b * p.len_q + qb.q0;
  return qb;
}

template <int BM, int D, int DC, int M>
SK_DEVICE QueryBlock<M> query_block(const SetAttentionParams& p) {
  QueryBlock<M> qb = query_place<BM, D, DC, M>(p);
  const int w = 16 * M * warp_id();
  qb.block_q = warp_id_range<BM>(qb.q_sets, qb.nq);
  qb.warp_q = warp_id_range<16 * M>(qb.q_sets + w, clamp_rows(qb.nq - w, 16 * M));
  return qb;
}

// Two stages each of K and V tiles (BN x D), of the key tiles' set-id codes (SetCodes)
// and of the flags of keys whose value holds a NaN or inf (scrub_rows; BN + 1 per stage).
template <typename T, int D, int BN>
struct KeyStages {
  static constexpr size_t kBytes =
      4 * tile_bytes<T, BN, D> + 2 * BN * sizeof(int32_t) + 2 * (BN + 1) * sizeof(int);
  T* k;
  T* v;
  int32_t* codes;
  int* bad;

  SK_DEVICE explicit KeyStages(unsigned char* at)
      : k(reinterpret_cast<T*>(at)),
        v(reinterpret_cast<T*>(at + 2 * tile_bytes<T, BN, D>)),
        codes(reinterpret_cast<int32_t*>(at + 4 * tile_bytes<T, BN, D>)),
        bad(reinterpret_cast<int*>(at + 4 * tile_bytes<T, BN, D> + 2 * BN * sizeof(int32_t))) {}
};

// For each key tile this warp's rows see: s = the warp's scores (M slabs of Q K^T) and
// body(s, k_tile, v_tile, scale, fold) with the stage's shared tiles, where either fold is
// std::true_type and s holds raw dot products of a tile every row sees, all of its values
// finite (the fast path: the caller folds `scale`, in ExpBase units per raw unit, into its
// exponent), or fold is std::false_type and s is scaled into ExpBase units with hidden
// pairs at -inf and NaN for keys whose value (kScrubK: or key) is not finite (the tiles
// then scrubbed of them).
// Non-finite values are looked for only in tiles some row of the block does not see (or in
// every tile, kScrubAll): in the others every row's output takes the non-finite value,
// which the caller detects (the forward's finish(), which needs every column of the rows:
// a forward split into column blocks scrubs all).
// q_rows: the warp's 16M rows of the block's Q tile (a SlabOperand: in shared memory,
// already issued, or held).
// kScrubK: the key tile is scrubbed too (and flagged), for a caller that multiplies it by
// weights that are 0 for the keys a row does not see (the dQ kernel's dS K).
template <int Threads, int M, bool kScrubAll, bool kScrubK, typename T, int D, int BN,
          bool kHeldQ, typename Body>
SK_DEVICE void for_each_key_tile(const SetAttentionParams& p, const QueryBlock<M>& qb,
                                 const SlabOperand<T, D, kHeldQ, M>& q_rows,
                                 KeyStages<T, D, BN> ks, TileList& list, Body body) {
  using Acc = acc_t<T>;
  constexpr int kLd = tile_ld<T, D>;
  const T* k = k_row<T>(p, qb.b, qb.hk, 0);
  const T* v = v_row<T>(p, qb.b, qb.hk, 0);
  const int64_t* k_sets = p.k_sets + qb.b * p.len_k;
  const Acc scale = Acc(p.scale) * ExpBase<Acc>::kPerNat;
  // Folding the scale into the exponent needs the row max of raw scores to give that of
  // the scaled ones: a finite scale >= 0.
  const bool foldable = scale >= Acc(0) && scale < Acc(INFINITY);
  const int len_k = int(p.len_k);
  auto keys_in = [&](int t) { return clamp_rows(len_k - t * BN, BN); };
  // Whether some row of the block does not see some key of the tile (or it is ragged), or
  // the tile is to be scrubbed as if it did.
  auto block_partial = [](unsigned info) {
    return kScrubAll || block_kind(info) == TileKind::kPartial;
  };
  const bool whole_rows = p.head_dim == D;
  const TileCopy<Threads, BN, D, T> k_copy(p.k_row_stride), v_copy(p.v_row_stride);
  list.set_rows<Threads, 16 * M * (Threads / 32), true>(qb.block_q, qb.warp_q, qb.q_sets, qb.nq,
                                                       p.strict);
  for_each_needed_tile<Threads, BN, kTensorCores<T>>(
      k_sets, len_k, 1, list,
      [&](int t, IdRange keys) {
        return tile_info<true, Threads / 32>(list, keys, p.strict, keys_in(t) < BN,
                                             !whole_rows);
      },
      [&](int t, int, int st, unsigned info) {
        T* const k_to = ks.k + st * BN * kLd;
        T* const v_to = ks.v + st * BN * kLd;
        const T* const k_from = k + rows_offset(t * BN, p.k_row_stride);
        const T* const v_from = v + rows_offset(t * BN, p.v_row_stride);
        if (!kScrubAll && fixed_copy(info)) {
          k_copy(k_to, k_from, p.k_row_stride);
          v_copy(v_to, v_from, p.v_row_stride);
          return;
        }
        const int nk = keys_in(t);
        k_copy.bounded(k_to, k_from, p.k_row_stride, nk, int(p.head_dim));
        v_copy.bounded(v_to, v_from, p.v_row_stride, nk, int(p.head_dim));
        if (block_partial(info)) {
          list.load_codes<Threads, BN, true>(ks.codes + st * BN, k_sets + t * BN, nk);
          load_values<Threads, BN + 1, int>(ks.bad + st * (BN + 1), nullptr, 0, 0);
        }
      },
      [&](int, int, int st, unsigned info) {
        if (block_partial(info)) {
          scrub_rows<Threads, BN, D>(ks.v + st * BN * kLd, flag_rows<BN>(ks.bad + st * (BN + 1)));
          if constexpr (kScrubK) {
            scrub_rows<Threads, BN, D>(ks.k + st * BN * kLd, flag_rows<BN>(ks.bad + st * (BN + 1)));
          }
        }
      },
      [&](int t, int, int st, unsigned info) {
        const TileKind kind = warp_kind(info);
        if (kind == TileKind::kSkip) return;
        const T* k_tile = ks.k + st * BN * kLd;
        const T* v_tile = ks.v + st * BN * kLd;
        const bool partial = block_partial(info), fold = !partial && foldable;
        uint32_t nan = 0;
        if (!fold) {
          const int* bad = ks.bad + st * (BN + 1);
          if (partial && bad[BN]) nan = flagged_bits<BN>(bad);
        }
        Frag<Acc, BN> s[M];
        SK_UNROLL for (int m = 0; m < M; ++m) s[m].zero();
        q_rows.template times<BN, BFrom::kRowsN>(s, k_tile, kLd);
        if (fold) {
          body(s, k_tile, v_tile, scale, std::true_type{});
        } else {
          if (kind == TileKind::kPartial) {
            SK_UNROLL for (int m = 0; m < M; ++m) {
              scale_and_mask(s[m], scale,
                             list.hidden<true>(16 * (M * warp_id() + m), ks.codes + st * BN), nan);
            }
          } else {
            SK_UNROLL for (int m = 0; m < M; ++m) scale_and_mask(s[m], scale, NoPairs{}, nan);
          }
          body(s, k_tile, v_tile, scale, std::false_type{});
        }
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
  if (p.len_q >= (int64_t(1) << 31) || p.len_k >= (int64_t(1) << 31)) {
    throw std::invalid_argument(std::string(fn) + ": at most 2^31 - 1 queries and keys, got " +
                                std::to_string(p.len_q) + " and " + std::to_string(p.len_k));
  }
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
