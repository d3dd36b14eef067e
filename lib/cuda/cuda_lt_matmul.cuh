#pragma once
// A cuBLASLt product into fp32 (or 16 bits) with the bias (and a ReLU) applied in the GEMM's epilogue:
//   D (m x n, column-major, ld ldd) = f(alpha op(A) op(B) + bias 1^T + beta D), f ReLU or none,
// A and B of one type (fp32, bf16 or fp16), bias m values or none, accumulation in fp32 (strict,
// or TF32 for fp32 operands where the compute type says so). cublasGemmEx has no bias; a separate
// pass would read and write D once more. One plan per shape (descriptors and the heuristic's
// algorithm), made on first use and kept: a steady step makes no plan, and a plan is made on the
// host only, so a step being recorded into a graph can make one.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

namespace relora {
namespace cuda_detail {

class LtMatmul {
 public:
  // Products run on `stream` with `workspace` (bytes) as cuBLASLt's scratch; both outlive this.
  LtMatmul(cudaStream_t stream, void* workspace, std::size_t workspace_bytes);
  ~LtMatmul();
  LtMatmul(const LtMatmul&) = delete;
  LtMatmul& operator=(const LtMatmul&) = delete;

  struct Product {
    bool transpose_a = false, transpose_b = false;
    std::int64_t m = 0, n = 0, k = 0;
    float alpha = 1;
    const void* A = nullptr;
    std::int64_t lda = 0;
    const void* B = nullptr;
    std::int64_t ldb = 0;
    cudaDataType_t type = CUDA_R_32F;  // A's and B's
    cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
    const float* bias = nullptr;  // m values, or none (an fp32 D only: cuBLASLt takes D's type for the bias)
    bool relu = false;            // D = max(D, 0) last
    float beta = 0;
    void* D = nullptr;                   // C and D: what beta scales and the result
    cudaDataType_t d_type = CUDA_R_32F;  // fp32, or A's 16-bit type (activations in 16 bits)
    std::int64_t ldd = 0;
  };
  void multiply(const Product& p);

 private:
  struct Plan {
    cublasLtMatmulDesc_t operation = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  // transposes, m, n, k, leading dimensions, type, compute type, bias or not, the operands' common
  // alignment (bytes, up to 256), ReLU or not, D's type
  using Key = std::tuple<bool, bool, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                         std::int64_t, int, int, bool, unsigned, bool, int>;
  Plan& plan(const Key& key);
  static void release(Plan& plan);

  cublasLtHandle_t handle_ = nullptr;
  cudaStream_t stream_;
  void* workspace_;
  std::size_t workspace_bytes_;
  std::map<Key, Plan> plans_;
};

}  // namespace cuda_detail
}  // namespace relora
