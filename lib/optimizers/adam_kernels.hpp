#pragma once
// Adam's kernels behind one small interface, one implementation per device: the CPU loop
// (cpu/adam_cpu.cpp) and the CUDA kernels (cuda/adam_cuda.cu, built only with CUDA). Adam builds
// its kernels once, from the backend's device, over flat slots: the kernels know nothing of layers.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "relora/core/backend.hpp"
#include "relora/optimizers/optimizer.hpp"

namespace relora {

// One parameter tensor as the update sees it.
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
  const char* name = "";    // for error messages; owned by the optimizer's parameter
};

// What one step's update shares across slots.
struct AdamHyper {
  double lr_factor = 1;  // the schedule's factor at this step, multiplying every group's lr
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  bool decoupled_weight_decay = true;  // AdamW; false adds weight_decay * param to the gradient (Adam with L2)
};

// A step's settings from an optimizer's configuration (AdamConfig, GaloreConfig: the same fields).
template <typename Config>
AdamHyper adam_hyper(const Config& config, double lr_factor) {
  AdamHyper hyper;
  hyper.lr_factor = lr_factor;
  hyper.beta1 = config.beta1;
  hyper.beta2 = config.beta2;
  hyper.eps = config.eps;
  hyper.decoupled_weight_decay = config.decoupled_weight_decay;
  return hyper;
}

template <typename T>
class AdamKernels {
 public:
  virtual ~AdamKernels() = default;
  // One Adam/AdamW update of every slot, in as few passes (launches) as possible. If any gradient
  // holds NaN or Inf nothing changes (update counts included) and NonFiniteError names the
  // parameter: at once on the CPU, at the backend's next synchronize() on CUDA.
  virtual void update(const AdamHyper& hyper) = 0;
  // Zeroes round(fraction * size) entries of m: those of smallest magnitude (ties to the lower
  // index), or those of smallest random key; and the same entries of v (same shape).
  virtual void prune(PruneMode mode, double fraction, RngKey key, Tensor<T>& m, Tensor<T>& v) = 0;
};

// The kernels for `backend`'s device over `slots` (whose buffers must outlive the kernels).
template <typename T>
std::unique_ptr<AdamKernels<T>> make_adam_kernels(Backend<T>& backend, std::vector<AdamSlot<T>> slots);

template <typename T>
std::unique_ptr<AdamKernels<T>> make_cpu_adam_kernels(std::vector<AdamSlot<T>> slots);
#if defined(RELORA_WITH_CUDA)
template <typename T>
std::unique_ptr<AdamKernels<T>> make_cuda_adam_kernels(Backend<T>& backend, std::vector<AdamSlot<T>> slots);
#endif

}  // namespace relora
