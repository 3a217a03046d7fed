// CPU implementations of the sarkernels ops: tensors in, params out, kernels called.
// Shape checks here guard memory safety for direct torch.ops calls; the friendly argument
// checks live in sarkernels/ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/interleave.h"
#include "cpu/kv_cache_append.h"
#include "cpu/set_attention.h"

namespace sarkernels::cpu {
namespace {

// The tensor in the kernels' element type, with a unit stride on its last dim.
at::Tensor compute_view(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor r = t.to(dtype);
  return r.size(-1) > 1 && r.stride(-1) != 1 ? r.contiguous() : r;
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  TORCH_CHECK(!at::isFloatingType(q_sets.scalar_type()) &&
                  !at::isFloatingType(k_sets.scalar_type()),
              "set_attention: set ids must be integers");
}

SetAttentionParams attention_params(const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& q_sets,
                                    const at::Tensor& k_sets, const at::Tensor& out,
                                    const at::Tensor& lse, bool strict, double scale) {
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

std::tuple<at::Tensor, at::Tensor> set_attention_op(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& q_sets,
                                                 const at::Tensor& k_sets, bool strict,
                                                 double scale) {
  check_attention_shapes(q, k, v, q_sets, k_sets);
  const at::ScalarType ct = compute_type(q);
  const at::Tensor qc = compute_view(q, ct), kc = compute_view(k, ct), vc = compute_view(v, ct);
  const at::Tensor qs = q_sets.to(at::kLong).contiguous(), ks = k_sets.to(at::kLong).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(ct));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(ct));
  set_attention_forward(attention_params(qc, kc, vc, qs, ks, out, lse, strict, scale),
                        ct == at::kDouble);
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> set_attention_backward_op(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& q_sets, const at::Tensor& k_sets, bool strict, double scale) {
  check_attention_shapes(q, k, v, q_sets, k_sets);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "set_attention_backward: dout and out must have q's shape ", q.sizes());
  const auto lse_shape = at::IntArrayRef(q.sizes()).slice(0, 3);
  TORCH_CHECK(lse.sizes() == lse_shape && (!dlse || dlse->sizes() == lse_shape),
              "set_attention_backward: lse and dlse must be [B, Hq, Lq]");
  const at::ScalarType ct = compute_type(q);
  const at::Tensor qc = compute_view(q, ct), kc = compute_view(k, ct), vc = compute_view(v, ct);
  const at::Tensor oc = out.to(ct).contiguous(), doc = dout.to(ct).contiguous();
  const at::Tensor lc = lse.to(ct).contiguous();
  const at::Tensor dlc = dlse ? dlse->to(ct).contiguous() : at::Tensor();
  const at::Tensor qs = q_sets.to(at::kLong).contiguous(), ks = k_sets.to(at::kLong).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().dtype(ct));
  at::Tensor dk = at::empty(k.sizes(), k.options().dtype(ct));
  at::Tensor dv = at::empty(v.sizes(), v.options().dtype(ct));
  SetAttentionBwdParams p{attention_params(qc, kc, vc, qs, ks, oc, lc, strict, scale),
                          doc.data_ptr(), dlse ? dlc.data_ptr() : nullptr, dq.data_ptr(),
                          dk.data_ptr(), dv.data_ptr()};
  set_attention_backward(p, ct == at::kDouble);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

void fill_strides(int64_t* dst, const at::Tensor& t, int n) {
  for (int i = 0; i < n; ++i) dst[i] = t.stride(i);
}

void kv_cache_append_op(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "kv_cache_append: k_cache and v_cache must be [B, H, S, D] of one shape");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == k_cache.size(0) &&
                  k.size(1) == k_cache.size(1) && k.size(3) == k_cache.size(3),
              "kv_cache_append: k and v must be [B, H, n, D] matching the cache");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == k.size(0) && slots.size(1) == k.size(2),
              "kv_cache_append: slots must be [B, n]");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type(),
              "kv_cache_append: caches and new k/v must share one dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "kv_cache_append: caches need a unit stride on their last dim");
  const at::Tensor kc = compute_view(k, k.scalar_type()), vc = compute_view(v, v.scalar_type());
  const at::Tensor sl = slots.to(at::kLong);
  KVCacheAppendParams p{};
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.slots = sl.data_ptr<int64_t>();
  p.batch = k.size(0);
  p.heads = k.size(1);
  p.cache_len = k_cache.size(2);
  p.num_new = k.size(2);
  p.head_dim = k.size(3);
  fill_strides(p.kc_strides, k_cache, 3);
  fill_strides(p.vc_strides, v_cache, 3);
  fill_strides(p.k_strides, kc, 3);
  fill_strides(p.v_strides, vc, 3);
  fill_strides(p.slots_strides, sl, 2);
  p.elem_size = k.element_size();
  kv_cache_append(p);
}

