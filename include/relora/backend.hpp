#pragma once
// The few operations the math needs. Layers, loss, optimizer and controller are written once
// against this interface; the CPU backend maps host buffers with Eigen, the CUDA backend keeps
// buffers on the device and calls cuBLAS and a few kernels. One virtual call per operation,
// never per element.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "relora/counter_rng.hpp"
#include "relora/tensor.hpp"

namespace relora {

enum class Trans { no, yes };

enum class Activation { identity, relu, tanh, gelu };

// Strict IEEE fp32 products, or TF32 tensor-core products (CUDA only; about 3e-4 relative error).
enum class MathMode { strict, tf32 };

enum class PruneMode { magnitude, random };

// One parameter tensor as the fused Adam update sees it: flat buffers, no notion of layers.
template <typename T>
struct AdamSlot {
  T* param = nullptr;
  const T* grad = nullptr;
  T* m = nullptr;     // first moment
  T* v = nullptr;     // second moment
  T* step = nullptr;  // this parameter's update count (one element, kept where the moments are)
  Index size = 0;
  double lr = 0;            // the group's learning rate, before the schedule's factor
  double weight_decay = 0;  // the group's weight decay
  const char* name = "";    // for error messages
};

struct AdamHyper {
  double lr_factor = 1;  // the schedule's factor at this step, multiplying every group's lr
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  bool decoupled_weight_decay = true;  // AdamW; false adds weight_decay * param to the gradient (Adam with L2)
};

struct BackendOptions {
  MathMode math = MathMode::strict;
  int device_id = 0;  // CUDA device ordinal
};

template <typename T>
class Backend {
 public:
  virtual ~Backend() = default;

  virtual Device device() const = 0;
  virtual std::string description() const = 0;
  virtual void set_math_mode(MathMode mode) = 0;
  virtual MathMode math_mode() const = 0;

  // ---- memory: contents of a fresh tensor are unspecified
  virtual Tensor<T> allocate(Index rows, Index cols) = 0;
  virtual void upload(const T* host, Tensor<T>& dst) = 0;      // dst.size() row-major elements
  virtual void download(const Tensor<T>& src, T* host) = 0;    // waits for pending work
  virtual void copy(const Tensor<T>& src, Tensor<T>& dst) = 0;  // same shape
  virtual void fill(Tensor<T>& x, T value) = 0;
  // Waits for queued work; raises errors the device found since the last call (NonFiniteError).
  virtual void synchronize() = 0;

  // ---- products: C = alpha op(A) op(B) + beta C, row-major, shapes checked
  virtual void gemm(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B,
                    T beta, Tensor<T>& C) = 0;

  // ---- element-wise and reductions
  virtual void add_row_vector(const Tensor<T>& b, Tensor<T>& Y) = 0;           // Y[i, :] += b
  virtual void column_sums(const Tensor<T>& dY, T beta, Tensor<T>& db) = 0;    // db = beta db + sum_i dY[i, :]
  virtual void multiply(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) = 0;  // out = a .* b
  virtual void activation_forward(Activation f, const Tensor<T>& Y, Tensor<T>& Z) = 0;  // Z = f(Y)
  // dY = dZ .* f'(Y); dY may alias dZ.
  virtual void activation_backward(Activation f, const Tensor<T>& Y, const Tensor<T>& dZ,
                                   Tensor<T>& dY) = 0;
  // loss (1 x 1) = mean((Y - target)^2); dY = 2 (Y - target) / Y.size()
  virtual void mse(const Tensor<T>& Y, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) = 0;

  // ---- random fills from the counter-based generator (same numbers on every backend)
  virtual void random_uniform(RngKey key, T low, T high, Tensor<T>& x) = 0;
  virtual void random_normal(RngKey key, T mean, T stddev, Tensor<T>& x) = 0;
  // Inverted dropout mask: 0 with probability p, else 1 / (1 - p).
  virtual void dropout_mask(RngKey key, T p, Tensor<T>& mask) = 0;

  // ---- optimizer
  // One Adam/AdamW update of every slot, as few launches as possible. If any gradient holds NaN
  // or Inf nothing changes (steps included) and NonFiniteError names the parameter: at once on
  // the CPU, at the next synchronize() on CUDA, so that no step waits for the device.
  virtual void adam_update(const AdamSlot<T>* slots, std::size_t count, const AdamHyper& hyper) = 0;
  // Zeroes round(fraction * size) entries of x: those of smallest magnitude, or chosen at random.
  virtual void prune(PruneMode mode, double fraction, RngKey key, Tensor<T>& x) = 0;
};

// A backend for `device`. CUDA throws DeviceError naming why when relora was built without CUDA
// or no GPU is visible.
template <typename T>
std::shared_ptr<Backend<T>> make_backend(Device device, const BackendOptions& options = {});

// Whether make_backend(Device::cuda) can succeed; if not, `why` says why.
bool cuda_available(std::string* why = nullptr);

}  // namespace relora
