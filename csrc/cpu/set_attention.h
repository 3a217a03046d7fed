#pragma once
#include "sarkernels/params.h"

namespace sarkernels::cpu {
// dt is float32 or float64 (the glue upcasts 16-bit inputs); out/lse/dq/dk/dv contiguous.
void set_attention_forward(const SetAttentionParams& p, DType dt);
void set_attention_backward(const SetAttentionBwdParams& p, DType dt);
}  // namespace sarkernels::cpu
