// Does compute-sanitizer's initcheck see the stores of cuBLAS's 16-bit GEMM kernels on this GPU?
// One product writes Y (every element, beta 0) into fresh memory and a plain kernel then reads Y.
// Under initcheck, a report of an uninitialised read of Y means the tool missed the product's
// stores: nothing but cuBLAS wrote Y. scripts/sanitize_cuda.sh runs it first and prints what it
// shows: the reason the library marks those products' outputs as written
// (lib/cuda/cuda_sanitizer_marks.cuh).
//
//   usage: cublas_16bit_store_probe [bf16|fp32] [n k d]
//     bf16: cublasGemmEx with bf16 inputs, fp32 output and fp32 accumulation (FrozenBase's
//           products); fp32: cublasSgemm, the control, whose stores the tool sees.
#include <cublas_v2.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

__global__ void sum_kernel(const float* y, long count, float* total) {
  float sum = 0;
  for (long i = threadIdx.x; i < count; i += blockDim.x) sum += y[i];
  atomicAdd(total, sum);
}

bool ok(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(status));
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const bool bf16 = argc < 2 || std::strcmp(argv[1], "bf16") == 0;
  int n = 64, k = 48, d = 40;
  if (argc == 5) {
    n = std::atoi(argv[2]);
    k = std::atoi(argv[3]);
    d = std::atoi(argv[4]);
  }
  const size_t element = bf16 ? 2 : 4;
  void *X = nullptr, *W = nullptr;
  float *Y = nullptr, *total = nullptr;
  if (!ok(cudaMalloc(&X, size_t(n) * k * element), "cudaMalloc X") ||
      !ok(cudaMalloc(&W, size_t(d) * k * element), "cudaMalloc W") ||
      !ok(cudaMalloc(&Y, size_t(n) * d * sizeof(float)), "cudaMalloc Y") ||
      !ok(cudaMalloc(&total, sizeof(float)), "cudaMalloc total")) {
    return 2;
  }
  cudaMemset(X, 0, size_t(n) * k * element);
  cudaMemset(W, 0, size_t(d) * k * element);
  cudaMemset(total, 0, sizeof(float));
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) return 2;
  const float alpha = 1, beta = 0;
  // Y (d x n, column-major) = W^T X, as FrozenBase's X W^T.
  const cublasStatus_t status =
      bf16 ? cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, d, n, k, &alpha, W, CUDA_R_16BF, k, X, CUDA_R_16BF, k,
                          &beta, Y, CUDA_R_32F, d, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
           : cublasSgemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, d, n, k, &alpha, static_cast<const float*>(W), k,
                         static_cast<const float*>(X), k, &beta, Y, d);
  if (status != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "the product failed: cuBLAS status %d\n", int(status));
    return 2;
  }
  sum_kernel<<<1, 128>>>(Y, long(n) * d, total);
  float sum = -1;
  if (!ok(cudaMemcpy(&sum, total, sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy")) return 2;
  std::printf("%s product n %d k %d d %d: sum of Y %g (0 expected)\n", bf16 ? "bf16" : "fp32", n, k, d, sum);
  cublasDestroy(handle);
  return sum == 0 ? 0 : 1;
}
