// CudaAdapterLoraLinear::forward_with_loss: a model's last layer, when it is wide with a
// small-rank adapter and the MSE follows it: the end of its forward, the loss and the first
// product of its backward as one pass over the rows.
//
// Why: after cuBLAS's X W^T (and U = X A^T beside it, cuda_adapter_lora_linear.cu), the separate
// passes would read and write Y to add b + s U B^T, read Y and the target and write dY for the
// loss, then read dY again for dU = s dY B: three launches, each mostly ramp and drain around
// little traffic, a large share of a step whose one large product is X W^T. One pass reads Y
// and the target once and writes Y and dY once.
//
// Two warps take a row, in alternate groups of columns; the block has all of B in shared memory,
// laid out along d. Per row:
//   y = Y + b + s U B^T (Y holds X W^T), written back: the model's output;
//   dY = (2 / size) (y - target), written; the squared errors added in double;
//   dU = s dY B: each warp's lanes' partial dot products summed by a butterfly of shuffles, the
//   two warps' sums added in shared memory.
// Y and dY are computed as the separate passes compute them (the expand pass's fma chain over j,
// mse_kernel's difference and scale), so they are the same bits either way; dU, summed in two
// halves, and the loss's sum differ from theirs by rounding.
#include <algorithm>

#include "cuda/cuda_backend_impl.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_block_loss.cuh"
#include "cuda/cuda_launch.cuh"
#include "layers/cuda/cuda_adapter_common.cuh"
#include "layers/cuda/cuda_lora_linear.hpp"
#include "relora/losses/mse_loss.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// Two warps share a row, taking alternate 32 x Width column groups, so that an SM has twice the
// warps to switch between: with one warp a row, a thousand rows give an SM about 8 warps and the
// pass is latency-bound.
constexpr int kWarpsPerRow = 2;
constexpr int kOutputRows = 8;  // rows per block
constexpr int kOutputThreads = kOutputRows * kWarpsPerRow * 32;
constexpr int kOutputSteps = 4;  // column groups whose loads of Y (and of the target) a lane issues at once

template <typename T>
struct OutputPass {
  const T* U;
  const T* B;
  const T* bias;  // null: none
  const T* target;
  T* Y;
  T* dY;
  T* dU;
  T* loss;
  Scratch* scratch;
  T scale, grad_scale;
  std::int64_t n;
  int d, r, stride;  // stride: of B's rows in shared memory
};

template <typename T>
__device__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  return reinterpret_cast<T*>(shared_raw);
}

