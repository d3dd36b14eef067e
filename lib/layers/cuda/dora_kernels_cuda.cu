// DoRA's CUDA kernels, one launch each on the backend's stream: grid-stride loops for the
// element-wise passes, a block per row for the row sums of W, a 32 x 32 block per 32 columns for
// the magnitude's column sums. Sums accumulate in double, as the CPU kernels do. Launch
// parameters never change between steps, so a recorded step replays them as they are.
#include <cstdint>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_resources.cuh"
#include "layers/dora_kernels.hpp"
#include "layers/dora_recovery.hpp"
#include "relora/core/elementwise_math.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// wsq[i] = ||W_i||^2: one block per row (grid-stride over the rows).
template <typename T>
__global__ void row_squared_norms_kernel(std::int64_t rows, std::int64_t cols, const T* __restrict__ W,
                                         T* __restrict__ wsq) {
  __shared__ double partial[kThreads];
  for (std::int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    double sum = 0;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const double w = double(W[i * cols + j]);
      sum += w * w;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (int(threadIdx.x) < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) wsq[i] = T(partial[0]);
    __syncthreads();  // partial is reused by the next row
  }
}

template <typename T>
__global__ void row_norms_kernel(std::int64_t rows, const T* __restrict__ wsq, T* __restrict__ m) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < rows;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const double sum = double(wsq[i]);
    m[i] = T(sqrt(sum > 0 ? sum : 0.0));
  }
}

// One warp per row: the lanes read the row's r values of B, P and B G side by side (coalesced),
// their double sums joined by shuffles.
template <typename T>
__global__ void norms_kernel(std::int64_t rows, std::int64_t r, const T* __restrict__ wsq, const T* __restrict__ P,
                             const T* __restrict__ B, const T* __restrict__ BG, const T* __restrict__ m, T s, T eps,
                             T* __restrict__ n, T* __restrict__ g) {
  const double s1 = 2 * double(s), s2 = double(s) * double(s);
  const int lane = int(threadIdx.x % 32);
  const std::int64_t warps = std::int64_t(gridDim.x) * blockDim.x / 32;
  for (std::int64_t i = (blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x) / 32; i < rows; i += warps) {
    double sum = 0;
    for (std::int64_t j = lane; j < r; j += 32) {
      sum += double(B[i * r + j]) * (s1 * double(P[i * r + j]) + s2 * double(BG[i * r + j]));
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) {
      sum += double(wsq[i]);
      const T norm = T(sqrt(sum > 0 ? sum : 0.0));
      n[i] = norm;
      g[i] = m[i] / (norm > eps ? norm : eps);
    }
  }
}

// Y may alias Z: each element is read before it is written, by the same thread.
template <typename T>
__global__ void scale_columns_add_kernel(std::int64_t size, std::int64_t cols, const T* Z,
                                         const T* __restrict__ g, const T* __restrict__ b, bool accumulate,
                                         bool relu, T* Y) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t i = e % cols;
    T value = Z[e] * g[i];
    if (b != nullptr) value += b[i];
    if (accumulate) value = Y[e] + value;
    Y[e] = relu ? activation_value(Activation::relu, value) : value;
  }
}

// out may alias X: each element is read before it is written, by the same thread.
template <typename T>
__global__ void scale_columns_kernel(std::int64_t size, std::int64_t cols, const T* X, const T* __restrict__ g,
                                     T shift, T* out) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    out[e] = X[e] * (g[e % cols] + shift);
  }
}

// The sum over a 32 x 32 block's rows of threads of each thread column's `value`, on threadIdx.y == 0.
__device__ double column_total(double (&partial)[32][33], double value) {
  partial[threadIdx.y][threadIdx.x] = value;
  __syncthreads();
  double total = 0;
  if (threadIdx.y == 0) {
    for (int y = 0; y < 32; ++y) total += partial[y][threadIdx.x];
  }
  __syncthreads();  // partial is reused by the next total
  return total;
}

