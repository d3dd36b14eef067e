// Element-wise kernels, column sums, MSE and the random fills of the CUDA backend. Each operation
// is one launch; the formulas come from relora/core/elementwise_math.hpp and relora/core/counter_rng.hpp,
// shared with the CPU backend.
#include <math_constants.h>
#include "cuda/cuda_backend_impl.cuh"
#include "cuda/cuda_block_loss.cuh"
#include "cuda/cuda_launch.cuh"
#include "cuda/cuda_pack.cuh"
#include "relora/core/counter_rng.hpp"
#include "relora/core/elementwise_math.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// One grid-stride loop over n elements, calling op(i): every element-wise operation is one of these.
template <typename Op>
__global__ void map_kernel(std::int64_t n, Op op) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    op(i);
  }
}

template <typename T>
struct AddRowVector {
  const T* b;
  T* y;
  std::int64_t cols;
  __device__ void operator()(std::int64_t i) const { y[i] += b[i % cols]; }
};

template <typename T>
struct Multiply {
  const T* a;
  const T* b;
  T* out;
  __device__ void operator()(std::int64_t i) const { out[i] = a[i] * b[i]; }
};

template <typename T>
struct ActivationForward {
  Activation f;
  const T* y;
  T* z;
  __device__ void operator()(std::int64_t i) const { z[i] = activation_value(f, y[i]); }
};

// dy may alias dz: each element is read before it is written, by the same thread.
template <typename T>
struct ActivationBackward {
  Activation f;
  const T* y;
  const T* dz;
  T* dy;
  __device__ void operator()(std::int64_t i) const { dy[i] = dz[i] * activation_derivative(f, y[i]); }
};

template <typename T>
struct Fill {
  T* x;
  T value;
  __device__ void operator()(std::int64_t i) const { x[i] = value; }
};

template <typename T>
struct RandomUniform {
  RngKey key;
  T low;
  T high;
  T* x;
  __device__ void operator()(std::int64_t i) const {
    x[i] = low + (high - low) * T(uniform01(key, std::uint64_t(i)));
  }
};

template <typename T>
struct RandomNormal {
  RngKey key;
  T mean;
  T stddev;
  T* x;
  __device__ void operator()(std::int64_t i) const {
    x[i] = mean + stddev * T(standard_normal(key, std::uint64_t(i)));
  }
};

template <typename T>
struct DropoutMask {
  RngKey key;
  double p;
  T keep_scale;
  T* mask;
  __device__ void operator()(std::int64_t i) const { mask[i] = uniform01(key, std::uint64_t(i)) < p ? T(0) : keep_scale; }
};

// db[j] = beta db[j] + sum_i dY[i, j]. A 32 x 32 block takes 32 columns; its 32 rows of threads
// take every 32nd row, so reads are coalesced along the columns. Sums accumulate in double.
template <typename T>
__global__ void column_sums_kernel(std::int64_t rows, std::int64_t cols, const T* __restrict__ dY, T beta,
                                   T* __restrict__ db) {
  __shared__ double partial[32][33];  // padded against bank conflicts
  const std::int64_t col = std::int64_t(blockIdx.x) * 32 + threadIdx.x;
  double sum = 0;
  if (col < cols) {
    for (std::int64_t r = threadIdx.y; r < rows; r += 32) sum += double(dY[r * cols + col]);
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    double total = 0;
    for (int y = 0; y < 32; ++y) total += partial[y][threadIdx.x];
    db[col] = beta == T(0) ? T(total) : beta * db[col] + T(total);
  }
}

// The largest |x_i|, +Inf for any NaN or Inf, in two launches: each block of the first writes
// the largest of its grid-stride share to scratch->partials[block]; one block of the second
// combines them into partials[0]. Merges and GaLore's pre-SVD check read whole weights with it,
// so it runs on every SM: one block alone would read a weight at a single SM's bandwidth.
__device__ inline double block_largest(double largest, double* block_max) {
  block_max[threadIdx.x] = largest;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) block_max[threadIdx.x] = fmax(block_max[threadIdx.x], block_max[threadIdx.x + half]);
    __syncthreads();
  }
  return block_max[0];
}

template <typename T>
__global__ void max_abs_partial_kernel(std::int64_t n, const T* __restrict__ x, Scratch* scratch) {
  __shared__ double block_max[kThreads];
  double largest = 0;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const double a = fabs(double(x[i]));
    if (!(a <= largest)) largest = isfinite(a) ? a : CUDART_INF;  // NaN fails <=
  }
  const double block = block_largest(largest, block_max);
  if (threadIdx.x == 0) scratch->partials[blockIdx.x] = block;
}