template <typename T, int MaxRank, int Width>
__global__ void __launch_bounds__(kOutputThreads) adapter_output_kernel(const OutputPass<T> a) {
  T* const staged = dynamic_shared<T>();  // staged[j * stride + c] = B[c, j]
  __shared__ T halves[kOutputRows][kWarpsPerRow][MaxRank];  // each warp's share of its row's dU
  wait_for_previous_grid();
  allow_next_grid();
  stage_slice<T, Width>(a.B, 1, a.r, a.r, 0, a.d, a.stride, staged);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int row_in_block = warp / kWarpsPerRow, part = warp % kWarpsPerRow;
  constexpr int kGroup = 32 * Width;  // columns of one group: a 16-byte access per lane
  constexpr int kChunk = kGroup * kWarpsPerRow * kOutputSteps;
  double squares = 0;
  // Every warp of the block goes round the loop equally often (the barrier below needs them all).
  const std::int64_t rounds = (a.n + std::int64_t(gridDim.x) * kOutputRows - 1) / (std::int64_t(gridDim.x) * kOutputRows);
  for (std::int64_t round = 0; round < rounds; ++round) {
    const std::int64_t i = (round * gridDim.x + blockIdx.x) * kOutputRows + row_in_block;
    const bool active = i < a.n;
    const T own = active && lane < a.r ? a.U[i * a.r + lane] : T(0);
    T u[MaxRank], v[MaxRank];
#pragma unroll
    for (int j = 0; j < MaxRank; ++j) {
      u[j] = __shfl_sync(0xffffffffu, own, j);
      v[j] = T(0);
    }
    const std::int64_t row = active ? i : 0;
    T* const y_row = a.Y + row * a.d;
    T* const dy_row = a.dY + row * a.d;
    const T* const target_row = a.target + row * a.d;
    const int end = active ? a.d : 0;
    for (int c0 = 0; c0 < end; c0 += kChunk) {
      Pack<T, Width> y[kOutputSteps], t[kOutputSteps];
      // This warp's groups of the chunk: part, part + kWarpsPerRow, ...
      const auto column = [&](int step) { return c0 + (step * kWarpsPerRow + part) * kGroup + lane * Width; };
#pragma unroll
      for (int step = 0; step < kOutputSteps; ++step) {  // every load of the round before any sum
        const int c = column(step);
        if (c < a.d) {
          y[step] = load_pack<T, Width>(y_row + c);
          t[step] = load_pack<T, Width>(target_row + c);
        }
      }
#pragma unroll
      for (int step = 0; step < kOutputSteps; ++step) {
        const int c = column(step);
        if (c >= a.d) continue;
        T sums[Width];
#pragma unroll
        for (int e = 0; e < Width; ++e) sums[e] = T(0);
#pragma unroll
        for (int j = 0; j < MaxRank; ++j) {
          if (j >= a.r) continue;
          const Pack<T, Width> h = *reinterpret_cast<const Pack<T, Width>*>(staged + j * a.stride + c);
#pragma unroll
          for (int e = 0; e < Width; ++e) sums[e] = fma(u[j], h.v[e], sums[e]);
        }
        Pack<T, Width> bias;
#pragma unroll
        for (int e = 0; e < Width; ++e) bias.v[e] = T(0);
        if (a.bias) bias = load_pack<T, Width>(a.bias + c);
        Pack<T, Width> grad;
#pragma unroll
        for (int e = 0; e < Width; ++e) {
          y[step].v[e] = fma(a.scale, sums[e], y[step].v[e] + bias.v[e]);
          const T diff = y[step].v[e] - t[step].v[e];
          squares += double(diff) * double(diff);
          grad.v[e] = a.grad_scale * diff;
        }
        store_pack(y_row + c, y[step]);
        store_pack(dy_row + c, grad);
#pragma unroll
        for (int j = 0; j < MaxRank; ++j) {
          if (j >= a.r) continue;
          const Pack<T, Width> h = *reinterpret_cast<const Pack<T, Width>*>(staged + j * a.stride + c);
#pragma unroll
          for (int e = 0; e < Width; ++e) v[j] = fma(grad.v[e], h.v[e], v[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < MaxRank; ++j) {
      if (j >= a.r) continue;
      const T total = warp_all_sum(v[j]);
      if (lane == j) halves[row_in_block][part][j] = total;  // lane j stores entry j: no register array indexed by lane
    }
    __syncthreads();
    if (active && part == 0 && lane < a.r) {  // the parts added in a fixed order
      T total = T(0);
#pragma unroll
      for (int p = 0; p < kWarpsPerRow; ++p) total += halves[row_in_block][p][lane];
      a.dU[i * a.r + lane] = a.scale * total;
    }
    __syncthreads();  // halves read before the next round writes them
  }
  finish_mean_loss<T, kOutputThreads>(squares, a.n * std::int64_t(a.d), a.loss, a.scratch);
}

template <typename T, int MaxRank>
void launch_output_pass(const OutputPass<T>& pass, bool vector, unsigned blocks, std::size_t shared,
                        cudaStream_t stream) {
  constexpr int kVector = int(16 / sizeof(T));
  const auto kernel = vector ? &adapter_output_kernel<T, MaxRank, kVector> : &adapter_output_kernel<T, MaxRank, 1>;
  RELORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
  // No programmatic edge: the pass follows the join of the side stream's U (see launch_plain).
  launch_plain(kernel, dim3(blocks), dim3(kOutputThreads), shared, stream, "launch of adapter_output_kernel", pass);
}

}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

template <typename T>
void CudaAdapterLoraLinear<T>::forward_with_loss(const Tensor<T>& X, Loss<T>& loss, const Tensor<T>& target) {
  auto* mse = dynamic_cast<MseLoss<T>*>(&loss);
  const Index n = X.rows(), k = X.cols(), d = this->out_features(), r = this->rank();
  if (mse == nullptr || this->merged() || this->dropout_in_use() || X.cols() != this->in_features() ||
      this->output_activation() != Activation::identity || !adapter_passes_apply(n, k, d, r)) {
    return Layer<T>::forward_with_loss(X, loss, target);
  }
  if (!target.same_shape(n, d)) {
    throw ShapeError("MseLoss: prediction is " + shape_string(n, d) + " but target is " + target.shape());
  }
  CudaContext& be = cuda();
  Tensor<T>& dY = mse->gradient_buffer(target);
  Tensor<T>& value = mse->value_buffer();
  const T* B = this->B_.data();
  const T* b = this->has_bias() ? this->base_.bias().data() : nullptr;
  constexpr int kVector = int(16 / sizeof(T));
  const bool vector = d % kVector == 0 && all_aligned_16(this->Y_.data(), target.data(), dY.data(), B) &&
                      (b == nullptr || all_aligned_16(b));
  const int stride = int(d) + (vector ? kVector : 1);  // rows stay 16-byte aligned; fewer bank conflicts
  const std::size_t shared = std::size_t(r) * std::size_t(stride) * sizeof(T);
  // All of B in shared memory, beside the static arrays (the loss reduction's doubles, the dU halves).
  const std::size_t static_bytes = kOutputThreads * sizeof(double) + sizeof(T) * kOutputRows * kWarpsPerRow * kMaxAdapterRank + 64;
  if (shared + static_bytes > be.shared_optin_bytes()) return Layer<T>::forward_with_loss(X, loss, target);

  this->begin_forward(X);
  be.activate();
  project_beside_product(X);
  const Index rows_per_block = kOutputRows;
  const unsigned blocks = unsigned(std::min<Index>((n + rows_per_block - 1) / rows_per_block, kMaxReduceBlocks));
  OutputPass<T> pass{this->U_.data(), B, b, target.data(), this->Y_.data(), dY.data(), this->dU_.data(),
                     value.data(), be.scratch(), this->scale_, T(2) / T(n * d), n, int(d), int(r), stride};
  if (r <= 8) {
    launch_output_pass<T, 8>(pass, vector, blocks, shared, be.stream());
  } else if (r <= 16) {
    launch_output_pass<T, 16>(pass, vector, blocks, shared, be.stream());
  } else {
    launch_output_pass<T, kMaxAdapterRank>(pass, vector, blocks, shared, be.stream());
  }
  dU_ready_for_ = dY.data();
}

#define RELORA_INSTANTIATE(T) \
  template void CudaAdapterLoraLinear<T>::forward_with_loss(const Tensor<T>&, Loss<T>&, const Tensor<T>&);
RELORA_INSTANTIATE(float)
RELORA_INSTANTIATE(double)
#undef RELORA_INSTANTIATE

}  // namespace relora
