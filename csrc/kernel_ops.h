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

#include "kernels/attention.h"
#include "kernels/decode_attention.cuh"
#include "kernels/interleave.cuh"
#include "kernels/kv_cache_append.cuh"
#include "tensor_params.h"

namespace sarkernels {

template <typename Target>
struct KernelOps {
  // Forward: the split-KV decode kernel for few queries (it spreads the keys over blocks)
  // and for head dims the training kernel lacks (it takes every one), the fused training
  // kernel (kernels/attention_fwd.cuh) otherwise. ops.ATTENTION_RULE says it in words.
  static std::tuple<at::Tensor, at::Tensor> set_attention(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const at::Tensor& q_sets,
                                                          const at::Tensor& k_sets, bool strict,
                                                          double scale) {
    const typename Target::Guard guard(q.device());
    AttentionInputs in = attention_inputs(q, k, v, q_sets, k_sets, strict, scale, q.scalar_type());
    TORCH_CHECK(in.p.head_dim <= 256, "set_attention: the kernels take head dims up to 256, "
                "got q ", q.sizes());
    Target::poison(in.out);
    Target::poison(in.lse);
    const DType dt = dtype_of(q, "q");
    if (in.p.len_q > kDecodeMaxQueries &&
        kernels::set_attention_kernel_has_head_dim(dt, in.p.head_dim)) {
      align_rows(in, strict, scale);
      kernels::set_attention_forward(in.p, dt, Target::stream(q));
      return {in.out, in.lse};
    }
    DecodeWorkspace w = kernels::decode_splits(in.p, dt);
    const int64_t out_elems = w.num_splits * in.p.batch * in.p.heads_q * in.p.len_q * in.p.head_dim;
    at::Tensor ws = at::empty({kernels::decode_workspace_elems(in.p, w)}, in.lse.options());
    Target::poison(ws);
    w.out = ws.data_ptr();
    w.lse = static_cast<char*>(ws.data_ptr()) + out_elems * ws.element_size();
    kernels::set_attention_decode(in.p, w, dt, Target::stream(q));
    return {in.out, in.lse};
  }

  // The fused backward (kernels/attention_bwd.cuh) for the head dims it has
  // (set_attention_kernel_has_head_dim; sarkernels/ops.py takes the reference recompute
  // for others). dQ by atomics, or by a separate pass over the keys when
  // torch asks for deterministic algorithms (torch.use_deterministic_algorithms).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> set_attention_backward(
      const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
      const at::Tensor& q_sets, const at::Tensor& k_sets, bool strict, double scale) {
    const typename Target::Guard guard(q.device());
    check_attention_backward(dout, dlse, q, out, lse);
    const DType kdt = dtype_of(q, "q");
    TORCH_CHECK(kernels::set_attention_kernel_has_head_dim(kdt, q.size(3)),
                "set_attention_backward: the kernels take head dims that are multiples of 8 up "
                "to ", kernels::set_attention_kernel_max_head_dim(kdt), " for ", q.scalar_type(),
                ", got q ", q.sizes());
    const at::ScalarType dt = q.scalar_type(), acc = acc_type(dt);
    AttentionInputs in = attention_operands(q, k, v, q_sets, k_sets, dt);
    // out and dout share one layout, lse and dlse another (the kernels take one stride set each)
    in.out = out.to(dt).contiguous();
    in.lse = lse.to(acc).contiguous();
    const at::Tensor dout_c = aligned(dout.to(dt).contiguous());
    const at::Tensor dlse_c = dlse ? dlse->to(acc).contiguous() : at::Tensor();
    align_rows(in, strict, scale);
    at::Tensor dq = at::empty(q.sizes(), q.options().dtype(dt));
    at::Tensor dk = at::empty(k.sizes(), k.options().dtype(dt));
    at::Tensor dv = at::empty(v.sizes(), v.options().dtype(dt));
    for (const at::Tensor& t : {dq, dk, dv}) Target::poison(t);
    const SetAttentionBwdParams g{in.p, dout_c.data_ptr(), dlse ? dlse_c.data_ptr() : nullptr,
                                  dq.data_ptr(), dk.data_ptr(), dv.data_ptr()};
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    const int64_t bytes = int64_t(kernels::attention_bwd_workspace_bytes(g, kdt, deterministic));
    at::Tensor ws = at::empty({bytes / int64_t(c10::elementSize(acc))}, q.options().dtype(acc));
    Target::poison(ws);
    kernels::set_attention_backward(g, kernels::attention_bwd_workspace(g, kdt, deterministic,
                                                                        ws.data_ptr()),
                                    kdt, deterministic, Target::stream(q));
    return {dq, dk, dv};
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
  // Up to this many queries the forward takes the split-KV decode kernel: a training-kernel
  // block would leave most of its 64 query rows idle and walk every key alone.
  static constexpr int64_t kDecodeMaxQueries = 16;

  // The training kernels move rows in 16-byte chunks: an operand whose rows are not 16-byte
  // aligned (odd strides or storage offset) is copied into fresh contiguous memory.
  static at::Tensor aligned(const at::Tensor& t) {
    const bool ok = kernels::rows_aligned(
        t.data_ptr(), {t.stride(0), t.stride(1), t.stride(2)}, t.element_size());
    return ok ? t : t.clone(at::MemoryFormat::Contiguous);
  }
  static void align_rows(AttentionInputs& in, bool strict, double scale) {
    in.q = aligned(in.q);
    in.k = aligned(in.k);
    in.v = aligned(in.v);
    in.out = aligned(in.out);
    in.p = attention_params(in.q, in.k, in.v, in.q_sets, in.k_sets, in.out, in.lse, strict, scale);
  }

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
  m.impl("set_attention_backward", &Ops::set_attention_backward);
  m.impl("kv_cache_append", &Ops::kv_cache_append);
  m.impl("interleave_position_instructions", &Ops::interleave);
  m.impl("interleave_position_instructions_backward", &Ops::interleave_backward);
}

}  // namespace sarkernels
