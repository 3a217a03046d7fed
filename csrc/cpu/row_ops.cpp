#include "cpu/row_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "sarkernels/mask.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SK_CLONES
#endif

namespace sarkernels::cpu {
namespace {

inline float exp_nonpositive(float x) {
  // exp underflows below -87.3; those inputs (and -inf) return exactly 0. NaN is clamped
  // too, so the integer conversion below stays defined, and returned unchanged.
  const float xc = x >= -87.0f ? x : -87.0f;
  const float big = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + big) - big;
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : (x == x ? p * scale : x);
}

template <typename T>
inline void mask_row_impl(T* row, const int64_t* k_sets, int64_t n, int64_t q_set, bool strict) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] = visible(q_set, k_sets[j], strict) ? row[j] : neg_inf;
}

template <typename T>
inline T row_max_impl(const T* row, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t c = 0; c < n; ++c) {
    m = row[c] > m ? row[c] : m;
    nan |= row[c] != row[c];
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : m;
}

}  // namespace

SK_CLONES void mask_row(float* row, const int64_t* k_sets, int64_t n, int64_t q_set, bool strict) {
  mask_row_impl(row, k_sets, n, q_set, strict);
}

void mask_row(double* row, const int64_t* k_sets, int64_t n, int64_t q_set, bool strict) {
  mask_row_impl(row, k_sets, n, q_set, strict);
}

SK_CLONES float row_max(const float* row, int64_t n) { return row_max_impl(row, n); }

double row_max(const double* row, int64_t n) { return row_max_impl(row, n); }

SK_CLONES float exp_shifted(float* row, int64_t n, float shift) {
  if (shift == -std::numeric_limits<float>::infinity()) {
    std::fill(row, row + n, 0.0f);
    return 0.0f;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const float e = exp_nonpositive(row[c] - shift);
    row[c] = e;
    sum += e;
  }
  return sum;
}

double exp_shifted(double* row, int64_t n, double shift) {
  if (shift == -std::numeric_limits<double>::infinity()) {
    std::fill(row, row + n, 0.0);
    return 0.0;
  }
  double sum = 0.0;
  for (int64_t c = 0; c < n; ++c) sum += row[c] = std::exp(row[c] - shift);
  return sum;
}

}  // namespace sarkernels::cpu
