#include "tensor_params.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "sarkernels/interleave_layout.h"

namespace sarkernels {
namespace {

// The tensor in `dtype` with a unit stride on its last dim (copied only when needed).
at::Tensor unit_stride_last(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.to(dtype);
  return r.size(-1) > 1 && r.stride(-1) != 1 ? r.contiguous() : r;
}

// Set ids, slots and positions of any integer dtype as int64. uint64 is refused: its values
// from 2^63 on have no int64 value and would wrap to negative ones (the Python layer says
// the same before dispatch; this covers direct op calls).
at::Tensor int64_indices(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false) &&
                       t.scalar_type() != at::kUInt64,
                   fn, ": ", name, " must be an integer tensor other than uint64, got ",
                   t.scalar_type());
  return t.to(at::kLong);
}

void fill_strides(int64_t* dst, const at::Tensor& t, int n) {
  for (int i = 0; i < n; ++i) dst[i] = t.stride(i);
}

void check_attention_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& q_sets, const at::Tensor& k_sets) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "set_attention: q, k, v must be 4-D [B, H, L, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "set_attention: k and v shapes differ: ", k.sizes(),
              " vs ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "set_attention: q ", q.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(q_sets.dim() == 2 && q_sets.size(0) == q.size(0) && q_sets.size(1) == q.size(2),
              "set_attention: q_sets must be [B, Lq] = [", q.size(0), ", ", q.size(2), "], got ",
              q_sets.sizes());
  TORCH_CHECK(k_sets.dim() == 2 && k_sets.size(0) == k.size(0) && k_sets.size(1) == k.size(2),
              "set_attention: k_sets must be [B, Lk] = [", k.size(0), ", ", k.size(2), "], got ",
              k_sets.sizes());
}

// Checks the sizes of one interleave and fills everything but pointers and strides.
InterleaveParams interleave_sizes(int64_t batch, int64_t num_tokens, int64_t d,
                                  const at::Tensor& positions, const at::Tensor& instruction,
                                  int64_t prefix_len, int64_t num_heads, int64_t grid_h,
                                  int64_t grid_w, double rope_base, bool merge) {
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == num_tokens,
              "interleave_position_instructions: positions must be [B, N] = [", batch, ", ",
              num_tokens, "], got ", positions.sizes());
  TORCH_CHECK(!at::isFloatingType(positions.scalar_type()),
              "interleave_position_instructions: positions must be integers");
  if (num_heads == 0) {
    TORCH_CHECK(instruction.dim() == 2 && instruction.size(1) == d,
                "interleave_position_instructions: a table instruction must be [P, ", d, "], got ",
                instruction.sizes());
  } else {
    TORCH_CHECK(instruction.dim() == 1 && instruction.size(0) == d && num_heads > 0 &&
                    d % (4 * num_heads) == 0 && grid_h > 0 && grid_w > 0,
                "interleave_position_instructions: a vector instruction must be [", d,
                "] with D divisible by 4 * num_heads and a positive grid, got ",
                instruction.sizes(), ", num_heads ", num_heads, ", grid ", grid_h, "x", grid_w);
  }
  TORCH_CHECK(!merge || prefix_len > 0 || num_tokens == 0,
              "interleave_position_instructions: merge=True needs a prefix");
  InterleaveParams p{};
  p.batch = batch;
  p.num_tokens = num_tokens;
  p.dim = d;
  p.prefix_len = prefix_len;
  p.table_rows = num_heads == 0 ? instruction.size(0) : 0;
  p.num_heads = num_heads;
  p.grid_h = grid_h;
  p.grid_w = grid_w;
  p.rope_base = rope_base;
  p.merge = merge;
  return p;
}

}  // namespace

DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "sarkernels: ", what, " must be float32/float64/float16/bfloat16, got ",
                  t.scalar_type());
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

SetAttentionParams attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& q_sets, const at::Tensor& k_sets,
                                    const at::Tensor& out, const at::Tensor& lse, bool strict,
                                    double scale) {
  SetAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sets = q_sets.data_ptr<int64_t>();
  p.k_sets = k_sets.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.len_q = q.size(2);
  p.len_k = k.size(2);
  p.head_dim = q.size(3);
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.out_batch_stride = out.stride(0), p.out_head_stride = out.stride(1);
  p.out_row_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  p.scale = scale;
  p.strict = strict;
  return p;
}

