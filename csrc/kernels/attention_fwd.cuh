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
#include "kernels/online_softmax.cuh"

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
  for_each_key_tile<Lay::kThreads, M, (D > DC), false>(
      p, qb, SlabOperand<T, D, false, M>(q_rows, kLd), KeyStages<T, D, BN>(smem + Lay::kKeys),
      *reinterpret_cast<TileList*>(smem + Lay::kList),
      [&](auto& s, const T*, const T* v_tile, Acc scale, auto fold) {
        softmax.update(s, o, scale, fold);
        softmax.template pv<BN, DC, kLd>(o, s, scratch, v_tile + qb.c0);
      });

  Acc inv[M][2], lse[M][2];
  softmax.finish(o, inv, lse);
  const QueryBlock<M> at = query_place<BM, D, DC, M>(p);
  SK_UNROLL for (int m = 0; m < M; ++m) {  // the warp's own rows: no other warp reads them
    stage_frag<T, D>(q_rows + 16 * m * kLd + at.c0, o[m], inv[m]);
  }
  sync_threads();
  store_rows<Lay::kThreads, D>(
      static_cast<T*>(p.out) + out_offset(p, at.b, at.h, at.q0) + at.c0, p.out_row_stride,
      q_tile + at.c0, at.nq, clamp_rows(p.head_dim - at.c0, DC));
  if (at.c0 == 0 && lane_id() % 4 == 0) {
    Acc* lse_rows = static_cast<Acc*>(p.lse) + lse_offset(p, at.b, at.h, at.q0);
    SK_UNROLL for (int m = 0; m < M; ++m) {
      SK_UNROLL for (int i = 0; i < 2; ++i) {
        const int r = RW * warp_id() + 16 * m + frag_row(2 * i);
        if (r < at.nq) lse_rows[r] = lse[m][i];
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
