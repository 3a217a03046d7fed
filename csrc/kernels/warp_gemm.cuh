// Warp-level GEMMs of the attention kernels, all in the mma.sync m16n8k16 accumulator
// layout: tensor cores (ldmatrix + mma_16816) for 16-bit inputs, scalar FMAs in acc_t<T>
// for float and double, so one kernel body serves every dtype.
//
// A warp owns a 16-row slab of its block's tile. Operands sit in shared memory as
// row-major tiles (rows padded to tile_ld, see attention_tiles.cuh), or, for the left
// operand, in an accumulator fragment of an earlier GEMM (P or dS, kept in registers).
#pragma once
#include <cstdint>

#include "kernels/convert.cuh"
#include "kernels/primitives.cuh"

// Loop unrolling hints for nvcc (the host compiler decides for itself).
#if SK_EMULATED
#define SK_UNROLL
#define SK_NO_UNROLL
#else
#define SK_UNROLL _Pragma("unroll")
#define SK_NO_UNROLL _Pragma("unroll 1")
#endif

namespace sarkernels::kernels::attention {

template <typename T>
inline constexpr bool kTensorCores = sizeof(T) == 2;

// A warp's 16 x N accumulator tile in the mma.sync C layout: with g = lane / 4 and
// t = lane % 4, x[n][e] is row g + 8 (e / 2), column 8 n + 2 t + e % 2.
template <typename Acc, int N>
struct Frag {
  static_assert(N % 8 == 0, "fragments are 8 columns wide");
  Acc x[N / 8][4];

