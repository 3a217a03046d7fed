// The fused set-attention forward (kernels/attention_fwd.cuh) compiled for the SIMT executor, in
// its own translation unit so that it builds in parallel with the rest.
#include "kernels/attention_fwd.cuh"
