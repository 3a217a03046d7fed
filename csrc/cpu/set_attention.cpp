// CPU set-masked attention, forward and backward.
//
// Work is cut into (batch, head, q-tile) units. For a q-tile, key tiles are classified
// with the shared mask rule; invisible tiles are skipped, consecutive visible tiles are
// merged into runs so that sorted set ids cost one GEMM per run, and only "partial" tiles
// get a per-element test. Scores exist for one q-tile at a time (never Lq x Lk).
// T is float or double: the glue upcasts half/bfloat16 before calling.
#include "cpu/set_attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/row_ops.h"
#include "sarkernels/mask.h"

namespace sarkernels::cpu {
namespace {

constexpr int64_t kTileQ = 96;
constexpr int64_t kTileK = 16;

// Score scratch handed to BLAS, a tensor's memory: ATen's CPU allocator aligns it to 64
// bytes. MKL may order a product's sums by the alignment of its operands (Intel: "Aligning
// Data for Consistent Results"); malloc'd memory (a std::vector's) sits wherever the heap's
// history puts it, so the same inputs could round differently from one call to the next.
// Here every operand's alignment follows from the shapes alone.
template <typename T>
T* scratch(at::Tensor& buffer, int64_t n) {
  if (!buffer.defined() || buffer.numel() < n) {
    buffer = at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  }
  return buffer.data_ptr<T>();
}

template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Row-major C[M, N] = alpha * op(A) @ op(B) + beta * C, through ATen's BLAS.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  at::Tensor A = trans_a ? matrix(a, k, m, lda).t() : matrix(a, m, k, lda);
  at::Tensor B = trans_b ? matrix(b, n, k, ldb).t() : matrix(b, k, n, ldb);
  at::Tensor C = matrix(c, m, n, ldc);
  at::addmm_out(C, C, A, B, beta, alpha);
}

// MKL's first products in a process, made by several threads at once, came out with other
// bits now and then: on an AVX-512 Xeon, in about one fresh process in 25 the first
// training step's attention differed, never a later call (the operands' shapes and
// alignments were the same). So before the kernels' first parallel region, each product
// variant they use runs once on this thread and then once on every thread of the pool;
// the results are thrown away.
template <typename T>
void warm_blas_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    constexpr int64_t n = kTileQ;
    const int64_t threads = at::get_num_threads();
    const at::Tensor buffer =
        at::zeros({(3 + threads) * n * n}, c10::CppTypeToScalarType<T>::value);
    auto products = [&](int64_t slot) {  // slot: whose output rows
      const T* a = buffer.data_ptr<T>();
      T* c = buffer.data_ptr<T>() + (2 + slot) * n * n;
      constexpr bool kTrans[3][2] = {{false, true}, {false, false}, {true, false}};
      for (const auto& t : kTrans) gemm<T>(t[0], t[1], n, n, n, T(1), a, n, a + n * n, n, T(1), c, n);
    };
    products(0);
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) products(1 + t);
    });
  });
}

// Min and max set id of each kTileK-wide key tile, for every batch row.
struct KeyTiles {
  int64_t count;
  std::vector<int64_t> lo, hi;  // [batch * count]

  explicit KeyTiles(const SetAttentionParams& p)
      : count((p.len_k + kTileK - 1) / kTileK), lo(p.batch * count), hi(p.batch * count) {
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t* ks = p.k_sets + b * p.len_k;
      for (int64_t t = 0; t < count; ++t) {
        int64_t mn = std::numeric_limits<int64_t>::max(), mx = std::numeric_limits<int64_t>::min();
        for (int64_t j = t * kTileK; j < std::min(p.len_k, (t + 1) * kTileK); ++j) {
          mn = std::min(mn, ks[j]);
          mx = std::max(mx, ks[j]);
        }
        lo[b * count + t] = mn;
        hi[b * count + t] = mx;
      }
    }
  }
};

// The visible key columns of one q-tile: runs of consecutive non-skipped key tiles laid
// side by side in a score buffer of `cols` columns; `partial` lists key ranges that need
// the per-element test (adjacent partial tiles merged).
struct Range {
  int64_t k0, k1, col;
};
struct QTilePlan {
  std::vector<Range> runs, partial;
  int64_t cols = 0;