__global__ void max_abs_combine_kernel(int blocks, Scratch* scratch) {
  __shared__ double block_max[kThreads];
  double largest = 0;
  for (int i = threadIdx.x; i < blocks; i += blockDim.x) largest = fmax(largest, scratch->partials[i]);
  const double all = block_largest(largest, block_max);  // every read of partials is done
  if (threadIdx.x == 0) scratch->partials[0] = all;
}

// MSE value and gradient in one launch: each block writes its part of dY and a partial sum (in
// double); the last block to finish adds the partials in a fixed order, so the loss is the same
// on every run.
template <typename T>
__global__ void mse_kernel(std::int64_t n, bool vector, const T* __restrict__ y, const T* __restrict__ target,
                           T* __restrict__ dy, T* __restrict__ loss, Scratch* scratch) {
  wait_for_previous_grid();
  allow_next_grid();
  const T grad_scale = T(2) / T(n);
  double sum = 0;
  const std::int64_t first = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  // 16 bytes per access where the three tensors allow it (a thread's packs in flight together
  // are what keeps a bandwidth-bound pass near the memory's rate); the tail element by element.
  constexpr int kWidth = int(16 / sizeof(T));
  std::int64_t done = 0;
  if (vector) {
    const std::int64_t packs = n / kWidth;
    for (std::int64_t p = first; p < packs; p += stride) {
      const Pack<T, kWidth> yp = load_pack<T, kWidth>(y + p * kWidth);
      const Pack<T, kWidth> tp = load_pack<T, kWidth>(target + p * kWidth);
      Pack<T, kWidth> out;
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        const T diff = yp.v[e] - tp.v[e];
        sum += double(diff) * double(diff);
        out.v[e] = grad_scale * diff;
      }
      store_pack(dy + p * kWidth, out);
    }
    done = packs * kWidth;
  }
  for (std::int64_t i = done + first; i < n; i += stride) {
    const T diff = y[i] - target[i];
    sum += double(diff) * double(diff);
    dy[i] = grad_scale * diff;
  }
  finish_mean_loss(sum, n, loss, scratch);
}

template <typename T>
void require_same_shape(const Tensor<T>& a, const Tensor<T>& b, const char* op) {
  if (!a.same_shape(b.rows(), b.cols())) {
    throw ShapeError(std::string(op) + ": operands differ in shape, " + a.shape() + " vs " + b.shape());
  }
}

template <typename Op>
void launch_map(std::int64_t n, int sm_count, cudaStream_t stream, const Op& op, const char* name) {
  if (n == 0) return;
  map_kernel<Op><<<grid_for(n, sm_count), kThreads, 0, stream>>>(n, op);
  check_cuda(cudaGetLastError(), name, __FILE__, __LINE__);
}

}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

template <typename T>
void CudaBackend<T>::fill(Tensor<T>& x, T value) {
  activate();
  launch_map(x.size(), sm_count_, stream_.stream, Fill<T>{x.data(), value}, "launch of fill");
}

template <typename T>
void CudaBackend<T>::add_row_vector(const Tensor<T>& b, Tensor<T>& Y) {
  if (b.size() != Y.cols()) {
    throw ShapeError("add_row_vector: bias " + b.shape() + " does not match " + Y.shape() + " columns");
  }
  activate();
  launch_map(Y.size(), sm_count_, stream_.stream, AddRowVector<T>{b.data(), Y.data(), Y.cols()},
             "launch of add_row_vector");
}

template <typename T>
void CudaBackend<T>::column_sums(const Tensor<T>& dY, T beta, Tensor<T>& db) {
  if (db.size() != dY.cols()) {
    throw ShapeError("column_sums: output " + db.shape() + " does not match " + dY.shape() + " columns");
  }
  if (dY.cols() == 0) return;
  activate();
  const dim3 block(32, 32);
  const dim3 grid(unsigned((dY.cols() + 31) / 32));
  column_sums_kernel<T><<<grid, block, 0, stream_.stream>>>(dY.rows(), dY.cols(), dY.data(), beta, db.data());
  RELORA_CHECK_LAUNCH("column_sums_kernel");
}

template <typename T>
void CudaBackend<T>::multiply(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) {
  require_same_shape(a, b, "multiply");
  require_same_shape(a, out, "multiply");
  activate();
  launch_map(a.size(), sm_count_, stream_.stream, Multiply<T>{a.data(), b.data(), out.data()}, "launch of multiply");
}

template <typename T>
void CudaBackend<T>::activation_forward(Activation f, const Tensor<T>& Y, Tensor<T>& Z) {
  require_same_shape(Y, Z, "activation_forward");
  activate();
  launch_map(Y.size(), sm_count_, stream_.stream, ActivationForward<T>{f, Y.data(), Z.data()},
             "launch of activation_forward");
}

