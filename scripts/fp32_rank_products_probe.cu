// The rank-sized fp32 products of one mlp4x4k layer (n = k = d = 4096, r = 64) in strict fp32
// (CUBLAS_COMPUTE_32F, what --math strict and PEFT's strict runs use), each whole and with its depth
// cut into 2, 4 and 8 chunks (one strided-batched call, a chunk a batch entry, each writing its own
// partial), alone and with a pass adding the partials; and the two short-depth products (depth r)
// whose output is n x d. Median µs a call over 15 rounds of 10 calls, and the rate in TFLOP/s.
//   nvcc -std=c++17 -O2 -arch=sm_90 scripts/fp32_rank_products_probe.cu -lcublas -o probe && ./probe
// What it is for: issue 14's strict-fp32 DoRA target needs the adapter's products (U, dU, dB, dA
// and DoRA's W A^T, whose outputs fill 32-64 of cuBLAS's tiles for 132 SMs) near the large
// products' 50 TFLOP/s (docs/PERFORMANCE.md, "DoRA (issue 14)").
#include "probe_common.cuh"

// Row-major C (m x n) = op(A) op(B) in strict fp32 over `chunks` chunks of the depth (1: whole).
void mul(bool ta, bool tb, int m, int n, int k, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
         int chunks, long long c_stride) {
  mul_chunks(CUDA_R_32F, ta, tb, m, n, k, A, lda, B, ldb, C, ldc, chunks, c_stride);
}

__global__ void fill(float* p, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    p[i] = float(int((i * 2654435761u >> 20) % 256) - 128) / 128.0f;
  }
}

int main() {
  const int n = 4096, k = 4096, d = 4096, r = 64;
  CK(cublasCreate(&h));
  void* ws;
  CK(cudaMalloc(&ws, 32 << 20));
  CK(cublasSetWorkspace(h, ws, 32 << 20));
  auto alloc = [](size_t e) {
    float* p;
    CK(cudaMalloc(&p, e * sizeof(float)));
    fill<<<1024, 256>>>(p, e);
    return p;
  };
  float *X = alloc(size_t(n) * k), *dY = alloc(size_t(n) * d), *W = alloc(size_t(d) * k), *A = alloc(size_t(r) * k),
        *B = alloc(size_t(d) * r), *U = alloc(size_t(n) * r), *dU = alloc(size_t(n) * r), *Y = alloc(size_t(n) * d);
  float* P = alloc(size_t(8) * 4096 * r);
  float* Q = alloc(size_t(4096) * r);
  struct Product {
    const char* name;
    bool ta, tb;
    int m, n, k;
    const float* A;
    int lda;
    const float* B;
    int ldb;
  };
  const Product products[] = {{"U    X A^T  ", false, true, n, r, k, X, k, A, k},
                              {"dU   dY B   ", false, false, n, r, d, dY, d, B, r},
                              {"dB   dY^T U ", true, false, d, r, n, dY, d, U, r},
                              {"dA   dU^T X ", true, false, r, k, n, dU, r, X, k},
                              {"W A^T (DoRA)", false, true, d, r, k, W, k, A, k}};
  for (const Product& p : products) {
    const long long count = (long long)p.m * p.n;
    const double gflop = 2.0 * p.m * p.n * p.k * 1e-9;
    printf("%s", p.name);
    for (int chunks : {1, 2, 4, 8}) {
      const float alone = med([&] { mul(p.ta, p.tb, p.m, p.n, p.k, p.A, p.lda, p.B, p.ldb, P, p.n, chunks, count); });
      const float summed = med([&] {
        mul(p.ta, p.tb, p.m, p.n, p.k, p.A, p.lda, p.B, p.ldb, P, p.n, chunks, count);
        if (chunks > 1) add_partials<<<264, 256>>>(P, count, count, chunks, Q);
      });
      printf(" | %d: %.1f (%.0f TF/s), +sum %.1f", chunks, alone, gflop / alone * 1e3, summed);
    }
    printf("\n");
  }
  // The short-depth products: Y = s U B^T + Y (the adapter's term beside X W^T) and dX's term.
  const float y_term = med([&] { mul(false, true, n, d, r, U, r, B, r, Y, d, 1, 0); });
  const float dx_term = med([&] { mul(false, false, n, k, r, dU, r, A, k, Y, k, 1, 0); });
  const float large = med([&] { mul(false, true, n, d, k, X, k, W, k, Y, d, 1, 0); });
  const double short_gflop = 2.0 * n * d * r * 1e-9, large_gflop = 2.0 * n * d * k * 1e-9;
  printf("Y term U B^T  %.1f (%.0f TF/s) | dX term dU A %.1f (%.0f TF/s) | X W^T %.1f (%.0f TF/s)\n", y_term,
         short_gflop / y_term * 1e3, dx_term, short_gflop / dx_term * 1e3, large, large_gflop / large * 1e3);
  CK(cudaDeviceSynchronize());
  return 0;
}
