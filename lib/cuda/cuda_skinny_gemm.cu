// Products with a LoRA rank's side: C (m x n) = alpha op(A) op(B) + beta C where one of m, n is
// at most a rank (<= 64) and the depth k is long (U = X A^T, dU = s dY B, dB = s dY^T U,
// dA = dU^T X). The output is a few 64 x 64 tiles, so a GEMM that gives each block a whole output
// tile keeps most of the GPU idle and walks the whole depth serially: cuBLAS takes about 10 us for
// layer1k's 1024 x 16 x 1024. Here the depth is split too (split-K): each block multiplies one
// output tile over one slice of k into the partials, and a second kernel adds the slices in a
// fixed order (the same bits on every run) and applies alpha and beta.
//
// The partials live in the cuBLAS workspace: the stream orders this product's two kernels
// after and before every cuBLAS call, so the two never use it at the same time.
#include <algorithm>

#include "cuda/cuda_backend_impl.cuh"
#include "cuda/cuda_launch.cuh"

namespace relora {
namespace cuda_detail {
namespace {

constexpr int kTile = 64;         // output tile, kTile x kTile
constexpr int kDepthStep = 16;    // depth staged in shared memory per step
constexpr int kSkinnyThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kMaxSkinnySide = 64;   // the rank side
constexpr std::int64_t kMinSkinnyDepth = 256;
// Up to this many multiply-adds the split kernels beat cuBLAS; beyond it cuBLAS's own kernels
// fill the GPU (mlp4x4k's rank-64 products at 4096 x 4096 stay on cuBLAS).
constexpr double kMaxSkinnyWork = double(1ll << 27);

template <typename T>
struct SkinnyArgs {
  const T* A;
  const T* B;
  T* partials;  // splits x m x n
  int m, n, k;
  int lda, ldb;  // row strides of A and B as stored
  bool trans_a, trans_b;
  int depth_per_split;
};

template <typename T>
__global__ void __launch_bounds__(kSkinnyThreads) skinny_partial_kernel(const SkinnyArgs<T> a) {
  wait_for_previous_grid();
  allow_next_grid();
  // Padded rows: the staging stores walk down a column for a depth-major source.
  __shared__ T As[kDepthStep][kTile + 1];  // As[kk][i] = op(A)(i0 + i, k0 + kk)
  __shared__ T Bs[kDepthStep][kTile + 1];  // Bs[kk][j] = op(B)(k0 + kk, j0 + j)
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int i0 = blockIdx.x * kTile, j0 = blockIdx.y * kTile;
  const int k_begin = blockIdx.z * a.depth_per_split;
  const int k_end = min(a.k, k_begin + a.depth_per_split);
  T acc[4][4] = {};
  for (int k0 = k_begin; k0 < k_end; k0 += kDepthStep) {
    // Staged so that neighbouring threads read neighbouring addresses of the stored matrix.
    for (int e = tid; e < kDepthStep * kTile; e += kSkinnyThreads) {
      int i, kk;
      if (a.trans_a) {  // A stored k x m: i runs along a row
        kk = e / kTile, i = e % kTile;
      } else {          // A stored m x k: the depth runs along a row
        i = e / kDepthStep, kk = e % kDepthStep;
      }
      const int gi = i0 + i, gk = k0 + kk;
      T value = T(0);
      if (gi < a.m && gk < k_end) value = a.trans_a ? a.A[std::int64_t(gk) * a.lda + gi] : a.A[std::int64_t(gi) * a.lda + gk];
      As[kk][i] = value;
    }
    for (int e = tid; e < kDepthStep * kTile; e += kSkinnyThreads) {
      int j, kk;
      if (a.trans_b) {  // B stored n x k: the depth runs along a row
        j = e / kDepthStep, kk = e % kDepthStep;
      } else {          // B stored k x n: j runs along a row
        kk = e / kTile, j = e % kTile;
      }
      const int gj = j0 + j, gk = k0 + kk;
      T value = T(0);
      if (gj < a.n && gk < k_end) value = a.trans_b ? a.B[std::int64_t(gj) * a.ldb + gk] : a.B[std::int64_t(gk) * a.ldb + gj];
      Bs[kk][j] = value;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDepthStep; ++kk) {
      T av[4], bv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        av[q] = As[kk][ty * 4 + q];
        bv[q] = Bs[kk][tx + 16 * q];  // strided by 16: neighbouring threads, neighbouring banks
      }
#pragma unroll
      for (int p = 0; p < 4; ++p) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = fma(av[p], bv[q], acc[p][q]);
      }
    }
    __syncthreads();
  }
  T* out = a.partials + std::int64_t(blockIdx.z) * a.m * a.n;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int gi = i0 + ty * 4 + p;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int gj = j0 + tx + 16 * q;
      if (gi < a.m && gj < a.n) out[std::int64_t(gi) * a.n + gj] = acc[p][q];
    }
  }
}

