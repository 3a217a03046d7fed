// Row primitives of the CPU attention kernels: the set-mask test, max, and
// exp(x - shift) with its sum.
//
// Float rows use a polynomial exp (Cody-Waite reduction + degree-6 Taylor, about 1 ulp)
// in branch-free loops that GCC vectorizes; target_clones builds AVX-512, AVX2 and
// baseline versions and picks one at load time, so the wheel stays portable. Double rows
// (the float64 test path) use std::exp.
#pragma once
#include <cstdint>

namespace sarkernels::cpu {

// row[j] <- -inf where key j is not visible to a query of set q_set (sarkernels::visible).
void mask_row(float* row, const int64_t* k_sets, int64_t n, int64_t q_set, bool strict);
void mask_row(double* row, const int64_t* k_sets, int64_t n, int64_t q_set, bool strict);

// The row's maximum, or NaN if the row holds a NaN (max alone would skip it).
float row_max(const float* row, int64_t n);
double row_max(const double* row, int64_t n);

// row[c] <- exp(row[c] - shift); returns the new row's sum. exp(-inf) is exactly 0, NaN
// stays NaN; shift = -inf (an empty row) gives a zero row.
float exp_shifted(float* row, int64_t n, float shift);
double exp_shifted(double* row, int64_t n, double shift);

}  // namespace sarkernels::cpu
