// CudaTinyLoraLinear: a tiny LoRA layer's forward, and its backward, as one kernel each on the
// CUDA backend. n rows, k = in, d = out, r = rank, s = scale; X n x k, W d x k, A r x k, B d x r,
// b 1 x d.
//
// Why: at tiny widths (n = 200, k = 10, d = 5, r = 4, say) every product is a few thousand
// multiply-adds and a step is launch-bound: each node of a CUDA graph costs its launch and drain
// however little it computes. Two kernels replace the eight products, the bias add and the
// column sums; the step becomes forward, MSE, backward, Adam. Their multiply-adds run on CUDA
// cores in T with fma (strict precision in either math mode), on operands in shared memory.
//
// Forward: a grid over tiles of kForwardRows rows. Each block stages W, A, B, b and its rows of
// X, computes its rows of U (kept in shared memory for the next phase), then its rows of Y.
//
// Backward: one block. dA, dB and db are sums over all n rows and must come out the same on
// every run (a graph replay is compared with eager steps, a resumed checkpoint with the
// uninterrupted run, bit for bit), so no floating-point atomics; blocks could still split the
// rows and let the last one add their partials (as mse_kernel does), but at the sizes admitted
// here one block costs less than that scratch and fence. It walks the rows a tile at a time:
// per tile it stages dY, X and U, computes the tile's dU (and dX) row by row, and every
// reduction output has `slices` threads, each adding a fixed subset of the rows in row order; at
// the end each output adds its slices' partial sums in slice order. Every order depends on the
// shapes only.
#include <algorithm>
#include <limits>

#include "cuda/cuda_backend_impl.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_launch.cuh"
#include "layers/cuda/cuda_adapter_common.cuh"
#include "layers/cuda/cuda_lora_linear.hpp"

