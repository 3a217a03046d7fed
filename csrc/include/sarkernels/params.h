// Torch-free descriptions of each op's operands: raw pointers and element strides.
// The torch glue (one file per backend) fills these; kernels see nothing else.
#pragma once
#include <cstdint>

namespace sarkernels {

// Element type of a kernel's floating-point operands; the one way dtypes reach kernels.
enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] with unit stride on D; sets are contiguous int64
// [B, Lq] and [B, Lk].
struct SetAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  const int64_t* q_sets;
  const int64_t* k_sets;
  void* out;  // [B, Hq, Lq, D]
  void* lse;  // [B, Hq, Lq]
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int64_t lse_batch_stride, lse_head_stride;
  double scale;
  bool strict;
};

// Gradients of set attention; dq/dk/dv are contiguous and share q/k/v's shapes.
struct SetAttentionBwdParams {
  SetAttentionParams fwd;  // out and lse are inputs here
  const void* dout;        // same strides as out
  const void* dlse;        // nullable; same strides as lse
  void* dq;
  void* dk;
  void* dv;
};

// Scratch of the fused set-attention backward, carved from one caller-allocated buffer
// (kernels::attention_bwd_workspace_bytes / attention_bwd_workspace). Elements are float
// (double for float64 inputs), rows indexed (b * Hq + h) * Lq + i.
struct AttentionBwdWorkspace {
  void* delta;     // [B, Hq, Lq]: rowsum(dO * O) - dlse
  void* lse;       // [B, Hq, Lq]: lse in the kernels' exponent base, +inf on empty rows
  void* dq_accum;  // [B, Hq, Lq, D]: dQ summed over key tiles; null when deterministic
  int* done;       // [B, Hkv] int32: dK/dV blocks finished (dQ's conversion); likewise
};

// Split-KV decode scratch: per split, each query row's normalised partial output and lse,
// in the kernel's accumulation type (float, or double for float64 inputs).
struct DecodeWorkspace {
  void* out;  // [num_splits, B, Hq, Lq, D]
  void* lse;  // [num_splits, B, Hq, Lq]
  int num_splits;
  int64_t split_len;  // keys per split
};

// caches [B, H, S, D] (unit stride on D), new k/v [B, H, n, D], slots int64 [B, n].
struct KVCacheAppendParams {
  void* k_cache;
  void* v_cache;
  const void* k;
  const void* v;
  const int64_t* slots;
  int64_t batch, heads, cache_len, num_new, head_dim;
  int64_t kc_strides[3], vc_strides[3], k_strides[3], v_strides[3];  // batch, head, row
  int64_t slots_strides[2];
  int64_t elem_size;
};

// tokens [B, N, D], positions int64 [B, N], prefix [B, C, D] (C may be 0), output rows as
// sarkernels/interleave_layout.h lays them out; all contiguous on D.
// The instruction is a table [P, D] (num_heads == 0) or one vector [D] rotated by the
// 2D RoPE of each cell with num_heads heads.
struct InterleaveParams {
  const void* tokens;
  const int64_t* positions;
  const void* instruction;
  const void* prefix;
  void* out;
  int64_t batch, num_tokens, dim, prefix_len, table_rows;
  int64_t num_heads, grid_h, grid_w;
  double rope_base;
  bool merge;
  int64_t tokens_strides[2], positions_strides[2], instruction_row_stride;
  int64_t prefix_strides[2], out_strides[2];
};

}  // namespace sarkernels
