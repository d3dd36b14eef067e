// What the GEMM probes in scripts/ share (each is built alone: nvcc includes this from beside it):
// a check macro, one cuBLAS handle, a row-major product over depth chunks, the pass that adds the
// chunks' partials, and the median timing of a call.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                  \
  do {                                                         \
    auto err_ = (x);                                           \
    if (err_ != 0) {                                           \
      printf("error %d at line %d\n", int(err_), __LINE__);    \
      exit(1);                                                 \
    }                                                          \
  } while (0)

inline cublasHandle_t h;

// Row-major C (m x n, fp32) = op(A) op(B), A and B of `type`, over `chunks` equal chunks of the
// depth k: entry c of one strided-batched call multiplies the operands' c-th depth slice into
// C + c * c_stride (chunks 1: the whole product). A chunk of a row-major operand's depth is a block
// of its columns when it is not transposed, of its rows when it is.
inline void mul_chunks(cudaDataType_t type, bool ta, bool tb, int m, int n, int k, const void* A, int lda, const void* B,
                       int ldb, float* C, int ldc, int chunks, long long c_stride) {
  const float one = 1, zero = 0;
  const int kc = k / chunks;
  const long long a_stride = ta ? (long long)kc * lda : kc, b_stride = tb ? kc : (long long)kc * ldb;
  CK(cublasGemmStridedBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, kc, &one, B,
                                type, ldb, b_stride, A, type, lda, a_stride, &zero, C, CUDA_R_32F, ldc, c_stride, chunks,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// out[e] = sum over c of P[c * stride + e]: the extra reads a pass over chunked partials makes.
__global__ void add_partials(const float* P, long long count, long long stride, int chunks, float* out) {
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < count; e += (long long)gridDim.x * blockDim.x) {
    float v = P[e];
    for (int c = 1; c < chunks; ++c) v += P[c * stride + e];
    out[e] = v;
  }
}

// Median µs a call of f over 15 rounds of 10 calls, after 5 calls of warm-up.
template <class F>
float med(F f) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 5; ++i) f();
  std::vector<float> t;
  for (int r = 0; r < 15; ++r) {
    cudaEventRecord(a);
    for (int i = 0; i < 10; ++i) f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms * 100);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