AttentionInputs attention_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& q_sets, const at::Tensor& k_sets,
                                   at::ScalarType compute) {
  check_attention_shapes(q, k, v, q_sets, k_sets);
  dtype_of(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "set_attention: q, k and v must share one dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  AttentionInputs in;
  in.q = unit_stride_last(q, compute);
  in.k = unit_stride_last(k, compute);
  in.v = unit_stride_last(v, compute);
  in.q_sets = int64_indices(q_sets, "set_attention", "q_sets").contiguous();
  in.k_sets = int64_indices(k_sets, "set_attention", "k_sets").contiguous();
  return in;
}

AttentionInputs attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& q_sets, const at::Tensor& k_sets, bool strict,
                                 double scale, at::ScalarType compute) {
  AttentionInputs in = attention_operands(q, k, v, q_sets, k_sets, compute);
  in.out = at::empty(q.sizes(), q.options().dtype(compute));
  in.lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_type(compute)));
  in.p = attention_params(in.q, in.k, in.v, in.q_sets, in.k_sets, in.out, in.lse, strict, scale);
  return in;
}

void check_attention_backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                              const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "set_attention_backward: dout and out must have q's shape ", q.sizes(), ", got ",
              dout.sizes(), " and ", out.sizes());
  const auto lse_shape = at::IntArrayRef(q.sizes()).slice(0, 3);
  TORCH_CHECK(lse.sizes() == lse_shape && (!dlse || dlse->sizes() == lse_shape),
              "set_attention_backward: lse and dlse must be [B, Hq, Lq] = ", lse_shape);
}

KVCacheInputs kv_cache_inputs(const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "kv_cache_append: k_cache and v_cache must be [B, H, S, D] of one shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == k_cache.size(0) &&
                  k.size(1) == k_cache.size(1) && k.size(3) == k_cache.size(3),
              "kv_cache_append: k and v must be [B, H, n, D] matching the cache ",
              k_cache.sizes(), ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == k.size(0) && slots.size(1) == k.size(2),
              "kv_cache_append: slots must be [B, n] = [", k.size(0), ", ", k.size(2), "], got ",
              slots.sizes());
  TORCH_CHECK(!at::isFloatingType(slots.scalar_type()), "kv_cache_append: slots must be integers");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type(),
              "kv_cache_append: caches and new k/v must share one dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "kv_cache_append: caches need a unit stride on their last dim");
  KVCacheInputs in;
  in.k = unit_stride_last(k, k.scalar_type());
  in.v = unit_stride_last(v, v.scalar_type());
  in.slots = int64_indices(slots, "kv_cache_append", "slots");
  KVCacheAppendParams& p = in.p;
  p = {};
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();
  p.slots = in.slots.data_ptr<int64_t>();
  p.batch = k.size(0);
  p.heads = k.size(1);
  p.cache_len = k_cache.size(2);
  p.num_new = k.size(2);
  p.head_dim = k.size(3);
  fill_strides(p.kc_strides, k_cache, 3);
  fill_strides(p.vc_strides, v_cache, 3);
  fill_strides(p.k_strides, in.k, 3);
  fill_strides(p.v_strides, in.v, 3);
  fill_strides(p.slots_strides, in.slots, 2);
  p.elem_size = k.element_size();
  return in;
}

void check_slots(const at::Tensor& slots, int64_t cache_len) {
  const at::Tensor s = slots.to(at::kCPU, at::kLong);
  const auto a = s.accessor<int64_t, 2>();
  for (int64_t b = 0; b < a.size(0); ++b) {
    for (int64_t i = 0; i < a.size(1); ++i) {
      TORCH_CHECK_VALUE(a[b][i] >= 0 && a[b][i] < cache_len, "kv_cache_append: slots[", b, ", ", i,
                        "] = ", a[b][i], " is outside the cache [0, ", cache_len, ")");
    }
  }
  for (int64_t b = 0; b < a.size(0); ++b) {
    std::vector<int64_t> row(a.size(1));
    for (int64_t i = 0; i < a.size(1); ++i) row[i] = a[b][i];
    std::sort(row.begin(), row.end());
    const auto dup = std::adjacent_find(row.begin(), row.end());
    TORCH_CHECK_VALUE(dup == row.end(), "kv_cache_append: slot ", dup == row.end() ? 0 : *dup,
                      " appears more than once in slots[", b, "]");
  }
}