  SK_DEVICE void zero() {
    SK_UNROLL for (int n = 0; n < N / 8; ++n) {
      SK_UNROLL for (int e = 0; e < 4; ++e) x[n][e] = Acc(0);
    }
  }
};
SK_DEVICE int frag_row(int e) { return lane_id() / 4 + 8 * (e >> 1); }
SK_DEVICE int frag_col(int n, int e) { return 8 * n + 2 * (lane_id() % 4) + (e & 1); }

// How the right operand B (K x N) is stored: as the rows of X = B^T ([N][K], e.g. K in
// Q K^T) or as X = B itself ([K][N], e.g. V in P V; read with ldmatrix.trans).
enum class BFrom { kRowsN, kRowsK };
// How a shared left operand A (M x K) is stored: as its rows ([M][K]) or as those of A^T
// ([K][M], e.g. dS^T staged from the dK/dV kernel's fragments; read with ldmatrix.trans).
enum class AFrom { kRowsM, kRowsK };

// Shared-memory scratch a scalar-path warp needs to turn a K-column fragment into a left
// operand (none on the tensor-core path, where the fragment is repacked in registers).
template <typename T, int K>
inline constexpr int kFragScratch = kTensorCores<T> ? 0 : 16 * K;

namespace detail {

// B fragments of n-tiles n0/8 (b[0], b[1]) and n0/8 + 1 (b[2], b[3]) at k-step k0.
template <typename T, BFrom L>
SK_DEVICE void load_b_pair(uint32_t (&b)[4], const T* x, int ldx, int n0, int k0) {
  const int l = lane_id(), j = l / 8, r = l % 8;
  if constexpr (L == BFrom::kRowsN) {
    ldmatrix<4, false>(b, x + (n0 + r + 8 * (j >> 1)) * ldx + k0 + 8 * (j & 1));
  } else {
    ldmatrix<4, true>(b, x + (k0 + r + 8 * (j & 1)) * ldx + n0 + 8 * (j >> 1));
  }
}

// c(m) += a[m] (16 x 16 A fragments at k-step k0) * B[k0 .. k0 + 16)[0 .. N) for the M
// 16-row slabs of a warp: each B fragment is loaded once for all of them.
template <typename T, int N, BFrom L, int M, typename CFn>
SK_DEVICE void mma_k_step(CFn c, const uint32_t (&a)[M][4], const T* x, int ldx, int k0) {
  static_assert(N % 16 == 0, "tensor-core GEMMs take N in multiples of 16");
  SK_UNROLL for (int p = 0; p < N / 16; ++p) {
    uint32_t b[4];
    load_b_pair<T, L>(b, x, ldx, 16 * p, k0);
    const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
    SK_UNROLL for (int m = 0; m < M; ++m) {
      auto& cm = c(m);
      mma_16816<T>(cm.x[2 * p], a[m], b0, cm.x[2 * p]);
      mma_16816<T>(cm.x[2 * p + 1], a[m], b1, cm.x[2 * p + 1]);
    }
  }
}

// c += A * B element by element; a(r, k) gives A. Like the mma path, products are summed
// over k-steps of 16 before each is added to c (plain running sums over long K lose
// several times the precision), 32 columns at a time to bound the registers.
template <typename T, int N, int K, BFrom L, typename AFn>
SK_DEVICE void scalar_gemm(Frag<acc_t<T>, N>& c, AFn a, const T* x, int ldx) {
  using Acc = acc_t<T>;
  static_assert(K % 16 == 0, "GEMMs take K in multiples of 16");
  constexpr int kTiles = N / 8, kBlock = kTiles % 4 == 0 ? 4 : kTiles % 2 == 0 ? 2 : 1;
  const int r = frag_row(0), c0 = frag_col(0, 0);
  SK_UNROLL for (int n0 = 0; n0 < kTiles; n0 += kBlock) {
    SK_NO_UNROLL for (int k0 = 0; k0 < K; k0 += 16) {
      Acc step[kBlock][4] = {};
      SK_NO_UNROLL for (int k = k0; k < k0 + 16; ++k) {
        const Acc a0 = a(r, k), a1 = a(r + 8, k);
        SK_UNROLL for (int n = 0; n < kBlock; ++n) {
          SK_UNROLL for (int j = 0; j < 2; ++j) {
            const int col = c0 + 8 * (n0 + n) + j;
            const Acc bv = to_float(L == BFrom::kRowsN ? x[col * ldx + k] : x[k * ldx + col]);
            step[n][j] += a0 * bv;
            step[n][j + 2] += a1 * bv;
          }
        }
      }
      SK_UNROLL for (int n = 0; n < kBlock; ++n) {
        SK_UNROLL for (int e = 0; e < 4; ++e) c.x[n0 + n][e] += step[n][e];
      }
    }
  }
}

// The A fragment of rows m0 .. m0 + 15 at k-step k0 of a shared tile (a, row stride lda;
// LA: stored as A's rows or as A^T's). Lane l addresses row l % 8 of 8 x 8 matrix j = l / 8:
// (rows, k) blocks (0, 0), (8, 0), (0, 8), (8, 8) of the 16 x 16 tile.
template <AFrom LA, typename T>
SK_DEVICE void load_a(uint32_t (&af)[4], const T* a, int lda, int m0, int k0) {
  constexpr bool kT = LA == AFrom::kRowsK;
  const int l = lane_id(), r = l % 8, j = l / 8;
  const int m = m0 + 8 * (j & 1), k = k0 + 8 * (j >> 1);  // block j's origin
  ldmatrix<4, kT>(af, kT ? a + (k + r) * lda + m : a + (m + r) * lda + k);
}

// c(m) (16 x N) += A * B for m < M, with A the warp's 16M x K rows of a shared tile (a,
// row stride lda; LA: stored as A's rows or as A^T's), slab m being rows 16m .. 16m + 15.
template <typename T, int N, int K, BFrom L, int M, AFrom LA, typename CFn>
SK_DEVICE void gemm_smem_a(CFn c, const T* a, int lda, const T* x, int ldx) {
  constexpr bool kT = LA == AFrom::kRowsK;
  if constexpr (kTensorCores<T>) {
    static_assert(K % 16 == 0, "tensor-core GEMMs take K in multiples of 16");
    SK_UNROLL for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t af[M][4];
      SK_UNROLL for (int m = 0; m < M; ++m) load_a<LA>(af[m], a, lda, 16 * m, k0);
      mma_k_step<T, N, L, M>(c, af, x, ldx, k0);
    }
  } else {
    SK_UNROLL for (int m = 0; m < M; ++m) {
      scalar_gemm<T, N, K, L>(
          c(m),
          [&](int r, int k) {
            const int row = 16 * m + r;
            return to_float(kT ? a[k * lda + row] : a[row * lda + k]);
          },
          x, ldx);
    }
  }
}

// c(m) (16 x N) += a(m) * B for m < M, with a(m) 16 x K fragments, rounded to T on the
// tensor-core path as FlashAttention does; there also on_a(m, k, af) with the packed A
// fragments of slab m at k-step k. `scratch` is the warp's kFragScratch<T, K> elements (the
// scalar path, which takes one slab at a time).
template <typename T, int N, int K, BFrom L, int M, typename CFn, typename AFn,
          typename OnA>
SK_DEVICE void gemm_frag_a(CFn c, AFn a, acc_t<T>* scratch, const T* x, int ldx, OnA on_a) {
  if constexpr (kTensorCores<T>) {
    static_assert(K % 16 == 0, "tensor-core GEMMs take K in multiples of 16");
    SK_UNROLL for (int k = 0; k < K / 16; ++k) {
      // The C layout of columns 16k .. 16k + 15 is the A layout of k-step k.
      uint32_t af[M][4];
      SK_UNROLL for (int m = 0; m < M; ++m) {
        const auto& am = a(m);
        af[m][0] = pack2<T>(am.x[2 * k][0], am.x[2 * k][1]);
        af[m][1] = pack2<T>(am.x[2 * k][2], am.x[2 * k][3]);
        af[m][2] = pack2<T>(am.x[2 * k + 1][0], am.x[2 * k + 1][1]);
        af[m][3] = pack2<T>(am.x[2 * k + 1][2], am.x[2 * k + 1][3]);
        on_a(m, k, af[m]);
      }
      mma_k_step<T, N, L, M>(c, af, x, ldx, 16 * k);
    }
  } else {
    SK_UNROLL for (int m = 0; m < M; ++m) {
      sync_warp();  // every lane is done reading the scratch's previous contents
      SK_UNROLL for (int n = 0; n < K / 8; ++n) {
        SK_UNROLL for (int e = 0; e < 4; ++e) {
          scratch[frag_row(e) * K + frag_col(n, e)] = a(m).x[n][e];
        }
      }
      sync_warp();
      scalar_gemm<T, N, K, L>(
          c(m), [&](int r, int k) { return scratch[r * K + k]; }, x, ldx);
    }
  }
}

}  // namespace detail

