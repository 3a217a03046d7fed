// Position-instruction interleave, torch-free: one block per output row (forward) gathers
// the instruction (table row, or the shared vector rotated by the cell's 2D RoPE) and the
// token, adds the prefix/merge terms, and writes the row once. Backward: token and prefix
// gradients are copies; the instruction gradient is scattered with atomics, or, in the
// deterministic mode, by column ownership (each thread adds every row of its columns in a
// fixed order). Positions outside the table/grid raise *error and are never read.
// Compile-checked in CI; not yet registered as the op's CUDA kernel (see issue 4).
#include <cstdint>

#include "cuda/convert.cuh"
#include "sarkernels/params.h"
#include "sarkernels/rope.h"

namespace sarkernels::cuda {

__device__ __forceinline__ int64_t cell_of(const InterleaveParams& p, int64_t b, int64_t i) {
  return p.positions[b * p.positions_strides[0] + i * p.positions_strides[1]];
}

__device__ __forceinline__ bool cell_ok(const InterleaveParams& p, int64_t cell) {
  return cell >= 0 && cell < (p.num_heads == 0 ? p.table_rows : p.grid_h * p.grid_w);
}

// Elements (e, e+1) of the instruction for `cell`, rotated forward (sign 1) or back (-1).
template <typename T>
__device__ __forceinline__ void instruction_pair(const InterleaveParams& p, int64_t cell,
                                                 int64_t e, float& x0, float& x1) {
  const T* ins = static_cast<const T*>(p.instruction);
  if (p.num_heads == 0) {
    x0 = to_float(ins[cell * p.instruction_row_stride + e]);
    x1 = e + 1 < p.dim ? to_float(ins[cell * p.instruction_row_stride + e + 1]) : 0.f;
    return;
  }
  const int64_t head_dim = p.dim / p.num_heads;
  float s, c;
  sincosf(static_cast<float>(rope_angle(cell, (e % head_dim) / 2, p.grid_w, head_dim, p.rope_base)), &s, &c);
  x0 = to_float(ins[e]);
  x1 = to_float(ins[e + 1]);
  rope_rotate(c, s, x0, x1);
}

// grid: (out_len, batch); threads over element pairs.
template <typename T>
__global__ void interleave_forward_kernel(InterleaveParams p, int* error) {
  const int64_t r = blockIdx.x, b = blockIdx.y, c_len = p.prefix_len, n = p.num_tokens;
  // Which token's instruction and which token (or prefix row) this output row carries.
  int64_t instr = -1, token = -1, prefix = -1;
  if (p.merge) {
    if (r < c_len) prefix = r;
    if (r == c_len - 1 && n > 0) instr = 0;
    if (r >= c_len) {
      token = r - c_len;
      if (token + 1 < n) instr = token + 1;
    }
  } else if (r < c_len) {
    prefix = r;
  } else {
    ((r - c_len) % 2 == 0 ? instr : token) = (r - c_len) / 2;
  }
  int64_t cell = 0;
  if (instr >= 0) {
    cell = cell_of(p, b, instr);
    if (!cell_ok(p, cell)) {
      if (threadIdx.x == 0) atomicExch(error, 1);
      return;
    }
  }
  const T* tok = static_cast<const T*>(p.tokens) + b * p.tokens_strides[0] + token * p.tokens_strides[1];
  const T* pre = static_cast<const T*>(p.prefix) + b * p.prefix_strides[0] + prefix * p.prefix_strides[1];
  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + r * p.out_strides[1];
  for (int64_t e = 2 * threadIdx.x; e < p.dim; e += 2 * blockDim.x) {
    const bool second = e + 1 < p.dim;
    float y0 = 0.f, y1 = 0.f;
    if (instr >= 0) instruction_pair<T>(p, cell, e, y0, y1);
    if (token >= 0) {
      y0 += to_float(tok[e]);
      y1 += second ? to_float(tok[e + 1]) : 0.f;
    }
    if (prefix >= 0) {
      y0 += to_float(pre[e]);
      y1 += second ? to_float(pre[e + 1]) : 0.f;
    }
    out[e] = from_float<T>(y0);
    if (second) out[e + 1] = from_float<T>(y1);
  }
}

__device__ __forceinline__ int64_t instr_row(const InterleaveParams& p, int64_t i) {
  return p.merge ? p.prefix_len + i - 1 : p.prefix_len + 2 * i;
}
__device__ __forceinline__ int64_t token_row(const InterleaveParams& p, int64_t i) {
  return p.merge ? p.prefix_len + i : p.prefix_len + 2 * i + 1;
}

// grid: (num_tokens + prefix_len, batch): copies grad rows of tokens and prefix.
template <typename T>
__global__ void interleave_copy_grads_kernel(InterleaveParams p, const T* grad, T* g_tokens,
                                             T* g_prefix) {
  const int64_t u = blockIdx.x, b = blockIdx.y, out_len = p.prefix_len + (p.merge ? 1 : 2) * p.num_tokens;
  const bool is_token = u < p.num_tokens;
  const int64_t src_row = is_token ? token_row(p, u) : u - p.num_tokens;
  const T* src = grad + (b * out_len + src_row) * p.dim;
  T* dst = is_token ? g_tokens + (b * p.num_tokens + u) * p.dim
                    : g_prefix + (b * p.prefix_len + u - p.num_tokens) * p.dim;
  for (int64_t e = threadIdx.x; e < p.dim; e += blockDim.x) dst[e] = src[e];
}

// The instruction gradient of one (b, i) pair of elements, rotated back to the vector's frame.
template <typename T>
__device__ __forceinline__ void instruction_grad_pair(const InterleaveParams& p, const T* grad,
                                                      int64_t b, int64_t i, int64_t e, float& g0,
                                                      float& g1, int64_t& cell) {
  const int64_t out_len = p.prefix_len + (p.merge ? 1 : 2) * p.num_tokens;
  const T* src = grad + (b * out_len + instr_row(p, i)) * p.dim;
  cell = cell_of(p, b, i);
  g0 = to_float(src[e]);
  g1 = e + 1 < p.dim ? to_float(src[e + 1]) : 0.f;
  if (p.num_heads != 0) {
    const int64_t head_dim = p.dim / p.num_heads;
    float s, c;
    sincosf(static_cast<float>(rope_angle(cell, (e % head_dim) / 2, p.grid_w, head_dim, p.rope_base)), &s, &c);
    rope_rotate(c, -s, g0, g1);
  }
}

// Deterministic: thread t owns element pair t of the instruction (for every table row)
// and adds all (b, i) in order. grid: ceil(dim / 2 / threads).
template <typename T>
__global__ void interleave_instruction_grad_ordered(InterleaveParams p, const T* grad, float* g_ins) {
  const int64_t e = 2 * (int64_t(blockIdx.x) * blockDim.x + threadIdx.x);
  if (e >= p.dim) return;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.num_tokens; ++i) {
      float g0, g1;
      int64_t cell;
      instruction_grad_pair<T>(p, grad, b, i, e, g0, g1, cell);
      float* dst = g_ins + (p.num_heads == 0 ? cell * p.dim : 0) + e;
      dst[0] += g0;
      if (e + 1 < p.dim) dst[1] += g1;
    }
  }
}

