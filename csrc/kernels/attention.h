// The fused set-attention kernels' entry points, torch-free, for the glue (kernel_ops.h).
// They are defined in attention_fwd.cuh / attention_bwd.cuh, each compiled once per target
// in its own translation unit: csrc/cuda/attention_{fwd,bwd}.cu (nvcc) and
// csrc/simt/attention_{fwd,bwd}.cpp (host compiler, SIMT executor).
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "kernels/platform.cuh"
#include "sarkernels/attention_limits.h"
#include "sarkernels/params.h"

namespace sarkernels::kernels {

inline size_t dtype_size(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2;
}

// Head dims with a kernel: multiples of 8 up to sarkernels/attention_limits.h's limit, each
// run by the kernel of the next capacity up (32, 64, 96, 128, 256), zero-padded; the glue
// sends other head dims to the decode forward and the reference backward.
inline int64_t set_attention_kernel_max_head_dim(DType dtype) {
  return fused_attention_max_head_dim(dtype_size(dtype));
}
inline bool set_attention_kernel_has_head_dim(DType dtype, int64_t d) {
  return d % 8 == 0 && 8 <= d && d <= set_attention_kernel_max_head_dim(dtype);
}

// Tiles move in 16-byte chunks: an operand's base and batch/head/row strides (elements of
// elem bytes) must keep every row 16-byte aligned (true of contiguous and [B, L, H, D]-
// transposed tensors).
inline bool rows_aligned(const void* base, std::initializer_list<int64_t> strides, size_t elem) {
  bool ok = reinterpret_cast<uintptr_t>(base) % 16 == 0;
  for (int64_t s : strides) ok = ok && (s * int64_t(elem)) % 16 == 0;
  return ok;
}

// out [B, Hq, Lq, D] in the inputs' dtype and lse [B, Hq, Lq] in float32 (float64 for
// float64 inputs), at the strides in p (unit stride on D, rows_aligned). Throws
// std::invalid_argument for a head dim without a kernel or unaligned rows.
void set_attention_forward(const SetAttentionParams& p, DType dtype, cudaStream_t stream);

// Bytes of the backward's scratch for p (a 16-byte aligned buffer), and the scratch carved
// from such a buffer.
size_t attention_bwd_workspace_bytes(const SetAttentionBwdParams& g, DType dtype,
                                     bool deterministic);
AttentionBwdWorkspace attention_bwd_workspace(const SetAttentionBwdParams& g, DType dtype,
                                              bool deterministic, void* buffer);

// dq, dk, dv (contiguous, the inputs' dtype) of set_attention_forward's op, given out, lse
// and dout (out's strides) and optionally dlse (lse's strides). deterministic: dQ by a
// separate pass over the key tiles instead of atomics (bitwise reproducible; w without
// dq_accum and done). Same head dims as the forward.
void set_attention_backward(const SetAttentionBwdParams& g, const AttentionBwdWorkspace& w,
                            DType dtype, bool deterministic, cudaStream_t stream);

}  // namespace sarkernels::kernels
