#pragma once
// The few operations the math needs. Layers, loss, optimizer and controller are written once
// against this interface; the CPU backend maps host buffers with Eigen, the CUDA backend keeps
// buffers on the device and calls cuBLAS and a few kernels. One virtual call per operation,
// never per element. A kernel that only one component needs (an optimizer's update) lives with
// that component, one file per device, not here.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "relora/core/counter_rng.hpp"
#include "relora/core/tensor.hpp"

namespace relora {

enum class Trans { no, yes };

enum class Activation { identity, relu, tanh, gelu };

// Strict IEEE fp32 products, or TF32 tensor-core products (CUDA only; about 3e-4 relative error).
enum class MathMode { strict, tf32 };

struct BackendOptions {
  MathMode math = MathMode::strict;
  int device_id = 0;  // CUDA device ordinal
  // Run LoRA layers through fused_lora_forward/backward where the backend has such a path: tiny
  // layers on both backends, and on CUDA wider layers of small rank (the adapter passes).
  // Off: every layer uses the separate products (tests compare the two).
  bool fused_small_layers = true;
};

// One LoRA layer as the fused small-layer operations see it (every pointer but b non-null):
// X n x k, W d x k, A r x k, B d x r, b 1 x d or null, and the adapter's scale s.
template <typename T>
struct LoraLayerTensors {
  const Tensor<T>* X = nullptr;
  const Tensor<T>* W = nullptr;
  const Tensor<T>* A = nullptr;
  const Tensor<T>* B = nullptr;
  const Tensor<T>* b = nullptr;
  T scale = T(1);
};

// What the fused backward writes: dU n x r, dA r x k, dB d x r, and where non-null
// db 1 x d (= sum_i dY[i, :]) and dX n x k (= dY W + dU A). All overwritten, never accumulated.
template <typename T>
struct LoraLayerGradients {
  Tensor<T>* dU = nullptr;
  Tensor<T>* dA = nullptr;
  Tensor<T>* dB = nullptr;
  Tensor<T>* db = nullptr;
  Tensor<T>* dX = nullptr;
  // dU already holds s dY B for this dY (fused_lora_forward_mse computed it): the backend may
  // skip that product.
  bool dU_ready = false;
};

template <typename T>
class Backend {
 public:
  virtual ~Backend() = default;

  virtual Device device() const = 0;
  virtual std::string description() const = 0;
  // The backend that runs the work: this one, or, for a wrapper that forwards every operation to
  // another (to count or trace them), that other one. A component whose own kernels need the
  // device backend's internals (the CUDA stream) finds them through it.
  virtual Backend& underlying() { return *this; }
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

  // ---- fused small LoRA layer (optional). A layer of tiny widths (the seed demo's 10 -> 5,
  // rank 4) spends its step in the fixed cost of six separate products, not in their flops; a
  // backend may run a layer's forward or backward as one pass instead (or, for a wider layer of
  // small rank, run its rank-sized products as work shaped for them). Each returns false, having
  // done nothing, when it has no fused path for these shapes (or BackendOptions said not to): the
  // layer then calls the separate operations, which compute the same values up to rounding.
  // Inconsistent shapes throw ShapeError naming the tensor (unless the path is switched off).
  //
  // U = X A^T; Y = X W^T + b + s U B^T.
  virtual bool fused_lora_forward(const LoraLayerTensors<T>& layer, Tensor<T>& U, Tensor<T>& Y) {
    (void)layer;
    (void)U;
    (void)Y;
    return false;
  }
  // The forward of a model's last layer fused with the MSE loss and the first product of the
  // backward, where the layer's output is the model's: U and Y as fused_lora_forward computes
  // them, then dY = 2 (Y - target) / size, loss (1 x 1) = mean((Y - target)^2) and dU = s dY B,
  // the same values (up to the order of the loss's sum) that MSE and the backward would give. It
  // saves the passes over Y and dY between them, most of a wide layer's step beside its product.
  virtual bool fused_lora_forward_mse(const LoraLayerTensors<T>& layer, const Tensor<T>& target, Tensor<T>& U,
                                      Tensor<T>& Y, Tensor<T>& dY, Tensor<T>& loss, Tensor<T>& dU) {
    (void)layer;
    (void)target;
    (void)U;
    (void)Y;
    (void)dY;
    (void)loss;
    (void)dU;
    return false;
  }
  // From dY (n x d) and the forward's U: dU = s dY B, dB = s dY^T U, dA = dU^T X, and db, dX
  // where requested.
  virtual bool fused_lora_backward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& dY,
                                   const LoraLayerGradients<T>& grads) {
    (void)layer;
    (void)U;
    (void)dY;
    (void)grads;
    return false;
  }

  // ---- recorded steps (optional: CUDA graphs). A launch-bound step (tiny layers) costs mostly
  // host time per operation; a backend that can record a sequence of operations once and run it
  // again with one launch saves that. A backend that cannot (the CPU backend) keeps these
  // defaults, which answer "not supported", and its caller runs every step eagerly.
  //
  // Starts recording: the operations queued after this are recorded, not run, until
  // end_recording(). False (and nothing changes) when the backend cannot record.
  virtual bool begin_recording() { return false; }
  // Ends the recording and queues it once, so the recorded operations run as if queued eagerly.
  // Returns its id (> 0); it replaces the backend's earlier recording, if any (one at a time).
  // 0: it was discarded and nothing of it ran (a tensor was allocated while recording, or the
  // device refused an operation); the caller then runs the operations eagerly.
  virtual std::uint64_t end_recording() { return 0; }
  // Queues recording `id` once more, on the same buffers. `refresh` runs first and must repeat
  // the recorded work whose parameters change from step to step (an optimizer's step, whose
  // learning-rate factor changes every step), on the same tensors, in the same order: the
  // components' kernels then set those parameters on the recording and keep their NaN/Inf
  // bookkeeping, instead of running. False (refresh not called, nothing queued) when `id` is not
  // the backend's recording or it is stale: a tensor was allocated since it was made (a buffer
  // may have moved) or the math mode changed.
  virtual bool replay(std::uint64_t id, const std::function<void()>& refresh) {
    (void)id;
    (void)refresh;
    return false;
  }
  // Ends a recording in progress, discarding it (after an exception, say), and forgets the
  // ready one.
  virtual void drop_recording() {}
};

// A backend for `device`. CUDA throws DeviceError naming why when relora was built without CUDA
// or no GPU is visible.
template <typename T>
std::shared_ptr<Backend<T>> make_backend(Device device, const BackendOptions& options = {});

// Whether make_backend(Device::cuda) can succeed; if not, `why` says why.
bool cuda_available(std::string* why = nullptr);

}  // namespace relora