template <typename T>
void CudaBackend<T>::activation_backward(Activation f, const Tensor<T>& Y, const Tensor<T>& dZ, Tensor<T>& dY) {
  require_same_shape(Y, dZ, "activation_backward");
  require_same_shape(Y, dY, "activation_backward");
  activate();
  launch_map(Y.size(), sm_count_, stream_.stream, ActivationBackward<T>{f, Y.data(), dZ.data(), dY.data()},
             "launch of activation_backward");
}

template <typename T>
void CudaBackend<T>::mse(const Tensor<T>& Y, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) {
  require_same_shape(Y, target, "mse (prediction vs target)");
  require_same_shape(Y, dY, "mse (prediction vs gradient)");
  require_shape(loss, 1, 1, "mse loss");
  activate();
  // One block up to kOneBlockLoss elements (a few loads per thread, and the loss without the
  // last-block hand-over); more blocks beyond.
  constexpr std::int64_t kOneBlockLoss = 8 * kThreads;
  const bool vector = all_aligned_16(Y.data(), target.data(), dY.data());
  const std::int64_t accesses = vector ? Y.size() / (16 / sizeof(T)) : Y.size();
  const int grid = Y.size() <= kOneBlockLoss ? 1 : std::min(grid_for(accesses, sm_count_), kMaxReduceBlocks);
  launch_overlapped(&mse_kernel<T>, dim3(grid), dim3(kThreads), 0, stream_.stream, "launch of mse_kernel",
                    std::int64_t(Y.size()), vector, Y.data(), target.data(), dY.data(), loss.data(), scratch());
}

template <typename T>
T CudaBackend<T>::max_abs(const Tensor<T>& x) {
  if (x.empty()) return T(0);
  activate();
  const int blocks = std::min(grid_for(x.size(), sm_count_), kMaxReduceBlocks);
  max_abs_partial_kernel<T><<<blocks, kThreads, 0, stream_.stream>>>(std::int64_t(x.size()), x.data(), scratch());
  RELORA_CUDA_CHECK(cudaGetLastError());
  max_abs_combine_kernel<<<1, kThreads, 0, stream_.stream>>>(blocks, scratch());
  RELORA_CUDA_CHECK(cudaGetLastError());
  double largest = 0;
  wait_before_pageable_copy();
  RELORA_CUDA_CHECK(cudaMemcpyAsync(&largest, &scratch()->partials[0], sizeof(double), cudaMemcpyDeviceToHost,
                                    stream_.stream));
  wait_for_stream();
  return T(largest);
}

template <typename T>
void CudaBackend<T>::random_uniform(RngKey key, T low, T high, Tensor<T>& x) {
  activate();
  launch_map(x.size(), sm_count_, stream_.stream, RandomUniform<T>{key, low, high, x.data()},
             "launch of random_uniform");
}

template <typename T>
void CudaBackend<T>::random_normal(RngKey key, T mean, T stddev, Tensor<T>& x) {
  activate();
  launch_map(x.size(), sm_count_, stream_.stream, RandomNormal<T>{key, mean, stddev, x.data()},
             "launch of random_normal");
}

template <typename T>
void CudaBackend<T>::dropout_mask(RngKey key, T p, Tensor<T>& mask) {
  activate();
  const T keep_scale = T(1) / (T(1) - p);  // computed here, in T, exactly as the CPU does
  launch_map(mask.size(), sm_count_, stream_.stream, DropoutMask<T>{key, double(p), keep_scale, mask.data()},
             "launch of dropout_mask");
}

// The class itself is instantiated in cuda_backend.cu; these are the members defined here.
#define RELORA_INSTANTIATE(T)                                                                           \
  template void CudaBackend<T>::fill(Tensor<T>&, T);                                                   \
  template void CudaBackend<T>::add_row_vector(const Tensor<T>&, Tensor<T>&);                          \
  template void CudaBackend<T>::column_sums(const Tensor<T>&, T, Tensor<T>&);                          \
  template void CudaBackend<T>::multiply(const Tensor<T>&, const Tensor<T>&, Tensor<T>&);              \
  template void CudaBackend<T>::activation_forward(Activation, const Tensor<T>&, Tensor<T>&);          \
  template void CudaBackend<T>::activation_backward(Activation, const Tensor<T>&, const Tensor<T>&,    \
                                                    Tensor<T>&);                                       \
  template void CudaBackend<T>::mse(const Tensor<T>&, const Tensor<T>&, Tensor<T>&, Tensor<T>&);       \
  template T CudaBackend<T>::max_abs(const Tensor<T>&);                                                \
  template void CudaBackend<T>::random_uniform(RngKey, T, T, Tensor<T>&);                              \
  template void CudaBackend<T>::random_normal(RngKey, T, T, Tensor<T>&);                               \
  template void CudaBackend<T>::dropout_mask(RngKey, T, Tensor<T>&);
RELORA_INSTANTIATE(float)
RELORA_INSTANTIATE(double)
#undef RELORA_INSTANTIATE

}  // namespace relora