// C = alpha (sum of the splits, in split order) + beta C; beta == 0 ignores C (NaN included).
template <typename T>
__global__ void skinny_reduce_kernel(std::int64_t size, int splits, const T* __restrict__ partials, T alpha, T beta,
                                     T* __restrict__ C) {
  wait_for_previous_grid();
  allow_next_grid();
  for (std::int64_t idx = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; idx < size;
       idx += std::int64_t(gridDim.x) * blockDim.x) {
    T sum = T(0);
    for (int s = 0; s < splits; ++s) sum += partials[s * size + idx];
    C[idx] = beta == T(0) ? alpha * sum : alpha * sum + beta * C[idx];
  }
}

}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

template <typename T>
bool CudaBackend<T>::skinny_gemm(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B,
                                 T beta, Tensor<T>& C) {
  const Index m = C.rows(), n = C.cols();
  const Index k = trans_a == Trans::no ? A.cols() : A.rows();
  if (std::min(m, n) > kMaxSkinnySide || k < kMinSkinnyDepth) return false;
  if (double(m) * double(n) * double(k) > kMaxSkinnyWork) return false;
  if (std::max({m, n, k}) > Index(1) << 30) return false;  // int indexing below
  const Index tiles = ((m + kTile - 1) / kTile) * ((n + kTile - 1) / kTile);
  // Enough slices for about two blocks per SM, each slice at least 4 depth steps deep, and all
  // the partials within the workspace.
  const Index workspace_elements = Index(blas_workspace_bytes_ / sizeof(T));
  Index splits = std::max<Index>(1, (2 * sm_count_ + tiles - 1) / tiles);
  splits = std::min(splits, std::max<Index>(1, k / (4 * kDepthStep)));
  splits = std::min(splits, workspace_elements / (m * n));
  if (splits < 2) return false;  // no split: cuBLAS does as well
  const Index per_split = ((k + splits - 1) / splits + kDepthStep - 1) / kDepthStep * kDepthStep;
  splits = (k + per_split - 1) / per_split;

  SkinnyArgs<T> args{A.data(), B.data(), static_cast<T*>(blas_workspace_.ptr), int(m), int(n), int(k),
                     int(A.cols()), int(B.cols()), trans_a == Trans::yes, trans_b == Trans::yes, int(per_split)};
  const dim3 grid(unsigned((m + kTile - 1) / kTile), unsigned((n + kTile - 1) / kTile), unsigned(splits));
  launch_overlapped(&skinny_partial_kernel<T>, grid, dim3(kSkinnyThreads), 0, stream_.stream,
                    "launch of skinny_partial_kernel", args);
  const std::int64_t size = std::int64_t(m) * n;
  launch_overlapped(&skinny_reduce_kernel<T>, dim3(grid_for(size, sm_count_)), dim3(kThreads), 0, stream_.stream,
                    "launch of skinny_reduce_kernel", size, int(splits), static_cast<const T*>(args.partials), alpha,
                    beta, C.data());
  return true;
}

template bool CudaBackend<float>::skinny_gemm(Trans, Trans, float, const Tensor<float>&, const Tensor<float>&, float,
                                              Tensor<float>&);
template bool CudaBackend<double>::skinny_gemm(Trans, Trans, double, const Tensor<double>&, const Tensor<double>&,
                                               double, Tensor<double>&);

}  // namespace relora
