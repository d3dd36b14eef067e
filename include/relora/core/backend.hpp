#pragma once
// The primitives that more than one component needs: memory, products, element-wise work,
// reductions, random fills, synchronisation and recording a step. Layers, losses, optimizers and
// the controller are written once against this interface; a component's own kernels (a fast
// layer sibling's, an optimizer's) live with the component, one file per device. The CPU backend maps
// host buffers with Eigen, the CUDA backend keeps buffers on the device and calls cuBLAS and a
// few kernels. One virtual call per operation, never per element.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "relora/core/counter_rng.hpp"
#include "relora/core/errors.hpp"
#include "relora/core/tensor.hpp"

namespace relora {

enum class Trans { no, yes };

enum class Activation { identity, relu, tanh, gelu };

// Whether f can overwrite its input (identity and ReLU: ReLU's derivative is the same taken from y
// or relu(y)); tanh and GELU keep their input for the backward, so they need a buffer of their own.
inline bool applies_in_place(Activation f) { return f == Activation::identity || f == Activation::relu; }

// Throws ConfigError naming `where` unless f can be applied to a product's output in place.
inline void require_in_place_activation(Activation f, const char* where) {
  if (!applies_in_place(f)) {
    throw ConfigError(std::string(where) + ": only identity or ReLU is applied to the output in place; tanh and "
                      "GELU need a buffer of their own (the model's)");
  }
}

// Strict IEEE fp32 products, or TF32 tensor-core products (CUDA; about 3e-4 relative error). On
// the CPU, tf32 lets a bf16 base's products run on AMX tiles (cpu_amx_bf16_available()) or, on a
// CPU without AMX, on AVX-512 BF16 dot products (cpu_avx512_bf16_available()), the fp32 operand
// rounded to bf16 as the CUDA backend always does; every other CPU product is full precision in
// either mode.
enum class MathMode { strict, tf32 };

struct BackendOptions {
  MathMode math = MathMode::strict;
  int device_id = 0;  // CUDA device ordinal
};

template <typename T>
class Backend {
 public:
  virtual ~Backend() = default;

  virtual Device device() const = 0;
  // The backend that runs the work: this one, or for a wrapper (one that counts allocations, say)
  // the backend it forwards to. A component with kernels of its own for one device finds that
  // device's backend here.
  virtual Backend<T>& underlying() { return *this; }
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
  // C = f(alpha op(A) op(B) + beta C + 1 b^T): a layer's product with its bias (b: 1 x C.cols(), or
  // null for none) and its activation f, identity or ReLU (applied in place; ConfigError for
  // another). By default gemm, add_row_vector and activation_forward; a device that can add the
  // bias and apply the ReLU in the product's epilogue (CUDA, float) does so, saving passes over C.
  virtual void gemm_bias_activation(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B,
                                    T beta, const Tensor<T>* b, Activation f, Tensor<T>& C) {
    require_in_place_activation(f, "gemm_bias_activation");
    gemm(trans_a, trans_b, alpha, A, B, beta, C);
    if (b != nullptr) add_row_vector(*b, C);
    if (f == Activation::relu) activation_forward(f, C, C);
  }

  // ---- element-wise and reductions
  virtual void add_row_vector(const Tensor<T>& b, Tensor<T>& Y) = 0;           // Y[i, :] += b
  virtual void column_sums(const Tensor<T>& dY, T beta, Tensor<T>& db) = 0;    // db = beta db + sum_i dY[i, :]
  virtual void multiply(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) = 0;  // out = a .* b
  virtual void activation_forward(Activation f, const Tensor<T>& Y, Tensor<T>& Z) = 0;  // Z = f(Y)
  // dY = dZ .* f'(Y); dY may alias dZ.
  virtual void activation_backward(Activation f, const Tensor<T>& Y, const Tensor<T>& dZ,
                                   Tensor<T>& dY) = 0;
  // The largest |x_i|, read back to the host (waits for the backend); +Inf when x holds NaN or
  // Inf, so that a finite answer means every entry is finite. 0 for an empty tensor.
  virtual T max_abs(const Tensor<T>& x) = 0;
  // loss (1 x 1) = mean((Y - target)^2); dY = 2 (Y - target) / Y.size()
  virtual void mse(const Tensor<T>& Y, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) = 0;

  // ---- random fills from the counter-based generator (same numbers on every backend)
  virtual void random_uniform(RngKey key, T low, T high, Tensor<T>& x) = 0;
  virtual void random_normal(RngKey key, T mean, T stddev, Tensor<T>& x) = 0;
  // Inverted dropout mask: 0 with probability p, else 1 / (1 - p).
  virtual void dropout_mask(RngKey key, T p, Tensor<T>& mask) = 0;

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

  // ---- waits: a function the backend calls while the host waits for its device (download,
  // upload, synchronize, max_abs), at least once a wait and then between polls until the work is
  // done, so that a wait which cannot end (behind a collective whose peer has failed) can: what it
  // throws ends the wait, once the queued work has drained, so a check must end what blocks the
  // work (abort the collective) before it throws. One check at a time, installed for `owner`; an
  // empty check removes it only when `owner` installed it. None (the default): the waits block in
  // the driver. A communicator of several GPU ranks installs one; the CPU backend has no such waits
  // and ignores it.
  virtual void set_host_wait_check(const void* owner, std::function<void()> check) {
    (void)owner;
    (void)check;
  }
};

// A backend for `device`. CUDA throws DeviceError naming why when relora was built without CUDA
// or no GPU is visible.
template <typename T>
std::shared_ptr<Backend<T>> make_backend(Device device, const BackendOptions& options = {});

// Whether make_backend(Device::cuda) can succeed; if not, `why` says why.
bool cuda_available(std::string* why = nullptr);

// Whether the CPU backend runs a bf16 base's products on AMX tiles in tf32 mode: an x86-64 CPU
// with AMX-BF16 under Linux, a library built by a compiler with AMX's flags, and the environment
// variable RELORA_CPU_AMX not set to 0.
bool cpu_amx_bf16_available();

// Whether the CPU backend has AVX-512 BF16 kernels for a bf16 base's products in tf32 mode (they
// run where cpu_amx_bf16_available() is false): an x86-64 CPU with AVX512F, BW, VL and BF16 (AMD
// Zen 4 and later, Intel from Cooper Lake), a library built by a compiler that can compile them,
// and the environment variable RELORA_CPU_AVX512_BF16 not set to 0.
bool cpu_avx512_bf16_available();

}  // namespace relora
