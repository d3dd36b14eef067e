// Probe: routes through cuSOLVER to the top-r left singular subspace of a gradient-sized G
// (m x n, m <= n; column-major, a flat spectrum: the hard case for any finder), timed on the GPU,
// each subspace's captured energy ||U^T G||_F^2 against a double-precision eigensolve of G G^T:
// the Gram matrix by syrk, then syevdx (the top r) and syevd (all) in fp32, gesvdp and gesvd.
// The figures behind GaLore's Gram finder (docs/PERFORMANCE.md, GaLore, run O).
//
//   nvcc -O2 -arch=sm_90 -o cusolver_subspace_probe scripts/cusolver_subspace_probe.cu -lcublas -lcusolver
//   ./cusolver_subspace_probe
#include <cublas_v2.h>
#include <cusolverDn.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <chrono>
#define CK(x) do { auto e_ = (x); if ((int)e_) { printf("err %d at %s:%d\n", (int)e_, __FILE__, __LINE__); exit(1); } } while (0)
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
__global__ void to_double(const float* a, double* b, size_t n) { size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; if (i < n) b[i] = a[i]; }
__global__ void to_float(const double* a, float* b, size_t n) { size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; if (i < n) b[i] = float(a[i]); }
cublasHandle_t cb; cusolverDnHandle_t cs;
// energy: ||U^T G||_F^2 with U m x r (column-major, ld m), G column-major m x n
double energy(const float* U, const float* G, int m, int n, int r, float* tmp) {
  float one = 1, zero = 0;
  CK(cublasSgemm(cb, CUBLAS_OP_T, CUBLAS_OP_N, r, n, m, &one, U, m, G, m, &zero, tmp, r));
  float nrm; CK(cublasSnrm2(cb, r * n, tmp, 1, &nrm)); return double(nrm) * nrm;
}
int main() {
  CK(cublasCreate(&cb)); CK(cusolverDnCreate(&cs));
  int shapes[][3] = {{2048, 2048, 128}, {4096, 4096, 256}, {4096, 11008, 256}};
  for (auto& s : shapes) {
    int m = s[0], n = s[1], r = s[2];
    size_t mn = size_t(m) * n;
    std::vector<float> h(mn); unsigned long long x = 12345;
    // Gaussian-ish (sum of uniforms) plus a decaying low-rank part: a flat tail under a few strong directions
    for (size_t i = 0; i < mn; ++i) { float a = 0; for (int k = 0; k < 4; ++k) { x = x * 6364136223846793005ULL + 1442695040888963407ULL; a += float((x >> 40) & 0xffffff) / 16777216.f - 0.5f; } h[i] = a; }
    float *G, *C, *C2, *W, *work, *tmp, *Ux; double *Gd, *Cd, *Wd, *workd; int* info;
    CK(cudaMalloc(&G, mn * 4)); CK(cudaMalloc(&C, size_t(m) * m * 4)); CK(cudaMalloc(&C2, size_t(m) * m * 4));
    CK(cudaMalloc(&W, m * 4)); CK(cudaMalloc(&tmp, size_t(r) * n * 4)); CK(cudaMalloc(&Ux, size_t(m) * r * 4));
    CK(cudaMalloc(&Gd, mn * 8)); CK(cudaMalloc(&Cd, size_t(m) * m * 8)); CK(cudaMalloc(&Wd, m * 8)); CK(cudaMalloc(&info, 4));
    CK(cudaMemcpy(G, h.data(), mn * 4, cudaMemcpyHostToDevice));
    float one = 1, zero = 0; double oned = 1, zerod = 0;
    auto gram = [&]() { CK(cublasSsyrk(cb, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, m, n, &one, G, m, &zero, C, m)); };
    gram(); cudaDeviceSynchronize();
    double t = now(); for (int i = 0; i < 5; ++i) gram(); cudaDeviceSynchronize(); double t_gram = (now() - t) / 5;
    // double reference: Gram in double, Dsyevdx top r
    to_double<<<(mn + 255) / 256, 256>>>(G, Gd, mn);
    t = now(); CK(cublasDsyrk(cb, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, m, n, &oned, Gd, m, &zerod, Cd, m)); cudaDeviceSynchronize(); double t_gramd = now() - t;
    int meig, lw;
    CK(cusolverDnDsyevdx_bufferSize(cs, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, m, Cd, m, 0, 0, m - r + 1, m, &meig, Wd, &lw));
    CK(cudaMalloc(&workd, size_t(lw) * 8));
    t = now(); CK(cusolverDnDsyevdx(cs, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, m, Cd, m, 0, 0, m - r + 1, m, &meig, Wd, workd, lw, info)); cudaDeviceSynchronize(); double t_dx = now() - t;
    float* Uref; CK(cudaMalloc(&Uref, size_t(m) * r * 4)); to_float<<<(size_t(m) * r + 255) / 256, 256>>>(Cd, Uref, size_t(m) * r);
    double e_ref = energy(Uref, G, m, n, r, tmp);
    printf("m %d n %d r %d: gram f32 syrk %.2f ms, gram f64 %.1f ms, Dsyevdx top-r %.1f ms (meig %d)\n", m, n, r, t_gram * 1e3, t_gramd * 1e3, t_dx * 1e3, meig);
    // float: syevdx top r, and syevd full
    CK(cusolverDnSsyevdx_bufferSize(cs, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, m, C, m, 0, 0, m - r + 1, m, &meig, W, &lw));
    int lw2; CK(cusolverDnSsyevd_bufferSize(cs, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, m, C, m, W, &lw2));
    CK(cudaMalloc(&work, size_t(std::max(lw, lw2)) * 4));
    for (int rep = 0; rep < 3; ++rep) {
      gram(); cudaDeviceSynchronize();
      t = now(); CK(cusolverDnSsyevdx(cs, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, m, C, m, 0, 0, m - r + 1, m, &meig, W, work, lw, info)); cudaDeviceSynchronize(); double t_sx = now() - t;
      double e = energy(C, G, m, n, r, tmp);
      gram(); cudaDeviceSynchronize();
      t = now(); CK(cusolverDnSsyevd(cs, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, m, C, m, W, work, lw2, info)); cudaDeviceSynchronize(); double t_sd = now() - t;
      double e2 = energy(C + size_t(m) * (m - r), G, m, n, r, tmp);
      printf("  rep %d: Ssyevdx top-r %.1f ms energy/ref %.7f; Ssyevd full %.1f ms energy/ref %.7f\n", rep, t_sx * 1e3, e / e_ref, t_sd * 1e3, e2 / e_ref);
    }
    // gesvdp (float, econ) on the column-major m x n? gesvdp wants m >= n: give G^T as n x m -> use G as column-major m x n with m<=n: transpose not free; time on a square copy only
    if (m == n) {
      cusolverDnParams_t p; CK(cusolverDnCreateParams(&p));
      size_t dws, hws; double err;
      float *Sv, *U, *V; CK(cudaMalloc(&Sv, m * 4)); CK(cudaMalloc(&U, mn * 4)); CK(cudaMalloc(&V, mn * 4));
      CK(cusolverDnXgesvdp_bufferSize(cs, p, CUSOLVER_EIG_MODE_VECTOR, 1, m, n, CUDA_R_32F, C2, m, CUDA_R_32F, Sv, CUDA_R_32F, U, m, CUDA_R_32F, V, n, CUDA_R_32F, &dws, &hws));
      void *dw, *hw = malloc(hws + 1); CK(cudaMalloc(&dw, dws));
      float* Gc; CK(cudaMalloc(&Gc, mn * 4));
      for (int rep = 0; rep < 2; ++rep) {
        CK(cudaMemcpy(Gc, G, mn * 4, cudaMemcpyDeviceToDevice)); cudaDeviceSynchronize();
        t = now(); CK(cusolverDnXgesvdp(cs, p, CUSOLVER_EIG_MODE_VECTOR, 1, m, n, CUDA_R_32F, Gc, m, CUDA_R_32F, Sv, CUDA_R_32F, U, m, CUDA_R_32F, V, n, CUDA_R_32F, dw, dws, hw, hws, info, &err)); cudaDeviceSynchronize(); double t_p = now() - t;
        // gesvdp's singular values are in descending order? check both ends
        std::vector<float> sv(m); cudaMemcpy(sv.data(), Sv, m * 4, cudaMemcpyDeviceToHost);
        double e = energy(U, G, m, n, r, tmp);
        printf("  gesvdp econ %.1f ms err %.2e s0 %.3f s_last %.3f energy(first r)/ref %.7f\n", t_p * 1e3, err, sv[0], sv[m - 1], e / e_ref);
      }
      // gesvd reference timing (left vectors only)
      int lw3; CK(cusolverDnSgesvd_bufferSize(cs, m, n, &lw3)); float* w3; CK(cudaMalloc(&w3, size_t(lw3) * 4));
      CK(cudaMemcpy(Gc, G, mn * 4, cudaMemcpyDeviceToDevice)); cudaDeviceSynchronize();
      t = now(); CK(cusolverDnSgesvd(cs, 'S', 'N', m, n, Gc, m, Sv, U, m, nullptr, n, w3, lw3, nullptr, info)); cudaDeviceSynchronize();
      printf("  gesvd jobu S %.1f ms energy/ref %.7f\n", (now() - t) * 1e3, energy(U, G, m, n, r, tmp) / e_ref);
      cudaFree(Sv); cudaFree(U); cudaFree(V); cudaFree(dw); cudaFree(Gc); cudaFree(w3); free(hw);
    }
    cudaFree(G); cudaFree(C); cudaFree(C2); cudaFree(W); cudaFree(work); cudaFree(tmp); cudaFree(Ux); cudaFree(Gd); cudaFree(Cd); cudaFree(Wd); cudaFree(workd); cudaFree(Uref);
    fflush(stdout);
  }
}