  void build(const SetAttentionParams& p, const KeyTiles& tiles, int64_t b, int64_t q0,
             int64_t q1) {
    runs.clear();
    partial.clear();
    cols = 0;
    const int64_t* qs = p.q_sets + b * p.len_q;
    int64_t q_min = std::numeric_limits<int64_t>::max(), q_max = std::numeric_limits<int64_t>::min();
    for (int64_t i = q0; i < q1; ++i) {
      q_min = std::min(q_min, qs[i]);
      q_max = std::max(q_max, qs[i]);
    }
    for (int64_t t = 0; t < tiles.count; ++t) {
      const TileKind kind = classify_tile(q_min, q_max, tiles.lo[b * tiles.count + t],
                                          tiles.hi[b * tiles.count + t], p.strict);
      if (kind == TileKind::kSkip) continue;
      const int64_t k0 = t * kTileK, k1 = std::min(p.len_k, k0 + kTileK);
      if (!runs.empty() && runs.back().k1 == k0) {
        runs.back().k1 = k1;
      } else {
        runs.push_back({k0, k1, cols});
      }
      if (kind == TileKind::kPartial) {
        if (!partial.empty() && partial.back().k1 == k0) {
          partial.back().k1 = k1;
        } else {
          partial.push_back({k0, k1, cols});
        }
      }
      cols += k1 - k0;
    }
  }
};

// scores[i, c] = scale * q_i . k_c over the plan's columns; invisible pairs get -inf.
// The scale is applied after the product, not as BLAS's alpha: BLAS skips the product for
// alpha 0 and may scale an operand first, so a NaN, 0 or inf scale would not give the
// IEEE products of the scaled dot products.
template <typename T>
void scores(const SetAttentionParams& p, const QTilePlan& plan, int64_t b, const T* q,
            const T* k, int64_t q0, int64_t rows, T* s) {
  for (const Range& run : plan.runs) {
    gemm<T>(false, true, rows, run.k1 - run.k0, p.head_dim, T(1), q + q0 * p.q_row_stride,
            p.q_row_stride, k + run.k0 * p.k_row_stride, p.k_row_stride, T(0), s + run.col,
            plan.cols);
  }
  const T scale = static_cast<T>(p.scale);
  for (int64_t c = 0; c < rows * plan.cols; ++c) s[c] *= scale;
  const int64_t* qs = p.q_sets + b * p.len_q;
  const int64_t* ks = p.k_sets + b * p.len_k;
  for (const Range& part : plan.partial) {
    for (int64_t i = 0; i < rows; ++i) {
      mask_row(s + i * plan.cols + part.col, ks + part.k0, part.k1 - part.k0,
               qs[q0 + i], p.strict);
    }
  }
}

template <typename T>
bool all_finite(const T* x, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    if (!std::isfinite(x[c])) return false;
  }
  return true;
}

// One output row the GEMM cannot settle: an empty row (zero, unless a key it sees holds a
// non-finite value) or a row whose output came out non-finite. A non-finite value in a
// key the row sees makes the row NaN, lse too; one in a key it does not see reached the
// row only through 0 * NaN in the GEMM, so the row is recomputed from its visible keys.
template <typename T>
void settle_row(const SetAttentionParams& p, const QTilePlan& plan, const T* prob, const T* v,
                int64_t q_set, const int64_t* k_sets, T inv_sum, T* out, T* lse) {
  const int64_t d = p.head_dim;
  std::fill(out, out + d, T(0));
  for (const Range& run : plan.runs) {
    for (int64_t j = run.k0; j < run.k1; ++j) {
      if (!visible(q_set, k_sets[j], p.strict)) continue;
      const T* vj = v + j * p.v_row_stride;
      if (!all_finite(vj, d)) {
        std::fill(out, out + d, std::numeric_limits<T>::quiet_NaN());
        *lse = std::numeric_limits<T>::quiet_NaN();
        return;
      }
      const T w = prob[run.col + j - run.k0] * inv_sum;
      for (int64_t c = 0; c < d; ++c) out[c] += w * vj[c];
    }
  }
}

template <typename T>
const T* head_ptr(const void* base, int64_t b, int64_t h, int64_t bs, int64_t hs) {
  return static_cast<const T*>(base) + b * bs + h * hs;
}

// The n rows (`stride` apart) of x as the gradient GEMMs take them: x itself, or, when a
// row holds a NaN or inf, a copy with those values zeroed. Those GEMMs weigh every row of a
// run, with weight 0 for the pairs the rule hides, and 0 * inf would carry the value into
// rows it is hidden from; a pair that sees it has a NaN weight already.
template <typename T>
struct GradRows {
  const T* rows;
  int64_t stride;

  GradRows(const T* x, int64_t n, int64_t d, int64_t x_stride, at::Tensor& buffer)
      : rows(x), stride(x_stride) {
    bool finite = true;
    for (int64_t j = 0; j < n && finite; ++j) finite = all_finite(x + j * x_stride, d);
    if (finite) return;
    T* copy = scratch<T>(buffer, n * d);
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t c = 0; c < d; ++c) {
        const T value = x[j * x_stride + c];
        copy[j * d + c] = std::isfinite(value) ? value : T(0);
      }
    }
    rows = copy;
    stride = d;
  }
};

