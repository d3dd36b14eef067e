#pragma once
// What a component's CUDA kernels (an optimizer's, a layer's) use of the CUDA backend they run
// on: its device, stream and size, the recording facility for kernels whose parameters change
// between replays, and the non-finite report. Internal to the library; the public Backend
// interface knows nothing of it. CudaBackend<T> implements it beside Backend<T>, so a component
// finds it from the backend it was given with cuda_context(backend).
#include <cuda_runtime.h>

#include <cstddef>

#include "cuda/cuda_nonfinite_report.cuh"
#include "cuda/cuda_recording.cuh"
#include "relora/core/backend.hpp"

namespace relora {
namespace cuda_detail {

struct Scratch;  // cuda_backend_impl.cuh

class CudaContext {
 public:
  virtual ~CudaContext() = default;
  // Makes the backend's device current (a user may drive several devices from one thread).
  virtual void activate() const = 0;
  // The stream all of the backend's work is queued on, in order.
  virtual cudaStream_t stream() const = 0;
  virtual int sm_count() const = 0;
  virtual StepRecorder& recorder() = 0;
  virtual NonFiniteReport& nonfinite_report() = 0;
  // Dynamic shared memory a block may have, opted in.
  virtual std::size_t shared_optin_bytes() const = 0;
  // The scratch of the loss reductions (partial sums, the last-block counter), for a kernel that
  // computes a loss as MseLoss does.
  virtual Scratch* scratch() const = 0;
  // Work beside the main stream: fork_side() makes the side stream wait for what the main stream
  // has queued, join_side() makes the main stream wait for what the side stream has queued since.
  // The main stream alone then orders the step, and a capture of it takes the side stream's work
  // into the graph as a parallel branch.
  virtual cudaStream_t side_stream() const = 0;
  virtual void fork_side() = 0;
  virtual void join_side() = 0;
};

// The CUDA context of a backend whose device() is Device::cuda.
template <typename T>
CudaContext& cuda_context(Backend<T>& backend) {
  auto* context = dynamic_cast<CudaContext*>(&backend.underlying());
  if (context == nullptr) {
    throw ConfigError("cuda kernels given a backend that is not relora's CUDA backend: " + backend.description());
  }
  return *context;
}

}  // namespace cuda_detail
}  // namespace relora
