#pragma once
// What CudaAdapterLoraLinear's passes (cuda_adapter_lora_linear.cu), its MSE output pass
// (cuda_adapter_output.cu) and CudaTinyLoraLinear's kernels (cuda_tiny_lora_linear.cu) share:
// which shapes each takes, and the device helpers that stage A or B in shared memory and sum a
// warp's partial dot products.
#include <limits>

#include "cuda/cuda_pack.cuh"
#include "relora/core/tensor.hpp"

namespace relora {
namespace cuda_detail {

constexpr int kMaxAdapterRank = 32;  // the passes keep up to r sums per lane in registers
constexpr int kStageBatch = 8;       // 16-byte loads a thread issues together when staging
// Up to this many multiply-adds in the rank-sized products, n (k + d) r, the passes beat cuBLAS:
// a layer of n = k = d = 1024, r = 16 (2^25) gains, while layers of 2^27 lose, because there
// cuBLAS's tiles are full (docs/PERFORMANCE.md).
constexpr double kMaxAdapterWork = double(1ll << 26);

// CudaTinyLoraLinear's one-kernel passes (cuda_tiny_lora_linear.cu) take k, d and r up to this.
constexpr int kMaxTinyWidth = 32;
inline bool tiny_layer_widths(Index k, Index d, Index r) {
  const auto fits = [](Index w) { return w >= 1 && w <= kMaxTinyWidth; };
  return fits(k) && fits(d) && fits(r);
}

inline bool adapter_passes_apply(Index n, Index k, Index d, Index r) {
  if (n < 1 || k < 1 || d < 1 || r < 1 || r > kMaxAdapterRank) return false;
  if (k + d > std::numeric_limits<int>::max() / (kMaxAdapterRank + 1)) return false;
  return double(n) * double(k + d) * double(r) <= kMaxAdapterWork;
}

// The sum over the warp's lanes, left in every lane, always added in the same order.
template <typename T>
__device__ __forceinline__ T warp_all_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// staged[j * stride + c] = F(j, first + c) for j < r, c < width, F(j, c) = F[j f_row + c f_col]:
// either r rows of `width` contiguous elements (A, f_col = 1) or `width` contiguous rows of r (B,
// f_row = 1, f_col = r). Read in memory order, Width elements per access, kStageBatch accesses
// issued before any is stored: a load-store loop waits out the memory latency once per element,
// which leaves the pass slower than the cuBLAS products it replaces.
template <typename T, int Width>
__device__ void stage_slice(const T* __restrict__ F, int f_row, int f_col, int r, int first, int width, int stride,
                            T* staged) {
  const bool rows_of_width = f_col == 1;
  const int count = r * width;
  // The flat index e walks F's memory: e = outer * inner_len + inner. Divisions by a run-time
  // length cost tens of instructions each, so a thread divides once and then advances its
  // (outer, inner) position by the fixed step (per element they would be most of the pass's
  // instructions).
  const int inner_len = rows_of_width ? width : r;
  const int step = int(blockDim.x) * Width;
  const int step_outer = step / inner_len, step_inner = step % inner_len;
  const int start = int(threadIdx.x) * Width;
  int outer = start / inner_len, inner = start % inner_len;
  for (int base = start; base < count; base += step * kStageBatch) {
    Pack<T, Width> batch[kStageBatch];
    int batch_outer[kStageBatch], batch_inner[kStageBatch];
#pragma unroll
    for (int b = 0; b < kStageBatch; ++b) {
      batch_outer[b] = outer;
      batch_inner[b] = inner;
      if (base + b * step < count) {
        const T* from = rows_of_width ? F + outer * f_row + first + inner : F + std::int64_t(first) * r + base + b * step;
        batch[b] = load_pack<T, Width>(from);
      }
      inner += step_inner;
      outer += step_outer;
      if (inner >= inner_len) {
        inner -= inner_len;
        ++outer;
      }
    }
#pragma unroll
    for (int b = 0; b < kStageBatch; ++b) {
      if (base + b * step >= count) continue;
      int o = batch_outer[b], i = batch_inner[b];
#pragma unroll
      for (int x = 0; x < Width; ++x) {  // a pack may run past the end of a row of B: wrap
        if (rows_of_width) {
          staged[o * stride + i] = batch[b].v[x];  // A: a pack never straddles a row (width % Width == 0)
        } else {
          staged[i * stride + o] = batch[b].v[x];
        }
        if (++i == inner_len) {
          i = 0;
          ++o;
        }
      }
    }
  }
}

}  // namespace cuda_detail
}  // namespace relora
