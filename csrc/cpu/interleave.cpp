// CPU position-instruction interleave: gather (table or shared vector + 2D RoPE), prefix
// and interleave/merge in one pass; the backward is deterministic (each thread owns a slice
// of the instruction's columns and adds rows in a fixed order).
#include "cpu/interleave.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/dispatch.h"
#include "sarkernels/interleave_layout.h"
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
  const InterleaveLayout layout = layout_of(p);
  at::parallel_for(0, p.batch * p.num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> ins(d);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / p.num_tokens, i = unit % p.num_tokens;
      const T* tok = row_ptr(static_cast<const T*>(p.tokens), p.tokens_strides, b, i);
      T* tok_dst = row_ptr(out, p.out_strides, b, layout.token_row(i));
      if (!p.merge) {
        instruction_row<T, A>(p, rope, b, i, ins.data());
        T* dst = row_ptr(out, p.out_strides, b, layout.instruction_row(i));
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(ins[e]);
        std::copy(tok, tok + d, tok_dst);
        continue;
      }
      // merge: unit i writes token i's row whole, with instruction i + 1 (that row is
      // also its row); instruction 0 joins the last prefix row, written by the pass above.
      if (i == 0) {
        instruction_row<T, A>(p, rope, b, 0, ins.data());
        T* dst = row_ptr(out, p.out_strides, b, layout.instruction_row(0));
        for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(static_cast<A>(dst[e]) + ins[e]);
      }
      if (i + 1 == p.num_tokens) {
        std::copy(tok, tok + d, tok_dst);
        continue;
      }
      instruction_row<T, A>(p, rope, b, i + 1, ins.data());
      for (int64_t e = 0; e < d; ++e) tok_dst[e] = static_cast<T>(static_cast<A>(tok[e]) + ins[e]);
    }
  });
}

template <typename T>
void backward(const InterleaveParams& p, const void* grad_out_v, void* grad_tokens_v,
              void* grad_prefix_v, void* grad_instruction_v) {
  using A = at::opmath_type<T>;
  const RopeTable<A> rope(p);
  const int64_t d = p.dim, c_len = p.prefix_len, n = p.num_tokens;
  const T* g = static_cast<const T*>(grad_out_v);  // contiguous [B, rows, D]
  const InterleaveLayout layout = layout_of(p);
  auto grow = [&](int64_t b, int64_t r) { return g + (b * layout.rows() + r) * d; };

  T* gt = static_cast<T*>(grad_tokens_v);
  T* gp = static_cast<T*>(grad_prefix_v);
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < n; ++i) {
        std::copy(grow(b, layout.token_row(i)), grow(b, layout.token_row(i)) + d, gt + (b * n + i) * d);
      }
      std::copy(grow(b, 0), grow(b, c_len), gp + b * c_len * d);
    }
  });

  A* gi = static_cast<A*>(grad_instruction_v);  // contiguous, zero-filled, accumulation type
  if (p.num_heads == 0) {
    at::parallel_for(0, d, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t i = 0; i < n; ++i) {
          const T* src = grow(b, layout.instruction_row(i));
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
        const T* src = grow(b, layout.instruction_row(i));
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

void interleave_forward(const InterleaveParams& p, DType dt) {
  dispatch(dt, [&](auto tag) { forward<typename decltype(tag)::type>(p); });
}

void interleave_backward(const InterleaveParams& p, DType dt, const void* grad_out,
                         void* grad_tokens, void* grad_prefix, void* grad_instruction) {
  dispatch(dt, [&](auto tag) {
    backward<typename decltype(tag)::type>(p, grad_out, grad_tokens, grad_prefix,
                                           grad_instruction);
  });
}

}  // namespace sarkernels::cpu
