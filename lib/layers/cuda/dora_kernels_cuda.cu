// DoRA's CUDA kernels, one launch each on the backend's stream: grid-stride loops for the
// element-wise passes, a block per row for the row sums of W, a 32 x 32 block per 32 columns for
// the magnitude's column sums. Sums accumulate in double, as the CPU kernels do. Launch
// parameters never change between steps, so a recorded step replays them as they are.
#include <cstdint>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_resources.cuh"
#include "layers/dora_kernels.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// wsq[i] = ||W_i||^2: one block per row (grid-stride over the rows).
template <typename T>
__global__ void row_squared_norms_kernel(std::int64_t rows, std::int64_t cols, const T* __restrict__ W,
                                         T* __restrict__ wsq) {
  __shared__ double partial[kThreads];
  for (std::int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    double sum = 0;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const double w = double(W[i * cols + j]);
      sum += w * w;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (int(threadIdx.x) < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) wsq[i] = T(partial[0]);
    __syncthreads();  // partial is reused by the next row
  }
}

template <typename T>
__global__ void row_norms_kernel(std::int64_t rows, const T* __restrict__ wsq, T* __restrict__ m) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < rows;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const double sum = double(wsq[i]);
    m[i] = T(sqrt(sum > 0 ? sum : 0.0));
  }
}

// One thread per row: r is small.
template <typename T>
__global__ void norms_kernel(std::int64_t rows, std::int64_t r, const T* __restrict__ wsq, const T* __restrict__ P,
                             const T* __restrict__ B, const T* __restrict__ BG, const T* __restrict__ m, T s, T eps,
                             T* __restrict__ n, T* __restrict__ g) {
  const double s1 = 2 * double(s), s2 = double(s) * double(s);
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < rows;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    double sum = double(wsq[i]);
    for (std::int64_t j = 0; j < r; ++j) {
      sum += double(B[i * r + j]) * (s1 * double(P[i * r + j]) + s2 * double(BG[i * r + j]));
    }
    const T norm = T(sqrt(sum > 0 ? sum : 0.0));
    n[i] = norm;
    g[i] = m[i] / (norm > eps ? norm : eps);
  }
}

template <typename T>
__global__ void scale_columns_add_kernel(std::int64_t size, std::int64_t cols, const T* __restrict__ Z,
                                         const T* __restrict__ g, const T* __restrict__ b, bool accumulate,
                                         T* __restrict__ Y) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t i = e % cols;
    T value = Z[e] * g[i];
    if (b != nullptr) value += b[i];
    Y[e] = accumulate ? Y[e] + value : value;
  }
}

// out may alias X: each element is read before it is written, by the same thread.
template <typename T>
__global__ void scale_columns_kernel(std::int64_t size, std::int64_t cols, const T* X, const T* __restrict__ g,
                                     T shift, T* out) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    out[e] = X[e] * (g[e % cols] + shift);
  }
}

// dm[i] = sum_t dY[t, i] Z[t, i] / max(n[i], eps): 32 columns per block, its 32 rows of threads
// take every 32nd row, so reads are coalesced along the columns.
template <typename T>
__global__ void magnitude_gradient_kernel(std::int64_t rows, std::int64_t cols, const T* __restrict__ dY,
                                          const T* __restrict__ Z, const T* __restrict__ n, T eps,
                                          T* __restrict__ dm) {
  __shared__ double partial[32][33];  // padded against bank conflicts
  const std::int64_t col = std::int64_t(blockIdx.x) * 32 + threadIdx.x;
  double sum = 0;
  if (col < cols) {
    for (std::int64_t t = threadIdx.y; t < rows; t += 32) sum += double(dY[t * cols + col]) * double(Z[t * cols + col]);
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    double total = 0;
    for (int y = 0; y < 32; ++y) total += partial[y][threadIdx.x];
    const T norm = n[col];
    dm[col] = T(total / double(norm > eps ? norm : eps));
  }
}

template <typename T>
__global__ void norm_factors_kernel(std::int64_t size, const T* __restrict__ dm, const T* __restrict__ m,
                                    const T* __restrict__ n, T eps, T* __restrict__ q) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < size;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const T norm = n[i];
    q[i] = norm > eps ? -dm[i] * m[i] / (norm * norm) : T(0);
  }
}

// out may alias M when not accumulating.
template <typename T>
__global__ void scale_rows_kernel(std::int64_t size, std::int64_t cols, const T* __restrict__ q, const T* M,
                                  bool accumulate, T* out) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const T value = q[e / cols] * M[e];
    out[e] = accumulate ? out[e] + value : value;
  }
}

template <typename T>
__global__ void add_norm_gradient_B_kernel(std::int64_t size, std::int64_t cols, const T* __restrict__ q,
                                           const T* __restrict__ P, const T* __restrict__ BG, T s,
                                           T* __restrict__ dB) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    dB[e] += q[e / cols] * (s * P[e] + s * s * BG[e]);
  }
}

template <typename T>
__global__ void difference_kernel(std::int64_t size, const T* __restrict__ a, const T* __restrict__ b,
                                  T* __restrict__ out) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    out[e] = a[e] - b[e];
  }
}

template <typename T>
class CudaDoraKernels final : public DoraKernels<T> {
 public:
  explicit CudaDoraKernels(Backend<T>& backend) : context_(cuda_context(backend)) {}