// f(dY[t, col], M[t, col]) for this thread's rows t = threadIdx.y + 32 j, then dY[t, col] *= factor
// where scale_dY: the magnitude-gradient passes' walk down a column. The rows come in groups of
// kRowsInFlight, all loaded before f sees any, so that one thread's loads overlap (a block covers
// only 32 columns).
constexpr int kRowsInFlight = 4;

template <typename T, typename F>
__device__ __forceinline__ void for_each_row_of_column(std::int64_t rows, std::int64_t cols, std::int64_t col,
                                                       T* __restrict__ dY, const T* __restrict__ M, bool scale_dY,
                                                       T factor, F&& f) {
  for (std::int64_t t0 = threadIdx.y; t0 < rows; t0 += 32 * kRowsInFlight) {
    T a[kRowsInFlight], m[kRowsInFlight];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      const std::int64_t t = t0 + 32 * u;
      a[u] = t < rows ? dY[t * cols + col] : T(0);
      m[u] = t < rows ? M[t * cols + col] : T(0);
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
      f(a[u], m[u]);  // a row past the end gives zeros, which add nothing
      const std::int64_t t = t0 + 32 * u;
      if (scale_dY && t < rows) dY[t * cols + col] = a[u] * factor;
    }
  }
}

// dm[i] = sum_t dY[t, i] Z[t, i] / max(n[i], eps) and db[i] = sum_t dY[t, i] (db not null), with
// dY scaled by g in place after it is read (scale_dY): 32 columns per block, its 32 rows of threads
// take every 32nd row, so reads are coalesced along the columns.
template <typename T>
__global__ void magnitude_gradient_kernel(std::int64_t rows, std::int64_t cols, T* __restrict__ dY,
                                          const T* __restrict__ Z, const T* __restrict__ g, const T* __restrict__ n,
                                          T eps, bool scale_dY, T* __restrict__ dm, T* __restrict__ db) {
  __shared__ double partial[32][33];  // padded against bank conflicts
  const std::int64_t col = std::int64_t(blockIdx.x) * 32 + threadIdx.x;
  double sum = 0, column_sum = 0;
  if (col < cols) {
    for_each_row_of_column(rows, cols, col, dY, Z, scale_dY, g[col], [&](T a, T z) {
      sum += double(a) * double(z);
      column_sum += double(a);
    });
  }
  sum = column_total(partial, sum);
  if (db != nullptr) column_sum = column_total(partial, column_sum);
  if (threadIdx.y == 0 && col < cols) {
    const T norm = n[col];
    dm[col] = T(sum / double(norm > eps ? norm : eps));
    if (db != nullptr) db[col] = T(column_sum);
  }
}

// magnitude_gradient's layout (32 columns per block, coalesced along the columns), reading Z back
// from Y = Z diag(g) + b and scaling dY in place (dora_recovery.hpp has the rule and its precision).
template <typename T>
__global__ void magnitude_gradient_from_output_kernel(std::int64_t rows, std::int64_t cols, T* __restrict__ dY,
                                                      const T* __restrict__ Y, const T* __restrict__ b,
                                                      const T* __restrict__ g, const T* __restrict__ n, T eps,
                                                      bool scale_dY, T* __restrict__ dm, T* __restrict__ db,
                                                      T* __restrict__ recompute) {
  __shared__ double partial[32][33];  // padded against bank conflicts
  const std::int64_t col = std::int64_t(blockIdx.x) * 32 + threadIdx.x;
  double sum = 0, abs_dY = 0, abs_product = 0, column_sum = 0, bias = 0;
  T gc = T(1);
  bool inv = false;
  if (col < cols) {
    gc = g[col];
    inv = dora_recovery::invertible(gc);
    bias = b != nullptr ? double(b[col]) : 0.0;
    const T factor = scale_dY && inv ? gc : T(1);
    for_each_row_of_column(rows, cols, col, dY, Y, scale_dY, factor, [&](T a, T y) {
      const double product = double(a) * (double(y) - bias);  // dY (Z g), divided by g below
      sum += product;
      abs_product += fabs(product);
      abs_dY += fabs(double(a));
      column_sum += double(a);
    });
    // sum_t dY (Y - b) / g: the division once per column (a column not invertible is recomputed).
    const double divisor = inv ? double(gc) : 1.0;
    sum /= divisor;
    abs_product /= fabs(divisor);
  }
  sum = column_total(partial, sum);
  abs_dY = column_total(partial, abs_dY);
  abs_product = column_total(partial, abs_product);
  column_sum = column_total(partial, column_sum);
  if (threadIdx.y == 0 && col < cols) {
    const bool accepted = inv && dora_recovery::recovery_accepted(sum, abs_dY, abs_product, T(bias), gc);
    recompute[col] = accepted ? T(0) : T(1);
    if (accepted) {
      const T norm = n[col];
      dm[col] = T(sum / double(norm > eps ? norm : eps));
    }
    if (db != nullptr) db[col] = T(column_sum);
  }
}