// The accessor of M slabs held as an array, or of a single one.
template <typename F, int M>
SK_DEVICE auto slabs(F (&f)[M]) {
  return [&f](int m) -> F& { return f[m]; };
}
template <typename F>
SK_DEVICE auto slabs(F& f) {
  return [&f](int) -> F& { return f; };
}

// c (16 x N, or M such slabs: Frag[M]) += A * B with A the warp's 16 (16M) x K rows of a
// shared tile (a, row stride lda).
template <typename T, int N, int K, BFrom L, AFrom LA = AFrom::kRowsM, typename C>
SK_DEVICE void gemm_smem_a(C& c, const T* a, int lda, const T* x, int ldx) {
  constexpr int M = sizeof(C) / sizeof(Frag<acc_t<T>, N>);
  detail::gemm_smem_a<T, N, K, L, M, LA>(slabs(c), a, lda, x, ldx);
}

// A warp's 16M x K rows of a shared tile (row-major, row stride lda; M slabs of 16) as the
// left operand of products that share it: with kHeld (tensor cores only) its fragments are
// loaded once, into M K / 4 registers a lane, so that later products read no shared memory
// for it; else each product reads the tile.
template <typename T, int K, bool kHeld, int M = 1>
struct SlabOperand {
  static_assert(!kHeld || kTensorCores<T>, "fragments are held on the tensor-core path");
  const T* a;
  int lda;
  uint32_t f[kHeld ? K / 16 : 1][M][4];

