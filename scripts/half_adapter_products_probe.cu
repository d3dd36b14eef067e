// The adapter's bf16 products of one mlp4x4k layer (n = k = d = 4096, r = 64, tf32 mode: two
// terms of A, B, s U and dU) as CudaHalfLoraLinear issues them through cublasGemmEx, each beside
// the same product computed transposed (the operands swapped), and dB's and the short-depth
// products at the widths and depths in question. Median µs a call over 15 rounds of 10 calls.
//   nvcc -std=c++17 -O2 -arch=sm_90 scripts/half_adapter_products_probe.cu -lcublas -o probe && ./probe
// What it is for: which layout each rank-sized product should take (docs/PERFORMANCE.md), and
// whether the rank-sized products go faster with their depth cut into chunks (one strided-batched
// call, a chunk a batch entry, each writing its own fp32 partial) and the partials added by the
// pass that sums and splits them anyway: printed per chunk count as the product alone and the
// product plus a pass that adds the partials (what the sums-and-splits pass would read more).
#include <cuda_bf16.h>

#include "probe_common.cuh"

// Row-major C (m x n) = op(A) op(B), as HalfGemm::multiply.
void mul(bool ta, bool tb, int m, int n, int k, const void* A, int lda, const void* B, int ldb, void* C, int ldc, bool half_out) {
  float one = 1, zero = 0;
  CK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &one, B, CUDA_R_16BF, ldb, A,
                  CUDA_R_16BF, lda, &zero, C, half_out ? CUDA_R_16BF : CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
void mul_chunks(bool ta, bool tb, int m, int n, int k, const void* A, int lda, const void* B, int ldb, float* C, int ldc,
                int chunks, long long c_stride) {
  mul_chunks(CUDA_R_16BF, ta, tb, m, n, k, A, lda, B, ldb, C, ldc, chunks, c_stride);
}
__global__ void fill(unsigned short* p, size_t n) { for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) p[i] = 0x3c00 + (i * 2654435761u >> 20) % 256; }
int main() {
  const int n = 4096, k = 4096, d = 4096, r = 64, tr = 128, ld = 200;
  CK(cublasCreate(&h));
  void* ws; CK(cudaMalloc(&ws, 32 << 20)); CK(cublasSetWorkspace(h, ws, 32 << 20));
  auto alloc = [](size_t e) { unsigned short* p; CK(cudaMalloc(&p, e * 2)); fill<<<1024, 256>>>(p, e); return p; };
  unsigned short *X = alloc(size_t(n) * k), *dY = alloc(size_t(n) * d), *A = alloc(size_t(3 * r) * k), *Bb = alloc(size_t(d) * ld),
                 *U = alloc(size_t(n) * ld), *L = alloc(size_t(n) * ld), *R = alloc(size_t(ld) * d), *Rt = alloc(size_t(d) * ld);
  float* P; CK(cudaMalloc(&P, size_t(8) << 20 << 2));
  unsigned short* Y = alloc(size_t(n) * d);
  printf("U  X A^T      %.1f | U^T  A X^T     %.1f\n", med([&] { mul(false, true, n, tr, k, X, k, A, k, P, tr, false); }),
         med([&] { mul(false, true, tr, n, k, A, k, X, k, P, n, false); }));
  printf("dU dY Bb      %.1f | dU^T Bb^T dY^T %.1f\n", med([&] { mul(false, false, n, tr, d, dY, d, Bb, ld, P, tr, false); }),
         med([&] { mul(true, true, tr, n, d, Bb, ld, dY, d, P, n, false); }));
  for (int w : {136, 200})
    printf("dB dY^T U w%d %.1f | dB^T U^T dY   %.1f\n", w, med([&] { mul(true, false, d, w, n, dY, d, U, ld, P, ld, false); }),
           med([&] { mul(true, false, w, d, n, U, ld, dY, d, P, d, false); }));
  printf("dA dU^T X     %.1f | dA^T X^T dU    %.1f\n", med([&] { mul(true, false, tr, k, n, L, ld, X, k, P, k, false); }),
         med([&] { mul(true, false, k, tr, n, X, k, L, ld, P, tr, false); }));
  for (int depth : {192, 200})
    printf("Y  L R   depth %d %.1f | L Rt^T %.1f\n", depth, med([&] { mul(false, false, n, d, depth, L, ld, R, d, Y, d, true); }),
           med([&] { mul(false, true, n, d, depth, L, ld, Rt, ld, Y, d, true); }));
  printf("dX L A   depth 192 %.1f | depth 128 %.1f\n", med([&] { mul(false, false, n, k, 192, L, ld, A, k, Y, k, true); }),
         med([&] { mul(false, false, n, k, 128, L, ld, A, k, Y, k, true); }));
  // Split depth: U, dU, dB (136 columns) and dA, whole depth (1) and 2, 4, 8 chunks.
  float* Q; CK(cudaMalloc(&Q, size_t(8) << 20 << 2));
  struct Product { const char* name; bool ta, tb; int m, n, k; const void* A; int lda; const void* B; int ldb; int ldc; };
  const Product products[] = {{"U  X A^T ", false, true, n, tr, k, X, k, A, k, tr},
                              {"dU dY Bb ", false, false, n, tr, d, dY, d, Bb, ld, tr},
                              {"dB dY^T U", true, false, d, 136, n, dY, d, U, ld, ld},
                              {"dA dU^T X", true, false, tr, k, n, L, ld, X, k, k}};
  for (const Product& p : products) {
    const long long count = (long long)p.m * p.ldc;
    printf("%s chunks:", p.name);
    for (int chunks : {1, 2, 4, 8}) {
      const float product = med([&] { mul_chunks(p.ta, p.tb, p.m, p.n, p.k, p.A, p.lda, p.B, p.ldb, P, p.ldc, chunks, count); });
      const float with_sum = med([&] {
        mul_chunks(p.ta, p.tb, p.m, p.n, p.k, p.A, p.lda, p.B, p.ldb, P, p.ldc, chunks, count);
        add_partials<<<264, 256>>>(P, count, count, chunks, Q);
      });
      printf("  %d: %.1f (+sum %.1f)", chunks, product, with_sum);
    }
    printf("\n");
  }
  CK(cudaDeviceSynchronize());
  return 0;
}
