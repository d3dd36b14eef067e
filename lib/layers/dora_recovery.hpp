#pragma once
// When DoraLinear's backward may recover Z from its output instead of keeping it: the rule both
// devices' kernels apply (cpu/dora_kernels_cpu.cpp, cuda/dora_kernels_cuda.cu), written once.
//
// The forward keeps Y = Z diag(g) + b and no Z, so the magnitude's gradient
// dm_i = sum_t dY_ti Z_ti / max(n_i, eps) reads Z_ti back as (Y_ti - b_i) / g_i (in double; the kernels
// sum dY_ti (Y_ti - b_i) and divide the column's sum by g_i once).
//
// Invertible: g_i finite and |g_i| >= sqrt(smallest normal) (about 1e-19 in float). Below that,
// Z's column is lost in Y (g_i = 0: m_i = 0, or a zero row with eps) or dY_ti g_i may underflow, so
// the column is recomputed as X_t . W_i + s U_t . B_i whatever the test below says.
//
// Precision. With u the unit roundoff of T, the forward rounds Y_ti = Z_ti g_i + b_i with an error
// of at most 2u |Z_ti g_i| + u |b_i| (a product and a sum, or one FMA), so the recovered value obeys
//
//   |Z~_ti - Z_ti| <= 2u |Z_ti| + u |b_i| / |g_i|
//
// and its sum S~_i = sum_t dY_ti Z~_ti is off by at most 2u sum_t |dY_ti Z_ti| + u (|b_i| / |g_i|) sum_t |dY_ti|.
// The second term is the amplification of Y's rounding by |b_i| / |g_i Z_ti|: a large frozen bias
// over a small factor. The kernels accumulate sum_t |dY_ti|, sum_t |dY_ti Z~_ti| and S~_i in the same
// pass and accept the recovered column only when
//
//   (|b_i| / |g_i|) sum_t |dY_ti|  <=  kRecoveryTolerance * sum_t |dY_ti Z~_ti|        (and S~_i finite)
//
// so an accepted dm_i is within (2 + kRecoveryTolerance) u sum_t |dY_ti Z_ti| / max(n_i, eps) of the
// sum over the Z the forward computed (to first order in u). kRecoveryTolerance = 64 keeps this
// below the rounding the product X W^T already leaves in a stored Z (about sqrt(k) u ||X_t|| ||V_i||
// per element, and ||X_t|| ||V_i|| >= |Z_ti|) for k >= 4096, while columns of ordinary training
// (g near 1, |b_i| a few |Z_ti|) pass with a wide margin and cost nothing more. A column that fails
// is recomputed, in double, from X, W, U and B: exact, and slow (n k work for the one column).
#include <limits>

#if defined(__CUDACC__)
#define RELORA_DORA_HD __host__ __device__
#else
#define RELORA_DORA_HD
#endif

namespace relora {
namespace dora_recovery {

constexpr double kRecoveryTolerance = 64;

// sqrt of the smallest normal number of T: floats 2^-63, doubles 2^-511.
template <typename T>
RELORA_DORA_HD constexpr double smallest_invertible() {
  return std::numeric_limits<T>::min_exponent <= -1000 ? 0x1p-511 : 0x1p-63;
}

template <typename T>
RELORA_DORA_HD inline bool invertible(T g) {
  const double a = double(g) < 0 ? -double(g) : double(g);
  return a >= smallest_invertible<T>() && a <= 1.7976931348623157e308;  // the largest double: false for Inf and NaN
}

// The test above, from the column's sums (sum_abs_dY = sum_t |dY_ti|, sum_abs_product = sum_t |dY_ti Z~_ti|).
template <typename T>
RELORA_DORA_HD inline bool recovery_accepted(double sum, double sum_abs_dY, double sum_abs_product, T b, T g) {
  const double ab = double(b) < 0 ? -double(b) : double(b), ag = double(g) < 0 ? -double(g) : double(g);
  const double amplified = ab / ag * sum_abs_dY;
  const bool finite = sum - sum == 0;  // false for NaN and Inf
  return finite && amplified <= kRecoveryTolerance * sum_abs_product;
}

}  // namespace dora_recovery
}  // namespace relora
