// CUDA multi-token KV-cache write, torch-free: one block row per (batch, head, new token),
// 16-byte vector copies where the row allows, K and V in one launch. A slot outside the
// cache is never written; it raises *error (device memory) instead, which the caller reads
// whenever it syncs anyway, so the write itself never waits on the host.
// Compile-checked in CI; not yet registered as the op's CUDA kernel (see issue 4).
#include <cstdint>

#include "sarkernels/params.h"

namespace sarkernels::cuda {

template <typename Vec>
__global__ void kv_cache_append_kernel(KVCacheAppendParams p, int* error) {
  const int64_t row = blockIdx.x;  // (b * heads + h) * num_new + i
  const int64_t i = row % p.num_new, bh = row / p.num_new;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t slot = p.slots[b * p.slots_strides[0] + i * p.slots_strides[1]];
  if (slot < 0 || slot >= p.cache_len) {
    if (threadIdx.x == 0) atomicExch(error, 1);
    return;
  }
  const int64_t vecs = p.head_dim * p.elem_size / sizeof(Vec);
  auto offset = [&](const int64_t* st, int64_t r) {
    return (b * st[0] + h * st[1] + r * st[2]) * p.elem_size;
  };
  const Vec* k = reinterpret_cast<const Vec*>(static_cast<const char*>(p.k) + offset(p.k_strides, i));
  const Vec* v = reinterpret_cast<const Vec*>(static_cast<const char*>(p.v) + offset(p.v_strides, i));
  Vec* kc = reinterpret_cast<Vec*>(static_cast<char*>(p.k_cache) + offset(p.kc_strides, slot));
  Vec* vc = reinterpret_cast<Vec*>(static_cast<char*>(p.v_cache) + offset(p.vc_strides, slot));
  for (int64_t e = threadIdx.x; e < vecs; e += blockDim.x) {
    kc[e] = k[e];
    vc[e] = v[e];
  }
}

// Uses 16-byte accesses when every row start and the row length allow it.
void kv_cache_append(const KVCacheAppendParams& p, int* error, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.num_new;
  if (rows == 0) return;
  const int64_t row_bytes = p.head_dim * p.elem_size;
  bool aligned = row_bytes % 16 == 0;
  for (const void* ptr : {static_cast<const void*>(p.k), static_cast<const void*>(p.v),
                          static_cast<const void*>(p.k_cache), static_cast<const void*>(p.v_cache)}) {
    aligned = aligned && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  }
  for (const int64_t* st : {p.k_strides, p.v_strides, p.kc_strides, p.vc_strides}) {
    for (int d = 0; d < 3; ++d) aligned = aligned && (st[d] * p.elem_size) % 16 == 0;
  }
  const int threads = 128;
  if (aligned) {
    kv_cache_append_kernel<int4><<<rows, threads, 0, stream>>>(p, error);
  } else {
    kv_cache_append_kernel<char><<<rows, threads, 0, stream>>>(p, error);
  }
}

}  // namespace sarkernels::cuda
