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
  // Y = Z diag(g) + b, or Y += Z diag(g) + b with accumulate; b may be null (no bias); then, with
  // relu, Y = max(Y, 0) (as the backend's activation_forward). Y may alias Z when not accumulating
  // (the forward without dropout computes Z in Y's buffer).
  virtual void scale_columns_add(const Tensor<T>& Z, const Tensor<T>& g, const Tensor<T>* b, bool accumulate,
                                 bool relu, Tensor<T>& Y) = 0;
  // out = X diag(g + shift); out may alias X.
  virtual void scale_columns(const Tensor<T>& X, const Tensor<T>& g, T shift, Tensor<T>& out) = 0;
  // dm_i = sum_t dY_ti Z_ti / max(n_i, eps) from a stored Z (dropout's forward, a 16-bit base), and
  // db_i = sum_t dY_ti when db is not null, sums in double; with scale_dY, dY then becomes
  // dZ = dY diag(g) in place. One read of dY and Z, one write of dY.
  virtual void magnitude_gradient(Tensor<T>& dY, const Tensor<T>& Z, const Tensor<T>& g, const Tensor<T>& n, T eps,
                                  bool scale_dY, Tensor<T>& dm, Tensor<T>* db) = 0;
  // The magnitude's gradient without a stored Z, in one pass over dY and Y = Z diag(g) + b (b may be
  // null). For a column whose g_i is invertible (dora_recovery.hpp), Z_ti = (Y_ti - b_i) / g_i and
  //   dm_i = sum_t dY_ti Z_ti / max(n_i, eps),
  // unless the recovery fails its precision test (dora_recovery.hpp): then, and for every column
  // whose g_i is not invertible, recompute_i = 1 (else 0) and dm_i is left to
  // recompute_magnitude_gradient. db_i = sum_t dY_ti when db is not null. With scale_dY, dY becomes
  // dZ = dY diag(g) in place in the columns of invertible g_i; the others keep dY for the recompute.
  // Sums in double.
  virtual void magnitude_gradient_from_output(Tensor<T>& dY, const Tensor<T>& Y, const Tensor<T>* b,
                                              const Tensor<T>& g, const Tensor<T>& n, T eps, bool scale_dY,
                                              Tensor<T>& dm, Tensor<T>* db, Tensor<T>& recompute) = 0;
  // dm_i for the columns with recompute_i != 0, from Z's column recomputed as Z_ti = X_t . W_i + s U_t . B_i
  // (in double). dY_scaled says what magnitude_gradient_from_output left in dY: then a column of
  // invertible g_i holds dY_ti g_i (read as dY_ti g_i / g_i), and a column of non-invertible g_i holds
  // dY_ti, which this scales in place after reading. Launched for every column (the flags are data),
  // so a recorded step replays it; a column not flagged costs one read of its flag.
  virtual void recompute_magnitude_gradient(Tensor<T>& dY, bool dY_scaled, const Tensor<T>& X, const Tensor<T>& W,
                                            const Tensor<T>& U, const Tensor<T>& B, T s, const Tensor<T>& g,
                                            const Tensor<T>& n, T eps, const Tensor<T>& recompute,
                                            Tensor<T>& dm) = 0;
  // out += mask .* M (dropout's backward: dX += M .* (dY diag(g - 1) W + dU A)).
  virtual void add_masked(const Tensor<T>& mask, const Tensor<T>& M, Tensor<T>& out) = 0;
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