InterleaveInputs interleave_inputs(const at::Tensor& tokens, const at::Tensor& positions,
                                   const at::Tensor& instruction,
                                   const std::optional<at::Tensor>& prefix, int64_t num_heads,
                                   int64_t grid_h, int64_t grid_w, double rope_base, bool merge) {
  TORCH_CHECK(tokens.dim() == 3, "interleave_position_instructions: tokens must be [B, N, D], got ",
              tokens.sizes());
  const int64_t c_len = prefix ? prefix->size(1) : 0;
  InterleaveInputs in;
  InterleaveParams& p = in.p;
  p = interleave_sizes(tokens.size(0), tokens.size(1), tokens.size(2), positions, instruction,
                       c_len, num_heads, grid_h, grid_w, rope_base, merge);
  const at::ScalarType dt = tokens.scalar_type();
  dtype_of(tokens, "tokens");
  TORCH_CHECK(instruction.scalar_type() == dt && (!prefix || prefix->scalar_type() == dt),
              "interleave_position_instructions: tokens, instruction and prefix must share a dtype");
  TORCH_CHECK(!prefix || (prefix->dim() == 3 && prefix->size(0) == p.batch &&
                          prefix->size(2) == p.dim),
              "interleave_position_instructions: prefix must be [B, C, D] = [", p.batch, ", C, ",
              p.dim, "], got ", prefix ? prefix->sizes() : at::IntArrayRef{});
  in.tokens = unit_stride_last(tokens, dt);
  in.positions = int64_indices(positions, "interleave_position_instructions", "positions");
  in.instruction = instruction.contiguous();
  if (prefix) in.prefix = unit_stride_last(*prefix, dt);
  in.out = at::empty({p.batch, layout_of(p).rows(), p.dim}, tokens.options());
  p.tokens = in.tokens.data_ptr();
  p.positions = in.positions.data_ptr<int64_t>();
  p.instruction = in.instruction.data_ptr();
  p.instruction_row_stride = num_heads == 0 ? in.instruction.stride(0) : 0;
  p.prefix = prefix ? in.prefix.data_ptr() : nullptr;
  fill_strides(p.tokens_strides, in.tokens, 2);
  fill_strides(p.positions_strides, in.positions, 2);
  if (prefix) fill_strides(p.prefix_strides, in.prefix, 2);
  p.out = in.out.data_ptr();
  fill_strides(p.out_strides, in.out, 2);
  return in;
}

InterleaveBackwardInputs interleave_backward_inputs(const at::Tensor& grad,
                                                    const at::Tensor& positions,
                                                    const at::Tensor& instruction,
                                                    int64_t prefix_len, int64_t num_heads,
                                                    int64_t grid_h, int64_t grid_w,
                                                    double rope_base, bool merge) {
  TORCH_CHECK(grad.dim() == 3 && positions.dim() == 2,
              "interleave_position_instructions_backward: grad must be 3-D and positions 2-D, got ",
              grad.sizes(), " and ", positions.sizes());
  TORCH_CHECK(prefix_len >= 0, "interleave_position_instructions_backward: prefix_len must be >= 0");
  const int64_t b = positions.size(0), n = positions.size(1);
  InterleaveBackwardInputs in;
  InterleaveParams& p = in.p;
  p = interleave_sizes(b, n, grad.size(2), positions, instruction, prefix_len, num_heads, grid_h,
                       grid_w, rope_base, merge);
  TORCH_CHECK(grad.size(0) == b && grad.size(1) == layout_of(p).rows(),
              "interleave_position_instructions_backward: grad ", grad.sizes(),
              " does not match positions ", positions.sizes(), " and prefix_len ", prefix_len);
  dtype_of(grad, "grad");
  in.grad = grad.contiguous();
  in.positions = int64_indices(positions, "interleave_position_instructions", "positions");
  p.positions = in.positions.data_ptr<int64_t>();
  fill_strides(p.positions_strides, in.positions, 2);
  in.grad_tokens = at::empty({b, n, p.dim}, grad.options());
  in.grad_prefix = at::empty({b, prefix_len, p.dim}, grad.options());
  in.grad_instruction =
      at::zeros(instruction.sizes(), grad.options().dtype(acc_type(grad.scalar_type())));
  return in;
}

void check_positions(const at::Tensor& positions, const InterleaveParams& p) {
  const int64_t limit = p.num_heads == 0 ? p.table_rows : p.grid_h * p.grid_w;
  const at::Tensor s = positions.to(at::kCPU, at::kLong);
  const auto a = s.accessor<int64_t, 2>();
  for (int64_t b = 0; b < a.size(0); ++b) {
    for (int64_t i = 0; i < a.size(1); ++i) {
      TORCH_CHECK_VALUE(a[b][i] >= 0 && a[b][i] < limit, "interleave_position_instructions: positions[",
                        b, ", ", i, "] = ", a[b][i], " is outside [0, ", limit, ")");
    }
  }
}

}  // namespace sarkernels
