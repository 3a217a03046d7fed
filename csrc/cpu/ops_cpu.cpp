// The sarkernels ops on CPU tensors: tensor_params.h builds the params, the CPU kernels run.
// Values (slots, positions) are checked here, synchronously, before anything is written.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/interleave.h"
#include "cpu/kv_cache_append.h"
#include "cpu/set_attention.h"
#include "tensor_params.h"

namespace sarkernels::cpu {
namespace {

// The attention kernels compute in float (16-bit inputs upcast) or double.
std::tuple<at::Tensor, at::Tensor> set_attention_op(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& q_sets,
                                                    const at::Tensor& k_sets, bool strict,
                                                    double scale) {
  const at::ScalarType ct = acc_type(q.scalar_type());
  AttentionInputs in = attention_inputs(q, k, v, q_sets, k_sets, strict, scale, ct);
  set_attention_forward(in.p, dtype_of(in.out, "out"));
  return {in.out.to(q.scalar_type()), in.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> set_attention_backward_op(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& q_sets, const at::Tensor& k_sets, bool strict, double scale) {
  const at::ScalarType ct = acc_type(q.scalar_type());
  const AttentionInputs in = attention_operands(q, k, v, q_sets, k_sets, ct);
  check_attention_backward(dout, dlse, q, out, lse);
  const at::Tensor oc = out.to(ct).contiguous(), doc = dout.to(ct).contiguous();
  const at::Tensor lc = lse.to(ct).contiguous();
  const at::Tensor dlc = dlse ? dlse->to(ct).contiguous() : at::Tensor();
  at::Tensor dq = at::empty(q.sizes(), q.options().dtype(ct));
  at::Tensor dk = at::empty(k.sizes(), k.options().dtype(ct));
  at::Tensor dv = at::empty(v.sizes(), v.options().dtype(ct));
  SetAttentionBwdParams p{
      attention_params(in.q, in.k, in.v, in.q_sets, in.k_sets, oc, lc, strict, scale),
      doc.data_ptr(), dlse ? dlc.data_ptr() : nullptr, dq.data_ptr(), dk.data_ptr(),
      dv.data_ptr()};
  set_attention_backward(p, dtype_of(dq, "dq"));
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

// `check` is for devices where reading an error costs a sync; here it is free: always.
void kv_cache_append_op(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& slots, bool /*check*/) {
  const KVCacheInputs in = kv_cache_inputs(k_cache, v_cache, k, v, slots);
  check_slots(in.slots, in.p.cache_len);
  kv_cache_append(in.p);
}

at::Tensor interleave_op(const at::Tensor& tokens, const at::Tensor& positions,
                         const at::Tensor& instruction, const std::optional<at::Tensor>& prefix,
                         int64_t num_heads, int64_t grid_h, int64_t grid_w, double rope_base,
                         bool merge, bool /*check*/) {
  const InterleaveInputs in = interleave_inputs(tokens, positions, instruction, prefix, num_heads,
                                                grid_h, grid_w, rope_base, merge);
  check_positions(in.positions, in.p);
  interleave_forward(in.p, dtype_of(tokens, "tokens"));
  return in.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> interleave_backward_op(
    const at::Tensor& grad, const at::Tensor& positions, const at::Tensor& instruction,
    int64_t prefix_len, int64_t num_heads, int64_t grid_h, int64_t grid_w, double rope_base,
    bool merge) {
  const InterleaveBackwardInputs in = interleave_backward_inputs(
      grad, positions, instruction, prefix_len, num_heads, grid_h, grid_w, rope_base, merge);
  check_positions(in.positions, in.p);
  interleave_backward(in.p, dtype_of(grad, "grad"), in.grad.data_ptr(), in.grad_tokens.data_ptr(),
                      in.grad_prefix.data_ptr(), in.grad_instruction.data_ptr());
  return {in.grad_tokens, in.grad_instruction.to(instruction.scalar_type()), in.grad_prefix};
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
