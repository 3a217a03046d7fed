// Multi-token KV-cache write. A validation kernel checks every slot first (in [0, S), no
// repeat within a batch row) and raises *error; the copy kernel then writes K and V rows
// with 16-byte vector copies where the rows allow, and writes nothing at all when *error
// is set, so a bad slot never lands anywhere. *error lives in device memory: the caller
// reads it only when it may sync (the message is rebuilt on the host from the slots).
#pragma once
#include <cstdint>

#include "kernels/launch.cuh"
#include "kernels/primitives.cuh"
#include "sarkernels/params.h"

namespace sarkernels::kernels {

SK_DEVICE int64_t kv_slot(const KVCacheAppendParams& p, int64_t b, int64_t i) {
  return p.slots[b * p.slots_strides[0] + i * p.slots_strides[1]];
}

// One block per batch row; thread t checks new tokens t, t + blockDim.x, ... (a repeat
// against every earlier token of its row: rows hold a handful of new tokens).
__global__ void kv_cache_validate_kernel(KVCacheAppendParams p, int* error) {
  const int64_t b = blockIdx.x;
  for (int64_t i = threadIdx.x; i < p.num_new; i += blockDim.x) {
    const int64_t s = kv_slot(p, b, i);
    bool bad = s < 0 || s >= p.cache_len;
    for (int64_t j = 0; j < i && !bad; ++j) bad = kv_slot(p, b, j) == s;
    if (bad) atomic_exch(error, 1);
  }
}

inline LaunchPlan kv_cache_validate_plan(const KVCacheAppendParams& p) {
  return {dim3(grid_dim("kv_cache_validate", p.num_new > 0 ? p.batch : 0, kMaxGridX)),
          dim3(block_threads(p.num_new)), 0};
}

// One block per (batch, head, new token) row; Vec is uint4 (16-byte copies) or char.
template <typename Vec>
__global__ void kv_cache_copy_kernel(KVCacheAppendParams p, const int* error) {
  if (*error) return;
  const int64_t row = blockIdx.x;  // (b * heads + h) * num_new + i
  const int64_t i = row % p.num_new, bh = row / p.num_new;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t slot = kv_slot(p, b, i);
  auto at = [&](auto base, const int64_t* st, int64_t r) {
    return base + (b * st[0] + h * st[1] + r * st[2]) * p.elem_size;
  };
  const char* k = at(static_cast<const char*>(p.k), p.k_strides, i);
  const char* v = at(static_cast<const char*>(p.v), p.v_strides, i);
  char* kc = at(static_cast<char*>(p.k_cache), p.kc_strides, slot);
  char* vc = at(static_cast<char*>(p.v_cache), p.vc_strides, slot);
  const int64_t vecs = p.head_dim * p.elem_size / int64_t(sizeof(Vec));
  for (int64_t e = threadIdx.x; e < vecs; e += blockDim.x) {
    if constexpr (sizeof(Vec) == 16) {
      store16(kc + 16 * e, load16(k + 16 * e));
      store16(vc + 16 * e, load16(v + 16 * e));
    } else {
      kc[e] = k[e];
      vc[e] = v[e];
    }
  }
}

// Whether every row start and the row length allow 16-byte copies.
inline bool kv_rows_aligned16(const KVCacheAppendParams& p) {
  bool aligned = p.head_dim * p.elem_size % 16 == 0;
  for (const void* ptr : {p.k, p.v, static_cast<const void*>(p.k_cache),
                          static_cast<const void*>(p.v_cache)}) {
    aligned = aligned && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  }
  for (const int64_t* st : {p.k_strides, p.v_strides, p.kc_strides, p.vc_strides}) {
    for (int d = 0; d < 3; ++d) aligned = aligned && st[d] * p.elem_size % 16 == 0;
  }
  return aligned;
}

inline LaunchPlan kv_cache_copy_plan(const KVCacheAppendParams& p, int64_t vec_bytes) {
  return {dim3(grid_dim("kv_cache_copy", p.batch * p.heads * p.num_new, kMaxGridX)),
          dim3(block_threads(p.head_dim * p.elem_size / vec_bytes)), 0};
}

// error: one int in device memory, zeroed by the caller; set when a slot is bad, and then
// nothing is written.
inline void kv_cache_append(const KVCacheAppendParams& p, int* error, cudaStream_t stream) {
  launch("kv_cache_validate", kv_cache_validate_plan(p), stream, kv_cache_validate_kernel, p,
         error);
  if (kv_rows_aligned16(p)) {
    launch("kv_cache_copy16", kv_cache_copy_plan(p, 16), stream, kv_cache_copy_kernel<uint4>, p,
           error);
  } else {
    launch("kv_cache_copy", kv_cache_copy_plan(p, 1), stream, kv_cache_copy_kernel<char>, p,
           error);
  }
}

}  // namespace sarkernels::kernels
