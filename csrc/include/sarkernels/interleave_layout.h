// The rows of interleave_position_instructions' output, in one place for the CPU kernel,
// the CUDA kernels and the glue (sarkernels/reference.py mirrors it for Python).
//
// interleave (merge = false): [prefix_0 .. prefix_{C-1}, instr_0, tok_0, instr_1, tok_1, ...],
//   C + 2N rows.
// merge (RAR's target-aware form): [prefix_0 .. prefix_{C-2}, prefix_{C-1} + instr_0,
//   tok_0 + instr_1, ..., tok_{N-2} + instr_{N-1}, tok_{N-1}], C + N rows (needs C > 0 if N > 0).
#pragma once
#include <cstdint>

#include "sarkernels/macros.h"
#include "sarkernels/params.h"

namespace sarkernels {

struct InterleaveLayout {
  int64_t prefix_len, num_tokens;
  bool merge;

  // What output row r sums: the index of its instruction, token and prefix row (-1: none).
  struct Row {
    int64_t instruction, token, prefix;
  };

  SK_HOST_DEVICE int64_t rows() const { return prefix_len + (merge ? 1 : 2) * num_tokens; }
  SK_HOST_DEVICE int64_t instruction_row(int64_t i) const {
    return merge ? prefix_len + i - 1 : prefix_len + 2 * i;
  }
  SK_HOST_DEVICE int64_t token_row(int64_t i) const {
    return merge ? prefix_len + i : prefix_len + 2 * i + 1;
  }
  SK_HOST_DEVICE Row row(int64_t r) const {
    Row x{-1, -1, r < prefix_len ? r : -1};
    if (merge) {
      if (r >= prefix_len) x.token = r - prefix_len;
      if (r + 1 >= prefix_len && r + 1 - prefix_len < num_tokens) x.instruction = r + 1 - prefix_len;
    } else if (r >= prefix_len) {
      ((r - prefix_len) % 2 == 0 ? x.instruction : x.token) = (r - prefix_len) / 2;
    }
    return x;
  }
};

SK_HOST_DEVICE InterleaveLayout layout_of(const InterleaveParams& p) {
  return {p.prefix_len, p.num_tokens, p.merge};
}

}  // namespace sarkernels