// The recompute of flagged columns, spread over the whole GPU whether one column is flagged or a
// thousand: the flagged columns are listed first (their order does not matter: each column's sum
// is formed alone), then every (column, chunk of rows) pair is a work item of a fixed grid, and
// each column's chunk sums are added in chunk order, so the result is the same bits on every run
// and a recorded step replays it (the count is data, the launches are fixed). A column's work is
// a pass over all of X (n k values): one block per column would stream it through one SM.
constexpr int kRecomputeChunks = 32;

template <typename T>
__global__ void list_flagged_kernel(std::int64_t cols, const T* __restrict__ recompute, unsigned int* count,
                                    int* __restrict__ list) {
  for (std::int64_t c = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; c < cols;
       c += std::int64_t(gridDim.x) * blockDim.x) {
    if (recompute[c] != T(0)) list[atomicAdd(count, 1u)] = int(c);
  }
}

// Item i: column list[i / chunks], rows [chunk * chunk_rows, ...): a warp per row of X, its lanes
// along k (X and W read coalesced); partials[i] = the chunk's sum of dY_tc Z_tc in double.
template <typename T>
__global__ void recompute_partials_kernel(std::int64_t rows, std::int64_t cols, std::int64_t k, std::int64_t r,
                                          T* __restrict__ dY, bool dY_scaled, const T* __restrict__ X,
                                          const T* __restrict__ W, const T* __restrict__ U,
                                          const T* __restrict__ B, T s, const T* __restrict__ g,
                                          const unsigned int* count, const int* __restrict__ list,
                                          double* __restrict__ partials) {
  constexpr int kWarps = kThreads / 32;
  __shared__ double partial[kWarps];
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const std::int64_t items = std::int64_t(*count) * kRecomputeChunks;
  const std::int64_t chunk_rows = (rows + kRecomputeChunks - 1) / kRecomputeChunks;
  for (std::int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const std::int64_t c = list[item / kRecomputeChunks], first = (item % kRecomputeChunks) * chunk_rows;
    const std::int64_t last = first + chunk_rows < rows ? first + chunk_rows : rows;
    const T gc = g[c];
    const bool inv = dora_recovery::invertible(gc);
    double total = 0;
    for (std::int64_t t = first + warp; t < last; t += kWarps) {
      double z = 0, adapter = 0;
      for (std::int64_t j = lane; j < k; j += 32) z += double(X[t * k + j]) * double(W[c * k + j]);
      for (std::int64_t j = lane; j < r; j += 32) adapter += double(U[t * r + j]) * double(B[c * r + j]);
      z += double(s) * adapter;
      for (int offset = 16; offset > 0; offset /= 2) z += __shfl_down_sync(0xffffffffu, z, offset);
      if (lane == 0) {
        T& a = dY[t * cols + c];
        double raw = double(a);
        if (dY_scaled && inv) raw /= double(gc);
        if (dY_scaled && !inv) a = a * gc;
        total += raw * z;
      }
    }
    if (lane == 0) partial[warp] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
      double sum = 0;
      for (int w = 0; w < kWarps; ++w) sum += partial[w];
      partials[item] = sum;
    }
    __syncthreads();  // partial is reused by the next item
  }
}

