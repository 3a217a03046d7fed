// Position-instruction interleave. Forward: one block per output row gathers the
// instruction (a table row, or the shared vector rotated by the cell's 2D RoPE) and the
// token, adds the prefix row (merge), and writes the row once. Backward: token and prefix
// gradients are row copies; the instruction gradient is scattered with atomics (one block
// per token) or, deterministic, by column ownership (each thread adds every (b, i) of its
// element pair in a fixed order, the CPU kernel's order). A position outside the
// table/grid raises *error (device memory, zeroed by the caller) and is never read; the
// results are then meaningless and the caller raises.
#pragma once
#include <cstdint>

#include "kernels/convert.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/launch.cuh"
#include "kernels/primitives.cuh"
#include "sarkernels/interleave_layout.h"
#include "sarkernels/params.h"
#include "sarkernels/rope.h"

namespace sarkernels::kernels {

SK_DEVICE int64_t interleave_cell(const InterleaveParams& p, int64_t b, int64_t i) {
  return p.positions[b * p.positions_strides[0] + i * p.positions_strides[1]];
}

SK_DEVICE bool interleave_cell_ok(const InterleaveParams& p, int64_t cell) {
  return cell >= 0 && cell < (p.num_heads == 0 ? p.table_rows : p.grid_h * p.grid_w);
}

// cos and sin of the 2D RoPE angle of element pair (e, e + 1) for `cell`.
template <typename A>
SK_DEVICE void interleave_rope(const InterleaveParams& p, int64_t cell, int64_t e, A& c, A& s) {
  const int64_t head_dim = p.dim / p.num_heads;
  double sd, cd;
  sincos(rope_angle(cell, (e % head_dim) / 2, p.grid_w, head_dim, p.rope_base), &sd, &cd);
  c = static_cast<A>(cd);
  s = static_cast<A>(sd);
}

// One block per (batch, output row); threads over element pairs.
template <typename T>
__global__ void interleave_forward_kernel(InterleaveParams p, int* error) {
  using A = acc_t<T>;
  const InterleaveLayout layout = layout_of(p);
  const int64_t b = blockIdx.x / layout.rows(), r = blockIdx.x % layout.rows();
  const InterleaveLayout::Row row = layout.row(r);
  int64_t cell = 0;
  if (row.instruction >= 0) {
    cell = interleave_cell(p, b, row.instruction);
    if (!interleave_cell_ok(p, cell)) {
      if (threadIdx.x == 0) atomic_exch(error, 1);
      return;
    }
  }
  const T* ins = static_cast<const T*>(p.instruction) +
                 (p.num_heads == 0 ? cell * p.instruction_row_stride : 0);
  const T* tok = row.token < 0 ? nullptr
                              : static_cast<const T*>(p.tokens) + b * p.tokens_strides[0] +
                                    row.token * p.tokens_strides[1];
  const T* pre = row.prefix < 0 ? nullptr
                                : static_cast<const T*>(p.prefix) + b * p.prefix_strides[0] +
                                      row.prefix * p.prefix_strides[1];
  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + r * p.out_strides[1];
  for (int64_t e = 2 * threadIdx.x; e < p.dim; e += 2 * blockDim.x) {
    const bool pair = e + 1 < p.dim;
    // -0 is the additive identity (+0 would turn a copied -0 into +0).
    A y0 = -A(0), y1 = -A(0);
    if (row.instruction >= 0) {
      A x0 = to_float(ins[e]), x1 = pair ? A(to_float(ins[e + 1])) : A(0);
      if (p.num_heads != 0) {
        A c, s;
        interleave_rope(p, cell, e, c, s);
        rope_rotate(c, s, x0, x1);
      }
      y0 += x0;
      y1 += x1;
    }
    if (tok) {
      y0 += to_float(tok[e]);
      if (pair) y1 += to_float(tok[e + 1]);
    }
    if (pre) {
      y0 += to_float(pre[e]);
      if (pair) y1 += to_float(pre[e + 1]);
    }
    out[e] = from_float<T>(y0);
    if (pair) out[e + 1] = from_float<T>(y1);
  }
}

inline LaunchPlan interleave_forward_plan(const InterleaveParams& p) {
  return {dim3(grid_dim("interleave_forward", p.batch * layout_of(p).rows(), kMaxGridX)),
          dim3(block_threads((p.dim + 1) / 2)), 0};
}

// One block per (batch, token or prefix row): those gradients are rows of grad.
template <typename T>
__global__ void interleave_copy_grads_kernel(InterleaveParams p, const T* grad, T* g_tokens,
                                             T* g_prefix) {
  const InterleaveLayout layout = layout_of(p);
  const int64_t units = p.num_tokens + p.prefix_len;
  const int64_t b = blockIdx.x / units, u = blockIdx.x % units;
  const bool is_token = u < p.num_tokens;
  const T* src = grad + (b * layout.rows() + (is_token ? layout.token_row(u) : u - p.num_tokens)) * p.dim;
  T* dst = is_token ? g_tokens + (b * p.num_tokens + u) * p.dim
                    : g_prefix + (b * p.prefix_len + u - p.num_tokens) * p.dim;
  for (int64_t e = threadIdx.x; e < p.dim; e += blockDim.x) dst[e] = src[e];
}

inline LaunchPlan interleave_copy_grads_plan(const InterleaveParams& p) {
  return {dim3(grid_dim("interleave_copy_grads", p.batch * (p.num_tokens + p.prefix_len), kMaxGridX)),
          dim3(block_threads(p.dim)), 0};
}

// The gradient of instruction elements (e, e + 1) from token (b, i), rotated back to the
// shared vector's frame; false (and *error raised) for a position outside the table/grid.
template <typename T>
SK_DEVICE bool instruction_grad_pair(const InterleaveParams& p, const T* grad, int64_t b,
                                     int64_t i, int64_t e, int* error, acc_t<T>* g,
                                     int64_t& cell) {
  using A = acc_t<T>;
  const InterleaveLayout layout = layout_of(p);
  cell = interleave_cell(p, b, i);
  if (!interleave_cell_ok(p, cell)) {
    atomic_exch(error, 1);
    return false;
  }
  const T* src = grad + (b * layout.rows() + layout.instruction_row(i)) * p.dim;
  g[0] = to_float(src[e]);
  g[1] = e + 1 < p.dim ? A(to_float(src[e + 1])) : A(0);
  if (p.num_heads != 0) {
    A c, s;
    interleave_rope(p, cell, e, c, s);
    rope_rotate(c, -s, g[0], g[1]);
  }
  return true;
}

// Deterministic: thread t owns element pair t (of every table row) and adds all (b, i) in
// order.
template <typename T>
__global__ void interleave_instruction_grad_ordered(InterleaveParams p, const T* grad,
                                                    acc_t<T>* g_ins, int* error) {
  const int64_t e = 2 * (int64_t(blockIdx.x) * blockDim.x + threadIdx.x);
  if (e >= p.dim) return;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.num_tokens; ++i) {
      acc_t<T> g[2];
      int64_t cell;
      if (!instruction_grad_pair<T>(p, grad, b, i, e, error, g, cell)) continue;
      acc_t<T>* dst = g_ins + (p.num_heads == 0 ? cell * p.dim : 0) + e;
      dst[0] += g[0];
      if (e + 1 < p.dim) dst[1] += g[1];
    }
  }
}

