#pragma once
// The kernels of a base weight stored in bf16 or fp16 (FrozenBase), one implementation per
// device: cpu/frozen_base_kernels_cpu.cpp (products on Eigen's fp32 kernels, W widened a panel of
// rows at a time) and cuda/frozen_base_kernels_cuda.cu (tensor-core products through
// cublasGemmEx with fp32 accumulation, the fp32 operand cast into a 16-bit buffer first). The CPU
// has siblings for a bf16 base in tf32 mode, chosen at run time (frozen_base_kernels.cpp): AMX
// tiles (cpu/frozen_base_kernels_amx.cpp) and AVX-512 BF16 (cpu/frozen_base_kernels_avx512_bf16.cpp).
// Letters as in lora_linear.hpp: X is n x k, W is d x k (16-bit), Y is n x d, dY n x d, dX n x k.
// 16-bit values are raw bits (half_precision.hpp). Float layers only: cuBLAS has no 16-bit
// product into fp64, and an fp64 model has no reason to store its base in 16 bits.
#include <cstdint>
#include <memory>

#include "relora/core/backend.hpp"
#include "relora/core/half_precision.hpp"
#include "relora/core/half_tensor.hpp"

namespace relora {

class FrozenBaseKernels {
 public:
  virtual ~FrozenBaseKernels() = default;
  // dst[i] = src[i] rounded to `format`, i in [0, count); a stochastic rounding of element i draws
  // element first_index + i of `key`, so a matrix rounded in blocks draws what it would in one.
  virtual void round(const float* src, Index count, Index first_index, BasePrecision format, HalfRounding mode,
                     RngKey key, std::uint16_t* dst) = 0;
  // dst[i] = src[i] as fp32 (exact).
  virtual void widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) = 0;
  // The largest |src[i]| (read back to the host, waiting for queued work); +Inf for NaN or Inf.
  virtual double max_abs(const std::uint16_t* src, Index count, BasePrecision format) = 0;
  // Y = f(X W^T + bias + beta Y) (W: d x k with d = Y.cols(), k = X.cols(); bias: d fp32 values on
  // the device, or null for none; f ReLU when relu, max(y, 0) as activation_value computes it,
  // else none). A layer that has computed its adapter's term into Y first passes beta 1, so the
  // product's epilogue adds it instead of a pass of its own; CUDA applies the bias and the ReLU in
  // that epilogue too, the CPU in one pass over Y after the product.
  virtual void forward_product(const Tensor<float>& X, const std::uint16_t* W, BasePrecision format,
                               const float* bias, float beta, bool relu, Tensor<float>& Y) = 0;
  // P = W A^T (W: d x k, A: r x k fp32, P: d x r) where the device has a way without widening W
  // (a bf16 W on CUDA); false, having done nothing, where it has not (FrozenBase then widens W's
  // rows a block at a time).
  virtual bool weight_times_transposed(const std::uint16_t* W, Index d, Index k, BasePrecision format,
                                       const Tensor<float>& A, Tensor<float>& P) {
    (void)W, (void)d, (void)k, (void)format, (void)A, (void)P;
    return false;
  }
  // dX = dY W + beta dX (W: d x k with d = dY.cols(), k = dX.cols()).
  virtual void input_gradient_product(const Tensor<float>& dY, const std::uint16_t* W, BasePrecision format,
                                      float beta, Tensor<float>& dX) = 0;

  // The same two products on 16-bit activations in W's format (a layer that takes them,
  // Layer::take_half_activations): X, Y, dY and dX hold 16-bit values, the products accumulate in
  // fp32 and Y and dX are rounded to nearest once, after the epilogue. The forward takes no bias
  // (cuBLASLt adds only a bias of the result's type, and the bias is fp32): the layer adds it with
  // its adapter's term. Only where has_half_activation_products() (CUDA); the CPU's layers run on
  // fp32 activations, the model converting around them.
  virtual bool has_half_activation_products() const { return false; }
  virtual void forward_product_half(const HalfTensor& X, const std::uint16_t* W, BasePrecision format, float beta,
                                    bool relu, HalfTensor& Y) {
    (void)X, (void)W, (void)format, (void)beta, (void)relu, (void)Y;
    throw DeviceError("16-bit activations: no product on this device's 16-bit base");
  }
  virtual void input_gradient_product_half(const HalfTensor& dY, const std::uint16_t* W, BasePrecision format,
                                           float beta, HalfTensor& dX) {
    (void)dY, (void)W, (void)format, (void)beta, (void)dX;
    throw DeviceError("16-bit activations: no product on this device's 16-bit base");
  }
};

// The kernels for `backend`'s device.
std::unique_ptr<FrozenBaseKernels> make_frozen_base_kernels(Backend<float>& backend);

std::unique_ptr<FrozenBaseKernels> make_cpu_frozen_base_kernels();
#if defined(RELORA_WITH_CUDA)
std::unique_ptr<FrozenBaseKernels> make_cuda_frozen_base_kernels(Backend<float>& backend);
#endif

}  // namespace relora