namespace relora {
namespace cuda_detail {
namespace {

constexpr int kMaxWidth = kMaxTinyWidth;    // k, d and r: W, A and B then fit in shared memory
constexpr int kForwardRows = 32;            // rows per forward block: at most 1024 elements of Y
constexpr int kBackwardThreads = 1024;      // the one backward block
constexpr int kSharedBytes = 48 * 1024;     // dynamic shared memory available without an opt-in
// Multiply-adds of one backward pass, n (2 d r + 2 r k + d k + d), up to which the single block
// is still faster than the separate products. Operands come from shared memory, so an SM does
// about 16 float (8 double) multiply-adds per clock here: 2^18 of them take less time than the
// five launches the pass replaces cost as graph nodes (more when queued eagerly). Beyond it the
// other SMs are worth their launches.
constexpr double kMaxBackwardWork = double(1 << 18);
// Reduction outputs: dB (d r), dA (r k), db (d); each thread owns at most this many (slices of) them.
constexpr int kMaxOutputs = 2 * kMaxWidth * kMaxWidth + kMaxWidth;
constexpr int kMaxUnits = (kMaxOutputs + kBackwardThreads - 1) / kBackwardThreads;

// Row strides of the shared-memory copies: odd, so that threads reading down a column (the same
// element of consecutive rows) hit distinct banks.
__host__ __device__ inline int padded(int width) { return width | 1; }

template <typename T>
__device__ T* shared_memory() {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  return reinterpret_cast<T*>(shared_raw);
}

// Copies rows x cols row-major elements from global memory into shared memory of row stride `stride`.
template <typename T>
__device__ void stage(const T* __restrict__ from, int rows, int cols, int stride, T* to) {
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) to[e / cols * stride + e % cols] = from[e];
}

template <typename T>
struct ForwardArgs {
  const T* X;
  const T* W;
  const T* A;
  const T* B;
  const T* b;  // null: no bias
  T* U;
  T* Y;
  T scale;
  std::int64_t n;
  int k, d, r;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_lora_forward_kernel(const ForwardArgs<T> a) {
  wait_for_previous_grid();
  allow_next_grid();
  const int k = a.k, d = a.d, r = a.r;
  const int kp = padded(k), rp = padded(r);
  T* const W = shared_memory<T>();
  T* const A = W + d * kp;
  T* const B = A + r * kp;
  T* const b = B + d * rp;
  T* const X = b + d;                 // kForwardRows x k
  T* const U = X + kForwardRows * kp;  // kForwardRows x r

  const std::int64_t first = std::int64_t(blockIdx.x) * kForwardRows;
  const int rows = int(a.n - first < kForwardRows ? a.n - first : kForwardRows);
  stage(a.W, d, k, kp, W);
  stage(a.A, r, k, kp, A);
  stage(a.B, d, r, rp, B);
  for (int c = threadIdx.x; c < d; c += blockDim.x) b[c] = a.b ? a.b[c] : T(0);
  stage(a.X + first * k, rows, k, kp, X);
  __syncthreads();

  for (int e = threadIdx.x; e < rows * r; e += blockDim.x) {
    const int i = e / r, j = e % r;
    T u = T(0);
    for (int p = 0; p < k; ++p) u = fma(X[i * kp + p], A[j * kp + p], u);
    U[i * rp + j] = u;
    a.U[first * r + e] = u;
  }
  __syncthreads();

  for (int e = threadIdx.x; e < rows * d; e += blockDim.x) {
    const int i = e / d, c = e % d;
    T y = b[c];
    for (int p = 0; p < k; ++p) y = fma(X[i * kp + p], W[c * kp + p], y);
    T lora = T(0);
    for (int j = 0; j < r; ++j) lora = fma(U[i * rp + j], B[c * rp + j], lora);
    a.Y[first * d + e] = fma(a.scale, lora, y);
  }
}

template <typename T>
struct BackwardArgs {
  const T* X;
  const T* W;
  const T* A;
  const T* B;
  const T* U;
  const T* dY;
  T* dU;
  T* dA;
  T* dB;
  T* db;  // null: not requested
  T* dX;  // null: not requested
  T scale;
  int n, k, d, r;
  int tile_rows;  // rows staged at a time
  int slices;     // threads per reduction output
};

// One reduction output as a sum over rows i of shared[a + i a_stride] * shared[b + i b_stride],
// offsets into the block's shared memory. db multiplies by a shared 1 of stride 0 (exact), so
// that all outputs run the same loop.
struct Reduction {
  int a, a_stride, b, b_stride;
};

template <typename T>
__global__ void __launch_bounds__(kBackwardThreads) fused_lora_backward_kernel(const BackwardArgs<T> a) {
  wait_for_previous_grid();
  allow_next_grid();
  const int n = a.n, k = a.k, d = a.d, r = a.r;
  const int kp = padded(k), dp = padded(d), rp = padded(r);
  T* const shared = shared_memory<T>();
  T* const W = shared;
  T* const A = W + d * kp;
  T* const B = A + r * kp;
  T* const one = B + d * rp;
  T* const dY = one + 1;              // tile_rows x d
  T* const X = dY + a.tile_rows * dp;  // tile_rows x k
  T* const U = X + a.tile_rows * kp;   // tile_rows x r
  T* const dU = U + a.tile_rows * rp;  // tile_rows x r
  T* const partial = dY;              // slices x outputs, once the last tile is done

  stage(a.W, d, k, kp, W);
  stage(a.A, r, k, kp, A);
  stage(a.B, d, r, rp, B);
  if (threadIdx.x == 0) *one = T(1);

  // This thread's reductions: unit u is output u % outputs (dB, then dA, then db, each
  // row-major), over the rows of slice u / outputs.
  const int outputs = d * r + r * k + (a.db ? d : 0);
  const int units = outputs * a.slices;
  Reduction sum[kMaxUnits];
  int slice[kMaxUnits];
  T acc[kMaxUnits];
#pragma unroll
  for (int m = 0; m < kMaxUnits; ++m) {
    const int u = threadIdx.x + m * kBackwardThreads;
    const int o = u % outputs;
    slice[m] = u < units ? u / outputs : n;  // no rows: an idle unit
    acc[m] = T(0);
    if (o < d * r) {
      sum[m] = {int(dY - shared) + o / r, dp, int(U - shared) + o % r, rp};  // dB[c, j]: dY[:, c] . U[:, j]
    } else if (o < d * r + r * k) {
      const int e = o - d * r;
      sum[m] = {int(dU - shared) + e / k, rp, int(X - shared) + e % k, kp};  // dA[j, p]: dU[:, j] . X[:, p]
    } else {
      sum[m] = {int(dY - shared) + o - d * r - r * k, dp, int(one - shared), 0};  // db[c]: dY[:, c] . 1
    }
  }

  for (int first = 0; first < n; first += a.tile_rows) {
    const int rows = min(a.tile_rows, n - first);
    stage(a.dY + first * d, rows, d, dp, dY);
    stage(a.X + first * k, rows, k, kp, X);
    stage(a.U + first * r, rows, r, rp, U);
    __syncthreads();

    for (int e = threadIdx.x; e < rows * r; e += blockDim.x) {
      const int i = e / r, j = e % r;
      T v = T(0);
      for (int c = 0; c < d; ++c) v = fma(dY[i * dp + c], B[c * rp + j], v);
      v *= a.scale;
      dU[i * rp + j] = v;
      a.dU[first * r + e] = v;
    }
    __syncthreads();

    if (a.dX) {
      for (int e = threadIdx.x; e < rows * k; e += blockDim.x) {
        const int i = e / k, p = e % k;
        T v = T(0);
        for (int c = 0; c < d; ++c) v = fma(dY[i * dp + c], W[c * kp + p], v);
        for (int j = 0; j < r; ++j) v = fma(dU[i * rp + j], A[j * kp + p], v);
        a.dX[first * k + e] = v;
      }
    }
#pragma unroll
    for (int m = 0; m < kMaxUnits; ++m) {
      const Reduction& red = sum[m];
      for (int i = slice[m]; i < rows; i += a.slices) {
        acc[m] = fma(shared[red.a + i * red.a_stride], shared[red.b + i * red.b_stride], acc[m]);
      }
    }
    __syncthreads();  // the next tile overwrites this one
  }

#pragma unroll
  for (int m = 0; m < kMaxUnits; ++m) {
    const int u = threadIdx.x + m * kBackwardThreads;
    if (u < units) partial[u] = acc[m];
  }
  __syncthreads();
  for (int o = threadIdx.x; o < outputs; o += blockDim.x) {
    T total = T(0);
    for (int q = 0; q < a.slices; ++q) total += partial[q * outputs + o];
    if (o < d * r) {
      a.dB[o] = a.scale * total;
    } else if (o < d * r + r * k) {
      a.dA[o - d * r] = total;
    } else {
      a.db[o - d * r - r * k] = total;
    }
  }
}


}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

template <typename T>
bool CudaTinyLoraLinear<T>::suits(const LoraConfig& config) {
  return tiny_layer_widths(config.in_features, config.out_features, config.rank);
}

template <typename T>
bool CudaTinyLoraLinear<T>::fast_path_for(Index rows) const {
  return rows >= 1 && (rows + kForwardRows - 1) / kForwardRows <= std::numeric_limits<int>::max();
}

template <typename T>
bool CudaTinyLoraLinear<T>::tiny_forward(const Tensor<T>& X) {
  const Index n = X.rows(), k = X.cols(), d = this->out_features(), r = this->rank();
  const Index blocks = (n + kForwardRows - 1) / kForwardRows;
  if (this->merged() || this->dropout_in_use() || n == 0 || k != this->in_features() ||
      blocks > std::numeric_limits<int>::max()) {
    return false;
  }
  const int kp = padded(int(k)), rp = padded(int(r));
  const std::size_t shared = std::size_t((d + r) * kp + d * rp + d + kForwardRows * (kp + rp)) * sizeof(T);
  if (shared > std::size_t(kSharedBytes)) return false;  // not at widths <= 32 (42 KB for double)

  this->begin_forward(X);
  ForwardArgs<T> args{X.data(), this->base_.weight().data(), this->A_.data(), this->B_.data(),
                      this->has_bias() ? this->base_.bias().data() : nullptr, this->U_.data(), this->Y_.data(),
                      this->scale_, n, int(k), int(d), int(r)};
  CudaContext& be = this->cuda();
  be.activate();
  launch_overlapped(&fused_lora_forward_kernel<T>, dim3(unsigned(blocks)), dim3(kThreads), shared, be.stream(),
                    "launch of fused_lora_forward_kernel", args);
  return true;
}

template <typename T>
const Tensor<T>& CudaTinyLoraLinear<T>::forward(const Tensor<T>& X) {
  if (tiny_forward(X)) return this->Y_;
  return CudaAdapterLoraLinear<T>::forward(X);
}

template <typename T>
bool CudaTinyLoraLinear<T>::tiny_backward(const Tensor<T>& dY, Tensor<T>* dX) {
  const Index n = this->batch_rows(), k = this->in_features(), d = this->out_features(), r = this->rank();
  if (!this->plain_backward() || double(n) * double(2 * d * r + 2 * r * k + d * k + d) > kMaxBackwardWork) {
    return false;
  }
  // As many rows per tile as shared memory holds beside W, A, B (at widths near 10, a few hundred);
  // as many threads per reduction output as the block has to spare.
  const bool db = this->bias_trains();
  const int kp = padded(int(k)), dp = padded(int(d)), rp = padded(int(r));
  const int weights = int((d + r) * kp + d * rp) + 1;  // and the shared 1
  const int row = dp + kp + 2 * rp;                     // dY, X, U, dU
  const int budget = kSharedBytes / int(sizeof(T));
  const int tile_rows = int(std::min<Index>(n, (budget - weights) / row));
  const int outputs = int(d * r + r * k + (db ? d : 0));
  const int slices = std::clamp(kBackwardThreads / outputs, 1, std::max(tile_rows, 1));
  const int tile = std::max(tile_rows * row, outputs * slices);  // the partial sums reuse the tile
  if (tile_rows < 1 || weights + tile > budget) return false;  // not at widths <= 32

  BackwardArgs<T> args{this->input().data(), this->base_.weight().data(), this->A_.data(), this->B_.data(),
                       this->U_.data(), dY.data(), this->dU_.data(), this->dA_.data(), this->dB_.data(),
                       db ? this->db_.data() : nullptr, dX ? dX->data() : nullptr,
                       this->scale_, int(n), int(k), int(d), int(r), tile_rows, slices};
  CudaContext& be = this->cuda();
  be.activate();
  const std::size_t shared = std::size_t(weights + tile) * sizeof(T);
  launch_overlapped(&fused_lora_backward_kernel<T>, dim3(1), dim3(kBackwardThreads), shared, be.stream(),
                    "launch of fused_lora_backward_kernel", args);
  return true;
}

template <typename T>
void CudaTinyLoraLinear<T>::backward(const Tensor<T>& dY, Tensor<T>* dX) {
  this->begin_backward(dY, dX);
  if (!tiny_backward(dY, dX)) return CudaAdapterLoraLinear<T>::backward(dY, dX);
  this->finish_backward(dX);
}

template class CudaTinyLoraLinear<float>;
template class CudaTinyLoraLinear<double>;

}  // namespace relora
