#pragma once
// How GaLore finds a weight's subspace, written once against the Backend: the exact SVD from the
// device's kernels, the eigenvectors of the Gram matrix, or a randomized range finder (Halko,
// Martinsson & Tropp 2011, algorithm 4.4 with a Rayleigh-Ritz step) whose products run on the
// backend's GEMM; then the sign convention.
//
// Legend: G is m x n; op(G) is G for left vectors (P, m x r) and G^T for right ones (Q, n x r);
// a x b is op(G)'s shape, k = min(r + oversample, a, b) the sketch's width.
#include <cstdint>

#include "optimizers/galore_kernels.hpp"
#include "relora/core/host_matrix.hpp"

namespace relora {

template <typename T>
class RangeFinder {
 public:
  // Workspace for weights whose longer side is at most max_long and sketches of up to max_width
  // columns; the QRs run in `kernels` (the device's).
  RangeFinder(Backend<T>& backend, GaloreKernels<T>& kernels, Index max_long, Index max_width);

  // The top U.cols() left singular vectors of op(G) (op(G) = G, or G^T when `transpose`) into U,
  // in order of decreasing singular value, signs not fixed. `power_iterations` passes of
  // subspace iteration, each orthonormalised by a Householder QR (GaloreKernels::orthonormalize;
  // Householder because a gradient's sketch is often rank-deficient, which Cholesky QR in float
  // cannot take). The Rayleigh-Ritz step's k x k eigenproblem is solved on the host, in double.
  void top_left_vectors(const Tensor<T>& G, bool transpose, Index oversample, int power_iterations, RngKey key,
                        Tensor<T>& U);

  std::size_t workspace_bytes() const;

 private:
  Backend<T>& backend_;
  GaloreKernels<T>& kernels_;
  Tensor<T> sketch_, other_, small_;  // a x k, b x k, k x k at most
};

// The top singular vectors from the Gram matrix C = op(G) op(G)^T (a x a: GaLore asks it for
// the short side, a = min(m, n)): its eigenvectors are op(G)'s left singular vectors and its
// eigenvalues their squared singular values. One GEMM of a a b flops and a symmetric
// eigenproblem of a x a instead of an SVD of a x b, of which the device's solver computes only
// the r vectors wanted (docs/PERFORMANCE.md compares the two).
// Its products run in strict precision on a TF32 backend too (the math mode is restored after).
template <typename T>
class GramFinder {
 public:
  // Workspace for C of weights whose short side is at most max_short.
  GramFinder(Backend<T>& backend, GaloreKernels<T>& kernels, Index max_short);

  // U (a x r) <- the top r left singular vectors of op(G), in order of decreasing singular
  // value, signs not fixed.
  void top_left_vectors(const Tensor<T>& G, bool transpose, Tensor<T>& U);
  // V (b x r) <- the matching right singular vectors: op(G)^T U (= V S) orthonormalised by a
  // Householder QR, which leaves each column's direction (V_j up to sign, the sign to be paired
  // with U_j's) and completes the basis where s_j = 0.
  void right_vectors(const Tensor<T>& G, bool transpose, const Tensor<T>& U, Tensor<T>& V);

  std::size_t workspace_bytes() const;

 private:
  Backend<T>& backend_;
  GaloreKernels<T>& kernels_;
  Tensor<T> gram_;  // max_short x max_short
};

// Flips each column pair (U_j, V_j) so that the largest-magnitude entry of `lead`'s column j is
// positive (ties to the lower row): `lead` is U or V, `follow` the other one or null. On the host
// (the columns are downloaded and uploaded: once per SVD).
template <typename T>
void fix_signs(Backend<T>& backend, Tensor<T>& lead, Tensor<T>* follow);

}  // namespace relora
