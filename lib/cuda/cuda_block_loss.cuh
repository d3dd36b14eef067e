#pragma once
// The last step of a loss kernel (mse_kernel, the fused output layer's pass): each block adds its
// threads' sums, writes that as a partial (in double) and the last block to finish adds the
// partials in block order, so the loss is the same on every run. No floating-point atomics.
#include "cuda/cuda_backend_impl.cuh"

namespace relora {
namespace cuda_detail {

// Sum of one value per thread over the block; every thread must call it, all get the sum.
__device__ inline double block_sum(double value, double* shared) {
  __syncthreads();  // the previous use of `shared` is over
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

// loss = (sum over the grid of every thread's thread_sum) / size. Every thread of the block must
// call it, with blockDim.x == Threads (a power of 2); at most kMaxReduceBlocks blocks.
template <typename T, int Threads = kThreads>
__device__ void finish_mean_loss(double thread_sum, std::int64_t size, T* loss, Scratch* scratch) {
  __shared__ double shared[Threads];
  __shared__ bool last_block;
  const double block_total = block_sum(thread_sum, shared);
  if (gridDim.x == 1) {  // a small batch: no partials, no second round trip through memory
    if (threadIdx.x == 0) *loss = T(block_total / double(size));
    return;
  }
  if (threadIdx.x == 0) {
    scratch->partials[blockIdx.x] = block_total;
    __threadfence();  // the partial is visible before this block counts itself done
    last_block = atomicAdd(&scratch->reduce_blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  const volatile double* partials = scratch->partials;
  double total = 0;
  for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) total += partials[b];
  total = block_sum(total, shared);
  if (threadIdx.x == 0) {
    *loss = T(total / double(size));
    scratch->reduce_blocks_done = 0;  // ready for the next launch
  }
}

}  // namespace cuda_detail
}  // namespace relora
