// CPU multi-token KV-cache write: K and V rows copied in one parallel pass.
#include "cpu/kv_cache_append.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace sarkernels::cpu {

void kv_cache_append(const KVCacheAppendParams& p) {
  const int64_t row_bytes = p.head_dim * p.elem_size;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / p.heads, h = unit % p.heads;
      for (int64_t i = 0; i < p.num_new; ++i) {
        const int64_t s = p.slots[b * p.slots_strides[0] + i * p.slots_strides[1]];
        auto at = [&](auto base, const int64_t* st, int64_t r) {
          return base + (b * st[0] + h * st[1] + r * st[2]) * p.elem_size;
        };
        std::memcpy(at(static_cast<char*>(p.k_cache), p.kc_strides, s),
                    at(static_cast<const char*>(p.k), p.k_strides, i), row_bytes);
        std::memcpy(at(static_cast<char*>(p.v_cache), p.vc_strides, s),
                    at(static_cast<const char*>(p.v), p.v_strides, i), row_bytes);
      }
    }
  });
}

}  // namespace sarkernels::cpu
