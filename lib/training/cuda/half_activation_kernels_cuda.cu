// The GPU's kernels of 16-bit activations: the conversions of half_convert.cuh, and ReLU and its
// derivative on 16-bit values eight at a time (16-byte loads and stores) where the buffers allow,
// and the MSE of a 16-bit prediction.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/cuda_block_loss.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_resources.cuh"
#include "cuda/half_convert.cuh"
#include "relora/core/elementwise_math.hpp"
#include "training/half_activation_kernels.hpp"

namespace relora {
namespace cuda_detail {
namespace {

__device__ std::uint16_t relu_bits(std::uint16_t y, BasePrecision format) {
  return std::uint16_t(half_convert::nearest(activation_value(Activation::relu, half_bits::half_to_float(y, format)), format));
}

__device__ std::uint16_t relu_backward_bits(std::uint16_t y, std::uint16_t dz, BasePrecision format) {
  const float slope = activation_derivative(Activation::relu, half_bits::half_to_float(y, format));
  return std::uint16_t(half_convert::nearest(half_bits::half_to_float(dz, format) * slope, format));
}

// The eight 16-bit values of a uint4, in memory order.
__device__ std::uint16_t lane(const uint4& v, int e) {
  const unsigned int word = e < 2 ? v.x : e < 4 ? v.y : e < 6 ? v.z : v.w;
  return std::uint16_t(e % 2 == 0 ? word & 0xFFFFu : word >> 16);
}

__device__ void set_lane(uint4& v, int e, std::uint16_t h) {
  unsigned int& word = e < 2 ? v.x : e < 4 ? v.y : e < 6 ? v.z : v.w;
  word = e % 2 == 0 ? (word & 0xFFFF0000u) | h : (word & 0xFFFFu) | (unsigned(h) << 16);
}

__global__ void relu_octets_kernel(std::int64_t octets, uint4* __restrict__ y, BasePrecision format) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < octets;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    uint4 v = y[i];
#pragma unroll
    for (int e = 0; e < 8; ++e) set_lane(v, e, relu_bits(lane(v, e), format));
    y[i] = v;
  }
}

__global__ void relu_kernel(std::int64_t count, std::uint16_t* __restrict__ y, BasePrecision format) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    y[i] = relu_bits(y[i], format);
  }
}

// dy may alias dz: each element is read before it is written, by the same thread.
__global__ void relu_backward_octets_kernel(std::int64_t octets, const uint4* y, const uint4* dz, BasePrecision format,
                                            uint4* dy) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < octets;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const uint4 yv = y[i];
    uint4 g = dz[i];
#pragma unroll
    for (int e = 0; e < 8; ++e) set_lane(g, e, relu_backward_bits(lane(yv, e), lane(g, e), format));
    dy[i] = g;
  }
}

__global__ void relu_backward_kernel(std::int64_t count, const std::uint16_t* y, const std::uint16_t* dz,
                                     BasePrecision format, std::uint16_t* dy) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    dy[i] = relu_backward_bits(y[i], dz[i], format);
  }
}

// The MSE of a 16-bit prediction in one launch, as the backend's mse_kernel: each thread's squared
// differences summed in double, the blocks' partials added in block order by the last block
// (cuda_block_loss.cuh). Eight values a thread per access where y, target and dy are 16-byte
// aligned; the tail element by element.
__global__ void mse_kernel(std::int64_t count, bool octets, const std::uint16_t* __restrict__ y,
                           const float* __restrict__ target, BasePrecision format, std::uint16_t* __restrict__ dy,
                           float* __restrict__ loss, Scratch* scratch) {
  const float grad_scale = 2.0f / float(count);
  double sum = 0;
  const std::int64_t first = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  std::int64_t done = 0;
  if (octets) {
    const std::int64_t packs = count / 8;
    for (std::int64_t p = first; p < packs; p += stride) {
      const uint4 yv = reinterpret_cast<const uint4*>(y)[p];
      const float4 low = __ldg(reinterpret_cast<const float4*>(target) + 2 * p);
      const float4 high = __ldg(reinterpret_cast<const float4*>(target) + 2 * p + 1);
      const float t[8] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
      uint4 grad;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float diff = half_bits::half_to_float(lane(yv, e), format) - t[e];
        sum += double(diff) * double(diff);
        set_lane(grad, e, std::uint16_t(half_convert::nearest(grad_scale * diff, format)));
      }
      reinterpret_cast<uint4*>(dy)[p] = grad;
    }
    done = 8 * packs;
  }
  for (std::int64_t i = done + first; i < count; i += stride) {
    const float diff = half_bits::half_to_float(y[i], format) - target[i];
    sum += double(diff) * double(diff);
    dy[i] = std::uint16_t(half_convert::nearest(grad_scale * diff, format));
  }
  finish_mean_loss(sum, count, loss, scratch);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