template <typename T>
__global__ void recompute_finish_kernel(const unsigned int* count, const int* __restrict__ list,
                                        const double* __restrict__ partials, const T* __restrict__ n, T eps,
                                        T* __restrict__ dm) {
  const std::int64_t listed = *count;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < listed;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    double sum = 0;
    for (int chunk = 0; chunk < kRecomputeChunks; ++chunk) sum += partials[i * kRecomputeChunks + chunk];
    const int c = list[i];
    const T norm = n[c];
    dm[c] = T(sum / double(norm > eps ? norm : eps));
  }
}

template <typename T>
__global__ void add_masked_kernel(std::int64_t size, const T* __restrict__ mask, const T* __restrict__ M,
                                  T* __restrict__ out) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    out[e] += mask[e] * M[e];
  }
}

template <typename T>
__global__ void norm_factors_kernel(std::int64_t size, const T* __restrict__ dm, const T* __restrict__ m,
                                    const T* __restrict__ n, T eps, T* __restrict__ q) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < size;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const T norm = n[i];
    q[i] = norm > eps ? -dm[i] * m[i] / (norm * norm) : T(0);
  }
}

// out may alias M when not accumulating.
template <typename T>
__global__ void scale_rows_kernel(std::int64_t size, std::int64_t cols, const T* __restrict__ q, const T* M,
                                  bool accumulate, T* out) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const T value = q[e / cols] * M[e];
    out[e] = accumulate ? out[e] + value : value;
  }
}

template <typename T>
__global__ void add_norm_gradient_B_kernel(std::int64_t size, std::int64_t cols, const T* __restrict__ q,
                                           const T* __restrict__ P, const T* __restrict__ BG, T s,
                                           T* __restrict__ dB) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    dB[e] += q[e / cols] * (s * P[e] + s * s * BG[e]);
  }
}

template <typename T>
__global__ void difference_kernel(std::int64_t size, const T* __restrict__ a, const T* __restrict__ b,
                                  T* __restrict__ out) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    out[e] = a[e] - b[e];
  }
}

template <typename T>
class CudaDoraKernels final : public DoraKernels<T> {
 public:
  explicit CudaDoraKernels(Backend<T>& backend) : context_(cuda_context(backend)) {}

  void row_squared_norms(const Tensor<T>& W, Tensor<T>& wsq) override {
    if (W.rows() == 0) return;
    context_.activate();
    const unsigned grid = unsigned(W.rows() < 65535 ? W.rows() : 65535);
    row_squared_norms_kernel<T><<<grid, kThreads, 0, context_.stream()>>>(W.rows(), W.cols(), W.data(), wsq.data());
    RELORA_CHECK_LAUNCH("row_squared_norms_kernel");
  }

  void row_norms(const Tensor<T>& wsq, Tensor<T>& m) override {
    context_.activate();
    row_norms_kernel<T><<<grid(wsq.size()), kThreads, 0, context_.stream()>>>(wsq.size(), wsq.data(), m.data());
    RELORA_CHECK_LAUNCH("row_norms_kernel");
  }

  void norms(const Tensor<T>& wsq, const Tensor<T>& P, const Tensor<T>& B, const Tensor<T>& BG, const Tensor<T>& m,
             T s, T eps, Tensor<T>& n, Tensor<T>& g) override {
    context_.activate();
    norms_kernel<T><<<grid(32 * B.rows()), kThreads, 0, context_.stream()>>>(
        B.rows(), B.cols(), wsq.data(), P.data(), B.data(), BG.data(), m.data(), s, eps, n.data(), g.data());
    RELORA_CHECK_LAUNCH("norms_kernel");
  }

