#pragma once
#include "sarkernels/params.h"

namespace sarkernels::cpu {
// Elements are float, or double when is_double; out/lse/dq/dk/dv must be contiguous.
void set_attention_forward(const SetAttentionParams& p, bool is_double);
void set_attention_backward(const SetAttentionBwdParams& p, bool is_double);
}  // namespace sarkernels::cpu
