#pragma once
// A cuBLASLt product of two 16-bit operands into fp32 with the bias added in the GEMM's epilogue:
//   D (m x n, column-major, ld m) = op(A) B + bias 1^T + beta D,
// A k x m stored (op T) or m x k (op N), B k x n, bias m values or none, accumulation in fp32.
// cublasGemmEx has no bias; a separate pass would read and write D once more. One plan per shape
// (descriptors and the heuristic's algorithm), made on first use and kept: a steady step makes no
// plan, and a plan is made on the host only, so a step being recorded into a graph can make one.
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

  void multiply(bool transpose_a, std::int64_t m, std::int64_t n, std::int64_t k, const void* A,
                const void* B, cudaDataType_t type, const float* bias, float beta, float* D);

 private:
  struct Plan {
    cublasLtMatmulDesc_t operation = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  // transpose_a, m, n, k, type, bias or not, the operands' common alignment (bytes, up to 256)
  using Key = std::tuple<bool, std::int64_t, std::int64_t, std::int64_t, int, bool, unsigned>;
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
