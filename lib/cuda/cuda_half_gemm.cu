#include "cuda/cuda_half_gemm.cuh"

#include <cublas_v2.h>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_sanitizer_marks.cuh"

namespace relora {
namespace cuda_detail {

HalfGemm::HalfGemm(CudaContext& context) : context_(&context) {
  context_->activate();
  create_blas_on_stream(context_->stream(), kWorkspaceBytes, blas_, workspace_);
}

void HalfGemm::multiply(Trans trans_a, Trans trans_b, Index m, Index n, Index k, float alpha, const std::uint16_t* A,
                        Index lda, const std::uint16_t* B, Index ldb, float beta, void* C, Index ldc,
                        BasePrecision format, Output output) {
  if (m == 0 || n == 0) return;
  context_->activate();
  const cudaDataType_t type = format == BasePrecision::bf16 ? CUDA_R_16BF : CUDA_R_16F;
  const cudaDataType_t c_type = output == Output::fp32 ? CUDA_R_32F : type;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B first, with the same flags.
  const cublasOperation_t op_a = trans_a == Trans::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b == Trans::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  RELORA_CUBLAS_CHECK(cublasGemmEx_64(blas_.handle, op_b, op_a, n, m, k, &alpha, B, type, ldb, A, type, lda, &beta, C,
                                      c_type, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  const std::size_t element = output == Output::fp32 ? sizeof(float) : sizeof(std::uint16_t);
  mark_written_for_sanitizer(C, std::size_t(m - 1) * std::size_t(ldc) * element + std::size_t(n) * element,
                             context_->stream());
}

}  // namespace cuda_detail
}  // namespace relora
