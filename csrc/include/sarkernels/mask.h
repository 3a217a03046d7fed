// The set-mask rule, in one place for the CPU and CUDA kernels.
//
// Key j is visible to query i iff k_sets[j] <= q_sets[i] (strict: <). A tile of queries
// x keys is classified from the min/max set ids of its rows and columns alone, so sorted
// ids (the common case) skip whole tiles and fully visible tiles need no per-element test;
// unsorted ids still land in "partial" and are tested element by element.
#pragma once
#include <cstdint>

#include "sarkernels/macros.h"

namespace sarkernels {

// Compared directly, never as k_set <= q_set - 1: that threshold wraps for the smallest
// int64 id and would make every key visible to a query that must see none.
SK_HOST_DEVICE bool visible(int64_t q_set, int64_t k_set, bool strict) {
  return strict ? k_set < q_set : k_set <= q_set;
}

enum class TileKind : int { kSkip = 0, kFull = 1, kPartial = 2 };

SK_HOST_DEVICE TileKind classify_tile(int64_t q_min, int64_t q_max, int64_t k_min,
                                      int64_t k_max, bool strict) {
  if (!visible(q_max, k_min, strict)) return TileKind::kSkip;  // no query sees any key
  if (visible(q_min, k_max, strict)) return TileKind::kFull;   // every query sees every key
  return TileKind::kPartial;
}

}  // namespace sarkernels
