#pragma once
// Random test data: fresh normal draws, never zeros, which would hide wrong indexing.
#include <random>

#include "relora/core/host_matrix.hpp"

namespace relora::testing {

template <typename T = double, typename Generator>
HostMatrix<T> normal_matrix(Index rows, Index cols, Generator& gen, double stddev = 1.0) {
  std::normal_distribution<double> normal(0.0, stddev);
  HostMatrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = T(normal(gen));
  return m;
}

}  // namespace relora::testing
