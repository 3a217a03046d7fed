#pragma once
#include "sarkernels/params.h"

namespace sarkernels::cpu {
// Positions are valid (the glue checks them); writes p.out.
void interleave_forward(const InterleaveParams& p, DType dt);
// grad_out is contiguous like the forward's output; grad_tokens/grad_prefix are contiguous
// in dt; grad_instruction is zero-filled and contiguous in dt's accumulation type
// (float for half/bfloat16).
void interleave_backward(const InterleaveParams& p, DType dt, const void* grad_out,
                         void* grad_tokens, void* grad_prefix, void* grad_instruction);
}  // namespace sarkernels::cpu
