// Fused set-masked attention, forward (FlashAttention-2 style), torch-free.
//
// One block per (query tile of BM rows, batch, q head); each warp owns 16 query rows and
// walks the key tiles of BN keys with an online softmax, K/V double-buffered through
// cp.async. A key tile is classified from set-id ranges (mask.h): skipped by the block
// when no query of the block sees it (no load), skipped by a warp when none of its rows
// do, computed without a per-element test when fully visible. Writes out and lse; a row
// with no visible key gets zeros and lse -inf (found as l == 0 exactly, so a NaN in the
// inputs reaches its row's out and lse).
// Defines set_attention_forward (kernels/attention.h): include in one translation unit
// per target.
#pragma once
#include "kernels/attention_tiles.cuh"

namespace sarkernels::kernels {
namespace attention {

template <typename T, int D, int BM, int BN>
struct FwdLayout {
  static constexpr int kWarps = BM / 16, kThreads = 32 * kWarps;
  static constexpr size_t kQ = 0;
  static constexpr size_t kKeys = kQ + tile_bytes<T, BM, D>;
  static constexpr size_t kScratch = kKeys + KeyStages<T, D, BN>::kBytes;
  static constexpr size_t kBytes = kScratch + kWarps * kFragScratch<T, BN> * sizeof(acc_t<T>);
};

// The running max and sum of this lane's two rows (g and g + 8). Scores arrive scaled
// into ExpBase units with hidden pairs at -inf. The max ignores NaN (fmax); a NaN score
// still makes its exponential, hence l, out and lse, NaN.
template <typename Acc>
struct OnlineSoftmax {
  using Base = ExpBase<Acc>;
  Acc m[2] = {-INFINITY, -INFINITY};
  Acc l[2] = {0, 0};  // this lane's share of the row sum; finish() adds the quad's

  // s <- exp(s - running max), rescaling o and l to the new max.
  template <int N, int D>
  SK_DEVICE void update(Frag<Acc, N>& s, Frag<Acc, D>& o) {
    SK_UNROLL for (int i = 0; i < 2; ++i) {
      Acc mx = m[i];
      SK_UNROLL for (int n = 0; n < N / 8; ++n) {
        mx = Base::max(mx, Base::max(s.x[n][2 * i], s.x[n][2 * i + 1]));
      }
      mx = Base::max(mx, shfl_xor(mx, 1));
      mx = Base::max(mx, shfl_xor(mx, 2));
      // Until a finite score shows up the shift is 0: hidden pairs give exp(-inf) = 0.
      const Acc shift = mx == Acc(-INFINITY) ? Acc(0) : mx;
      const Acc corr = m[i] == Acc(-INFINITY) ? Acc(0) : Base::exp(m[i] - shift);
      Acc sum = 0;
      SK_UNROLL for (int n = 0; n < N / 8; ++n) {
        SK_UNROLL for (int j = 2 * i; j < 2 * i + 2; ++j) {
          s.x[n][j] = Base::exp(s.x[n][j] - shift);
          sum += s.x[n][j];
        }
      }
      l[i] = l[i] * corr + sum;
      SK_UNROLL for (int n = 0; n < D / 8; ++n) {
        o.x[n][2 * i] *= corr;
        o.x[n][2 * i + 1] *= corr;
      }
      m[i] = mx;
    }
  }

  // Per row: the factor that normalises o (0 on an empty row) and the lse in nats.
  SK_DEVICE void finish(Acc (&inv)[2], Acc (&lse)[2]) const {
    SK_UNROLL for (int i = 0; i < 2; ++i) {
      Acc sum = l[i] + shfl_xor(l[i], 1);
      sum += shfl_xor(sum, 2);
      const bool empty = sum == Acc(0);  // no visible key; never `sum > 0`, NaN must pass
      inv[i] = empty ? Acc(0) : Acc(1) / sum;
      lse[i] = empty ? Acc(-INFINITY) : (m[i] + Base::log(sum)) / Base::kPerNat;
    }
  }
};

template <typename T, int D, int BM, int BN, int DC>
__global__ void __launch_bounds__(FwdLayout<T, D, BM, BN>::kThreads)
    set_attention_fwd_kernel(SetAttentionParams p) {
  using Acc = acc_t<T>;
  using Lay = FwdLayout<T, D, BM, BN>;
  constexpr int kLd = tile_ld<T, D>;
  SK_DYNAMIC_SMEM(smem);
  T* const q_tile = reinterpret_cast<T*>(smem + Lay::kQ);
  T* const q_rows = q_tile + 16 * warp_id() * kLd;  // this warp's
  Acc* const scratch =
      reinterpret_cast<Acc*>(smem + Lay::kScratch) + warp_id() * kFragScratch<T, BN>;
  const QueryBlock qb = query_block<BM, D, DC>(p);

  load_rows_async<Lay::kThreads, BM, D>(q_tile, q_row<T>(p, qb.b, qb.h, qb.q0), p.q_row_stride,
                                        qb.nq, int(p.head_dim));
  cp_async_commit();
  Frag<Acc, DC> o;  // columns c0 .. c0 + DC
  o.zero();
  OnlineSoftmax<Acc> softmax;
  for_each_key_tile<Lay::kThreads>(
      p, qb, q_rows, KeyStages<T, D, BN>(smem + Lay::kKeys),
      [&](Frag<Acc, BN>& s, const T*, const T* v_tile) {
        softmax.update(s, o);
        gemm_frag_a<T, DC, BN, BFrom::kRowsK>(o, s, scratch, v_tile + qb.c0, kLd);
      });

  Acc inv[2], lse[2];
  softmax.finish(inv, lse);
  stage_frag<T, D>(q_rows + qb.c0, o, inv);  // the warp's own rows: no other warp reads them
  sync_threads();
  store_rows<Lay::kThreads, D>(
      static_cast<T*>(p.out) + out_offset(p, qb.b, qb.h, qb.q0) + qb.c0, p.out_row_stride,
      q_tile + qb.c0, qb.nq, clamp_rows(p.head_dim - qb.c0, DC));
  if (qb.c0 == 0 && lane_id() % 4 == 0) {
    Acc* lse_rows = static_cast<Acc*>(p.lse) + lse_offset(p, qb.b, qb.h, qb.q0);
    SK_UNROLL for (int i = 0; i < 2; ++i) {
      const int r = 16 * warp_id() + frag_row(2 * i);
      if (r < qb.nq) lse_rows[r] = lse[i];
    }
  }
}

template <typename T, int D, int BM, int BN, int DC>
LaunchPlan fwd_plan(const SetAttentionParams& p) {
  using Lay = FwdLayout<T, D, BM, BN>;
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
    constexpr int DC = FwdTiles<T, D>::kCols;
    launch("set_attention_fwd", fwd_plan<T, D, BM, BN, DC>(p), stream,
           set_attention_fwd_kernel<T, D, BM, BN, DC>, p);
  });
}

}  // namespace sarkernels::kernels
