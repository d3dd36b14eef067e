#include "optimizers/galore_subspace.hpp"

#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>

namespace relora {
namespace {

using HostMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The backend's products in strict precision while it lives, its math mode restored after (also
// when a product throws). The Gram matrix must not take TF32's 10-bit mantissas: a relative
// error of 1e-3 in C moves every eigenvector whose eigenvalue gap is below 1e-3 of the largest.
template <typename T>
class StrictProducts {
 public:
  explicit StrictProducts(Backend<T>& backend) : backend_(backend), mode_(backend.math_mode()) {
    if (mode_ != MathMode::strict) backend_.set_math_mode(MathMode::strict);
  }
  ~StrictProducts() {
    if (mode_ != MathMode::strict) backend_.set_math_mode(mode_);
  }
  StrictProducts(const StrictProducts&) = delete;
  StrictProducts& operator=(const StrictProducts&) = delete;

 private:
  Backend<T>& backend_;
  MathMode mode_;
};

}  // namespace

template <typename T>
RangeFinder<T>::RangeFinder(Backend<T>& backend, GaloreKernels<T>& kernels, Index max_long, Index max_width)
    : backend_(backend), kernels_(kernels) {
  sketch_ = backend_.allocate(max_long, max_width);
  other_ = backend_.allocate(max_long, max_width);
  small_ = backend_.allocate(max_width, max_width);
}

template <typename T>
std::size_t RangeFinder<T>::workspace_bytes() const {
  return sizeof(T) * std::size_t(sketch_.size() + other_.size() + small_.size());
}

template <typename T>
void RangeFinder<T>::top_left_vectors(const Tensor<T>& G, bool transpose, Index oversample, int power_iterations,
                                      RngKey key, Tensor<T>& U) {
  const Index a = transpose ? G.cols() : G.rows();
  const Index b = transpose ? G.rows() : G.cols();
  const Index r = U.cols();
  const Index k = std::min({r + oversample, a, b});
  const Trans op = transpose ? Trans::yes : Trans::no;
  const Trans op_t = transpose ? Trans::no : Trans::yes;
  Tensor<T> Y = leading_view(sketch_, a, k);  // the range's basis
  Tensor<T> Z = leading_view(other_, b, k);   // op(G)^T's
  backend_.random_normal(key, T(0), T(1), Z);
  backend_.gemm(op, Trans::no, T(1), G, Z, T(0), Y);  // Y = op(G) Omega
  kernels_.orthonormalize(Y);
  for (int q = 0; q < power_iterations; ++q) {
    backend_.gemm(op_t, Trans::no, T(1), G, Y, T(0), Z);  // Z = op(G)^T Y
    kernels_.orthonormalize(Z);
    backend_.gemm(op, Trans::no, T(1), G, Z, T(0), Y);  // Y = op(G) Z
    kernels_.orthonormalize(Y);
  }
  // Rayleigh-Ritz: with B = Y^T op(G) (k x b), the left singular vectors of B are the
  // eigenvectors of B B^T (k x k, formed on the device, solved on the host in double).
  backend_.gemm(op_t, Trans::no, T(1), G, Y, T(0), Z);  // Z = B^T
  Tensor<T> BBt = leading_view(small_, k, k);
  backend_.gemm(Trans::yes, Trans::no, T(1), Z, Z, T(0), BBt);
  const HostMatrixD s = to_host(backend_, BBt).template cast<double>();
  const Eigen::SelfAdjointEigenSolver<HostMatrixD> eig(0.5 * (s + s.transpose()));
  // Eigenvalues ascending: the top r eigenvectors are the last r columns, reversed.
  HostMatrix<T> rotation(k, r);
  for (Index j = 0; j < r; ++j) rotation.col(j) = eig.eigenvectors().col(k - 1 - j).template cast<T>();
  Tensor<T> E = leading_view(small_, k, r);
  backend_.upload(rotation.data(), E);
  backend_.gemm(Trans::no, Trans::no, T(1), Y, E, T(0), U);
}

template <typename T>
GramFinder<T>::GramFinder(Backend<T>& backend, GaloreKernels<T>& kernels, Index max_short)
    : backend_(backend), kernels_(kernels) {
  gram_ = backend_.allocate(max_short, max_short);
}

template <typename T>
std::size_t GramFinder<T>::workspace_bytes() const {
  return sizeof(T) * std::size_t(gram_.size());
}

template <typename T>
void GramFinder<T>::top_left_vectors(const Tensor<T>& G, bool transpose, Tensor<T>& U) {
  const Index a = transpose ? G.cols() : G.rows();
  Tensor<T> C = leading_view(gram_, a, a);
  const StrictProducts<T> strict(backend_);
  if (transpose) {
    backend_.gemm(Trans::yes, Trans::no, T(1), G, G, T(0), C);  // G^T G
  } else {
    backend_.gemm(Trans::no, Trans::yes, T(1), G, G, T(0), C);  // G G^T
  }
  kernels_.top_eigenvectors(C, U);
}

template <typename T>
void GramFinder<T>::right_vectors(const Tensor<T>& G, bool transpose, const Tensor<T>& U, Tensor<T>& V) {
  // op(G)^T U: G^T U, or G U when op(G) = G^T.
  const StrictProducts<T> strict(backend_);
  backend_.gemm(transpose ? Trans::no : Trans::yes, Trans::no, T(1), G, U, T(0), V);
  kernels_.orthonormalize(V);
}

template <typename T>
void fix_signs(Backend<T>& backend, Tensor<T>& lead, Tensor<T>* follow) {
  HostMatrix<T> l = to_host(backend, lead);
  HostMatrix<T> f;
  if (follow) f = to_host(backend, *follow);
  bool flipped = false;
  for (Index j = 0; j < l.cols(); ++j) {
    Index best = 0;
    for (Index i = 1; i < l.rows(); ++i) {
      if (std::abs(l(i, j)) > std::abs(l(best, j))) best = i;
    }
    if (l(best, j) < T(0)) {
      l.col(j) = -l.col(j);
      if (follow) f.col(j) = -f.col(j);
      flipped = true;
    }
  }
  if (!flipped) return;
  backend.upload(l.data(), lead);
  if (follow) backend.upload(f.data(), *follow);
}

template class RangeFinder<float>;
template class RangeFinder<double>;
template class GramFinder<float>;
template class GramFinder<double>;
template void fix_signs(Backend<float>&, Tensor<float>&, Tensor<float>*);
template void fix_signs(Backend<double>&, Tensor<double>&, Tensor<double>*);

}  // namespace relora