template <typename T>
void forward(const SetAttentionParams& p) {
  warm_blas_once<T>();
  const KeyTiles tiles(p);
  const int64_t q_tiles = (p.len_q + kTileQ - 1) / kTileQ;
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t d = p.head_dim;
  at::parallel_for(0, p.batch * p.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    QTilePlan plan;
    at::Tensor s_buffer;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (p.heads_q * q_tiles);
      const int64_t h = unit / q_tiles % p.heads_q;
      const int64_t q0 = unit % q_tiles * kTileQ, rows = std::min(kTileQ, p.len_q - q0);
      const T* q = head_ptr<T>(p.q, b, h, p.q_batch_stride, p.q_head_stride);
      const T* k = head_ptr<T>(p.k, b, h / group, p.k_batch_stride, p.k_head_stride);
      const T* v = head_ptr<T>(p.v, b, h / group, p.v_batch_stride, p.v_head_stride);
      T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
               q0 * p.out_row_stride;
      T* lse = static_cast<T*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride + q0;

      plan.build(p, tiles, b, q0, q0 + rows);
      T* s = scratch<T>(s_buffer, rows * plan.cols);
      scores(p, plan, b, q, k, q0, rows, s);
      // A row is empty iff its sum is exactly 0 (no visible key, or only -inf logits); a
      // NaN or +inf logit makes the sum, and so lse, NaN.
      std::vector<T> inv_sum(rows);
      for (int64_t i = 0; i < rows; ++i) {
        T* row = s + i * plan.cols;
        const T m = row_max(row, plan.cols);
        const T sum = exp_shifted(row, plan.cols, m);
        inv_sum[i] = sum == 0 ? T(0) : T(1) / sum;
        lse[i] = sum == 0 ? -std::numeric_limits<T>::infinity() : m + std::log(sum);
      }
      if (plan.runs.empty()) {
        for (int64_t i = 0; i < rows; ++i) {
          std::fill(out + i * p.out_row_stride, out + i * p.out_row_stride + d, T(0));
        }
        continue;
      }
      for (size_t r = 0; r < plan.runs.size(); ++r) {
        const Range& run = plan.runs[r];
        gemm<T>(false, false, rows, d, run.k1 - run.k0, T(1), s + run.col, plan.cols,
                v + run.k0 * p.v_row_stride, p.v_row_stride, r == 0 ? T(0) : T(1), out,
                p.out_row_stride);
      }
      const int64_t* qs = p.q_sets + b * p.len_q;
      const int64_t* ks = p.k_sets + b * p.len_k;
      for (int64_t i = 0; i < rows; ++i) {
        T* o = out + i * p.out_row_stride;
        if (std::isnan(lse[i])) {
          std::fill(o, o + d, std::numeric_limits<T>::quiet_NaN());
          continue;
        }
        for (int64_t c = 0; c < d; ++c) o[c] *= inv_sum[i];
        if (inv_sum[i] == 0 || !all_finite(o, d)) {
          settle_row(p, plan, s + i * plan.cols, v, qs[q0 + i], ks, inv_sum[i], o, lse + i);
        }
      }
    }
  });
}

