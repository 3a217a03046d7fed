// The online softmax of the query-row kernels (the fused forward, the split-KV decode):
// a warp's M 16-row slabs of scores per key tile in, probabilities for P V out, with the
// running shift, the row sums and the final normalisation and lse.
#pragma once
#include <type_traits>

#include "kernels/attention_tiles.cuh"

namespace sarkernels::kernels::attention {

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
  // past its shift by more than kSlack. Fold: s holds raw scores, `scale` (finite, >= 0)
  // takes them to ExpBase units in the exponent's one FFMA (a hidden pair may be a raw
  // -inf only where scale > 0); otherwise s is already scaled, hidden pairs at -inf.
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

}  // namespace sarkernels::kernels::attention
