// CPU position-instruction interleave: gather (table or shared vector + 2D RoPE), prefix
// and interleave/merge in one pass; the backward is deterministic (each thread owns a slice
// of the instruction's columns and adds rows in a fixed order).
#include "cpu/interleave.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "sarkernels/rope.h"

namespace sarkernels::cpu {
namespace {

// cos/sin of every (cell, pair) for the shared-vector instruction; empty for a table.
template <typename A>
struct RopeTable {
  int64_t pairs = 0;
  std::vector<A> cos, sin;

  explicit RopeTable(const InterleaveParams& p) {
    if (p.num_heads == 0) return;
    const int64_t head_dim = p.dim / p.num_heads, cells = p.grid_h * p.grid_w;
    pairs = head_dim / 2;
    cos.resize(cells * pairs);
    sin.resize(cells * pairs);
    for (int64_t cell = 0; cell < cells; ++cell) {
      for (int64_t j = 0; j < pairs; ++j) {
        const double a = rope_angle(cell, j, p.grid_w, head_dim, p.rope_base);
        cos[cell * pairs + j] = static_cast<A>(std::cos(a));
        sin[cell * pairs + j] = static_cast<A>(std::sin(a));
      }
    }
  }
};

int64_t position(const InterleaveParams& p, int64_t b, int64_t i) {
  return p.positions[b * p.positions_strides[0] + i * p.positions_strides[1]];
}

void check_positions(const InterleaveParams& p) {
  const int64_t limit = p.num_heads == 0 ? p.table_rows : p.grid_h * p.grid_w;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t i = 0; i < p.num_tokens; ++i) {
      const int64_t cell = position(p, b, i);
      TORCH_CHECK_VALUE(cell >= 0 && cell < limit, "interleave_position_instructions: positions[", b,
                  ", ", i, "] = ", cell, " is outside [0, ", limit, ") (",
                  p.num_heads == 0 ? "instruction table rows" : "grid cells", ")");
    }
  }
}

// The instruction for token (b, i), in the accumulation type.
template <typename T, typename A>
void instruction_row(const InterleaveParams& p, const RopeTable<A>& rope, int64_t b, int64_t i,
                     A* row) {
  const int64_t cell = position(p, b, i);
  const T* ins = static_cast<const T*>(p.instruction);
  if (p.num_heads == 0) {
    const T* src = ins + cell * p.instruction_row_stride;
    for (int64_t e = 0; e < p.dim; ++e) row[e] = static_cast<A>(src[e]);
    return;
  }
  for (int64_t q = 0; q < p.dim / 2; ++q) {  // q = h * pairs + j
    const int64_t j = q % rope.pairs;
    A x0 = static_cast<A>(ins[2 * q]), x1 = static_cast<A>(ins[2 * q + 1]);
    rope_rotate(rope.cos[cell * rope.pairs + j], rope.sin[cell * rope.pairs + j], x0, x1);
    row[2 * q] = x0;
    row[2 * q + 1] = x1;
  }
}