// Fast: one block per (i, b), atomics into the instruction gradient. grid: (num_tokens, batch).
template <typename T>
__global__ void interleave_instruction_grad_atomic(InterleaveParams p, const T* grad, float* g_ins) {
  const int64_t i = blockIdx.x, b = blockIdx.y;
  for (int64_t e = 2 * threadIdx.x; e < p.dim; e += 2 * blockDim.x) {
    float g0, g1;
    int64_t cell;
    instruction_grad_pair<T>(p, grad, b, i, e, g0, g1, cell);
    float* dst = g_ins + (p.num_heads == 0 ? cell * p.dim : 0) + e;
    atomicAdd(dst, g0);
    if (e + 1 < p.dim) atomicAdd(dst + 1, g1);
  }
}

template <typename F>
bool by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); return true;
    case 1: f(__half{}); return true;
    case 2: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

// dtype: 0 float, 1 half, 2 bfloat16. p.out contiguous rows; *error set on a bad position.
bool interleave_forward(const InterleaveParams& p, int dtype, int* error, cudaStream_t stream) {
  const int64_t out_len = p.prefix_len + (p.merge ? 1 : 2) * p.num_tokens;
  if (out_len * p.batch == 0) return true;
  return by_dtype(dtype, [&](auto tag) {
    interleave_forward_kernel<decltype(tag)><<<dim3(out_len, p.batch), 128, 0, stream>>>(p, error);
  });
}

// grad contiguous [B, out_len, D]; g_tokens, g_prefix contiguous in dtype; g_instruction
// zero-filled float32 (table [P, D] or vector [D]). Positions were checked by the forward.
bool interleave_backward(const InterleaveParams& p, int dtype, const void* grad, void* g_tokens,
                         void* g_prefix, float* g_instruction, bool deterministic,
                         cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad);
    if (p.batch * (p.num_tokens + p.prefix_len) > 0) {
      interleave_copy_grads_kernel<T><<<dim3(p.num_tokens + p.prefix_len, p.batch), 128, 0, stream>>>(
          p, g, static_cast<T*>(g_tokens), static_cast<T*>(g_prefix));
    }
    if (p.batch * p.num_tokens == 0) return;
    if (deterministic) {
      const int threads = 128;
      const int64_t pairs = (p.dim + 1) / 2;
      interleave_instruction_grad_ordered<T><<<(pairs + threads - 1) / threads, threads, 0, stream>>>(
          p, g, g_instruction);
    } else {
      interleave_instruction_grad_atomic<T><<<dim3(p.num_tokens, p.batch), 128, 0, stream>>>(
          p, g, g_instruction);
    }
  });
}

}  // namespace sarkernels::cuda
