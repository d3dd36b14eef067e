#pragma once
// The two passes around a product on the CPU, shared by the CPU backend (gemm, add_row_vector)
// and the kernels of a 16-bit base (where cuBLASLt's epilogue does them on CUDA): C = beta C
// before a product adds into it, and a bias (and a ReLU) applied to every row after.
#include "cpu/cpu_parallel.hpp"
#include "relora/core/elementwise_math.hpp"
#include "relora/core/tensor.hpp"

namespace relora {

// C = beta C over every element (beta = 0 ignores C's contents, NaN included, as BLAS does), in
// parallel: Eigen's setZero and scaling run on one thread, which for large layers costs more than
// the products' share of a step would suggest.
template <typename T>
void scale_in_place(T beta, Tensor<T>& C) {
  T* c = C.data();
  const Index size = C.size();
  if (beta == T(1)) return;
  if (beta == T(0)) {
    for_each_element(size, [&](Index i) { c[i] = T(0); });
  } else {
    for_each_element(size, [&](Index i) { c[i] *= beta; });
  }
}

// Every row of Y += bias (Y.cols() values; none when null), then, with relu, Y = max(Y, 0) as
// activation_value computes it: one pass, row by row on every thread (Eigen's rowwise() += runs
// on one).
template <typename T>
void finish_rows(const T* bias, bool relu, Tensor<T>& Y) {
  if (bias == nullptr && !relu) return;
  T* y = Y.data();
  const Index rows = Y.rows(), cols = Y.cols();
  auto finish_row = [&](Index i) {
    T* row = y + i * cols;
    if (bias != nullptr) {
#pragma omp simd
      for (Index j = 0; j < cols; ++j) row[j] += bias[j];
    }
    if (relu) {
#pragma omp simd
      for (Index j = 0; j < cols; ++j) row[j] = activation_value(Activation::relu, row[j]);
    }
  };
  if (run_parallel(Y.size())) {
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < rows; ++i) finish_row(i);
  } else {
    for (Index i = 0; i < rows; ++i) finish_row(i);
  }
}

}  // namespace relora
