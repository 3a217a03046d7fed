// The largest head dim of the fused set-attention kernels (kernels/attention_fwd.cuh,
// attention_bwd.cuh), by element size: the one home of that limit. The kernels' glue reads
// it through kernels::set_attention_kernel_max_head_dim, Python through the
// attention_max_head_dim attribute of the modules built with the kernels (_C with CUDA,
// _simt), which holds kFusedAttentionLimits.
//
// Every capacity up to 256 compiles without register spills at sm_80/sm_90a with the tiles
// of kernels/attention_tiles.cuh (make cuda-check), float64 included, but float64 stops at
// 128: its 256 kernels need about 198 KB of shared memory (two stages of 16-key K and V
// tiles alone take 129 KB), more than an sm_80 block gets (163 KB).
#pragma once
#include <cstddef>
#include <cstdint>

namespace sarkernels {

constexpr int64_t fused_attention_max_head_dim(size_t elem_bytes) {
  return elem_bytes == 8 ? 128 : 256;
}

struct FusedAttentionLimit {
  const char* dtype;  // torch's name
  int64_t max_head_dim;
};
inline constexpr FusedAttentionLimit kFusedAttentionLimits[] = {
    {"float16", fused_attention_max_head_dim(2)},
    {"bfloat16", fused_attention_max_head_dim(2)},
    {"float32", fused_attention_max_head_dim(4)},
    {"float64", fused_attention_max_head_dim(8)}};

}  // namespace sarkernels
