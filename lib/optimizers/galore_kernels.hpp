#pragma once
// GaLore's per-device work, behind one small interface: the CPU (cpu/galore_cpu.cpp) and CUDA
// (cuda/galore_cuda.cu, built only with CUDA). Everything else GaLore does (projections, moment
// updates through Adam's kernels, the range finder) is written once against the Backend.
#include <memory>

#include "relora/core/backend.hpp"

namespace relora {

template <typename T>
class GaloreKernels {
 public:
  virtual ~GaloreKernels() = default;
  // Whether the backend is recording a step, or refreshing a recorded one (CUDA graphs): while
  // refreshing only the refreshable launches (Adam's update, decay()) may be made, in the
  // recorded order; while recording an SVD cannot run (GaLore then spoils the recording).
  virtual bool recording() const = 0;
  virtual bool refreshing() const = 0;
  // Whether a NaN/Inf gradient is found by the host before a step (the CPU) rather than by a
  // guard on the device that refuses the step's kernels (CUDA).
  virtual bool checks_on_host() const = 0;
  // W -= factor W (AdamW's decoupled decay; factor = lr wd), unless the step was refused for a
  // non-finite gradient (CUDA's device guard).
  virtual void decay(Tensor<T>& W, double factor) = 0;
  // The top-r singular vectors of G (m x n): U (m x r) left and V (n x r) right, either null when
  // not wanted, columns in order of decreasing singular value, signs not fixed. Exact (a full SVD).
  virtual void top_singular_vectors(const Tensor<T>& G, Tensor<T>* U, Tensor<T>* V) = 0;
  // U (a x r) <- the eigenvectors of the symmetric C (a x a, read from one triangle; its contents
  // are destroyed) that belong to its r largest eigenvalues, in order of decreasing eigenvalue,
  // signs not fixed. The Gram finder's solve (SubspaceMethod::gram).
  virtual void top_eigenvectors(Tensor<T>& C, Tensor<T>& U) = 0;
  // X (rows x k, rows >= k) <- the Q factor of its thin Householder QR: orthonormal columns that
  // span X's columns (and complete them where X is rank-deficient). The randomized range
  // finder's step between two products.
  virtual void orthonormalize(Tensor<T>& X) = 0;
  // Bytes of device workspace the SVD keeps between refreshes (the CPU's lives only during one).
  virtual std::size_t workspace_bytes() const = 0;
};

// The kernels for `backend`'s device; `max_long`, `max_short`: the longest and the shortest side
// of the weights they will see (the SVD's workspace is sized once, for max_long x max_short);
// below 2, no weight is projected and no SVD will be asked for.
template <typename T>
std::unique_ptr<GaloreKernels<T>> make_galore_kernels(Backend<T>& backend, Index max_long, Index max_short);

template <typename T>
std::unique_ptr<GaloreKernels<T>> make_cpu_galore_kernels();
#if defined(RELORA_WITH_CUDA)
template <typename T>
std::unique_ptr<GaloreKernels<T>> make_cuda_galore_kernels(Backend<T>& backend, Index max_long, Index max_short);
#endif

}  // namespace relora
