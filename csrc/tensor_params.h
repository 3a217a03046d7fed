// Tensors -> torch-free params (sarkernels/params.h) for every backend's glue (CPU, CUDA,
// SIMT): the shape checks that keep direct torch.ops calls memory-safe, the conversions the
// kernels need, the outputs, and the value checks (slots, positions) that raise the
// reference's ValueErrors. The friendly argument checks live in sarkernels/ops.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "sarkernels/params.h"

namespace sarkernels {

// Element type of a float tensor (an error naming `what` for any other).
DType dtype_of(const at::Tensor& t, const char* what);
// The type kernels accumulate in: double for double, float otherwise.
at::ScalarType acc_type(at::ScalarType t);

// Attention operands converted to `compute` (unit stride on D; int64 contiguous set ids),
// out [B, Hq, Lq, D] in `compute` and lse [B, Hq, Lq] in acc_type(compute).
struct AttentionInputs {
  at::Tensor q, k, v, q_sets, k_sets, out, lse;
  SetAttentionParams p;
};
// The checked, converted operands only (out, lse and p left empty).
AttentionInputs attention_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& q_sets, const at::Tensor& k_sets,
                                   at::ScalarType compute);
AttentionInputs attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& q_sets, const at::Tensor& k_sets, bool strict,
                                 double scale, at::ScalarType compute);
void check_attention_backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                              const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse);
// Params over already converted operands (unit stride on D, int64 contiguous set ids).
SetAttentionParams attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& q_sets, const at::Tensor& k_sets,
                                    const at::Tensor& out, const at::Tensor& lse, bool strict,
                                    double scale);

// New k/v with unit stride on D and int64 slots; the caches are written in place.
struct KVCacheInputs {
  at::Tensor k, v, slots;
  KVCacheAppendParams p;
};
KVCacheInputs kv_cache_inputs(const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots);
// Raises the reference's ValueError for the first bad slot (slots on any device).
void check_slots(const at::Tensor& slots, int64_t cache_len);

// Converted operands and the output [B, rows, D] (rows from sarkernels/interleave_layout.h).
struct InterleaveInputs {
  at::Tensor tokens, positions, instruction, prefix, out;
  InterleaveParams p;
};
InterleaveInputs interleave_inputs(const at::Tensor& tokens, const at::Tensor& positions,
                                   const at::Tensor& instruction,
                                   const std::optional<at::Tensor>& prefix, int64_t num_heads,
                                   int64_t grid_h, int64_t grid_w, double rope_base, bool merge);
// Contiguous grad, the outputs (grad_instruction zero-filled in acc_type), the params.
struct InterleaveBackwardInputs {
  at::Tensor grad, positions, grad_tokens, grad_instruction, grad_prefix;
  InterleaveParams p;
};
InterleaveBackwardInputs interleave_backward_inputs(const at::Tensor& grad,
                                                    const at::Tensor& positions,
                                                    const at::Tensor& instruction,
                                                    int64_t prefix_len, int64_t num_heads,
                                                    int64_t grid_h, int64_t grid_w,
                                                    double rope_base, bool merge);
// Raises the reference's ValueError for the first position outside the table/grid
// (positions on any device).
void check_positions(const at::Tensor& positions, const InterleaveParams& p);

}  // namespace sarkernels
