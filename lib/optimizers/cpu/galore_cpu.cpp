// GaLore's CPU kernels: the decoupled decay as one loop, the exact SVD through Eigen's BDCSVD in
// double, the Gram finder's eigenproblem through Eigen's SelfAdjointEigenSolver and the range
// finder's Householder QR (in double too). Double because a gradient's singular values cluster
// (many near-equal small ones); in float the trailing vectors of the top r, where the spectrum is flat, would be noise, and the
// float result would differ from CUDA's by more than the sign convention can repair. The SVD runs
// once every T steps, so its cost in double is amortised.
#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <Eigen/SVD>

#include "cpu/cpu_parallel.hpp"
#include "cpu/eigen_maps.hpp"
#include "optimizers/galore_kernels.hpp"

namespace relora {
namespace {

template <typename T>
class CpuGaloreKernels final : public GaloreKernels<T> {
 public:
  bool recording() const override { return false; }
  bool refreshing() const override { return false; }
  bool checks_on_host() const override { return true; }
  std::size_t workspace_bytes() const override { return 0; }

  void decay(Tensor<T>& W, double factor) override {
    T* w = W.data();
    const T f = T(factor);
    for_each_element(W.size(), [&](Index i) { w[i] -= f * w[i]; });
  }

  void orthonormalize(Tensor<T>& X) override {
    // In double, as the SVD: a sketch of a gradient is often nearly rank-deficient.
    const Eigen::MatrixXd x = as_matrix(X).template cast<double>();
    Eigen::HouseholderQR<Eigen::MatrixXd> qr(x);
    const Eigen::MatrixXd q = qr.householderQ() * Eigen::MatrixXd::Identity(x.rows(), x.cols());
    as_matrix(X) = q.template cast<T>();
  }

  void top_eigenvectors(Tensor<T>& C, Tensor<T>& U) override {
    const Index a = C.rows(), r = U.cols();
    if (C.cols() != a || U.rows() != a || r > a) {
      throw ShapeError("GaLore eigenvectors: C " + C.shape() + " and U " + U.shape() + " do not match");
    }
    // The lower triangle (Eigen's default), in double.
    const Eigen::MatrixXd c = as_matrix(C).template cast<double>();
    const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(c);
    if (eig.info() != Eigen::Success) throw Error("GaLore eigenvectors: Eigen's solver did not converge on " + C.shape());
    // Eigenvalues ascending: the top r eigenvectors are the last r columns, reversed.
    as_matrix(U) = eig.eigenvectors().rightCols(r).rowwise().reverse().template cast<T>();
  }

  void top_singular_vectors(const Tensor<T>& G, Tensor<T>* U, Tensor<T>* V) override {
    const Eigen::MatrixXd g = as_matrix(G).template cast<double>();
    unsigned options = 0;
    if (U) options |= Eigen::ComputeThinU;
    if (V) options |= Eigen::ComputeThinV;
    Eigen::BDCSVD<Eigen::MatrixXd> svd(g, options);
    if (U) as_matrix(*U) = svd.matrixU().leftCols(U->cols()).template cast<T>();
    if (V) as_matrix(*V) = svd.matrixV().leftCols(V->cols()).template cast<T>();
  }
};

}  // namespace

template <typename T>
std::unique_ptr<GaloreKernels<T>> make_cpu_galore_kernels() {
  return std::make_unique<CpuGaloreKernels<T>>();
}

template std::unique_ptr<GaloreKernels<float>> make_cpu_galore_kernels();
template std::unique_ptr<GaloreKernels<double>> make_cpu_galore_kernels();

}  // namespace relora
