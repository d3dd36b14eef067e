#pragma once
// The CPU backend: host buffers mapped as Eigen row-major matrices. Eigen runs the large
// products in parallel with OpenMP; element-wise work is simple loops the compiler vectorises.

#include "cpu/cpu_gemm.hpp"
#include "relora/core/backend.hpp"

namespace relora {

template <typename T>
class CpuBackend final : public Backend<T> {
 public:
  explicit CpuBackend(const BackendOptions& options = {});

  Device device() const override { return Device::cpu; }
  std::string description() const override;
  void set_math_mode(MathMode mode) override { math_ = mode; }  // tf32: a bf16 base on AMX (backend.hpp)
  MathMode math_mode() const override { return math_; }

  Tensor<T> allocate(Index rows, Index cols) override;
  void upload(const T* host, Tensor<T>& dst) override;
  void download(const Tensor<T>& src, T* host) override;
  void copy(const Tensor<T>& src, Tensor<T>& dst) override;
  void fill(Tensor<T>& x, T value) override;
  void synchronize() override {}

  void gemm(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B, T beta,
            Tensor<T>& C) override;

  void add_row_vector(const Tensor<T>& b, Tensor<T>& Y) override;
  void column_sums(const Tensor<T>& dY, T beta, Tensor<T>& db) override;
  void multiply(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) override;
  void activation_forward(Activation f, const Tensor<T>& Y, Tensor<T>& Z) override;
  void activation_backward(Activation f, const Tensor<T>& Y, const Tensor<T>& dZ, Tensor<T>& dY) override;
  T max_abs(const Tensor<T>& x) override;
  void mse(const Tensor<T>& Y, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) override;

  void random_uniform(RngKey key, T low, T high, Tensor<T>& x) override;
  void random_normal(RngKey key, T mean, T stddev, Tensor<T>& x) override;
  void dropout_mask(RngKey key, T p, Tensor<T>& mask) override;


 private:
  MathMode math_ = MathMode::strict;
  CpuGemm<T> gemm_;  // Eigen's GEMM with its packing buffers kept here, so steady steps allocate nothing

};

}  // namespace relora
