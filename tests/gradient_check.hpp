#pragma once
// Central finite differences in double precision, the reference every analytic gradient is
// checked against: on CPU tensors (host memory), or on any backend's through upload and download.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>

#include "relora/core/backend.hpp"
#include "relora/core/host_matrix.hpp"
#include "test_support.hpp"

namespace relora::testing {

// dL/dx for every entry of x by (L(x + h) - L(x - h)) / 2h.
inline HostMatrix<double> numeric_gradient(Tensor<double>& x, const std::function<double()>& loss, double h = 1e-6) {
  HostMatrix<double> grad(x.rows(), x.cols());
  double* data = x.data();
  for (Index i = 0; i < x.size(); ++i) {
    const double saved = data[i];
    data[i] = saved + h;
    const double up = loss();
    data[i] = saved - h;
    const double down = loss();
    data[i] = saved;
    grad.data()[i] = (up - down) / (2 * h);
  }
  return grad;
}

// The same for a tensor of any backend (a GPU tensor): each entry perturbed on the host and
// uploaded. Under the sanitizer only every 16th entry is (the others are copied from `analytic`
// where given, so that a comparison with it measures the perturbed entries alone, else zero).
inline HostMatrix<double> numeric_gradient_on(Backend<double>& backend, Tensor<double>& x,
                                              const std::function<double()>& loss, double h = 1e-6,
                                              const HostMatrix<double>* analytic = nullptr) {
  const Index stride = under_sanitizer() ? 16 : 1;
  HostMatrix<double> values = to_host(backend, x), grad = HostMatrix<double>::Zero(x.rows(), x.cols());
  if (stride > 1 && analytic != nullptr) grad = *analytic;
  for (Index i = 0; i < values.size(); i += stride) {
    const double saved = values.data()[i];
    values.data()[i] = saved + h;
    backend.upload(values.data(), x);
    const double up = loss();
    values.data()[i] = saved - h;
    backend.upload(values.data(), x);
    const double down = loss();
    values.data()[i] = saved;
    grad.data()[i] = (up - down) / (2 * h);
  }
  backend.upload(values.data(), x);
  return grad;
}

// ||a - b|| / max(||b||, tiny): the figure every check prints.
template <typename A, typename B>
double relative_error(const A& a, const B& b) {
  const double denom = std::max(double(b.norm()), 1e-300);
  return double((a - b).norm()) / denom;
}

inline HostMatrix<double> host_of(const Tensor<double>& t) {
  return Eigen::Map<const HostMatrix<double>>(t.data(), t.rows(), t.cols());
}

}  // namespace relora::testing
