#pragma once
// Overlapped launches (programmatic dependent launch, Hopper and newer). A tiny step is a chain
// of kernels that each run for a couple of microseconds, and the gap between two of them (the
// next one's launch, after the previous one has drained) is as long as the kernels themselves.
// A kernel queued with launch_overlapped() may be started while the kernel before it in the
// stream is still running; it must call wait_for_previous_grid() before it reads or writes
// anything the earlier work touches, which returns once that work has completed and its writes
// are visible. A kernel that calls allow_next_grid() lets the next overlapped kernel start
// before it finishes. Stream capture keeps these as programmatic edges of the CUDA graph.
// Programmatic dependent launch needs compute capability 9.0: for older GPUs the two calls
// compile to nothing (__CUDA_ARCH__ < 900), and the host leaves the launch attribute out, since
// CUDA documents the feature from 9.0 on and says nothing of the attribute on earlier devices.
#include <cuda_runtime.h>

#include <atomic>
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

// Whether the current device (the one a stream of it launches on) has programmatic dependent
// launch, compute capability 9.0 or newer. Asked of CUDA once per device, then read from here.
inline bool overlapped_launch_supported() {
  constexpr int kDevices = 64;
  static std::atomic<signed char> known[kDevices];  // per device: 0 not asked yet, 1 no, 2 yes
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) return false;
  signed char answer = known[device].load(std::memory_order_relaxed);
  if (answer == 0) {
    int major = 0;
    const bool asked = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess;
    answer = asked && major >= 9 ? 2 : 1;
    known[device].store(answer, std::memory_order_relaxed);
  }
  return answer == 2;
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
    config.numAttrs = overlapped_launch_supported() ? 1 : 0;  // else a plain launch, fully ordered
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
