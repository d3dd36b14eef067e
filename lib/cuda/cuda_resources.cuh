#pragma once
// Owners of raw CUDA resources (device and pinned memory, streams, events, graphs, a cuBLAS
// handle), so that a constructor that throws half-way leaks nothing, and the launch geometry of
// grid-stride loops. Shared by the CUDA backend and the components' CUDA kernels.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_check.cuh"

namespace relora {
namespace cuda_detail {

constexpr int kThreads = 256;  // threads per block of the element-wise kernels

// Blocks for a grid-stride loop over n elements: enough to fill the device, never more than needed.
inline int grid_for(std::int64_t n, int sm_count, int blocks_per_sm = 8) {
  const std::int64_t needed = (n + kThreads - 1) / kThreads;
  const std::int64_t cap = std::int64_t(sm_count) * blocks_per_sm;
  return int(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

struct DeviceMemory {
  void* ptr = nullptr;
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    if (ptr) (void)cudaFree(ptr);
  }
};

struct PinnedMemory {
  void* ptr = nullptr;
  PinnedMemory() = default;
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;
  ~PinnedMemory() {
    if (ptr) (void)cudaFreeHost(ptr);
  }
};

struct Stream {
  cudaStream_t stream = nullptr;
  Stream() = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (stream) {
      (void)cudaStreamSynchronize(stream);
      (void)cudaStreamDestroy(stream);
    }
  }
};

struct Event {
  cudaEvent_t event = nullptr;
  Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (event) (void)cudaEventDestroy(event);
  }
};

struct Graph {
  cudaGraph_t graph = nullptr;
  Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() { reset(); }
  void reset(cudaGraph_t g = nullptr) {
    if (graph) (void)cudaGraphDestroy(graph);
    graph = g;
  }
};

// An instantiated graph. Destroying one still in flight is allowed: CUDA frees it on completion.
struct GraphExec {
  cudaGraphExec_t exec = nullptr;
  GraphExec() = default;
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  ~GraphExec() { reset(); }
  void reset(cudaGraphExec_t e = nullptr) {
    if (exec) (void)cudaGraphExecDestroy(exec);
    exec = e;
  }
};

struct BlasHandle {
  cublasHandle_t handle = nullptr;
  BlasHandle() = default;
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
  ~BlasHandle() {
    if (handle) (void)cublasDestroy(handle);
  }
};

// A cuBLAS handle on `stream` with a workspace of its own (`bytes`), set after the stream (which
// resets it): cuBLAS then allocates nothing itself, not even while a step is captured into a graph.
// The workspace is zeroed once, for compute-sanitizer's initcheck: a split-K product's partial
// sums reach it through stores the tool does not see (cuda_sanitizer_marks.cuh), and the reduce
// kernel's reads of them would be reported as reads of memory never written. The zeroing goes on
// `stream` itself: a non-blocking stream is not ordered after the legacy default stream, so a
// cudaMemset there could still be writing while cuBLAS's first product used the workspace.
inline void create_blas_on_stream(cudaStream_t stream, std::size_t bytes, BlasHandle& blas, DeviceMemory& workspace) {
  RELORA_CUBLAS_CHECK(cublasCreate(&blas.handle));
  RELORA_CUBLAS_CHECK(cublasSetStream(blas.handle, stream));
  RELORA_CUDA_CHECK(cudaMalloc(&workspace.ptr, bytes));
  RELORA_CUDA_CHECK(cudaMemsetAsync(workspace.ptr, 0, bytes, stream));
  RELORA_CUBLAS_CHECK(cublasSetWorkspace(blas.handle, workspace.ptr, bytes));
}

}  // namespace cuda_detail
}  // namespace relora
