#pragma once
// The CPU backend: host buffers mapped as Eigen row-major matrices. Eigen runs the large
// products in parallel with OpenMP; element-wise work is simple loops the compiler vectorises.
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/cpu_gemm.hpp"
#include "relora/core/backend.hpp"

namespace relora {

// Feature-major copies of a fused small layer's operands (cpu_fused_lora.cpp): feature f of row i
// at [f * ld + i], ld = n rounded up to whole SIMD registers, the lanes past n zero. Grown to the
// largest layer seen and never shrunk, so that steady steps allocate nothing.
template <typename T>
struct FusedLoraScratch {
  // Which tensor (data, rows, cols) a copy was taken of; data null when it holds none.
  struct Source {
    const T* data = nullptr;
    Index rows = 0, cols = 0;
    bool is(const Tensor<T>& t) const { return data != nullptr && data == t.data() && t.same_shape(rows, cols); }
  };
  // A panel kept from one step to the next: the batch X and the target, which full-batch training
  // (the seed demo) passes unchanged every step. `rows` is the row-major copy it was made from, so
  // that it is reused only while the tensor still holds those values (a memcmp, a third of the
  // transpose), whether or not it was rewritten through its host pointer in between.
  struct KeptPanel {
    std::vector<T> panel, rows;
    Source source;
    bool holds(const Tensor<T>& t) const {
      return source.is(t) && std::memcmp(rows.data(), t.data(), sizeof(T) * std::size_t(t.size())) == 0;
    }
    void keep(const Tensor<T>& t) {
      rows.assign(t.data(), t.data() + t.size());  // allocates only while a batch is larger than any before
      source = {t.data(), t.rows(), t.cols()};
    }
  };
  KeptPanel X, target;  // X: the last fused pass's, which its backward reads rather than X again
  std::vector<T> Ut;    // the last fused forward's U: its backward reads it, not U again
  Source U;
  // dY and dU: the fused MSE's (fused_lora_forward_mse), which its backward reads instead of
  // transposing dY and computing dU again; else the backward's own, for its reductions.
  std::vector<T> dYt, dUt;
  Source dY, dU;
  std::vector<T> strip;  // one strip of rows of the forward's Y or the backward's dX

  // What a forward computes anew; the kept panels are checked against their tensors instead.
  void forget_outputs() { U = dY = dU = Source{}; }

  // A backend operation wrote `size` elements at `p`: the copies of whatever it overlaps are stale.
  // (Addresses compared as integers: `<` between pointers into different buffers is unspecified.)
  void forget_overlapping(const T* p, Index size) {
    const auto begin = reinterpret_cast<std::uintptr_t>(p), end = begin + std::uintptr_t(size) * sizeof(T);
    for (Source* s : {&X.source, &target.source, &U, &dY, &dU}) {
      const auto s_begin = reinterpret_cast<std::uintptr_t>(s->data);
      const auto s_end = s_begin + std::uintptr_t(s->rows * s->cols) * sizeof(T);
      if (s->data != nullptr && begin < s_end && s_begin < end) *s = Source{};
    }
  }
};

// What a fused forward computes beside Y when the MSE is fused into it: dY = grad_scale (Y - target),
// the squared differences' sum and dU = s dY B, as CpuBackend::mse and the backward would.
template <typename T>
struct FusedMseOutputs {
  const Tensor<T>* target;  // n x d
  bool target_loaded;       // the kept target panel already holds it
  T grad_scale;
  T* dY;  // n x d
  T* dU;  // n x r
  double squared_errors = 0;
};

template <typename T>
class CpuBackend final : public Backend<T> {
 public:
  explicit CpuBackend(const BackendOptions& options = {});

  Device device() const override { return Device::cpu; }
  std::string description() const override;
  void set_math_mode(MathMode mode) override { math_ = mode; }  // the CPU always computes in full precision
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
  void mse(const Tensor<T>& Y, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) override;

  void random_uniform(RngKey key, T low, T high, Tensor<T>& x) override;
  void random_normal(RngKey key, T mean, T stddev, Tensor<T>& x) override;
  void dropout_mask(RngKey key, T p, Tensor<T>& mask) override;

  // Tiny layers computed feature-major in one pass each way (cpu_fused_lora.cpp).
  bool fused_lora_forward(const LoraLayerTensors<T>& layer, Tensor<T>& U, Tensor<T>& Y) override;
  bool fused_lora_forward_mse(const LoraLayerTensors<T>& layer, const Tensor<T>& target, Tensor<T>& U, Tensor<T>& Y,
                              Tensor<T>& dY, Tensor<T>& loss, Tensor<T>& dU) override;
  bool fused_lora_backward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& dY,
                           const LoraLayerGradients<T>& grads) override;

 private:
  MathMode math_ = MathMode::strict;
  bool fused_small_layers_ = true;
  CpuGemm<T> gemm_;  // Eigen's GEMM with its packing buffers kept here, so steady steps allocate nothing
  FusedLoraScratch<T> fused_;

  // fused_lora_forward, and with `mse` fused_lora_forward_mse, once the shapes are checked and the
  // layer is small enough.
  void fused_forward_pass(const LoraLayerTensors<T>& layer, Tensor<T>& U, Tensor<T>& Y, FusedMseOutputs<T>* mse);

  // Every operation that writes a tensor calls this, so that the fused backward never reads a
  // feature-major copy of an X or U that this backend has overwritten since the copy was taken.
  void wrote(const Tensor<T>& t) { fused_.forget_overlapping(t.data(), t.size()); }
};

}  // namespace relora
