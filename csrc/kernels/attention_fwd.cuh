// Fused set-masked attention, forward (FlashAttention-2 style), torch-free.
//
// One block per (query tile of BM rows, batch, q head); each warp owns RW query rows and
// walks the key tiles of BN keys with an online softmax, K/V double-buffered through
// cp.async. A key tile is classified from set-id ranges (mask.h): never visited when no
// query of the block sees it, skipped by a warp when none of its rows do, computed without
// a per-element test (and with the scale folded into the exponent) when every row of the
// block sees every key. Writes out and lse; a row with no visible key gets zeros and lse
// -inf (found as l == 0 exactly, so a NaN in the inputs reaches its row's out and lse).
// Defines set_attention_forward (kernels/attention.h): include in one translation unit
// per target.
#pragma once
#include "kernels/attention_tiles.cuh"

namespace sarkernels::kernels {
namespace attention {

template <typename T, int D, int BM, int BN, int RW>
struct FwdLayout {
  static constexpr int kWarps = BM / RW, kThreads = 32 * kWarps;
  static constexpr size_t kQ = 0;
  static constexpr size_t kKeys = kQ + tile_bytes<T, BM, D>;
  static constexpr size_t kList = kKeys + KeyStages<T, D, BN>::kBytes;
  static constexpr size_t kScratch = kList + sizeof(TileList);
  static constexpr size_t kBytes = kScratch + kWarps * kFragScratch<T, BN> * sizeof(acc_t<T>);
};

// The running shift (in ExpBase units) and sum of this lane's two rows (g and g + 8) of
// each of M slabs. The shift follows the row max lazily, as in FlashAttention-4: o and l
// are rescaled only when a row's max exceeds its shift by more than kSlack (then the
// warp's rows all move to their max), so exponentials stay below 2^kSlack and most tiles
// after the first take no rescale. The price: o may hold up to 2^kSlack times the values'
// magnitude before normalising, so values within 2^-kSlack of the float range can
// overflow it (a row's output is then NaN). The max ignores NaN (fmax); a NaN score still makes its
// exponential, hence l, out and lse, NaN. On tensor cores (16-bit inputs, whose
// probabilities are rounded to 16 bits for P V) the exponential is exp_for's approximation
// and the row sums are those of the rounded probabilities, found by the P V product
// (pv below), so that out is normalised by what it summed.
template <typename T, int M>
struct OnlineSoftmax {
  using Acc = acc_t<T>;
  using Base = ExpBase<Acc>;
  static constexpr bool kMmaSums = kTensorCores<T>;
  static constexpr Acc kSlack = 8;
  Acc m[M][2];
  Acc l[M][2];  // this lane's share of the row sum (finish() adds the quad's); or:
  Frag<Acc, 8> sums[M];  // with kMmaSums: every column holds the row's whole sum

  SK_DEVICE OnlineSoftmax() {
    SK_UNROLL for (int i = 0; i < M; ++i) {
      m[i][0] = m[i][1] = Acc(-INFINITY);
      l[i][0] = l[i][1] = Acc(0);
      sums[i].zero();
    }
  }

  // o += P V for the probabilities p that update() left in s (and, kMmaSums, their sums).
  template <int N, int D, int Ld>
  SK_DEVICE void pv(Frag<Acc, D> (&o)[M], const Frag<Acc, N> (&p)[M], Acc* scratch,
                    const T* v_tile) {
    if constexpr (kMmaSums) {
      gemm_frag_a_row_sums<T, D, N, BFrom::kRowsK>(o, p, sums, v_tile, Ld);
    } else {
      gemm_frag_a<T, D, N, BFrom::kRowsK>(o, p, scratch, v_tile, Ld);
    }
  }

  static SK_DEVICE Acc exp(Acc x) { return exp_for<T>(x); }

