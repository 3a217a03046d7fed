#pragma once
#include "sarkernels/params.h"

namespace sarkernels::cpu {
void kv_cache_append(const KVCacheAppendParams& p);
}  // namespace sarkernels::cpu
