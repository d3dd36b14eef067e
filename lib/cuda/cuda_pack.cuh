#pragma once
// Vector accesses for the CUDA kernels: Width consecutive elements of T loaded or stored as one
// 16-byte access where Width elements make 16 bytes (float4, double2) and the caller has checked
// the alignment, element by element otherwise.
#include <cuda_runtime.h>

#include <cstdint>

namespace relora {
namespace cuda_detail {

template <typename T, int Width>
struct alignas(Width * sizeof(T) == 16 ? 16 : alignof(T)) Pack {
  T v[Width];
};

template <typename T, int Width>
__device__ __forceinline__ Pack<T, Width> load_pack(const T* p) {
  Pack<T, Width> out;
  if constexpr (Width * sizeof(T) == 16) {
    *reinterpret_cast<float4*>(out.v) = __ldg(reinterpret_cast<const float4*>(p));
  } else {
#pragma unroll
    for (int e = 0; e < Width; ++e) out.v[e] = p[e];
  }
  return out;
}

template <typename T, int Width>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, Width>& in) {
  if constexpr (Width * sizeof(T) == 16) {
    *reinterpret_cast<float4*>(p) = *reinterpret_cast<const float4*>(in.v);
  } else {
#pragma unroll
    for (int e = 0; e < Width; ++e) p[e] = in.v[e];
  }
}

// Whether every pointer given is 16-byte aligned (cudaMalloc's are; views into them may not be).
template <typename... Pointers>
inline bool all_aligned_16(const Pointers*... p) {
  return ((reinterpret_cast<std::uintptr_t>(p) % 16 == 0) && ...);
}

}  // namespace cuda_detail
}  // namespace relora