  // s <- exp(s - shift), first moving the shifts (rescaling o and l) if a row's max got
  // past its shift by more than kSlack. Fold: s holds raw scores of a tile without hidden
  // pairs, `scale` (finite, >= 0) takes them to ExpBase units in the exponent's one FFMA;
  // otherwise s is already scaled, hidden pairs at -inf.
  template <bool kFold, int N, int D>
  SK_DEVICE void update(Frag<Acc, N> (&s)[M], Frag<Acc, D> (&o)[M], Acc scale,
                        std::bool_constant<kFold>) {
    Acc mx[M][2];
    bool grow = false;
    SK_UNROLL for (int mi = 0; mi < M; ++mi) {
      SK_UNROLL for (int i = 0; i < 2; ++i) {
        Acc x = Acc(-INFINITY);
        SK_UNROLL for (int n = 0; n < N / 8; ++n) {
          x = Base::max(x, Base::max(s[mi].x[n][2 * i], s[mi].x[n][2 * i + 1]));
        }
        x = Base::max(x, shfl_xor(x, 1));
        x = Base::max(x, shfl_xor(x, 2));
        if constexpr (kFold) x *= scale;  // scale >= 0: the max of the scaled scores
        mx[mi][i] = x;
        grow = grow || x - m[mi][i] > kSlack;  // also a first finite score (m = -inf)
      }
    }
    if (vote_any(grow)) {
      SK_UNROLL for (int mi = 0; mi < M; ++mi) {
        SK_UNROLL for (int i = 0; i < 2; ++i) {
          const Acc to = Base::max(m[mi][i], mx[mi][i]);
          // exp(-inf - -inf) must not make NaN: a shift of -inf stands for "no score yet".
          const Acc corr = m[mi][i] == Acc(-INFINITY) ? Acc(0)
                           : to == Acc(-INFINITY)     ? Acc(1)
                                                      : exp(m[mi][i] - to);
          l[mi][i] *= corr;
          sums[mi].x[0][2 * i] *= corr;
          sums[mi].x[0][2 * i + 1] *= corr;
          SK_UNROLL for (int n = 0; n < D / 8; ++n) {
            o[mi].x[n][2 * i] *= corr;
            o[mi].x[n][2 * i + 1] *= corr;
          }
          // A max of +inf (an inf score, or one the scale takes past the float range, which
          // the folded FFMA never rounds to inf) makes the row NaN, as inf - inf would: a
          // NaN shift makes every later exponential NaN, and stays (fmax would drop it).
          const bool dead = to == Acc(INFINITY) || m[mi][i] != m[mi][i];
          m[mi][i] = dead ? Acc(NAN) : to;
        }
      }
    }
    SK_UNROLL for (int mi = 0; mi < M; ++mi) {
      SK_UNROLL for (int i = 0; i < 2; ++i) {
        // Until a finite score shows up the shift is 0: hidden pairs give exp(-inf) = 0.
        const Acc shift = m[mi][i] == Acc(-INFINITY) ? Acc(0) : m[mi][i];
        Acc sum = 0;
        SK_UNROLL for (int n = 0; n < N / 8; ++n) {
          SK_UNROLL for (int j = 2 * i; j < 2 * i + 2; ++j) {
            Acc& x = s[mi].x[n][j];
            x = exp(kFold ? x * scale - shift : x - shift);
            if constexpr (!kMmaSums) sum += x;
          }
        }
        if constexpr (!kMmaSums) l[mi][i] += sum;
      }
    }
  }