inline LaunchPlan interleave_instruction_grad_ordered_plan(const InterleaveParams& p) {
  const int64_t pairs = (p.dim + 1) / 2, threads = block_threads(pairs);
  const int64_t blocks = p.batch * p.num_tokens > 0 ? (pairs + threads - 1) / threads : 0;
  return {dim3(grid_dim("interleave_instruction_grad_ordered", blocks, kMaxGridX)),
          dim3(static_cast<unsigned>(threads)), 0};
}

// Fast: one block per (batch, token), atomics into the instruction gradient.
template <typename T>
__global__ void interleave_instruction_grad_atomic(InterleaveParams p, const T* grad,
                                                   acc_t<T>* g_ins, int* error) {
  const int64_t b = blockIdx.x / p.num_tokens, i = blockIdx.x % p.num_tokens;
  for (int64_t e = 2 * threadIdx.x; e < p.dim; e += 2 * blockDim.x) {
    acc_t<T> g[2];
    int64_t cell;
    if (!instruction_grad_pair<T>(p, grad, b, i, e, error, g, cell)) return;
    acc_t<T>* dst = g_ins + (p.num_heads == 0 ? cell * p.dim : 0) + e;
    atomic_add(dst, g[0]);
    if (e + 1 < p.dim) atomic_add(dst + 1, g[1]);
  }
}

inline LaunchPlan interleave_instruction_grad_atomic_plan(const InterleaveParams& p) {
  return {dim3(grid_dim("interleave_instruction_grad_atomic", p.batch * p.num_tokens, kMaxGridX)),
          dim3(block_threads((p.dim + 1) / 2)), 0};
}

// p.out as p.out_strides say; *error set on a bad position.
inline void interleave_forward(const InterleaveParams& p, DType dt, int* error,
                               cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch("interleave_forward", interleave_forward_plan(p), stream, interleave_forward_kernel<T>,
           p, error);
  });
}

// grad contiguous [B, rows, D]; g_tokens and g_prefix contiguous in dt; g_instruction
// zero-filled in acc_t of dt (a table [P, D] or a vector [D]); *error set on a bad position.
inline void interleave_backward(const InterleaveParams& p, DType dt, const void* grad,
                                void* g_tokens, void* g_prefix, void* g_instruction,
                                bool deterministic, int* error, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* g = static_cast<const T*>(grad);
    auto* gi = static_cast<acc_t<T>*>(g_instruction);
    launch("interleave_copy_grads", interleave_copy_grads_plan(p), stream,
           interleave_copy_grads_kernel<T>, p, g, static_cast<T*>(g_tokens),
           static_cast<T*>(g_prefix));
    if (deterministic) {
      launch("interleave_instruction_grad_ordered", interleave_instruction_grad_ordered_plan(p),
             stream, interleave_instruction_grad_ordered<T>, p, g, gi, error);
    } else {
      launch("interleave_instruction_grad_atomic", interleave_instruction_grad_atomic_plan(p),
             stream, interleave_instruction_grad_atomic<T>, p, g, gi, error);
    }
  });
}

}  // namespace sarkernels::kernels
