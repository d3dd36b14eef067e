#pragma once
// Adam's CUDA side, shared by its two files: the update (adam_cuda.cu) and the pruning of the
// moments (adam_prune_cuda.cu).
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_resources.cuh"
#include "optimizers/adam_kernels.hpp"

namespace relora {
namespace cuda_detail {

// Scratch of the pruning sort: keys, indices and cub's temporary storage, grown, never shrunk, so
// that a model's restarts allocate at most once per size increase.
struct PruneScratch {
  DeviceMemory memory;
  std::size_t capacity = 0;  // bytes
};

// Zeroes round(fraction * m.size()) entries of m, chosen as AdamKernels::prune says, and the
// same entries of v, on the context's stream.
template <typename T>
void prune_moments(CudaContext& context, PruneScratch& scratch, PruneMode mode, double fraction, RngKey key,
                   Tensor<T>& m, Tensor<T>& v);

}  // namespace cuda_detail
}  // namespace relora