  // Per row: the factor that normalises o (0 on an empty row) and the lse in nats. A row
  // whose o is not finite took a non-finite value from a tile the walk did not scrub (see
  // for_each_key_tile): its out and lse are NaN, as for a NaN score.
  template <int D>
  SK_DEVICE void finish(const Frag<Acc, D> (&o)[M], Acc (&inv)[M][2], Acc (&lse)[M][2]) const {
    SK_UNROLL for (int mi = 0; mi < M; ++mi) {
      SK_UNROLL for (int i = 0; i < 2; ++i) {
        Acc sum = sums[mi].x[0][2 * i];
        if constexpr (!kMmaSums) {
          sum = l[mi][i] + shfl_xor(l[mi][i], 1);
          sum += shfl_xor(sum, 2);
        }
        Acc zero = 0;  // stays 0 unless the row holds a NaN or inf (0 * inf is NaN)
        SK_UNROLL for (int n = 0; n < D / 8; ++n) {
          zero += o[mi].x[n][2 * i] * Acc(0) + o[mi].x[n][2 * i + 1] * Acc(0);
        }
        zero += shfl_xor(zero, 1);
        zero += shfl_xor(zero, 2);
        const bool bad = !(zero == Acc(0));
        const bool empty = sum == Acc(0);  // no visible key; never `sum > 0`, NaN must pass
        inv[mi][i] = bad ? Acc(NAN) : empty ? Acc(0) : Acc(1) / sum;
        lse[mi][i] = bad     ? Acc(NAN)
                     : empty ? Acc(-INFINITY)
                             : (m[mi][i] + Base::log(sum)) / Base::kPerNat;
      }
    }
  }
};

template <typename T, int D, int BM, int BN, int DC, int RW>
__global__ void __launch_bounds__(FwdLayout<T, D, BM, BN, RW>::kThreads, 1)
    set_attention_fwd_kernel(SetAttentionParams p) {
  using Acc = acc_t<T>;
  using Lay = FwdLayout<T, D, BM, BN, RW>;
  constexpr int kLd = tile_ld<T, D>, M = RW / 16;
  SK_DYNAMIC_SMEM(smem);
  T* const q_tile = reinterpret_cast<T*>(smem + Lay::kQ);
  T* const q_rows = q_tile + RW * warp_id() * kLd;  // this warp's
  Acc* const scratch =
      reinterpret_cast<Acc*>(smem + Lay::kScratch) + warp_id() * kFragScratch<T, BN>;
  const QueryBlock<M> qb = query_block<BM, D, DC, M>(p);

  load_rows_async<Lay::kThreads, BM, D>(q_tile, q_row<T>(p, qb.b, qb.h, qb.q0), p.q_row_stride,
                                        qb.nq, int(p.head_dim));
  cp_async_commit();
  Frag<Acc, DC> o[M];  // columns c0 .. c0 + DC
  SK_UNROLL for (int m = 0; m < M; ++m) o[m].zero();
  OnlineSoftmax<T, M> softmax;
  for_each_key_tile<Lay::kThreads, M, (D > DC)>(
      p, qb, q_rows, KeyStages<T, D, BN>(smem + Lay::kKeys),
      *reinterpret_cast<TileList*>(smem + Lay::kList),
      [&](auto& s, const T*, const T* v_tile, Acc scale, auto fold) {
        softmax.update(s, o, scale, fold);
        softmax.template pv<BN, DC, kLd>(o, s, scratch, v_tile + qb.c0);
      });

  Acc inv[M][2], lse[M][2];
  softmax.finish(o, inv, lse);
  SK_UNROLL for (int m = 0; m < M; ++m) {  // the warp's own rows: no other warp reads them
    stage_frag<T, D>(q_rows + 16 * m * kLd + qb.c0, o[m], inv[m]);
  }
  sync_threads();
  store_rows<Lay::kThreads, D>(
      static_cast<T*>(p.out) + out_offset(p, qb.b, qb.h, qb.q0) + qb.c0, p.out_row_stride,
      q_tile + qb.c0, qb.nq, clamp_rows(p.head_dim - qb.c0, DC));
  if (qb.c0 == 0 && lane_id() % 4 == 0) {
    Acc* lse_rows = static_cast<Acc*>(p.lse) + lse_offset(p, qb.b, qb.h, qb.q0);
    SK_UNROLL for (int m = 0; m < M; ++m) {
      SK_UNROLL for (int i = 0; i < 2; ++i) {
        const int r = RW * warp_id() + 16 * m + frag_row(2 * i);
        if (r < qb.nq) lse_rows[r] = lse[m][i];
      }
    }
  }
}

template <typename T, int D, int BM, int BN, int DC, int RW>
LaunchPlan fwd_plan(const SetAttentionParams& p) {
  using Lay = FwdLayout<T, D, BM, BN, RW>;
  static_assert(Lay::kBytes <= kMaxSmem, "forward tiles exceed shared memory");
  return {flat_grid("set_attention_forward", ceil_div(p.len_q, BM) * (D / DC),
                    p.batch * p.heads_q),
          dim3(Lay::kThreads), Lay::kBytes};
}

}  // namespace attention

void set_attention_forward(const SetAttentionParams& p, DType dtype, cudaStream_t stream) {
  using namespace attention;
  check_attention_operands("set_attention_forward", p, dtype);
  dispatch_head_dim(dtype, p.head_dim, "set_attention_forward", [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value, BM = FwdTiles<T, D>::kM, BN = FwdTiles<T, D>::kN;
    constexpr int DC = FwdTiles<T, D>::kCols, RW = FwdTiles<T, D>::kRows;
    launch("set_attention_fwd", fwd_plan<T, D, BM, BN, DC, RW>(p), stream,
           set_attention_fwd_kernel<T, D, BM, BN, DC, RW>, p);
  });
}

}  // namespace sarkernels::kernels
