#pragma once
// What the CPU kernels of a 16-bit base do around a product, where cuBLASLt's epilogue does it on
// CUDA: C = beta C before the product adds into it, and the bias added to every row after.
#include <algorithm>

#include "cpu/cpu_parallel.hpp"
#include "relora/core/backend.hpp"

namespace relora {

// C = beta C (beta 0 writes zeros, so C's old contents may be anything, NaN included).
inline void scale(float beta, Tensor<float>& C) {
  if (beta == 0.0f) {
    std::fill_n(C.data(), C.size(), 0.0f);
  } else if (beta != 1.0f) {
    float* c = C.data();
    for_each_element(C.size(), [&](Index i) { c[i] *= beta; });
  }
}

// Every row of Y (n x d) += bias (d values).
inline void add_bias(const float* bias, Tensor<float>& Y) {
  const Index d = Y.cols();
  float* y = Y.data();
  for_each_element(Y.rows(), [&](Index i) {
    float* row = y + i * d;
    for (Index j = 0; j < d; ++j) row[j] += bias[j];
  });
}

}  // namespace relora
