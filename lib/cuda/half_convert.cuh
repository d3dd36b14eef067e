#pragma once
// fp32 <-> bf16 / fp16 conversion of whole buffers on the GPU, for the components that cast
// (a 16-bit base's operands, 16-bit activations): half_precision.hpp's functions, four values a
// thread where the buffers allow 16-byte loads, so that a conversion runs at memory bandwidth.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_resources.cuh"
#include "relora/core/half_precision.hpp"

namespace relora {
namespace cuda_detail {
namespace half_convert {
namespace {  // each file that includes this has its own copy of the kernels

RELORA_HOST_DEVICE std::uint32_t nearest(float x, BasePrecision format) {
  return format == BasePrecision::bf16 ? half_bits::bf16_nearest(x)
                                       : half_bits::round_float(x, format, HalfRounding::nearest, 0.0f);
}

// x as three bf16 terms, hi + mid + lo, each the nearest bf16 to what the terms before it leave
// (the differences are exact in fp32): for a normal x whose last term is not subnormal the three
// hold all of its 24 bits, so that products of the terms with bf16 values are exact in fp32.
__device__ void split_bf16(float x, std::uint16_t (&terms)[3]) {
  float rest = x;
#pragma unroll
  for (int t = 0; t < 3; ++t) {
    terms[t] = half_bits::bf16_nearest(rest);
    rest -= half_bits::bf16_to_float(terms[t]);
  }
}

__global__ void round_quads_kernel(std::int64_t quads, const float4* __restrict__ src, BasePrecision format,
                                          uint2* __restrict__ dst) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < quads;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float4 v = src[i];
    dst[i] = make_uint2(nearest(v.x, format) | nearest(v.y, format) << 16,
                        nearest(v.z, format) | nearest(v.w, format) << 16);  // little-endian pairs
  }
}

__global__ void round_kernel(std::int64_t count, const float* __restrict__ src, BasePrecision format,
                                    std::uint16_t* __restrict__ dst) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    dst[i] = std::uint16_t(nearest(src[i], format));
  }
}

__global__ void widen_quads_kernel(std::int64_t quads, const uint2* __restrict__ src, BasePrecision format,
                                          float4* __restrict__ dst) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < quads;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const uint2 v = src[i];
    dst[i] = make_float4(half_bits::half_to_float(std::uint16_t(v.x & 0xFFFFu), format),
                         half_bits::half_to_float(std::uint16_t(v.x >> 16), format),
                         half_bits::half_to_float(std::uint16_t(v.y & 0xFFFFu), format),
                         half_bits::half_to_float(std::uint16_t(v.y >> 16), format));
  }
}

__global__ void widen_kernel(std::int64_t count, const std::uint16_t* __restrict__ src, BasePrecision format,
                                    float* __restrict__ dst) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    dst[i] = half_bits::half_to_float(src[i], format);
  }
}

bool quad_aligned(const void* fp32, const void* bits16) {
  return reinterpret_cast<std::uintptr_t>(fp32) % 16 == 0 && reinterpret_cast<std::uintptr_t>(bits16) % 8 == 0;
}

// dst = src rounded to nearest (count values), queued on `stream`.
void round_to_nearest(const float* src, std::int64_t count, BasePrecision format, std::uint16_t* dst,
                             cudaStream_t stream, int sm_count) {
  if (count == 0) return;
  const std::int64_t quads = quad_aligned(src, dst) ? count / 4 : 0;
  if (quads > 0) {
    round_quads_kernel<<<grid_for(quads, sm_count), kThreads, 0, stream>>>(
        quads, reinterpret_cast<const float4*>(src), format, reinterpret_cast<uint2*>(dst));
    RELORA_CHECK_LAUNCH("round_quads_kernel");
  }
  const std::int64_t done = 4 * quads;
  if (done == count) return;
  round_kernel<<<grid_for(count - done, sm_count), kThreads, 0, stream>>>(count - done, src + done, format, dst + done);
  RELORA_CHECK_LAUNCH("round_kernel");
}

// dst = src widened (count values, exact), queued on `stream`.
void widen(const std::uint16_t* src, std::int64_t count, BasePrecision format, float* dst, cudaStream_t stream,
                  int sm_count) {
  if (count == 0) return;
  const std::int64_t quads = quad_aligned(dst, src) ? count / 4 : 0;
  if (quads > 0) {
    widen_quads_kernel<<<grid_for(quads, sm_count), kThreads, 0, stream>>>(
        quads, reinterpret_cast<const uint2*>(src), format, reinterpret_cast<float4*>(dst));
    RELORA_CHECK_LAUNCH("widen_quads_kernel");
  }
  const std::int64_t done = 4 * quads;
  if (done == count) return;
  widen_kernel<<<grid_for(count - done, sm_count), kThreads, 0, stream>>>(count - done, src + done, format, dst + done);
  RELORA_CHECK_LAUNCH("widen_kernel");
}

}  // namespace
}  // namespace half_convert
}  // namespace cuda_detail
}  // namespace relora
