#pragma once
// The Adam/AdamW update of one element, shared by the CPU loop and the CUDA kernels.
//
// Both devices round it identically: every product, sum and difference below is rounded on its
// own. Left to themselves, nvcc fuses a product into the add that follows it (an FMA, one
// rounding instead of two) and so does GCC on a CPU with FMA (-ffp-contract=fast is its default
// in C++), each choosing its own pairs; where a moment nearly cancels (beta1 m + (1 - beta1) g
// close to 0) the two roundings then differ by far more than a relative 1e-5. On the device the
// _rn intrinsics are never fused; the CPU loop's file is compiled with -ffp-contract=off
// (CMakeLists.txt). Division and square root are correctly rounded on both.
#include <cmath>

#include "optimizers/adam_kernels.hpp"
#include "relora/core/counter_rng.hpp"

namespace relora {
namespace adam_rule {

RELORA_HOST_DEVICE inline float product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
RELORA_HOST_DEVICE inline double product(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
RELORA_HOST_DEVICE inline float sum(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
RELORA_HOST_DEVICE inline double sum(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
RELORA_HOST_DEVICE inline float difference(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
RELORA_HOST_DEVICE inline double difference(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// 1 - beta^t for a whole count t >= 1, beta^t by repeated squaring through the correctly rounded
// products above: the CPU and the device get the same bits. (Each device's pow is accurate to
// about an ulp, but not to the same ulp: in double that last bit reached the parameters, 1e-12
// apart where an update nearly cancels a parameter.) At most 2 log2(t) products, so beta^t is
// within about 2 log2(t) ulp of exact: 40 ulp (1e-14 relative) at ten million steps.
RELORA_HOST_DEVICE inline double bias_correction(double beta, double t) {
  unsigned long long n = static_cast<unsigned long long>(t);
  double power = 1, square = beta;
  while (n != 0) {
    if (n & 1) power = product(power, square);
    n >>= 1;
    if (n != 0) square = product(square, square);
  }
  return difference(1.0, power);
}

}  // namespace adam_rule

// One update of element p with gradient g and moments m, v; `c1`, `c2` are the bias corrections
// 1 - beta^t of the parameter's count t (adam_rule::bias_correction, computed by the caller once
// per count).
template <typename T>
RELORA_HOST_DEVICE inline void adam_element(T& p, T g, T& m, T& v, double lr, double weight_decay,
                                            const AdamHyper& h, double c1, double c2) {
  using adam_rule::difference;
  using adam_rule::product;
  using adam_rule::sum;
  if (!h.decoupled_weight_decay) g = sum(g, product(T(weight_decay), p));
  m = sum(product(T(h.beta1), m), product(T(1 - h.beta1), g));
  v = sum(product(T(h.beta2), v), product(product(T(1 - h.beta2), g), g));
  const T m_hat = m / T(c1);
  const T v_hat = v / T(c2);
  if (h.decoupled_weight_decay) p = difference(p, product(T(lr * weight_decay), p));
  // std::sqrt's overload for T: an unqualified sqrt of a float finds C's double sqrt on the host
  // (float on the device), which would round differently and keep the CPU loop from vectorising.
  using std::sqrt;
  p = difference(p, product(T(lr), m_hat) / sum(sqrt(v_hat), T(h.eps)));
}

}  // namespace relora