  void row_squared_norms(const Tensor<T>& W, Tensor<T>& wsq) override {
    if (W.rows() == 0) return;
    context_.activate();
    const unsigned grid = unsigned(W.rows() < 65535 ? W.rows() : 65535);
    row_squared_norms_kernel<T><<<grid, kThreads, 0, context_.stream()>>>(W.rows(), W.cols(), W.data(), wsq.data());
    RELORA_CHECK_LAUNCH("row_squared_norms_kernel");
  }

  void row_norms(const Tensor<T>& wsq, Tensor<T>& m) override {
    context_.activate();
    row_norms_kernel<T><<<grid(wsq.size()), kThreads, 0, context_.stream()>>>(wsq.size(), wsq.data(), m.data());
    RELORA_CHECK_LAUNCH("row_norms_kernel");
  }

  void norms(const Tensor<T>& wsq, const Tensor<T>& P, const Tensor<T>& B, const Tensor<T>& BG, const Tensor<T>& m,
             T s, T eps, Tensor<T>& n, Tensor<T>& g) override {
    context_.activate();
    norms_kernel<T><<<grid(B.rows()), kThreads, 0, context_.stream()>>>(
        B.rows(), B.cols(), wsq.data(), P.data(), B.data(), BG.data(), m.data(), s, eps, n.data(), g.data());
    RELORA_CHECK_LAUNCH("norms_kernel");
  }

  void scale_columns_add(const Tensor<T>& Z, const Tensor<T>& g, const Tensor<T>* b, bool accumulate,
                         Tensor<T>& Y) override {
    context_.activate();
    scale_columns_add_kernel<T><<<grid(Z.size()), kThreads, 0, context_.stream()>>>(
        Z.size(), Z.cols(), Z.data(), g.data(), b ? b->data() : nullptr, accumulate, Y.data());
    RELORA_CHECK_LAUNCH("scale_columns_add_kernel");
  }

  void scale_columns(const Tensor<T>& X, const Tensor<T>& g, T shift, Tensor<T>& out) override {
    context_.activate();
    scale_columns_kernel<T><<<grid(X.size()), kThreads, 0, context_.stream()>>>(X.size(), X.cols(), X.data(),
                                                                                 g.data(), shift, out.data());
    RELORA_CHECK_LAUNCH("scale_columns_kernel");
  }

  void magnitude_gradient(const Tensor<T>& dY, const Tensor<T>& Z, const Tensor<T>& n, T eps,
                          Tensor<T>& dm) override {
    if (dY.cols() == 0) return;
    context_.activate();
    const dim3 block(32, 32);
    const dim3 blocks(unsigned((dY.cols() + 31) / 32));
    magnitude_gradient_kernel<T><<<blocks, block, 0, context_.stream()>>>(dY.rows(), dY.cols(), dY.data(), Z.data(),
                                                                         n.data(), eps, dm.data());
    RELORA_CHECK_LAUNCH("magnitude_gradient_kernel");
  }

  void norm_factors(const Tensor<T>& dm, const Tensor<T>& m, const Tensor<T>& n, T eps, Tensor<T>& q) override {
    context_.activate();
    norm_factors_kernel<T><<<grid(n.size()), kThreads, 0, context_.stream()>>>(n.size(), dm.data(), m.data(),
                                                                               n.data(), eps, q.data());
    RELORA_CHECK_LAUNCH("norm_factors_kernel");
  }

  void scale_rows(const Tensor<T>& q, const Tensor<T>& M, bool accumulate, Tensor<T>& out) override {
    if (M.size() == 0) return;
    context_.activate();
    scale_rows_kernel<T><<<grid(M.size()), kThreads, 0, context_.stream()>>>(M.size(), M.cols(), q.data(), M.data(),
                                                                             accumulate, out.data());
    RELORA_CHECK_LAUNCH("scale_rows_kernel");
  }

  void add_norm_gradient_B(const Tensor<T>& q, const Tensor<T>& P, const Tensor<T>& BG, T s, Tensor<T>& dB) override {
    context_.activate();
    add_norm_gradient_B_kernel<T><<<grid(dB.size()), kThreads, 0, context_.stream()>>>(
        dB.size(), dB.cols(), q.data(), P.data(), BG.data(), s, dB.data());
    RELORA_CHECK_LAUNCH("add_norm_gradient_B_kernel");
  }

  void difference(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) override {
    context_.activate();
    difference_kernel<T><<<grid(a.size()), kThreads, 0, context_.stream()>>>(a.size(), a.data(), b.data(),
                                                                             out.data());
    RELORA_CHECK_LAUNCH("difference_kernel");
  }

 private:
  unsigned grid(std::int64_t n) const { return unsigned(grid_for(n, context_.sm_count())); }

  CudaContext& context_;
};

}  // namespace
}  // namespace cuda_detail

template <typename T>
std::unique_ptr<DoraKernels<T>> make_cuda_dora_kernels(Backend<T>& backend) {
  return std::make_unique<cuda_detail::CudaDoraKernels<T>>(backend);
}

template std::unique_ptr<DoraKernels<float>> make_cuda_dora_kernels(Backend<float>&);
template std::unique_ptr<DoraKernels<double>> make_cuda_dora_kernels(Backend<double>&);

}  // namespace relora
