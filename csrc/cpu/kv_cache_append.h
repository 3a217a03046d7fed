#pragma once
#include "sarkernels/params.h"

namespace sarkernels::cpu {
// Slots are valid (the glue checks them before anything is written).
void kv_cache_append(const KVCacheAppendParams& p);
}  // namespace sarkernels::cpu
