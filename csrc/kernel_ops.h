// The ops on the one-source kernels (csrc/kernels/), for both targets that run them:
// csrc/cuda/ops_cuda.cu (nvcc, CUDA tensors) and csrc/simt/ops_simt.cpp (host compiler,
// CPU tensors under the SIMT executor). Each includes this file once and supplies a Target:
//   Guard                         device guard type, constructed from a tensor's device
//   stream(t)                     the stream to launch on
//   poison(t)                     fills an output the kernels must overwrite (NaN under SIMT)
//   error_raised(flag, check, s)  reads the kernels' error flag where allowed: under SIMT
//                                 always (free); on CUDA only with check and a stream not
//                                 being captured (a device-to-host copy and a sync)
// Tensors -> params and every check come from tensor_params.h; nothing is allocated but
// outputs and workspace.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "kernels/decode_attention.cuh"
#include "kernels/interleave.cuh"
#include "kernels/kv_cache_append.cuh"
#include "tensor_params.h"

namespace sarkernels {

template <typename Target>
struct KernelOps {
  // Forward: the split-KV decode kernel for every shape (no training kernel yet); no
  // backward kernel is registered, so autograd recomputes the reference (sarkernels/ops.py).
  static std::tuple<at::Tensor, at::Tensor> set_attention(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const at::Tensor& q_sets,
                                                          const at::Tensor& k_sets, bool strict,
                                                          double scale) {
    const typename Target::Guard guard(q.device());
    TORCH_CHECK(q.dim() == 4 && q.size(3) >= 1 && q.size(3) <= 256,
                "set_attention: the decode kernel takes head dims 1..256, got q ", q.sizes());
    AttentionInputs in = attention_inputs(q, k, v, q_sets, k_sets, strict, scale, q.scalar_type());
    DecodeWorkspace w = kernels::decode_splits(in.p);
    const int64_t out_elems = w.num_splits * in.p.batch * in.p.heads_q * in.p.len_q * in.p.head_dim;
    at::Tensor ws = at::empty({kernels::decode_workspace_elems(in.p, w)}, in.lse.options());
    Target::poison(ws);
    Target::poison(in.out);
    Target::poison(in.lse);
    w.out = ws.data_ptr();
    w.lse = static_cast<char*>(ws.data_ptr()) + out_elems * ws.element_size();
    kernels::set_attention_decode(in.p, w, dtype_of(q, "q"), Target::stream(q));
    return {in.out, in.lse};
  }

  static void kv_cache_append(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& slots, bool check) {
    const typename Target::Guard guard(k_cache.device());
    const KVCacheInputs in = kv_cache_inputs(k_cache, v_cache, k, v, slots);
    const at::Tensor error = at::zeros({1}, slots.options().dtype(at::kInt));
    const cudaStream_t stream = Target::stream(k_cache);
    kernels::kv_cache_append(in.p, error.data_ptr<int>(), stream);
    if (Target::error_raised(error, check, stream)) {
      check_slots(in.slots, in.p.cache_len);
      flagged_but_valid("slots");
    }
  }

  static at::Tensor interleave(const at::Tensor& tokens, const at::Tensor& positions,
                               const at::Tensor& instruction,
                               const std::optional<at::Tensor>& prefix, int64_t num_heads,
                               int64_t grid_h, int64_t grid_w, double rope_base, bool merge,
                               bool check) {
    const typename Target::Guard guard(tokens.device());
    InterleaveInputs in = interleave_inputs(tokens, positions, instruction, prefix, num_heads,
                                            grid_h, grid_w, rope_base, merge);
    Target::poison(in.out);
    const at::Tensor error = at::zeros({1}, positions.options().dtype(at::kInt));
    const cudaStream_t stream = Target::stream(tokens);
    kernels::interleave_forward(in.p, dtype_of(tokens, "tokens"), error.data_ptr<int>(), stream);
    if (Target::error_raised(error, check, stream)) {
      check_positions(in.positions, in.p);
      flagged_but_valid("positions");
    }
    return in.out;
  }

  // Deterministic instruction gradients (column ownership) when torch asks for
  // deterministic algorithms, atomics otherwise. Positions were checked by the forward;
  // a bad one is skipped (and raised where the flag is free to read).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> interleave_backward(
      const at::Tensor& grad, const at::Tensor& positions, const at::Tensor& instruction,
      int64_t prefix_len, int64_t num_heads, int64_t grid_h, int64_t grid_w, double rope_base,
      bool merge) {
    const typename Target::Guard guard(grad.device());
    InterleaveBackwardInputs in = interleave_backward_inputs(
        grad, positions, instruction, prefix_len, num_heads, grid_h, grid_w, rope_base, merge);
    Target::poison(in.grad_tokens);
    Target::poison(in.grad_prefix);
    const at::Tensor error = at::zeros({1}, positions.options().dtype(at::kInt));
    const cudaStream_t stream = Target::stream(grad);
    kernels::interleave_backward(in.p, dtype_of(grad, "grad"), in.grad.data_ptr(),
                                 in.grad_tokens.data_ptr(), in.grad_prefix.data_ptr(),
                                 in.grad_instruction.data_ptr(),
                                 at::globalContext().deterministicAlgorithms(),
                                 error.data_ptr<int>(), stream);
    if (Target::error_raised(error, false, stream)) {
      check_positions(in.positions, in.p);
      flagged_but_valid("positions");
    }
    return {in.grad_tokens, in.grad_instruction.to(instruction.scalar_type()), in.grad_prefix};
  }

 private:
  // After a kernel's error flag, the host check raises the reference's ValueError naming
  // the bad value; reaching this means the two disagree.
  [[noreturn]] static void flagged_but_valid(const char* what) {
    throw std::logic_error(std::string("sarkernels: a kernel flagged ") + what +
                           " that the host check accepts");
  }
};

// Registers every op of the library fragment `m` on Target's kernels.
template <typename Target>
void register_kernel_ops(torch::Library& m) {
  using Ops = KernelOps<Target>;
  m.impl("set_attention", &Ops::set_attention);
  m.impl("kv_cache_append", &Ops::kv_cache_append);
  m.impl("interleave_position_instructions", &Ops::interleave);
  m.impl("interleave_position_instructions_backward", &Ops::interleave_backward);
}

}  // namespace sarkernels
