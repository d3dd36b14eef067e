#pragma once
// The host side of the API: Eigen row-major matrices in, Eigen matrices out. Uploads check
// shapes and finiteness here, once, so that device code never has to.
#include <Eigen/Core>
#include <string>
#include <type_traits>

#include "relora/core/backend.hpp"

namespace relora {

template <typename T>
using HostMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using HostVector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// A host matrix argument whose scalar is taken from the backend, not deduced from the argument,
// so that plain matrices, blocks and maps all bind to the Eigen::Ref.
template <typename T>
using HostInput = Eigen::Ref<const HostMatrix<typename std::common_type<T>::type>>;

// Throws NonFiniteError naming `what`, its shape and the first bad entry if `m` holds NaN or Inf.
template <typename T>
void require_finite(const Eigen::Ref<const HostMatrix<T>>& m, const std::string& what) {
  if (m.allFinite()) return;
  for (Eigen::Index i = 0; i < m.rows(); ++i) {
    for (Eigen::Index j = 0; j < m.cols(); ++j) {
      if (!std::isfinite(m(i, j))) {
        throw NonFiniteError(what + " " + shape_string(m.rows(), m.cols()) + " holds " + std::to_string(m(i, j)) +
                             " at (" + std::to_string(i) + ", " + std::to_string(j) + ")");
      }
    }
  }
}

// Copies a host matrix into an existing tensor of the same shape.
template <typename T>
void upload(Backend<T>& backend, const HostInput<T>& host, Tensor<T>& dst,
            const std::string& what) {
  if (!dst.same_shape(host.rows(), host.cols())) {
    throw ShapeError(what + ": expected shape " + dst.shape() + ", got " + shape_string(host.rows(), host.cols()));
  }
  require_finite<T>(host, what);
  if (host.outerStride() == host.cols() || host.rows() <= 1) {
    backend.upload(host.data(), dst);
  } else {
    const HostMatrix<T> packed = host;  // a strided block: pack it first
    backend.upload(packed.data(), dst);
  }
}

// A new tensor on `backend` holding a copy of `host`.
template <typename T>
Tensor<T> to_backend(Backend<T>& backend, const HostInput<T>& host, const std::string& what) {
  Tensor<T> t = backend.allocate(host.rows(), host.cols());
  upload(backend, host, t, what);
  return t;
}

// A host copy of `t` (waits for the backend's queued work).
template <typename T>
HostMatrix<T> to_host(Backend<T>& backend, const Tensor<T>& t) {
  HostMatrix<T> host(t.rows(), t.cols());
  backend.download(t, host.data());
  return host;
}

}  // namespace relora