template <typename T>
void backward(const SetAttentionBwdParams& g) {
  const SetAttentionParams& p = g.fwd;
  warm_blas_once<T>();
  const KeyTiles tiles(p);
  const int64_t group = p.heads_q / p.heads_kv;
  const int64_t d = p.head_dim;
  // One unit per (batch, kv head): it owns its dk/dv rows, so no two threads add into them.
  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    QTilePlan plan;
    at::Tensor s_buffer, ds_buffer, k_buffer, q_buffer;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / p.heads_kv, hk = unit % p.heads_kv;
      const T* k = head_ptr<T>(p.k, b, hk, p.k_batch_stride, p.k_head_stride);
      const GradRows<T> k_grad(k, p.len_k, d, p.k_row_stride, k_buffer);
      const T* v = head_ptr<T>(p.v, b, hk, p.v_batch_stride, p.v_head_stride);
      T* dk = static_cast<T*>(g.dk) + (b * p.heads_kv + hk) * p.len_k * d;
      T* dv = static_cast<T*>(g.dv) + (b * p.heads_kv + hk) * p.len_k * d;
      std::fill(dk, dk + p.len_k * d, T(0));
      std::fill(dv, dv + p.len_k * d, T(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const T* q = head_ptr<T>(p.q, b, h, p.q_batch_stride, p.q_head_stride);
        const GradRows<T> q_grad(q, p.len_q, d, p.q_row_stride, q_buffer);
        const T* o = head_ptr<T>(p.out, b, h, p.out_batch_stride, p.out_head_stride);
        const T* dout = head_ptr<T>(g.dout, b, h, p.out_batch_stride, p.out_head_stride);
        const T* lse = head_ptr<T>(p.lse, b, h, p.lse_batch_stride, p.lse_head_stride);
        const T* dlse = g.dlse ? head_ptr<T>(g.dlse, b, h, p.lse_batch_stride, p.lse_head_stride) : nullptr;
        T* dq = static_cast<T*>(g.dq) + (b * p.heads_q + h) * p.len_q * d;
        for (int64_t q0 = 0; q0 < p.len_q; q0 += kTileQ) {
          const int64_t rows = std::min(kTileQ, p.len_q - q0);
          plan.build(p, tiles, b, q0, q0 + rows);
          std::fill(dq + q0 * d, dq + (q0 + rows) * d, T(0));
          if (plan.runs.empty()) continue;
          T* s = scratch<T>(s_buffer, rows * plan.cols);
          T* ds = scratch<T>(ds_buffer, rows * plan.cols);
          scores(p, plan, b, q, k, q0, rows, s);
          const T scale = static_cast<T>(p.scale);
          for (int64_t i = 0; i < rows; ++i) {  // s <- P = exp(s - lse)
            T* row = s + i * plan.cols;
            if (std::isnan(lse[q0 + i])) {  // NaN where the row sees, not in its hidden pairs
              for (int64_t c = 0; c < plan.cols; ++c) {
                row[c] = row[c] == -std::numeric_limits<T>::infinity()
                             ? T(0) : std::numeric_limits<T>::quiet_NaN();
              }
            } else {
              exp_shifted(row, plan.cols, lse[q0 + i]);
            }
          }
          // ds <- dP = dO V^T, then scale * dS, dS = P * (dP - delta), delta =
          // rowsum(dO * O) - dlse (the scale here, not as alpha: 0 * an inf scale is NaN)
          for (const Range& run : plan.runs) {
            gemm<T>(false, true, rows, run.k1 - run.k0, d, T(1), dout + q0 * p.out_row_stride,
                    p.out_row_stride, v + run.k0 * p.v_row_stride, p.v_row_stride, T(0),
                    ds + run.col, plan.cols);
          }
          for (int64_t i = 0; i < rows; ++i) {
            const T* oi = o + (q0 + i) * p.out_row_stride;
            const T* gi = dout + (q0 + i) * p.out_row_stride;
            T delta = 0;
            for (int64_t c = 0; c < d; ++c) delta += oi[c] * gi[c];
            if (dlse) delta -= dlse[q0 + i];
            const T* pr = s + i * plan.cols;
            T* dr = ds + i * plan.cols;
            // P = 0 (a key the row does not see) gives dS = 0 even where dP is NaN.
            for (int64_t c = 0; c < plan.cols; ++c) {
              dr[c] = pr[c] == 0 ? T(0) : scale * pr[c] * (dr[c] - delta);
            }
          }
          for (const Range& run : plan.runs) {
            const int64_t n = run.k1 - run.k0;
            gemm<T>(false, false, rows, d, n, T(1), ds + run.col, plan.cols,
                    k_grad.rows + run.k0 * k_grad.stride, k_grad.stride, T(1), dq + q0 * d, d);
            gemm<T>(true, false, n, d, rows, T(1), ds + run.col, plan.cols,
                    q_grad.rows + q0 * q_grad.stride, q_grad.stride, T(1), dk + run.k0 * d, d);
            gemm<T>(true, false, n, d, rows, T(1), s + run.col, plan.cols,
                    dout + q0 * p.out_row_stride, p.out_row_stride, T(1), dv + run.k0 * d, d);
          }
        }
      }
    }
  });
}

// The kernels take float or double; 16-bit inputs are upcast by the glue.
template <typename F>
void dispatch_float_double(DType dt, F&& f) {
  dispatch(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      f(tag);
    } else {
      TORCH_CHECK(false, "sarkernels: the CPU attention kernels take float32 or float64");
    }
  });
}

}  // namespace

void set_attention_forward(const SetAttentionParams& p, DType dt) {
  dispatch_float_double(dt, [&](auto tag) { forward<typename decltype(tag)::type>(p); });
}

void set_attention_backward(const SetAttentionBwdParams& p, DType dt) {
  dispatch_float_double(dt, [&](auto tag) { backward<typename decltype(tag)::type>(p); });
}

}  // namespace sarkernels::cpu
