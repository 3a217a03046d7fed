#pragma once
#include <c10/core/ScalarType.h>

#include "sarkernels/params.h"

namespace sarkernels::cpu {
// Validates positions, then writes p.out (contiguous).
void interleave_forward(const InterleaveParams& p, at::ScalarType dtype);
// grad_out is contiguous like the forward's output; grad_tokens/grad_prefix are contiguous
// in dtype; grad_instruction is zero-filled and contiguous in dtype's accumulation type
// (float for half/bfloat16).
void interleave_backward(const InterleaveParams& p, at::ScalarType dtype, const void* grad_out,
                         void* grad_tokens, void* grad_prefix, void* grad_instruction);
}  // namespace sarkernels::cpu