  SK_DEVICE SlabOperand(const T* a, int lda) : a(a), lda(lda) {
    if constexpr (kHeld) {
      SK_UNROLL for (int k = 0; k < K / 16; ++k) {
        SK_UNROLL for (int m = 0; m < M; ++m) {
          detail::load_a<AFrom::kRowsM>(f[k][m], a, lda, 16 * m, 16 * k);
        }
      }
    }
  }

  // c (16 x N, or Frag[M]) += A * B
  template <int N, BFrom L, typename C>
  SK_DEVICE void times(C& c, const T* x, int ldx) const {
    static_assert(sizeof(C) == M * sizeof(Frag<acc_t<T>, N>), "one C slab per A slab");
    if constexpr (kHeld) {
      SK_UNROLL for (int k = 0; k < K / 16; ++k) {
        detail::mma_k_step<T, N, L, M>(slabs(c), f[k], x, ldx, 16 * k);
      }
    } else {
      gemm_smem_a<T, N, K, L>(c, a, lda, x, ldx);
    }
  }
};

// Where the backward kernels hold their 16-row operands (16 registers a lane each at head
// dim 64, beside dK and dV or dQ): tensor cores, head dims up to 64.
template <typename T, int D>
inline constexpr bool kHoldRows = kTensorCores<T> && D <= 64;

// c (16 x N, or Frag[M]) += A * B with A = the fragment(s) `a` (16 x K each), rounded to
// T on the tensor-core path. `scratch` is the warp's kFragScratch<T, K> elements.
template <typename T, int N, int K, BFrom L, typename C, typename A>
SK_DEVICE void gemm_frag_a(C& c, const A& a, acc_t<T>* scratch, const T* x, int ldx) {
  constexpr int M = sizeof(C) / sizeof(Frag<acc_t<T>, N>);
  static_assert(sizeof(A) == M * sizeof(Frag<acc_t<T>, K>), "one A fragment per C slab");
  detail::gemm_frag_a<T, N, K, L, M>(slabs(c), slabs(a), scratch, x, ldx,
                                     [](int, int, const uint32_t (&)[4]) {});
}

// gemm_frag_a on tensor cores for one slab that also hands on_a(k, af) its packed A
// fragment of each k-step (A rounded to T once for a caller that stores it too).
template <typename T, int N, int K, BFrom L, typename C, typename A, typename OnA>
SK_DEVICE void gemm_frag_a_each(C& c, const A& a, const T* x, int ldx, OnA on_a) {
  static_assert(kTensorCores<T>, "packed A fragments exist on the tensor-core path");
  detail::gemm_frag_a<T, N, K, L, 1>(slabs(c), slabs(a), nullptr, x, ldx,
                                     [&](int, int k, const uint32_t (&af)[4]) { on_a(k, af); });
}

// gemm_frag_a on tensor cores that also adds the row sums of each slab of `a`, as rounded
// to T for the product, to every column of sums[m] (16 x 8: one more mma per k-step, with
// B all ones, instead of an add per element).
template <typename T, int N, int K, BFrom L, typename C, typename A, int M>
SK_DEVICE void gemm_frag_a_row_sums(C& c, const A& a, Frag<float, 8> (&sums)[M], const T* x,
                                    int ldx) {
  static_assert(kTensorCores<T>, "row sums by mma take 16-bit inputs");
  static_assert(sizeof(A) == M * sizeof(Frag<float, K>), "one A fragment per slab");
  const uint32_t one = pack2<T>(1.0f, 1.0f), ones[2] = {one, one};
  detail::gemm_frag_a<T, N, K, L, M>(slabs(c), slabs(a), nullptr, x, ldx,
                                     [&](int m, int, const uint32_t (&af)[4]) {
                                       mma_16816<T>(sums[m].x[0], af, ones, sums[m].x[0]);
                                     });
}

}  // namespace sarkernels::kernels::attention
