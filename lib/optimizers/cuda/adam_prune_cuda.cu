// Pruning of Adam's moments on CUDA: zero round(fraction * size) entries, those of smallest
// magnitude or chosen at random. It runs only at ReLoRA restarts, so it may sort: a stable radix
// sort of (key, index) pairs orders the entries exactly as the CPU's comparator does (by key, ties
// by lower index), and the first `count` indices are zeroed in m and v. Launches: 1 (keys) + the
// sort's own + 1 (zero).
#include <cub/device/device_radix_sort.cuh>

#include <cmath>

#include "cuda/cuda_check.cuh"
#include "optimizers/cuda/adam_cuda.cuh"
#include "relora/core/counter_rng.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// For |x| >= 0 the IEEE bit pattern, read as an unsigned integer, orders as the value does.
__device__ inline std::uint64_t magnitude_bits(float x) { return std::uint64_t(__float_as_uint(fabsf(x))); }
__device__ inline std::uint64_t magnitude_bits(double x) { return std::uint64_t(__double_as_longlong(fabs(x))); }

template <typename T>
__global__ void prune_keys_kernel(std::int64_t n, const T* __restrict__ x, bool magnitude, RngKey key,
                                  std::uint64_t* __restrict__ keys, std::int64_t* __restrict__ indices) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    keys[i] = magnitude ? magnitude_bits(x[i]) : random_bits(key, std::uint64_t(i));
    indices[i] = i;
  }
}

template <typename T>
__global__ void prune_zero_kernel(std::int64_t count, const std::int64_t* __restrict__ order, T* __restrict__ m,
                                  T* __restrict__ v) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    m[order[i]] = T(0);
    v[order[i]] = T(0);
  }
}

std::size_t round_up(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

template <typename T>
void prune_moments(CudaContext& context, PruneScratch& scratch, PruneMode mode, double fraction, RngKey key,
                   Tensor<T>& m, Tensor<T>& v) {
  const Index count = static_cast<Index>(std::llround(fraction * double(m.size())));
  if (count == 0) return;
  context.activate();
  cudaStream_t stream = context.stream();
  const std::int64_t n = m.size();
  const bool magnitude = mode == PruneMode::magnitude;
  // Magnitude keys of floats hold 32 bits: sort only those.
  const int end_bit = magnitude && sizeof(T) == 4 ? 32 : 64;

  std::size_t temp_bytes = 0;
  RELORA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, static_cast<const std::uint64_t*>(nullptr),
                                                    static_cast<std::uint64_t*>(nullptr),
                                                    static_cast<const std::int64_t*>(nullptr),
                                                    static_cast<std::int64_t*>(nullptr), n, 0, end_bit, stream));
  const std::size_t array_bytes = round_up(sizeof(std::uint64_t) * std::size_t(n));
  const std::size_t needed = 4 * array_bytes + round_up(temp_bytes);
  if (needed > scratch.capacity) {
    RELORA_CUDA_CHECK(cudaStreamSynchronize(stream));  // the old buffer may still be in use
    RELORA_CUDA_CHECK(cudaFree(scratch.memory.ptr));
    scratch.memory.ptr = nullptr;
    scratch.capacity = 0;
    RELORA_CUDA_CHECK(cudaMalloc(&scratch.memory.ptr, needed));
    scratch.capacity = needed;
  }
  char* base = static_cast<char*>(scratch.memory.ptr);
  auto* keys_in = reinterpret_cast<std::uint64_t*>(base);
  auto* keys_out = reinterpret_cast<std::uint64_t*>(base + array_bytes);
  auto* indices_in = reinterpret_cast<std::int64_t*>(base + 2 * array_bytes);
  auto* indices_out = reinterpret_cast<std::int64_t*>(base + 3 * array_bytes);
  void* temp = base + 4 * array_bytes;

  const int sm_count = context.sm_count();
  prune_keys_kernel<T><<<grid_for(n, sm_count), kThreads, 0, stream>>>(n, m.data(), magnitude, key, keys_in,
                                                                        indices_in);
  RELORA_CHECK_LAUNCH("prune_keys_kernel");
  // Radix sort is stable and the indices start in order, so equal keys keep the lower index first.
  RELORA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, indices_in, indices_out, n,
                                                    0, end_bit, stream));
  prune_zero_kernel<T><<<grid_for(count, sm_count), kThreads, 0, stream>>>(count, indices_out, m.data(), v.data());
  RELORA_CHECK_LAUNCH("prune_zero_kernel");
}

template void prune_moments(CudaContext&, PruneScratch&, PruneMode, double, RngKey, Tensor<float>&, Tensor<float>&);
template void prune_moments(CudaContext&, PruneScratch&, PruneMode, double, RngKey, Tensor<double>&,
                            Tensor<double>&);

}  // namespace cuda_detail
}  // namespace relora
