#pragma once
// What a component's CUDA kernels (an optimizer's, a layer's) use of the CUDA backend they run
// on: its device, stream and size, the recording facility for kernels whose parameters change
// between replays, and the non-finite report. Internal to the library; the public Backend
// interface knows nothing of it. CudaBackend<T> implements it beside Backend<T>, so a component
// finds it from the backend it was given with cuda_context(backend).
#include <cuda_runtime.h>

#include "cuda/cuda_nonfinite_report.cuh"
#include "cuda/cuda_recording.cuh"
#include "relora/core/backend.hpp"

namespace relora {
namespace cuda_detail {

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
