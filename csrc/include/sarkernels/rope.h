// 2D RoPE angles in LlamaGen's convention (what RandAR's weights were trained with).
//
// A head of size head_dim has head_dim/2 adjacent pairs (x[2j], x[2j+1]). With
// quarter = head_dim/4 frequencies f_k = base^(-4k/head_dim), pair j < quarter turns by
// row * f_j and pair j >= quarter by col * f_{j-quarter}. Angles depend on the cell only,
// never on the head or the sequence index.
#pragma once
#include <cmath>
#include <cstdint>

#include "sarkernels/macros.h"

namespace sarkernels {

// Angle of pair j for cell = row * grid_w + col (cell >= 0).
SK_HOST_DEVICE double rope_angle(int64_t cell, int64_t j, int64_t grid_w, int64_t head_dim,
                                 double base) {
  const int64_t quarter = head_dim / 4;
  const int64_t coord = j < quarter ? cell / grid_w : cell % grid_w;
  const int64_t k = j < quarter ? j : j - quarter;
  return static_cast<double>(coord) * pow(base, -4.0 * static_cast<double>(k) / head_dim);
}

// (x0, x1) <- (x0 c - x1 s, x1 c + x0 s); pass -s for the inverse (transpose) rotation.
template <typename T>
SK_HOST_DEVICE void rope_rotate(T c, T s, T& x0, T& x1) {
  const T y0 = x0 * c - x1 * s;
  x1 = x1 * c + x0 * s;
  x0 = y0;
}

}  // namespace sarkernels
