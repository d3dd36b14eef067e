#pragma once
// The element-wise work of a Model whose activations travel in 16 bits (Model::set_activation_format),
// one implementation per device: cpu/half_activation_kernels_cpu.cpp and
// cuda/half_activation_kernels_cuda.cu. Values are raw bf16 or fp16 bits (half_precision.hpp);
// both devices run the functions of half_precision.hpp and elementwise_math.hpp, so they give the
// same bits.
#include <cstdint>
#include <memory>

#include "relora/core/backend.hpp"
#include "relora/core/half_precision.hpp"

namespace relora {

class HalfActivationKernels {
 public:
  virtual ~HalfActivationKernels() = default;
  // dst[i] = src[i] rounded to nearest (ties to even), i in [0, count).
  virtual void round(const float* src, Index count, BasePrecision format, std::uint16_t* dst) = 0;
  // dst[i] = src[i] as fp32 (exact).
  virtual void widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) = 0;
  // y[i] = relu(y[i]) in place, as activation_value computes it on the widened value.
  virtual void relu(std::uint16_t* y, Index count, BasePrecision format) = 0;
  // dy[i] = dz[i] relu'(y[i]) (activation_derivative on the widened values; exact in the format,
  // a value or zero); dy may alias dz.
  virtual void relu_backward(const std::uint16_t* y, const std::uint16_t* dz, Index count, BasePrecision format,
                             std::uint16_t* dy) = 0;
  // The MSE of a 16-bit prediction y (count >= 1 values) against an fp32 target, y widened as it
  // is read: *loss = mean((widen(y) - t)^2) and dy[i] = round(2 (widen(y[i]) - t[i]) / count).
  // These are the backend's mse on widen(y) and its gradient rounded, without either fp32 copy;
  // the CPU's loss is that one's to the bit (the same sum in the same order), CUDA's to the order
  // of its sum. loss is one float in the device's memory.
  virtual void mse(const std::uint16_t* y, const float* target, Index count, BasePrecision format,
                   std::uint16_t* dy, float* loss) = 0;
};

// The kernels for `backend`'s device.
std::unique_ptr<HalfActivationKernels> make_half_activation_kernels(Backend<float>& backend);

std::unique_ptr<HalfActivationKernels> make_cpu_half_activation_kernels();
#if defined(RELORA_WITH_CUDA)
std::unique_ptr<HalfActivationKernels> make_cuda_half_activation_kernels(Backend<float>& backend);
#endif

}  // namespace relora