template <typename T>
void forward(const InterleaveParams& p) {
  using A = at::opmath_type<T>;
  check_positions(p);
  const RopeTable<A> rope(p);
  const int64_t d = p.dim, c_len = p.prefix_len;
  auto row_ptr = [&](auto base, const int64_t* st, int64_t b, int64_t r) {
    return base + b * st[0] + r * st[1];
  };
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.batch * c_len, 16, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / c_len, c = unit % c_len;
      const T* src = row_ptr(static_cast<const T*>(p.prefix), p.prefix_strides, b, c);
      std::copy(src, src + d, row_ptr(out, p.out_strides, b, c));
    }
  });
  at::parallel_for(0, p.batch * p.num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> ins(d);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / p.num_tokens, i = unit % p.num_tokens;
      const T* tok = row_ptr(static_cast<const T*>(p.tokens), p.tokens_strides, b, i);
      if (!p.merge) {
        instruction_row<T, A>(p, rope, b, i, ins.data());
        T* dst = row_ptr(out, p.out_strides, b, c_len + 2 * i);
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(ins[e]);
        std::copy(tok, tok + d, row_ptr(out, p.out_strides, b, c_len + 2 * i + 1));
        continue;
      }
      // merge: instr_{i+1} joins tok_i; instr_0 joins the last prefix row
      if (i == 0) {
        instruction_row<T, A>(p, rope, b, 0, ins.data());
        T* dst = row_ptr(out, p.out_strides, b, c_len - 1);
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(static_cast<A>(dst[e]) + ins[e]);
      }
      T* dst = row_ptr(out, p.out_strides, b, c_len + i);
      if (i + 1 == p.num_tokens) {
        std::copy(tok, tok + d, dst);
        continue;
      }
      instruction_row<T, A>(p, rope, b, i + 1, ins.data());
      for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(static_cast<A>(tok[e]) + ins[e]);
    }
  });
}

template <typename T>
void backward(const InterleaveParams& p, const void* grad_out_v, void* grad_tokens_v,
              void* grad_prefix_v, void* grad_instruction_v) {
  using A = at::opmath_type<T>;
  const RopeTable<A> rope(p);
  const int64_t d = p.dim, c_len = p.prefix_len, n = p.num_tokens;
  const T* g = static_cast<const T*>(grad_out_v);  // contiguous [B, out_len, D]
  const int64_t out_len = c_len + (p.merge ? n : 2 * n);
  auto grow = [&](int64_t b, int64_t r) { return g + (b * out_len + r) * d; };
  // Row of the output that carries instruction i, and the one that carries token i.
  auto instr_row = [&](int64_t i) { return p.merge ? c_len + i - 1 : c_len + 2 * i; };
  auto token_row = [&](int64_t i) { return p.merge ? c_len + i : c_len + 2 * i + 1; };

  T* gt = static_cast<T*>(grad_tokens_v);
  T* gp = static_cast<T*>(grad_prefix_v);
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < n; ++i) {
        std::copy(grow(b, token_row(i)), grow(b, token_row(i)) + d, gt + (b * n + i) * d);
      }
      std::copy(grow(b, 0), grow(b, c_len), gp + b * c_len * d);
    }
  });

  A* gi = static_cast<A*>(grad_instruction_v);  // contiguous, zero-filled, accumulation type
  if (p.num_heads == 0) {
    at::parallel_for(0, d, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t i = 0; i < n; ++i) {
          const T* src = grow(b, instr_row(i));
          A* dst = gi + position(p, b, i) * d;
          for (int64_t e = begin; e < end; ++e) dst[e] += static_cast<A>(src[e]);
        }
      }
    });
    return;
  }
  at::parallel_for(0, d / 2, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t i = 0; i < n; ++i) {
        const T* src = grow(b, instr_row(i));
        const int64_t cell = position(p, b, i);
        for (int64_t q = begin; q < end; ++q) {
          const int64_t j = q % rope.pairs;
          A x0 = static_cast<A>(src[2 * q]), x1 = static_cast<A>(src[2 * q + 1]);
          rope_rotate(rope.cos[cell * rope.pairs + j], -rope.sin[cell * rope.pairs + j], x0, x1);
          gi[2 * q] += x0;
          gi[2 * q + 1] += x1;
        }
      }
    }
  });
}

}  // namespace

void interleave_forward(const InterleaveParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "interleave_forward",
                                  [&] { forward<scalar_t>(p); });
}

void interleave_backward(const InterleaveParams& p, at::ScalarType dtype, const void* grad_out,
                         void* grad_tokens, void* grad_prefix, void* grad_instruction) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "interleave_backward",
      [&] { backward<scalar_t>(p, grad_out, grad_tokens, grad_prefix, grad_instruction); });
}

}  // namespace sarkernels::cpu
