#include "layers/cpu/cpu_bf16_sibling_kernels.hpp"

namespace relora {

CpuBf16SiblingKernels::CpuBf16SiblingKernels(Backend<float>& backend, std::unique_ptr<FrozenBaseKernels> reference)
    : backend_(backend), reference_(std::move(reference)) {}

void CpuBf16SiblingKernels::round(const float* src, Index count, Index first_index, BasePrecision format,
                                  HalfRounding mode, RngKey key, std::uint16_t* dst) {
  reference_->round(src, count, first_index, format, mode, key, dst);
}

void CpuBf16SiblingKernels::widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) {
  reference_->widen(src, count, format, dst);
}

double CpuBf16SiblingKernels::max_abs(const std::uint16_t* src, Index count, BasePrecision format) {
  return reference_->max_abs(src, count, format);
}

bool CpuBf16SiblingKernels::runs_product(BasePrecision format, Index n, Index k, Index d) const {
  return format == BasePrecision::bf16 && backend_.math_mode() == MathMode::tf32 && n > 0 && k > 0 && d > 0;
}

}  // namespace relora
