// The op schemas: the contract of sarkernels.ops, defined once for every namespace that
// implements it (sarkernels in _C, sarkernels_simt in _simt). Fake impls and autograd are
// registered in Python (sarkernels/ops.py).
#pragma once
#include <torch/library.h>

namespace sarkernels {

inline void define_ops(torch::Library& m) {
  m.def(
      "set_attention(Tensor q, Tensor k, Tensor v, Tensor q_sets, Tensor k_sets, bool strict, "
      "float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "set_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor q_sets, Tensor k_sets, bool strict, float scale) -> "
      "(Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
      "Tensor slots, bool check=True) -> ()");
  m.def(
      "interleave_position_instructions(Tensor tokens, Tensor positions, Tensor instruction, "
      "Tensor? prefix, int num_heads, int grid_h, int grid_w, float rope_base, bool merge, "
      "bool check=True) -> Tensor");
  m.def(
      "interleave_position_instructions_backward(Tensor grad, Tensor positions, "
      "Tensor instruction, int prefix_len, int num_heads, int grid_h, int grid_w, "
      "float rope_base, bool merge) -> (Tensor grad_tokens, Tensor grad_instruction, "
      "Tensor grad_prefix)");
}

}  // namespace sarkernels