class CudaHalfActivationKernels final : public HalfActivationKernels {
 public:
  explicit CudaHalfActivationKernels(Backend<float>& backend) : context_(&cuda_context(backend)) {}

  void round(const float* src, Index count, BasePrecision format, std::uint16_t* dst) override {
    context_->activate();
    half_convert::round_to_nearest(src, count, format, dst, context_->stream(), context_->sm_count());
  }

  void widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) override {
    context_->activate();
    half_convert::widen(src, count, format, dst, context_->stream(), context_->sm_count());
  }

  void relu(std::uint16_t* y, Index count, BasePrecision format) override {
    if (count == 0) return;
    context_->activate();
    const Index octets = aligned16(y) ? count / 8 : 0;
    if (octets > 0) {
      relu_octets_kernel<<<grid(octets), kThreads, 0, context_->stream()>>>(octets, reinterpret_cast<uint4*>(y), format);
      RELORA_CHECK_LAUNCH("relu_octets_kernel");
    }
    const Index done = 8 * octets;
    if (done == count) return;
    relu_kernel<<<grid(count - done), kThreads, 0, context_->stream()>>>(count - done, y + done, format);
    RELORA_CHECK_LAUNCH("relu_kernel");
  }

  void relu_backward(const std::uint16_t* y, const std::uint16_t* dz, Index count, BasePrecision format,
                     std::uint16_t* dy) override {
    if (count == 0) return;
    context_->activate();
    const Index octets = aligned16(y) && aligned16(dz) && aligned16(dy) ? count / 8 : 0;
    if (octets > 0) {
      relu_backward_octets_kernel<<<grid(octets), kThreads, 0, context_->stream()>>>(
          octets, reinterpret_cast<const uint4*>(y), reinterpret_cast<const uint4*>(dz), format,
          reinterpret_cast<uint4*>(dy));
      RELORA_CHECK_LAUNCH("relu_backward_octets_kernel");
    }
    const Index done = 8 * octets;
    if (done == count) return;
    relu_backward_kernel<<<grid(count - done), kThreads, 0, context_->stream()>>>(count - done, y + done, dz + done,
                                                                                   format, dy + done);
    RELORA_CHECK_LAUNCH("relu_backward_kernel");
  }

  void mse(const std::uint16_t* y, const float* target, Index count, BasePrecision format, std::uint16_t* dy,
           float* loss) override {
    if (count < 1) throw ShapeError("16-bit mse: an empty prediction");
    context_->activate();
    // One block up to kOneBlockLoss values (the loss without the last-block hand-over), as the
    // backend's mse; more blocks beyond.
    constexpr Index kOneBlockLoss = 8 * kThreads;
    const bool octets = aligned16(y) && aligned16(target) && aligned16(dy);
    const Index accesses = octets ? count / 8 : count;
    const int blocks = count <= kOneBlockLoss ? 1 : std::min(grid(accesses), kMaxReduceBlocks);
    mse_kernel<<<blocks, kThreads, 0, context_->stream()>>>(count, octets, y, target, format, dy, loss,
                                                            context_->scratch());
    RELORA_CHECK_LAUNCH("16-bit mse_kernel");
  }

 private:
  int grid(Index n) const { return grid_for(n, context_->sm_count()); }

  CudaContext* context_;
};

}  // namespace
}  // namespace cuda_detail

std::unique_ptr<HalfActivationKernels> make_cuda_half_activation_kernels(Backend<float>& backend) {
  return std::make_unique<cuda_detail::CudaHalfActivationKernels>(backend);
}

}  // namespace relora