// Checks the shapes of one interleave (tokens [B, N, d]) and fills everything but pointers.
InterleaveParams interleave_params(int64_t batch, int64_t num_tokens, int64_t d,
                                   const at::Tensor& positions, const at::Tensor& instruction,
                                   int64_t prefix_len, int64_t num_heads, int64_t grid_h,
                                   int64_t grid_w, double rope_base, bool merge) {
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == num_tokens,
              "interleave_position_instructions: tokens [B, N, D] and positions [B, N] expected");
  if (num_heads == 0) {
    TORCH_CHECK(instruction.dim() == 2 && instruction.size(1) == d,
                "interleave_position_instructions: a table instruction must be [P, ", d, "]");
  } else {
    TORCH_CHECK(instruction.dim() == 1 && instruction.size(0) == d && num_heads > 0 &&
                    d % (4 * num_heads) == 0 && grid_h > 0 && grid_w > 0,
                "interleave_position_instructions: a vector instruction must be [", d,
                "] with D divisible by 4 * num_heads and a positive grid");
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

at::Tensor interleave_op(const at::Tensor& tokens, const at::Tensor& positions,
                      const at::Tensor& instruction, const std::optional<at::Tensor>& prefix,
                      int64_t num_heads, int64_t grid_h, int64_t grid_w, double rope_base,
                      bool merge) {
  const int64_t c_len = prefix ? prefix->size(1) : 0;
  TORCH_CHECK(tokens.dim() == 3, "interleave_position_instructions: tokens must be [B, N, D]");
  InterleaveParams p = interleave_params(tokens.size(0), tokens.size(1), tokens.size(2), positions,
                                         instruction, c_len, num_heads,
                                         grid_h, grid_w, rope_base, merge);
  const at::ScalarType dt = tokens.scalar_type();
  TORCH_CHECK(instruction.scalar_type() == dt && (!prefix || prefix->scalar_type() == dt),
              "interleave_position_instructions: tokens, instruction and prefix must share a dtype");
  TORCH_CHECK(!prefix || (prefix->dim() == 3 && prefix->size(0) == p.batch &&
                          prefix->size(2) == p.dim),
              "interleave_position_instructions: prefix must be [B, C, D]");
  const at::Tensor tok = compute_view(tokens, dt), pos = positions.to(at::kLong);
  const at::Tensor ins = instruction.contiguous();
  const at::Tensor pre = prefix ? compute_view(*prefix, dt) : at::Tensor();
  at::Tensor out = at::empty({p.batch, c_len + (merge ? 1 : 2) * p.num_tokens, p.dim},
                             tokens.options());
  p.tokens = tok.data_ptr();
  p.positions = pos.data_ptr<int64_t>();
  p.instruction = ins.data_ptr();
  p.instruction_row_stride = num_heads == 0 ? ins.stride(0) : 0;
  p.prefix = prefix ? pre.data_ptr() : nullptr;
  fill_strides(p.tokens_strides, tok, 2);
  fill_strides(p.positions_strides, pos, 2);
  if (prefix) fill_strides(p.prefix_strides, pre, 2);
  p.out = out.data_ptr();
  fill_strides(p.out_strides, out, 2);
  interleave_forward(p, dt);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> interleave_backward_op(
    const at::Tensor& grad, const at::Tensor& positions, const at::Tensor& instruction,
    int64_t prefix_len, int64_t num_heads, int64_t grid_h, int64_t grid_w, double rope_base,
    bool merge) {
  TORCH_CHECK(grad.dim() == 3, "interleave_position_instructions_backward: grad must be 3-D");
  const int64_t b = positions.size(0), n = positions.size(1);
  TORCH_CHECK(grad.size(0) == b && grad.size(1) == prefix_len + (merge ? 1 : 2) * n,
              "interleave_position_instructions_backward: grad ", grad.sizes(),
              " does not match positions ", positions.sizes(), " and prefix_len ", prefix_len);
  const at::Tensor g = grad.contiguous(), pos = positions.to(at::kLong);
  InterleaveParams p = interleave_params(b, n, grad.size(2), pos, instruction, prefix_len, num_heads,
                                         grid_h, grid_w, rope_base, merge);
  p.positions = pos.data_ptr<int64_t>();
  fill_strides(p.positions_strides, pos, 2);
  const at::ScalarType dt = grad.scalar_type();
  at::Tensor grad_tokens = at::empty({b, n, p.dim}, grad.options());
  at::Tensor grad_prefix = at::empty({b, prefix_len, p.dim}, grad.options());
  at::Tensor grad_instruction =
      at::zeros(instruction.sizes(), grad.options().dtype(compute_type(grad)));
  interleave_backward(p, dt, g.data_ptr(), grad_tokens.data_ptr(), grad_prefix.data_ptr(),
                      grad_instruction.data_ptr());
  return {grad_tokens, grad_instruction.to(instruction.scalar_type()), grad_prefix};
}

}  // namespace

TORCH_LIBRARY_IMPL(sarkernels, CPU, m) {
  m.impl("set_attention", &set_attention_op);
  m.impl("set_attention_backward", &set_attention_backward_op);
  m.impl("kv_cache_append", &kv_cache_append_op);
  m.impl("interleave_position_instructions", &interleave_op);
  m.impl("interleave_position_instructions_backward", &interleave_backward_op);
}

}  // namespace sarkernels::cpu
