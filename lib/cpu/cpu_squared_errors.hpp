#pragma once
// The MSE's pass on the CPU, written once for CpuBackend::mse (a prediction in T) and for the
// 16-bit activations' loss (half_activation_kernels_cpu.cpp: a 16-bit prediction widened as it
// is read, its gradient rounded as it is written): both sum the same differences in the same
// order, so they give the same loss, and the same gradient before its rounding.
#include <algorithm>

#include "cpu/cpu_parallel.hpp"

namespace relora {

// store(i, grad_scale (y(i) - t[i])) over [begin, end), and the sum of the squared differences.
// The sum accumulates in double so that the loss of a large float batch keeps its digits, in 32
// partial sums: written as one reduction (omp simd included) GCC leaves the float-to-double loop
// scalar, and 8 partial sums (two AVX registers of doubles) wait on the adds' latency.
template <typename T, typename ReadY, typename StoreGrad>
double squared_errors(const ReadY& y, const T* t, T grad_scale, const StoreGrad& store, Index begin, Index end) {
  constexpr Index kLanes = 32;
  double partial[kLanes] = {};
  Index i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (Index c = 0; c < kLanes; ++c) {
      const T diff = y(i + c) - t[i + c];
      store(i + c, grad_scale * diff);
      partial[c] += double(diff) * double(diff);
    }
  }
  double sum = 0;
  for (; i < end; ++i) {
    const T diff = y(i) - t[i];
    store(i, grad_scale * diff);
    sum += double(diff) * double(diff);
  }
  for (Index c = 0; c < kLanes; ++c) sum += partial[c];
  return sum;
}

// mean((y - t)^2) over `size` (>= 1) elements, storing dL/dy = 2 (y - t) / size: in blocks of
// 4096 on every thread above kParallelElements, else on this one.
template <typename T, typename ReadY, typename StoreGrad>
T mean_squared_error(Index size, const ReadY& y, const T* t, const StoreGrad& store) {
  const T grad_scale = T(2) / T(size);
  double sum = 0;
  if (run_parallel(size)) {
    constexpr Index kBlock = 4096;
    const Index blocks = (size + kBlock - 1) / kBlock;
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (Index block = 0; block < blocks; ++block) {
      sum += squared_errors(y, t, grad_scale, store, block * kBlock, std::min(size, (block + 1) * kBlock));
    }
  } else {
    sum = squared_errors(y, t, grad_scale, store, Index(0), size);
  }
  return T(sum / double(size));
}

}  // namespace relora
