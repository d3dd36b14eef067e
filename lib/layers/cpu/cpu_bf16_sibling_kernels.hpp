#pragma once
// What the CPU's siblings for a bf16 base in tf32 mode share (AMX tiles,
// frozen_base_kernels_amx.cpp; AVX-512 BF16, frozen_base_kernels_avx512_bf16.cpp): they run X W^T
// and dY W themselves where runs_product() says so and leave everything else (strict mode, fp16,
// rounding, widening) to the reference kernels.
#include <memory>

#include "layers/frozen_base_kernels.hpp"

namespace relora {

class CpuBf16SiblingKernels : public FrozenBaseKernels {
 public:
  CpuBf16SiblingKernels(Backend<float>& backend, std::unique_ptr<FrozenBaseKernels> reference);

  void round(const float* src, Index count, Index first_index, BasePrecision format, HalfRounding mode, RngKey key,
             std::uint16_t* dst) override;
  void widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) override;
  double max_abs(const std::uint16_t* src, Index count, BasePrecision format) override;

 protected:
  // A bf16 W only, and only in tf32 mode (the user's consent to rounding X and dY to bf16); an
  // empty product is the reference's.
  bool runs_product(BasePrecision format, Index n, Index k, Index d) const;

  Backend<float>& backend_;
  std::unique_ptr<FrozenBaseKernels> reference_;
};

}  // namespace relora
