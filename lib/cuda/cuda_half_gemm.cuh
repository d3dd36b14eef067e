#pragma once
// Row-major products of 16-bit operands (bf16 or fp16) on tensor cores with fp32 accumulation,
// into fp32 or into the operands' format (rounded to nearest):
//   C (m x n, leading dimension ldc) = alpha op(A) op(B) + beta C,  op(A) m x k, op(B) k x n,
// A and B row-major with leading dimensions lda and ldb. cublasGemmEx on a handle of its own, on
// the context's stream, with a workspace of its own set once, so that a product allocates nothing
// (not even while a step is captured into a graph).
#include <cstdint>

#include "cuda/cuda_context.cuh"
#include "cuda/cuda_resources.cuh"
#include "relora/core/half_precision.hpp"

namespace relora {
namespace cuda_detail {

class HalfGemm {
 public:
  explicit HalfGemm(CudaContext& context);
  HalfGemm(const HalfGemm&) = delete;
  HalfGemm& operator=(const HalfGemm&) = delete;

  enum class Output { fp32, half };
  void multiply(Trans trans_a, Trans trans_b, Index m, Index n, Index k, float alpha, const std::uint16_t* A,
                Index lda, const std::uint16_t* B, Index ldb, float beta, void* C, Index ldc, BasePrecision format,
                Output output);

 private:
  static constexpr std::size_t kWorkspaceBytes = std::size_t(4) << 20;
  CudaContext* context_;
  BlasHandle blas_;
  DeviceMemory workspace_;
};

}  // namespace cuda_detail
}  // namespace relora