  void scale_columns_add(const Tensor<T>& Z, const Tensor<T>& g, const Tensor<T>* b, bool accumulate, bool relu,
                         Tensor<T>& Y) override {
    context_.activate();
    scale_columns_add_kernel<T><<<grid(Z.size()), kThreads, 0, context_.stream()>>>(
        Z.size(), Z.cols(), Z.data(), g.data(), b ? b->data() : nullptr, accumulate, relu, Y.data());
    RELORA_CHECK_LAUNCH("scale_columns_add_kernel");
  }

  void scale_columns(const Tensor<T>& X, const Tensor<T>& g, T shift, Tensor<T>& out) override {
    context_.activate();
    scale_columns_kernel<T><<<grid(X.size()), kThreads, 0, context_.stream()>>>(X.size(), X.cols(), X.data(),
                                                                                 g.data(), shift, out.data());
    RELORA_CHECK_LAUNCH("scale_columns_kernel");
  }

  void magnitude_gradient(Tensor<T>& dY, const Tensor<T>& Z, const Tensor<T>& g, const Tensor<T>& n, T eps,
                          bool scale_dY, Tensor<T>& dm, Tensor<T>* db) override {
    if (dY.cols() == 0) return;
    context_.activate();
    const dim3 block(32, 32);
    const dim3 blocks(unsigned((dY.cols() + 31) / 32));
    magnitude_gradient_kernel<T><<<blocks, block, 0, context_.stream()>>>(
        dY.rows(), dY.cols(), dY.data(), Z.data(), g.data(), n.data(), eps, scale_dY, dm.data(),
        db ? db->data() : nullptr);
    RELORA_CHECK_LAUNCH("magnitude_gradient_kernel");
  }

  void magnitude_gradient_from_output(Tensor<T>& dY, const Tensor<T>& Y, const Tensor<T>* b, const Tensor<T>& g,
                                      const Tensor<T>& n, T eps, bool scale_dY, Tensor<T>& dm, Tensor<T>* db,
                                      Tensor<T>& recompute) override {
    if (dY.cols() == 0) return;
    context_.activate();
    const dim3 block(32, 32);
    const dim3 blocks(unsigned((dY.cols() + 31) / 32));
    magnitude_gradient_from_output_kernel<T><<<blocks, block, 0, context_.stream()>>>(
        dY.rows(), dY.cols(), dY.data(), Y.data(), b ? b->data() : nullptr, g.data(), n.data(), eps, scale_dY,
        dm.data(), db ? db->data() : nullptr, recompute.data());
    RELORA_CHECK_LAUNCH("magnitude_gradient_from_output_kernel");
  }

  void recompute_magnitude_gradient(Tensor<T>& dY, bool dY_scaled, const Tensor<T>& X, const Tensor<T>& W,
                                    const Tensor<T>& U, const Tensor<T>& B, T s, const Tensor<T>& g,
                                    const Tensor<T>& n, T eps, const Tensor<T>& recompute, Tensor<T>& dm) override {
    const Index cols = dY.cols();
    if (cols == 0) return;
    context_.activate();
    if (cols > listed_capacity_) {  // the first step's (a layer's width does not change)
      for (DeviceMemory* memory : {&flagged_count_, &flagged_list_, &chunk_sums_}) {
        if (memory->ptr) RELORA_CUDA_CHECK(cudaFree(memory->ptr));
        memory->ptr = nullptr;
      }
      RELORA_CUDA_CHECK(cudaMalloc(&flagged_count_.ptr, sizeof(unsigned int)));
      RELORA_CUDA_CHECK(cudaMalloc(&flagged_list_.ptr, std::size_t(cols) * sizeof(int)));
      RELORA_CUDA_CHECK(cudaMalloc(&chunk_sums_.ptr, std::size_t(cols) * kRecomputeChunks * sizeof(double)));
      listed_capacity_ = cols;
    }
    auto* count = static_cast<unsigned int*>(flagged_count_.ptr);
    auto* list = static_cast<int*>(flagged_list_.ptr);
    auto* sums = static_cast<double*>(chunk_sums_.ptr);
    RELORA_CUDA_CHECK(cudaMemsetAsync(count, 0, sizeof(unsigned int), context_.stream()));
    list_flagged_kernel<T><<<grid(cols), kThreads, 0, context_.stream()>>>(cols, recompute.data(), count, list);
    RELORA_CHECK_LAUNCH("list_flagged_kernel");
    recompute_partials_kernel<T><<<unsigned(4 * context_.sm_count()), kThreads, 0, context_.stream()>>>(
        dY.rows(), cols, X.cols(), U.cols(), dY.data(), dY_scaled, X.data(), W.data(), U.data(), B.data(), s,
        g.data(), count, list, sums);
    RELORA_CHECK_LAUNCH("recompute_partials_kernel");
    recompute_finish_kernel<T><<<grid(cols), kThreads, 0, context_.stream()>>>(count, list, sums, n.data(), eps,
                                                                               dm.data());
    RELORA_CHECK_LAUNCH("recompute_finish_kernel");
  }

