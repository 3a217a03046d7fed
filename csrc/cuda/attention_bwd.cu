// The fused set-attention backward (kernels/attention_bwd.cuh) compiled for the GPU, in its own
// translation unit so that it builds in parallel with the rest.
#include "kernels/attention_bwd.cuh"
