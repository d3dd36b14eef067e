#pragma once
// Overlapped launches (programmatic dependent launch, Hopper and newer). A tiny step is a chain
// of kernels that each run for a couple of microseconds, and the gap between two of them (the
// next one's launch, after the previous one has drained) is as long as the kernels themselves.
// A kernel queued with launch_overlapped() may be started while the kernel before it in the
// stream is still running; it must call wait_for_previous_grid() before it reads or writes
// anything the earlier work touches, which returns once that work has completed and its writes
// are visible. A kernel that calls allow_next_grid() lets the next overlapped kernel start
// before it finishes. Stream capture keeps these as programmatic edges of the CUDA graph. On
// older GPUs the launch attribute is ignored and the two calls compile to nothing.
#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/cuda_check.cuh"

namespace relora {
namespace cuda_detail {

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

struct OverlappedLaunch {
  cudaLaunchAttribute attribute{};
  cudaLaunchConfig_t config{};
  OverlappedLaunch(dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream) {
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
};

// kernel<<<grid, block, shared, stream>>>(args...), overlapped with the kernel before it.
template <typename... Params, typename... Args>
void launch_overlapped(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream,
                       const char* name, Args... args) {
  OverlappedLaunch launch(grid, block, shared, stream);
  check_cuda(cudaLaunchKernelEx(&launch.config, kernel, args...), name, __FILE__, __LINE__);
}

// kernel<<<grid, block, shared, stream>>>(args...) with no programmatic edge: for a kernel that
// follows a join of two streams, where the edge would name only one of the work items it waits for.
template <typename... Params, typename... Args>
void launch_plain(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream,
                  const char* name, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  check_cuda(cudaLaunchKernelEx(&config, kernel, args...), name, __FILE__, __LINE__);
}

// The same with the arguments as an array of pointers (cudaLaunchKernel's form).
inline void launch_overlapped(const void* kernel, dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream,
                              void** args, const char* name) {
  OverlappedLaunch launch(grid, block, shared, stream);
  check_cuda(cudaLaunchKernelExC(&launch.config, kernel, args), name, __FILE__, __LINE__);
}

}  // namespace cuda_detail
}  // namespace relora