  void add_masked(const Tensor<T>& mask, const Tensor<T>& M, Tensor<T>& out) override {
    if (out.size() == 0) return;
    context_.activate();
    add_masked_kernel<T><<<grid(out.size()), kThreads, 0, context_.stream()>>>(out.size(), mask.data(), M.data(),
                                                                             out.data());
    RELORA_CHECK_LAUNCH("add_masked_kernel");
  }

  void norm_factors(const Tensor<T>& dm, const Tensor<T>& m, const Tensor<T>& n, T eps, Tensor<T>& q) override {
    context_.activate();
    norm_factors_kernel<T><<<grid(n.size()), kThreads, 0, context_.stream()>>>(n.size(), dm.data(), m.data(),
                                                                               n.data(), eps, q.data());
    RELORA_CHECK_LAUNCH("norm_factors_kernel");
  }

  void scale_rows(const Tensor<T>& q, const Tensor<T>& M, bool accumulate, Tensor<T>& out) override {
    if (M.size() == 0) return;
    context_.activate();
    scale_rows_kernel<T><<<grid(M.size()), kThreads, 0, context_.stream()>>>(M.size(), M.cols(), q.data(), M.data(),
                                                                             accumulate, out.data());
    RELORA_CHECK_LAUNCH("scale_rows_kernel");
  }

  void add_norm_gradient_B(const Tensor<T>& q, const Tensor<T>& P, const Tensor<T>& BG, T s, Tensor<T>& dB) override {
    context_.activate();
    add_norm_gradient_B_kernel<T><<<grid(dB.size()), kThreads, 0, context_.stream()>>>(
        dB.size(), dB.cols(), q.data(), P.data(), BG.data(), s, dB.data());
    RELORA_CHECK_LAUNCH("add_norm_gradient_B_kernel");
  }

  void difference(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) override {
    context_.activate();
    difference_kernel<T><<<grid(a.size()), kThreads, 0, context_.stream()>>>(a.size(), a.data(), b.data(),
                                                                             out.data());
    RELORA_CHECK_LAUNCH("difference_kernel");
  }

 private:
  unsigned grid(std::int64_t n) const { return unsigned(grid_for(n, context_.sm_count())); }

  CudaContext& context_;
  // recompute_magnitude_gradient's list of flagged columns and their chunk sums, for up to
  // listed_capacity_ columns.
  DeviceMemory flagged_count_, flagged_list_, chunk_sums_;
  Index listed_capacity_ = 0;
};

}  // namespace
}  // namespace cuda_detail

template <typename T>
std::unique_ptr<DoraKernels<T>> make_cuda_dora_kernels(Backend<T>& backend) {
  return std::make_unique<cuda_detail::CudaDoraKernels<T>>(backend);
}

template std::unique_ptr<DoraKernels<float>> make_cuda_dora_kernels(Backend<float>&);
template std::unique_ptr<DoraKernels<double>> make_cuda_dora_kernels(Backend<double>&);

}  // namespace relora
