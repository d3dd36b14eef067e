#pragma once
// DoRA's element-wise kernels, the work of DoraLinear that Backend's primitives (products,
// element-wise products, column sums) do not cover, behind one small interface with one
// implementation per device: cpu/dora_kernels_cpu.cpp and cuda/dora_kernels_cuda.cu (built only
// with CUDA). DoraLinear builds its kernels once, from the backend's device. Vectors of length d
// are 1 x d tensors; row i of a matrix is M_i, as in dora_linear.hpp, whose formulas these are.
#include <memory>

#include "relora/core/backend.hpp"

namespace relora {

template <typename T>
class DoraKernels {
 public:
  virtual ~DoraKernels() = default;
  // wsq_i = ||W_i||^2 (summed in double).
  virtual void row_squared_norms(const Tensor<T>& W, Tensor<T>& wsq) = 0;
  // m_i = sqrt(wsq_i), computed in double and rounded as norms() rounds n_i when B = 0.
  virtual void row_norms(const Tensor<T>& wsq, Tensor<T>& m) = 0;
  // n_i = sqrt(max(0, wsq_i + sum_j B_ij (2 s P_ij + s^2 BG_ij))) (summed in double),
  // g_i = m_i / max(n_i, eps).
  virtual void norms(const Tensor<T>& wsq, const Tensor<T>& P, const Tensor<T>& B, const Tensor<T>& BG,
                     const Tensor<T>& m, T s, T eps, Tensor<T>& n, Tensor<T>& g) = 0;
  // Y = Z diag(g) + b, or Y += Z diag(g) + b with accumulate; b may be null (no bias).
  virtual void scale_columns_add(const Tensor<T>& Z, const Tensor<T>& g, const Tensor<T>* b, bool accumulate,
                                 Tensor<T>& Y) = 0;
  // out = X diag(g + shift); out may alias X.
  virtual void scale_columns(const Tensor<T>& X, const Tensor<T>& g, T shift, Tensor<T>& out) = 0;
  // dm_i = sum_t dY_ti Z_ti / max(n_i, eps) (summed in double).
  virtual void magnitude_gradient(const Tensor<T>& dY, const Tensor<T>& Z, const Tensor<T>& n, T eps,
                                  Tensor<T>& dm) = 0;
  // q_i = -dm_i m_i / n_i^2 where n_i > eps, else 0: dL/dn_i / n_i (the exact gradient's row factors).
  virtual void norm_factors(const Tensor<T>& dm, const Tensor<T>& m, const Tensor<T>& n, T eps, Tensor<T>& q) = 0;
  // out = diag(q) M, or out += diag(q) M with accumulate; out may alias M when not accumulating.
  virtual void scale_rows(const Tensor<T>& q, const Tensor<T>& M, bool accumulate, Tensor<T>& out) = 0;
  // dB_ij += q_i (s P_ij + s^2 BG_ij).
  virtual void add_norm_gradient_B(const Tensor<T>& q, const Tensor<T>& P, const Tensor<T>& BG, T s,
                                   Tensor<T>& dB) = 0;
  // out = a - b.
  virtual void difference(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) = 0;
};

// The kernels for `backend`'s device.
template <typename T>
std::unique_ptr<DoraKernels<T>> make_dora_kernels(Backend<T>& backend);

template <typename T>
std::unique_ptr<DoraKernels<T>> make_cpu_dora_kernels();
#if defined(RELORA_WITH_CUDA)
template <typename T>
std::unique_ptr<DoraKernels<T>> make_cuda_dora_kernels(Backend<T>& backend);
#endif

}  // namespace relora
