// Fused set-masked attention, backward (FlashAttention-2 style), torch-free.
//
// 1. prep: per query row delta = rowsum(dO * O) - dlse and the lse in the kernels'
//    exponent base (+inf on empty rows, so recomputed probabilities are 0 there); zeroes
//    the dQ accumulator and the dK/dV blocks' finish counts.
// 2. dK/dV: one block per (key tile, batch, kv head), 16 keys per warp; walks the query
//    tiles of every q head of the group (GQA sums there, in registers), recomputing
//    P^T = exp(K Q^T - lse) and dS^T = P^T * (V dO^T - delta). Query tiles are classified
//    from set-id ranges like the forward's key tiles.
// 3. dQ, either by fp32 atomics from the dK/dV blocks (dS through shared memory), turned
//    into dq by the last dK/dV block of each (batch, kv head) to finish, or, deterministic,
//    by a query-tile kernel that walks the key tiles like the forward and owns its rows of
//    dQ (no atomics; recomputes Q K^T and dO V^T).
// The gradient through lse enters as dS = P * (dP - delta) with delta including -dlse.
// Defines the backward's entry points (kernels/attention.h): include in one translation
// unit per target.
#pragma once
#include "kernels/attention_tiles.cuh"

namespace sarkernels::kernels {
namespace attention {

constexpr int kRowThreads = 128;  // threads per block of the row-wise kernels

// s <- P = exp(s - lse) (exp_for<T>), with lse(n, e) the lse of fragment element (n, e);
// kFold: s holds raw scores, taken to ExpBase units by `scale` in the exponent's FFMA.
template <typename T, bool kFold, typename Acc, int N, typename LseFn>
SK_DEVICE void recompute_probs(Frag<Acc, N>& s, LseFn lse, Acc scale) {
  SK_UNROLL for (int n = 0; n < N / 8; ++n) {
    SK_UNROLL for (int e = 0; e < 4; ++e) {
      const Acc x = s.x[n][e];
      s.x[n][e] = exp_for<T>(kFold ? x * scale - lse(n, e) : x - lse(n, e));
    }
  }
}

// prob <- 0 where hidden(n, e) (HiddenPairs, or NoPairs), else NaN where `nan` has the
// element's bit. After the exponent, so that the hidden pairs of a row whose lse is NaN
// still weigh 0.
template <typename Acc, int N, typename Hidden>
SK_DEVICE void mask_probs(Frag<Acc, N>& prob, Hidden hidden, uint32_t nan) {
  SK_UNROLL for (int n = 0; n < N / 8; ++n) {
    SK_UNROLL for (int e = 0; e < 4; ++e) {
      const Acc x = nan >> (4 * n + e) & 1 ? Acc(NAN) : prob.x[n][e];
      prob.x[n][e] = hidden(n, e) ? Acc(0) : x;
    }
  }
}

// dp <- dS = P * (dP - delta), with delta(n, e) that of fragment element (n, e). Unless
// every pair of the tile is seen (kAllSeen), P = 0 (a key the row does not see) gives 0
// even where a non-finite value made dP NaN; in a tile whose rows all see all its keys
// such a dP makes the row's delta NaN anyway.
template <bool kAllSeen, typename Acc, int N, typename DeltaFn>
SK_DEVICE void score_grads(Frag<Acc, N>& dp, const Frag<Acc, N>& prob, DeltaFn delta) {
  SK_UNROLL for (int n = 0; n < N / 8; ++n) {
    SK_UNROLL for (int e = 0; e < 4; ++e) {
      const Acc pr = prob.x[n][e], g = pr * (dp.x[n][e] - delta(n, e));
      dp.x[n][e] = kAllSeen || pr != Acc(0) ? g : Acc(0);
    }
  }
}

// The lse of a dK/dV visit's queries is stored in the order the lanes read it. A lane reads
// columns 8n + 2(lane % 4) + {0, 1} of every n-tile: BM / 4 consecutive slots here, read in
// 16-byte loads (BM / 16 of them for float) instead of BM / 8 pairs. (Fragment column c =
// 8n + 2q + b is held by the lanes of quad q = lane % 4.)
template <int BM>
SK_DEVICE int query_slot(int quad, int n) {
  return quad * (BM / 4) + 2 * n;
}
template <int BM>
SK_DEVICE int query_slot(int col) {
  return query_slot<BM>(col % 8 / 2, col / 8) + col % 2;
}

template <typename Acc, int BM>
struct LaneQueryValues {
  static_assert(BM / 4 * sizeof(Acc) % 16 == 0, "a lane's slots are whole 16-byte loads");
  Acc v[BM / 4];
  SK_DEVICE explicit LaneQueryValues(const Acc* tile) {
    const Acc* at = tile + query_slot<BM>(lane_id() % 4, 0);
    SK_UNROLL for (int j = 0; j < BM / 4; j += 16 / int(sizeof(Acc))) {
      const uint4 x = load16(at + j);
      memcpy(v + j, &x, 16);
    }
  }
  SK_DEVICE Acc operator()(int n, int e) const { return v[2 * n + (e & 1)]; }
};

// The dK/dV kernel's -delta, stored as the lanes' accumulators start: the 4 words a lane
// reads at slot (n, lane % 4) are (-delta[c], -delta[c + 1]) twice (c = 8n + 2(lane % 4):
// both rows of its fragment pair share the columns). dP^T's product then accumulates onto
// them, leaving dP - delta with no subtraction per score.
template <int BM>
SK_DEVICE int neg_delta_slot(int quad, int n) {
  return (quad * (BM / 8) + n) * 4;
}
template <int BM>
SK_DEVICE int neg_delta_slot(int col) {  // the first copy's
  return neg_delta_slot<BM>(col % 8 / 2, col / 8) + col % 2;
}

// This lane's 4 words of n-tile n.
template <int BM, typename Acc>
SK_DEVICE const Acc* lane_neg_delta(const Acc* tile, int n) {
  return tile + neg_delta_slot<BM>(lane_id() % 4, n);
}

template <typename Acc, int BM>
SK_DEVICE void seed_neg_delta(Frag<Acc, BM>& f, const Acc* tile) {
  SK_UNROLL for (int n = 0; n < BM / 8; ++n) {
    SK_UNROLL for (int j = 0; j < 4; j += 16 / int(sizeof(Acc))) {
      const uint4 x = load16(lane_neg_delta<BM>(tile, n) + j);
      memcpy(&f.x[n][j], &x, 16);
    }
  }
}

// ---------------------------------------------------------------- 1. prep

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    set_attention_bwd_prep_kernel(SetAttentionBwdParams g, AttentionBwdWorkspace w) {
  using Acc = acc_t<T>;
  constexpr int kPer = 16 / int(sizeof(T));
  const SetAttentionParams& p = g.fwd;
  const int64_t row = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  if (row >= p.batch * p.heads_q * p.len_q) return;
  const int64_t i = row % p.len_q, bh = row / p.len_q, b = bh / p.heads_q, h = bh % p.heads_q;
  const T* o = static_cast<const T*>(p.out) + out_offset(p, b, h, i);
  const T* dout = static_cast<const T*>(g.dout) + out_offset(p, b, h, i);
  Acc dot = 0;
  for (int c = 0; c < p.head_dim; c += kPer) {
    const uint4 ob = load16(o + c), db = load16(dout + c);
    T ov[kPer], dv[kPer];
    memcpy(ov, &ob, 16);
    memcpy(dv, &db, 16);
    SK_UNROLL for (int j = 0; j < kPer; ++j) dot += to_float(ov[j]) * to_float(dv[j]);
  }
  const int64_t lse_at = lse_offset(p, b, h, i);
  const Acc lse = static_cast<const Acc*>(p.lse)[lse_at];
  const bool empty = lse == Acc(-INFINITY);  // such a row's lse gradient goes nowhere
  if (g.dlse != nullptr && !empty) dot -= static_cast<const Acc*>(g.dlse)[lse_at];
  static_cast<Acc*>(w.delta)[row] = dot;
  static_cast<Acc*>(w.lse)[row] = empty ? Acc(INFINITY) : lse * ExpBase<Acc>::kPerNat;
  if (w.dq_accum != nullptr) {
    Acc* acc = static_cast<Acc*>(w.dq_accum) + row * p.head_dim;
    for (int c = 0; c < p.head_dim; c += 16 / int(sizeof(Acc))) store16(acc + c, uint4{0, 0, 0, 0});
    if (row < p.batch * p.heads_kv) w.done[row] = 0;  // (rows: B Hq Lq >= B Hkv)
  }
}

// The last of a (batch, kv head)'s `blocks` dK/dV blocks to get here turns the dQ sums of
// its q heads into dq (times the scale, in the inputs' dtype), while they are still in L2:
// a pass of its own would read them back from HBM. Every thread fences its reductions
// before the barrier that precedes the count; the counting thread fences after it, before
// the block reads. `last`: an int of shared memory.
template <typename T, int Threads>
SK_DEVICE void convert_dq_if_last(const SetAttentionBwdParams& g, const AttentionBwdWorkspace& w,
                                  int64_t bh, int blocks, int* last) {
  using Acc = acc_t<T>;
  const SetAttentionParams& p = g.fwd;
  thread_fence();
  sync_threads();
  if (thread_rank() == 0) {
    *last = atomic_add(w.done + bh, 1) == blocks - 1;
    thread_fence();
  }
  sync_threads();
  if (!*last) return;
  const int64_t group = p.heads_q / p.heads_kv, b = bh / p.heads_kv, hk = bh % p.heads_kv;
  const int64_t first = ((b * p.heads_q + hk * group) * p.len_q) * p.head_dim;
  const int64_t n = group * p.len_q * p.head_dim;  // a multiple of 8, as the head dim
  const Acc* acc = static_cast<const Acc*>(w.dq_accum) + first;
  T* dq = static_cast<T*>(g.dq) + first;
  constexpr int kAcc = 16 / int(sizeof(Acc)), kOut = 16 / int(sizeof(T));
  SK_NO_UNROLL for (int64_t i = int64_t(thread_rank()) * 8; i < n; i += int64_t(Threads) * 8) {
    Acc a[8];
    T out[8];
    SK_UNROLL for (int j = 0; j < 8; j += kAcc) {
      const uint4 v = load16_l2(acc + i + j);
      memcpy(a + j, &v, 16);
    }
    SK_UNROLL for (int j = 0; j < 8; ++j) out[j] = from_float<T>(a[j] * Acc(p.scale));
    SK_UNROLL for (int j = 0; j < 8; j += kOut) {
      uint4 v;
      memcpy(&v, out + j, 16);
      store16(dq + i + j, v);
    }
  }
}

// ---------------------------------------------------------------- 2. dK, dV (+ atomic dQ)

template <typename T, int D, int BN, int BM, bool kAtomicDq>
struct DkdvLayout {
  using Acc = acc_t<T>;
  static constexpr int kWarps = BN / 16, kThreads = 32 * kWarps;
  static constexpr size_t kK = 0;
  static constexpr size_t kV = kK + tile_bytes<T, BN, D>;
  static constexpr size_t kQ = kV + tile_bytes<T, BN, D>;  // two stages of everything below
  static constexpr size_t kDout = kQ + 2 * tile_bytes<T, BM, D>;
  static constexpr size_t kQCodes = kDout + 2 * tile_bytes<T, BM, D>;
  static constexpr size_t kLse = kQCodes + 2 * BM * sizeof(int32_t);
  static constexpr size_t kDelta = kLse + 2 * BM * sizeof(Acc);
  static_assert(kLse % 16 == 0 && kDelta % 16 == 0, "LaneQueryValues' loads are aligned");
  static constexpr size_t kDs = kDelta + 2 * 2 * BM * sizeof(Acc);  // (seed_neg_delta's)
  // dS^T [BN][BM], atomic dQ only
  static constexpr size_t kList = kDs + (kAtomicDq ? tile_bytes<T, BN, BM> : 0);
  static constexpr size_t kScratch = kList + sizeof(TileList);
  // scrub_rows' flags of the block's keys
  static constexpr size_t kBad = kScratch + kWarps * kFragScratch<T, BM> * sizeof(Acc);
  static constexpr size_t kBytes = kBad + (BN + 1) * sizeof(int);
};

// Register budget of one block per SM, as in the dQ kernel below. DC: the dK/dV columns of
// a block.
template <typename T, int D, int BN, int BM, int DC, bool kAtomicDq>
__global__ void __launch_bounds__(DkdvLayout<T, D, BN, BM, kAtomicDq>::kThreads, 1)
    set_attention_dkdv_kernel(SetAttentionBwdParams g, AttentionBwdWorkspace w) {
  using Acc = acc_t<T>;
  using Lay = DkdvLayout<T, D, BN, BM, kAtomicDq>;
  constexpr int kLd = tile_ld<T, D>, kDsLd = tile_ld<T, BM>;
  const SetAttentionParams& p = g.fwd;
  SK_DYNAMIC_SMEM(smem);
  T* const k_tile = reinterpret_cast<T*>(smem + Lay::kK);
  T* const v_tile = reinterpret_cast<T*>(smem + Lay::kV);
  T* const q_tiles = reinterpret_cast<T*>(smem + Lay::kQ);
  T* const dout_tiles = reinterpret_cast<T*>(smem + Lay::kDout);
  int32_t* const q_code_tiles = reinterpret_cast<int32_t*>(smem + Lay::kQCodes);
  Acc* const lse_tiles = reinterpret_cast<Acc*>(smem + Lay::kLse);
  Acc* const delta_tiles = reinterpret_cast<Acc*>(smem + Lay::kDelta);
  T* const ds_tile = reinterpret_cast<T*>(smem + Lay::kDs);
  const int warp = warp_id();
  Acc* const scratch = reinterpret_cast<Acc*>(smem + Lay::kScratch) + warp * kFragScratch<T, BM>;
  int* const k_bad = reinterpret_cast<int*>(smem + Lay::kBad);

  constexpr int kSplits = D / DC;
  // dP^T's accumulators start at -delta (seed_neg_delta) below head dim 256, where that
  // spills.
  constexpr bool kSeedDelta = D <= 128;
  // Atomic dQ stages dS^T from dK's product on tensor cores when no column split (whose
  // other blocks stage nothing) makes that product conditional.
  constexpr bool kStagePacked = kAtomicDq && kTensorCores<T> && kSplits == 1;
  T* const ds_rows = ds_tile + 16 * warp * kDsLd;
  // The block: (key tile, column split) fastest, then (batch, kv head) = bh. Derived again
  // after the walk, from blockIdx, so that few 64-bit values stay live across it.
  auto block_of = [&](int64_t& bh, int64_t& k0) {
    const int64_t k_tiles = ceil_div(p.len_k, BN);
    bh = blockIdx.x / (k_tiles * kSplits);
    k0 = blockIdx.x % k_tiles * BN;
    return int(blockIdx.x / k_tiles % kSplits);
  };
  int64_t bh, k0;
  const int split = block_of(bh, k0), c0 = split * DC;
  const int64_t b = bh / p.heads_kv, hk = bh % p.heads_kv;
  const int group = int(p.heads_q / p.heads_kv);
  const int nk = clamp_rows(p.len_k - k0, BN);
  const int64_t* k_sets = p.k_sets + b * p.len_k + k0;
  const int64_t* q_sets = p.q_sets + b * p.len_q;
  const IdRange block_k = warp_id_range<BN>(k_sets, nk);
  const IdRange warp_k = warp_id_range<16>(k_sets + 16 * warp, clamp_rows(nk - 16 * warp, 16));

  const int dim = int(p.head_dim);
  load_rows_async<Lay::kThreads, BN, D>(k_tile, k_row<T>(p, b, hk, k0), p.k_row_stride, nk, dim);
  load_rows_async<Lay::kThreads, BN, D>(v_tile, v_row<T>(p, b, hk, k0), p.v_row_stride, nk, dim);
  cp_async_commit();
  // Non-finite keys are scrubbed (and their rows' scores made NaN below where seen) for
  // dS K, which would carry them as 0 * inf into the queries that do not see them. Before
  // the walk: a register flag for "not yet" would be live across it.
  load_values<Lay::kThreads, BN + 1, int>(k_bad, nullptr, 0, 0);
  sync_threads();
  cp_async_wait<0>();
  scrub_rows<Lay::kThreads, BN, D>(k_tile, flag_rows<BN>(k_bad));
  sync_threads();  // the flags are read once, into a register, not on every visit
  const bool bad_keys = k_bad[BN] != 0;
  // The warp's keys and values, left operands of every visit's first two products, held in
  // registers at head dim 64 (16 a lane each; 4 ldmatrix a visit fewer for each).
  constexpr bool kHold = kHoldRows<T, D>;
  const SlabOperand<T, D, kHold> k_rows(k_tile + 16 * warp * kLd, kLd),
      v_rows(v_tile + 16 * warp * kLd, kLd);

  const Acc scale = Acc(p.scale) * ExpBase<Acc>::kPerNat;
  Frag<Acc, DC> dk, dv;  // columns c0 .. c0 + DC
  dk.zero();
  dv.zero();
  const int len_q = int(p.len_q);
  auto queries_in = [&](int t) { return clamp_rows(len_q - t * BM, BM); };
  // The group's first q head: its rows of q, dO and the workspace.
  const T* const q_group = q_row<T>(p, b, hk * group, 0);
  const T* const dout_group = static_cast<const T*>(g.dout) + out_offset(p, b, hk * group, 0);
  // Workspace rows are ints: set_attention_backward refuses 2^31 of them.
  const int row_group = int((b * p.heads_q + hk * group) * p.len_q);
  auto first_row = [&](int t, int rep) {  // workspace row of the tile's first query
    return row_group + rep * len_q + t * BM;
  };
  TileList& list = *reinterpret_cast<TileList*>(smem + Lay::kList);
  const bool whole_rows = dim == D;
  const TileCopy<Lay::kThreads, BM, D, T> q_copy(p.q_row_stride), dout_copy(p.out_row_stride);
  list.set_rows<Lay::kThreads, BN, false>(block_k, warp_k, k_sets, nk, p.strict);
  // (unrolled, head dim 256 spills on sm_80)
  for_each_needed_tile<Lay::kThreads, BM, kTensorCores<T> && D <= 128>(
      q_sets, len_q, int(group), list,
      [&](int t, IdRange queries) {
        return tile_info<false, Lay::kWarps>(list, queries, p.strict, queries_in(t) < BM,
                                             !whole_rows);
      },
      [&](int t, int rep, int st, unsigned info) {
        const int q0 = t * BM;
        const int row = first_row(t, rep);
        T* const q_to = q_tiles + st * BM * kLd;
        T* const dout_to = dout_tiles + st * BM * kLd;
        const T* const q_from =
            q_group + rows_offset(rep, p.q_head_stride) + rows_offset(q0, p.q_row_stride);
        const T* const dout_from =
            dout_group + rows_offset(rep, p.out_head_stride) + rows_offset(q0, p.out_row_stride);
        const bool partial = block_kind(info) == TileKind::kPartial;  // or ragged
        const int nq = queries_in(t);
        if (fixed_copy(info)) {
          q_copy(q_to, q_from, p.q_row_stride);
          dout_copy(dout_to, dout_from, p.out_row_stride);
        } else {
          q_copy.bounded(q_to, q_from, p.q_row_stride, nq, dim);
          dout_copy.bounded(dout_to, dout_from, p.out_row_stride, nq, dim);
        }
        if (partial) {  // the codes only serve the mask of partial tiles
          list.load_codes<Lay::kThreads, BM, false>(q_code_tiles + st * BM, q_sets + q0, nq);
        }
        const Acc* lse = static_cast<const Acc*>(w.lse) + uint32_t(row);
        const Acc* delta = static_cast<const Acc*>(w.delta) + uint32_t(row);
        for_thread_shares<Lay::kThreads, BM>([&](int i) {
          lse_tiles[st * BM + query_slot<BM>(i)] = i < nq ? lse[i] : Acc(INFINITY);
          const Acc neg_delta = i < nq ? -delta[i] : Acc(0);
          delta_tiles[st * 2 * BM + neg_delta_slot<BM>(i)] = neg_delta;
          delta_tiles[st * 2 * BM + neg_delta_slot<BM>(i) + 2] = neg_delta;
        });
      },
      // Likewise the queries of partial tiles, for dS^T Q; a NaN lse (issue() stored the
      // stage's before the barrier this follows) makes a query's probabilities NaN where
      // it sees and, masked after the exponent, 0 where it does not.
      [&](int, int, int st, unsigned info) {
        if (block_kind(info) == TileKind::kPartial) {
          scrub_rows<Lay::kThreads, BM, D>(q_tiles + st * BM * kLd, [&](int r) {
            lse_tiles[st * BM + query_slot<BM>(r)] = Acc(NAN);
          });
        }
      },
      [&](int t, int rep, int st, unsigned info) {
        const int nq = queries_in(t);
        const T* q_tile = q_tiles + st * BM * kLd;
        const T* dout_tile = dout_tiles + st * BM * kLd;
        const Acc* lse = lse_tiles + st * BM;
        const Acc* neg_delta = delta_tiles + st * 2 * BM;
        const TileKind kind = warp_kind(info);
        // dS^T of the warp's keys x the tile's queries. Set only where its product starts
        // (seeded with -delta), as long as no path after the branch reads it: else zeros
        // for the skipping warps are moved in before the branch, on every tile.
        Frag<Acc, BM> ds;
        if (kind != TileKind::kSkip) {
          Frag<Acc, BM> prob;
          prob.zero();
          k_rows.template times<BM, BFrom::kRowsN>(prob, q_tile, kLd);
          const bool partial = kind == TileKind::kPartial;
          recompute_probs<T, true>(prob, LaneQueryValues<Acc, BM>(lse), scale);
          if (partial || bad_keys) {
            const int r0 = 16 * warp + frag_row(0);  // this lane's keys: r0, r0 + 8
            const uint32_t nan = bad_keys ? row_bits<BM>(k_bad[r0] != 0, k_bad[r0 + 8] != 0) : 0;
            if (partial) {
              mask_probs(prob, list.hidden<false>(16 * warp, q_code_tiles + st * BM), nan);
            } else {
              mask_probs(prob, NoPairs{}, nan);
            }
          }
          if constexpr (kSeedDelta) {
            seed_neg_delta(ds, neg_delta);
          } else {
            ds.zero();
          }
          v_rows.template times<BM, BFrom::kRowsN>(ds, dout_tile, kLd);
          gemm_frag_a<T, DC, BM, BFrom::kRowsK>(dv, prob, scratch, dout_tile + c0, kLd);
          auto delta_of = [&](int n, int e) {  // 0 where ds holds dP - delta already
            return kSeedDelta ? Acc(0) : -lane_neg_delta<BM>(neg_delta, n)[e & 1];
          };
          if (partial) {
            score_grads<false>(ds, prob, delta_of);
          } else {
            score_grads<true>(ds, prob, delta_of);
          }
          if constexpr (kStagePacked) {  // dS^T as dS^T Q rounds it, packed once for both
            gemm_frag_a_each<T, DC, BM, BFrom::kRowsK>(
                dk, ds, q_tile + c0, kLd,
                [&](int k, const uint32_t (&af)[4]) { stage_packed<T, BM>(ds_rows, k, af); });
          } else {
            gemm_frag_a<T, DC, BM, BFrom::kRowsK>(dk, ds, scratch, q_tile + c0, kLd);
          }
        }
        if (kAtomicDq && split == 0) {
          // dS^T staged as the warps hold it (keys x queries); the warps then take items of
          // dS K, reading dS^T transposed.
          if constexpr (kStagePacked) {
            if (kind == TileKind::kSkip) {
              const uint32_t zeros[4] = {0, 0, 0, 0};
              SK_UNROLL for (int k = 0; k < BM / 16; ++k) stage_packed<T, BM>(ds_rows, k, zeros);
            }
          } else {
            if (kind == TileKind::kSkip) ds.zero();
            const Acc one[2] = {1, 1};
            stage_frag<T, BM>(ds_rows, ds, one);
          }
          sync_threads();
          // Items of kM slabs of 16 queries x kCols columns, spread over the warps: the
          // slab groups fastest, so a warp's items share its rows. On tensor cores up to
          // head dim 128 a warp's columns are one item (dS read once for all of them), and
          // 64-query tiles take 32 x 32 (16 ldmatrix of dS and K where 16 x 64 takes 20);
          // else 32 columns at a time keep dK and dV in registers.
          constexpr bool kWide = kTensorCores<T> && D <= 128;
          constexpr int kM = kWide && BM == 64 ? 2 : 1, kRowGroups = BM / 16 / kM;
          static_assert(Lay::kWarps % kRowGroups == 0, "the warps take whole slab groups");
          constexpr int kGroups = Lay::kWarps / kRowGroups, kCols = kWide ? D / kGroups : 32;
          static_assert(kCols % 16 == 0, "items are whole pairs of n-tiles");
          const int slab = kM * (warp % kRowGroups), r = 16 * slab + frag_row(0);
          // (a constant where one group: the passes' addresses then differ by immediates)
          const int first_col = kGroups == 1 ? 0 : warp / kRowGroups * kCols;
          auto add_slabs = [&](auto whole) {  // whole: no bounds to check
            constexpr bool kWhole = decltype(whole)::value;
            if (!kWhole && 16 * slab >= nq) return;
            const int cols = kWhole ? D : dim;  // a constant multiplier where whole
            Acc* const at = static_cast<Acc*>(w.dq_accum) +
                            rows_offset(first_row(t, rep) + r, cols) + uint32_t(frag_col(0, 0));
            auto item = [&](int c0) {
              Frag<Acc, kCols> dq[kM];
              SK_UNROLL for (int m = 0; m < kM; ++m) dq[m].zero();
              gemm_smem_a<T, kCols, BN, BFrom::kRowsK, AFrom::kRowsK>(
                  dq, ds_tile + 16 * slab, kDsLd, k_tile + c0, kLd);
              SK_UNROLL for (int m = 0; m < kM; ++m) {
                SK_UNROLL for (int n = 0; n < kCols / 8; ++n) {
                  SK_UNROLL for (int h = 0; h < 2; ++h) {  // c even, dim a multiple of 8
                    const int dr = 16 * m + 8 * h;  // this element's row past r
                    if (kWhole || (r + dr < nq && c0 + frag_col(n, 0) < cols)) {
                      atomic_add2(at + c0 + dr * cols + 8 * n, dq[m].x[n][2 * h],
                                  dq[m].x[n][2 * h + 1]);
                    }
                  }
                }
              }
            };
            constexpr int kStep = kGroups * kCols, kPasses = (D + kStep - 1) / kStep;
            // Unrolled where there are two passes at most (below head dim 256): the loop's own
            // bookkeeping was 12 instructions a pass; unrolled, head dim 256 and the bounded
            // form spill.
            if constexpr (kWhole && kPasses <= 2 && D <= 128) {
              SK_UNROLL for (int j = 0; j < kPasses; ++j) {
                if (const int c0 = first_col + j * kStep; D % kStep == 0 || c0 < D) item(c0);
              }
            } else {
              SK_NO_UNROLL for (int c0 = first_col; c0 < cols; c0 += kGroups * kCols) item(c0);
            }
          };
          if (!(info & kBoundedTile)) {
            add_slabs(std::true_type{});
          } else {
            add_slabs(std::false_type{});
          }
        }
      });

  const Acc dk_factor[2] = {Acc(p.scale), Acc(p.scale)}, dv_factor[2] = {1, 1};
  stage_frag<T, D>(k_tile + 16 * warp * kLd + c0, dk, dk_factor);
  stage_frag<T, D>(v_tile + 16 * warp * kLd + c0, dv, dv_factor);
  sync_threads();
  const int col0 = block_of(bh, k0) * DC;
  const int64_t at = (bh * p.len_k + k0) * dim + col0;
  const int cols = clamp_rows(dim - col0, DC);
  store_rows<Lay::kThreads, D>(static_cast<T*>(g.dk) + at, dim, k_tile + col0, nk, cols);
  store_rows<Lay::kThreads, D>(static_cast<T*>(g.dv) + at, dim, v_tile + col0, nk, cols);
  if (kAtomicDq && col0 == 0) {  // its flag in k_bad, free since the walk
    convert_dq_if_last<T, Lay::kThreads>(g, w, bh, int(ceil_div(p.len_k, BN)), k_bad);
  }
}

// ---------------------------------------------------------------- 3. dQ

template <typename T, int D, int BM, int BN>
struct DqLayout {
  static constexpr int kWarps = BM / 16, kThreads = 32 * kWarps;
  static constexpr size_t kQ = 0;
  static constexpr size_t kDout = kQ + tile_bytes<T, BM, D>;
  static constexpr size_t kKeys = kDout + tile_bytes<T, BM, D>;
  static constexpr size_t kList = kKeys + KeyStages<T, D, BN>::kBytes;
  static constexpr size_t kScratch = kList + sizeof(TileList);
  static constexpr size_t kBytes = kScratch + kWarps * kFragScratch<T, BN> * sizeof(acc_t<T>);
};

// Register budget of one block per SM: ptxas's default (occupancy-driven) budget spills
// at some head dims.
template <typename T, int D, int BM, int BN, int DC>
__global__ void __launch_bounds__(DqLayout<T, D, BM, BN>::kThreads, 1)
    set_attention_dq_kernel(SetAttentionBwdParams g, AttentionBwdWorkspace w) {
  using Acc = acc_t<T>;
  using Lay = DqLayout<T, D, BM, BN>;
  constexpr int kLd = tile_ld<T, D>;
  const SetAttentionParams& p = g.fwd;
  SK_DYNAMIC_SMEM(smem);
  T* const q_tile = reinterpret_cast<T*>(smem + Lay::kQ);
  T* const q_rows = q_tile + 16 * warp_id() * kLd;  // this warp's
  const T* const dout_rows = reinterpret_cast<T*>(smem + Lay::kDout) + 16 * warp_id() * kLd;
  Acc* const scratch =
      reinterpret_cast<Acc*>(smem + Lay::kScratch) + warp_id() * kFragScratch<T, BN>;
  const QueryBlock<1> qb = query_block<BM, D, DC, 1>(p);
  const int64_t row0 = (qb.b * p.heads_q + qb.h) * p.len_q + qb.q0;
  Acc lse[2], delta[2];
  SK_UNROLL for (int i = 0; i < 2; ++i) {
    const int r = 16 * warp_id() + frag_row(2 * i);
    lse[i] = r < qb.nq ? static_cast<const Acc*>(w.lse)[row0 + r] : Acc(INFINITY);
    delta[i] = r < qb.nq ? static_cast<const Acc*>(w.delta)[row0 + r] : Acc(0);
  }

  const T* dout = static_cast<const T*>(g.dout) + out_offset(p, qb.b, qb.h, qb.q0);
  const int dim = int(p.head_dim);
  load_rows_async<Lay::kThreads, BM, D>(q_tile, q_row<T>(p, qb.b, qb.h, qb.q0), p.q_row_stride,
                                        qb.nq, dim);
  load_rows_async<Lay::kThreads, BM, D>(reinterpret_cast<T*>(smem + Lay::kDout), dout,
                                        p.out_row_stride, qb.nq, dim);
  cp_async_commit();
  // The warp's queries and output gradients, left operands of every visit's first two
  // products, held in registers at head dim 64 (16 a lane each; 8 ldmatrix a visit fewer),
  // loaded once they land (before the first key tile is issued, not beside it).
  constexpr bool kHold = kHoldRows<T, D>;
  if constexpr (kHold) {
    cp_async_wait<0>();
    sync_threads();
  }
  const SlabOperand<T, D, kHold> q_held(q_rows, kLd), dout_held(dout_rows, kLd);
  Frag<Acc, DC> dq;  // columns c0 .. c0 + DC
  dq.zero();
  for_each_key_tile<Lay::kThreads, 1, false, true>(
      p, qb, q_held, KeyStages<T, D, BN>(smem + Lay::kKeys),
      *reinterpret_cast<TileList*>(smem + Lay::kList),
      [&](Frag<Acc, BN>(&s)[1], const T* k_tile, const T* v_tile, Acc scale, auto fold) {
        constexpr bool kFold = decltype(fold)::value;  // implies every pair seen
        recompute_probs<T, kFold>(s[0], [&](int, int e) { return lse[e >> 1]; }, scale);
        Frag<Acc, BN> ds;
        ds.zero();
        dout_held.template times<BN, BFrom::kRowsN>(ds, v_tile, kLd);
        score_grads<kFold>(ds, s[0], [&](int, int e) { return delta[e >> 1]; });
        gemm_frag_a<T, DC, BN, BFrom::kRowsK>(dq, ds, scratch, k_tile + qb.c0, kLd);
      });

  const Acc factor[2] = {Acc(p.scale), Acc(p.scale)};
  stage_frag<T, D>(q_rows + qb.c0, dq, factor);
  sync_threads();
  store_rows<Lay::kThreads, D>(static_cast<T*>(g.dq) + row0 * dim + qb.c0, dim, q_tile + qb.c0,
                               qb.nq, clamp_rows(dim - qb.c0, DC));
}

// ---------------------------------------------------------------- launch plans

inline LaunchPlan row_plan(int64_t rows) {
  return {dim3(unsigned(ceil_div(rows, kRowThreads))), dim3(kRowThreads), 0};
}

template <typename T, int D, int BN, int BM, int DC, bool kAtomicDq>
LaunchPlan dkdv_plan(const SetAttentionParams& p) {
  using Lay = DkdvLayout<T, D, BN, BM, kAtomicDq>;
  static_assert(Lay::kBytes <= kMaxSmem, "dK/dV tiles exceed shared memory");
  return {flat_grid("set_attention_backward", ceil_div(p.len_k, BN) * (D / DC),
                    p.batch * p.heads_kv),
          dim3(Lay::kThreads), Lay::kBytes};
}

template <typename T, int D, int BM, int BN, int DC>
LaunchPlan dq_plan(const SetAttentionParams& p) {
  using Lay = DqLayout<T, D, BM, BN>;
  static_assert(Lay::kBytes <= kMaxSmem, "dQ tiles exceed shared memory");
  return {flat_grid("set_attention_backward", ceil_div(p.len_q, BM) * (D / DC),
                    p.batch * p.heads_q),
          dim3(Lay::kThreads), Lay::kBytes};
}

inline size_t round16(size_t n) { return (n + 15) / 16 * 16; }

}  // namespace attention

size_t attention_bwd_workspace_bytes(const SetAttentionBwdParams& g, DType dtype,
                                            bool deterministic) {
  const SetAttentionParams& p = g.fwd;
  const size_t e = dtype == DType::kFloat64 ? 8 : 4, rows = size_t(p.batch * p.heads_q * p.len_q);
  const size_t counts = attention::round16(size_t(p.batch * p.heads_kv) * sizeof(int));
  return 2 * attention::round16(rows * e) +
         (deterministic ? 0 : rows * size_t(p.head_dim) * e + counts);
}

AttentionBwdWorkspace attention_bwd_workspace(const SetAttentionBwdParams& g, DType dtype,
                                                     bool deterministic, void* buffer) {
  const SetAttentionParams& p = g.fwd;
  const size_t e = dtype == DType::kFloat64 ? 8 : 4, rows = size_t(p.batch * p.heads_q * p.len_q);
  unsigned char* at = static_cast<unsigned char*>(buffer);
  const size_t vec = attention::round16(rows * e);
  if (deterministic) return {at, at + vec, nullptr, nullptr};
  return {at, at + vec, at + 2 * vec,
          reinterpret_cast<int*>(at + 2 * vec + rows * size_t(p.head_dim) * e)};
}

void set_attention_backward(const SetAttentionBwdParams& g, const AttentionBwdWorkspace& w,
                                   DType dtype, bool deterministic, cudaStream_t stream) {
  using namespace attention;
  const SetAttentionParams& p = g.fwd;
  const char* fn = "set_attention_backward";
  check_attention_operands(fn, p, dtype);
  if (p.batch * p.heads_q * p.len_q >= (int64_t(1) << 31)) {
    throw std::invalid_argument(std::string(fn) + ": at most 2^31 - 1 query rows (batch x "
                                "heads x queries), got " +
                                std::to_string(p.batch * p.heads_q * p.len_q));
  }
  const size_t e = dtype_size(dtype);
  check_rows_aligned(fn, "dout", g.dout,
                     {p.out_batch_stride, p.out_head_stride, p.out_row_stride}, e);
  for (const void* grad : {g.dq, g.dk, g.dv}) check_rows_aligned(fn, "dq/dk/dv", grad, {}, e);
  // (With no query rows the accumulator is empty, and its pointer may be null either way.)
  if ((deterministic != (w.dq_accum == nullptr) || deterministic != (w.done == nullptr)) &&
      p.batch * p.heads_q * p.len_q > 0) {
    throw std::invalid_argument(std::string(fn) + ": the workspace must have a dQ accumulator "
                                "and finish counts exactly when not deterministic");
  }
  dispatch_head_dim(dtype, p.head_dim, fn, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value;
    auto dkdv = [&](auto atomic_dq) {
      constexpr bool kAtomicDq = decltype(atomic_dq)::value;
      using Tiles = BwdTiles<T, D, kAtomicDq>;
      constexpr int BN = Tiles::kKeys, BM = Tiles::kQueries, DC = Tiles::kCols;
      launch("set_attention_dkdv", dkdv_plan<T, D, BN, BM, DC, kAtomicDq>(p), stream,
             set_attention_dkdv_kernel<T, D, BN, BM, DC, kAtomicDq>, g, w);
    };
    const int64_t rows = p.batch * p.heads_q * p.len_q;
    launch("set_attention_bwd_prep", row_plan(rows), stream, set_attention_bwd_prep_kernel<T>,
           g, w);
    // With no keys there is no dK/dV block to convert dQ: the query-tile kernel writes its
    // zeros.
    if (deterministic) {
      dkdv(std::false_type{});
    } else {
      dkdv(std::true_type{});
    }
    if (deterministic || p.len_k == 0) {
      constexpr int QM = DqTiles<T, D>::kM, QN = DqTiles<T, D>::kN, QC = DqTiles<T, D>::kCols;
      launch("set_attention_dq", dq_plan<T, D, QM, QN, QC>(p), stream,
             set_attention_dq_kernel<T, D, QM, QN, QC>, g, w);
    }
  });
}

}  // namespace sarkernels::kernels
