// CudaAdapterLoraLinear: the LoRA branch of a layer too wide for the one-kernel path
// (CudaTinyLoraLinear, cuda_tiny_lora_linear.cu) but of small rank: cuBLAS keeps the large
// products (X W^T, dY W), and the rank-sized work runs as kernels of ours instead of five cuBLAS
// products, a bias kernel and cuBLAS's split-depth reductions. The MSE output pass of a model's
// last layer is in cuda_adapter_output.cu.
//
// Why: at n = k = d = 1024, r = 16 each rank-sized product is 34 MFLOP, far too little to fill
// the GPU through a GEMM's tiles; cuBLAS runs each as a split-depth product plus a reduction
// kernel, and the step spends more in them (and in the bias and Adam kernels) than in its one
// large product. Here:
//
// - Row pass (U = X A^T in the forward; dU = s dY B and dX += dU A in the backward, dX holding dY W
//   from cuBLAS): a warp takes a row. The block stages a slice of A or B at a time in shared
//   memory, laid out along the row; the lanes stride along the row 16 bytes at a time, each
//   keeping r partial dot products; a butterfly of shuffles leaves the r sums in every lane (bit
//   for bit the same in each: every step adds the same two values), and the lanes then stride
//   along the output row to add the rank-r update where there is one.
//   The forward's U runs on the backend's side stream beside cuBLAS's X W^T, which leaves SMs
//   and issue slots to spare: off the step's critical path.
// - Expand pass (forward, once X W^T and U are in): Y += b + s U B^T, a block per tile of Y. A
//   pass of its own, after the join, so that the row pass computing U needs only X and can run
//   beside X W^T.
// - Column pass (backward's dB, dA, db): sums over the n rows. Blocks own 256 output columns and
//   a chunk of rows; each thread keeps r sums for its column and writes them as one partial per
//   chunk. No floating-point atomics: the result is the same bits on every run (graph replays are
//   compared with eager steps, resumed checkpoints with uninterrupted runs).
// - Reduce pass: adds each output's partials in chunk order.
// All multiply-adds are fma in T (strict precision in either math mode).
#include <algorithm>
#include <limits>

#include "cuda/cuda_backend_impl.cuh"
#include "cuda/cuda_context.cuh"
#include "layers/cuda/cuda_adapter_common.cuh"
#include "layers/cuda/cuda_lora_linear.hpp"
#include "cuda/cuda_launch.cuh"
#include "cuda/cuda_pack.cuh"
#include "relora/core/elementwise_math.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// One row per warp, 8 warps a block: a thousand rows then make about a block per SM. Fewer warps
// per SM (one per scheduler) leave the pass latency-bound on its own instructions.
constexpr int kRowsPerWarp = 1;
constexpr int kRowWarps = 8;
constexpr int kColumnThreads = 256;
constexpr int kColumnTileRows = 32;  // rows of U or dU staged in shared memory at a time
constexpr int kColumnBatch = 16;     // rows whose loads a thread issues together
constexpr int kReduceUnroll = 8;

// V[i, :] = in_scale * M[i, :] G^T, G(j, p) = G[j g_row + p g_col] for j < r, p < K;
// then, unless O is null, O[i, q] += bias[q] + out_scale sum_j V[i, j] H(q, j),
// H(q, j) = H[q h_row + j h_col] for q < Q. Strides let one kernel read A, B or their transposes.
template <typename T>
struct RowPass {
  const T* M;
  const T* G;
  const T* H;
  const T* bias;  // null: none
  T* V;
  T* O;  // null: no output phase
  T in_scale, out_scale;
  std::int64_t n;
  int K, Q, r;
  int g_row, g_col, h_row, h_col;
};

// Columns staged per round of the row pass: the staged slice of G or H (MaxRank x chunk) stays
// within 33 KB of static shared memory.
template <typename T, int MaxRank>
constexpr int row_chunk() {
  constexpr int fit = int(8192 * 4 / sizeof(T)) / MaxRank;
  return fit < 512 ? fit : 512;
}

// Width elements per lane access (Width 1 when a row length is not a multiple of a 16-byte
// vector). Rounds of Chunk columns: every lane first issues all its loads of the round (the
// warp's rows of M), the block stages the round's slice of G, then the multiply-adds run; a
// round keeps 32 floats per lane in flight, which is what hides the memory latency at these sizes.
template <typename T, int MaxRank, int Width>
__global__ void __launch_bounds__(kRowWarps * 32) adapter_row_kernel(const RowPass<T> a) {
  constexpr int kChunk = row_chunk<T, MaxRank>();
  constexpr int kStride = kChunk + 4;  // staged row stride: 16-byte aligned rows, fewer bank conflicts
  constexpr int kSteps = kChunk / (32 * Width);
  static_assert(kSteps >= 1, "a round covers at least one access per lane");
  __shared__ __align__(16) T staged[MaxRank * kStride];
  wait_for_previous_grid();
  allow_next_grid();
  const int lane = threadIdx.x % 32;
  const std::int64_t first = (std::int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32) * kRowsPerWarp;
  // A warp past the last row still takes part in staging (the block's barriers need it).
  const int rows = first >= a.n ? 0 : int(a.n - first < kRowsPerWarp ? a.n - first : kRowsPerWarp);
  const T* M = a.M + (rows > 0 ? first * a.K : 0);

  T v[kRowsPerWarp][MaxRank];
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) {
#pragma unroll
    for (int j = 0; j < MaxRank; ++j) v[w][j] = T(0);
  }
  for (int p0 = 0; p0 < a.K; p0 += kChunk) {
    const int width = a.K - p0 < kChunk ? a.K - p0 : kChunk;
    Pack<T, Width> m[kSteps][kRowsPerWarp];
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int c = (lane + 32 * step) * Width;
#pragma unroll
      for (int w = 0; w < kRowsPerWarp; ++w) {
        if (c < width && w < rows) {
          m[step][w] = load_pack<T, Width>(M + std::int64_t(w) * a.K + p0 + c);
        } else {
#pragma unroll
          for (int e = 0; e < Width; ++e) m[step][w].v[e] = T(0);
        }
      }
    }
    __syncthreads();  // the previous round's slice has been read
    stage_slice<T, Width>(a.G, a.g_row, a.g_col, a.r, p0, width, kStride, staged);
    __syncthreads();
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int c = (lane + 32 * step) * Width;
      if (c >= width) continue;
#pragma unroll
      for (int j = 0; j < MaxRank; ++j) {
        if (j >= a.r) continue;
        const Pack<T, Width> g = *reinterpret_cast<const Pack<T, Width>*>(staged + j * kStride + c);
#pragma unroll
        for (int e = 0; e < Width; ++e) {
#pragma unroll
          for (int w = 0; w < kRowsPerWarp; ++w) v[w][j] = fma(m[step][w].v[e], g.v[e], v[w][j]);
        }
      }
    }
  }
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) {
#pragma unroll
    for (int j = 0; j < MaxRank; ++j) {
      if (j < a.r) v[w][j] = a.in_scale * warp_all_sum(v[w][j]);
      // Lane j stores entry j: a register array indexed by the lane would be spilled to memory.
      if (j < a.r && lane == j && w < rows) a.V[(first + w) * a.r + j] = v[w][j];
    }
  }
  if (a.O == nullptr) return;  // the same for the whole block

  T* O = a.O + (rows > 0 ? first * a.Q : 0);
  for (int q0 = 0; q0 < a.Q; q0 += kChunk) {
    const int width = a.Q - q0 < kChunk ? a.Q - q0 : kChunk;
    __syncthreads();
    stage_slice<T, Width>(a.H, a.h_col, a.h_row, a.r, q0, width, kStride, staged);  // staged[j][c] = H(q0 + c, j)
    __syncthreads();
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int c = (lane + 32 * step) * Width;
      if (c >= width) continue;
      Pack<T, Width> t[kRowsPerWarp];
#pragma unroll
      for (int w = 0; w < kRowsPerWarp; ++w) {
#pragma unroll
        for (int e = 0; e < Width; ++e) t[w].v[e] = T(0);
      }
#pragma unroll
      for (int j = 0; j < MaxRank; ++j) {
        if (j >= a.r) continue;
        const Pack<T, Width> h = *reinterpret_cast<const Pack<T, Width>*>(staged + j * kStride + c);
#pragma unroll
        for (int e = 0; e < Width; ++e) {
#pragma unroll
          for (int w = 0; w < kRowsPerWarp; ++w) t[w].v[e] = fma(v[w][j], h.v[e], t[w].v[e]);
        }
      }
      Pack<T, Width> bias;
      if (a.bias) {
        bias = load_pack<T, Width>(a.bias + q0 + c);
      } else {
#pragma unroll
        for (int e = 0; e < Width; ++e) bias.v[e] = T(0);
      }
#pragma unroll
      for (int w = 0; w < kRowsPerWarp; ++w) {
        if (w >= rows) continue;
        T* o = O + std::int64_t(w) * a.Q + q0 + c;
        Pack<T, Width> out = load_pack<T, Width>(o);
#pragma unroll
        for (int e = 0; e < Width; ++e) out.v[e] = fma(a.out_scale, t[w].v[e], out.v[e] + bias.v[e]);
        store_pack(o, out);
      }
    }
  }
}

// Y[i, q] += b[q] + s sum_j U[i, j] B[q, j], the forward's rank-r update once U and X W^T are
// both in hand, then ReLU where the layer took it (LoraLinear::take_output_activation). Unlike
// the row pass it needs no whole row: a block owns a tile of
// kExpandRows x (kExpandThreadsX Width) of Y, stages its rows of U and its columns of B, and
// each thread updates kExpandRowsPerThread rows of Width columns. The sums run over j in order
// with fma, as the row pass's output phase does, so either path gives the same bits.
constexpr int kExpandThreadsX = 32;
constexpr int kExpandThreadsY = 8;
constexpr int kExpandRowsPerThread = 4;
constexpr int kExpandRows = kExpandThreadsY * kExpandRowsPerThread;

template <typename T>
struct ExpandPass {
  const T* U;
  const T* B;
  const T* bias;  // null: none
  T* Y;
  T scale;
  std::int64_t n;
  int d, r;
  bool relu;
};

template <typename T, int MaxRank, int Width>
__global__ void __launch_bounds__(kExpandThreadsX * kExpandThreadsY) adapter_expand_kernel(const ExpandPass<T> a) {
  constexpr int kColumns = kExpandThreadsX * Width;
  __shared__ __align__(16) T b_tile[MaxRank][kColumns];  // b_tile[j][c] = B[q0 + c, j]
  __shared__ T u_tile[kExpandRows][MaxRank];
  wait_for_previous_grid();
  allow_next_grid();
  const int q0 = blockIdx.x * kColumns;
  const std::int64_t i0 = std::int64_t(blockIdx.y) * kExpandRows;
  const int threads = kExpandThreadsX * kExpandThreadsY;
  const int t = threadIdx.y * kExpandThreadsX + threadIdx.x;
  for (int e = t; e < kColumns * a.r; e += threads) {  // B's rows q0.. are contiguous: read in order
    const int c = e / a.r, j = e % a.r;
    b_tile[j][c] = q0 + c < a.d ? a.B[std::int64_t(q0 + c) * a.r + j] : T(0);
  }
  for (int e = t; e < kExpandRows * a.r; e += threads) {
    const int row = e / a.r, j = e % a.r;
    u_tile[row][j] = i0 + row < a.n ? a.U[(i0 + row) * a.r + j] : T(0);
  }
  __syncthreads();
  const int c = threadIdx.x * Width;
  const int q = q0 + c;
  if (q >= a.d) return;
  Pack<T, Width> bias;
#pragma unroll
  for (int e = 0; e < Width; ++e) bias.v[e] = T(0);
  if (a.bias) bias = load_pack<T, Width>(a.bias + q);
  Pack<T, Width> y[kExpandRowsPerThread];
#pragma unroll
  for (int w = 0; w < kExpandRowsPerThread; ++w) {  // every load of Y issued before the sums
    const std::int64_t i = i0 + threadIdx.y + w * kExpandThreadsY;
    if (i < a.n) y[w] = load_pack<T, Width>(a.Y + i * a.d + q);
  }
  T sums[kExpandRowsPerThread][Width];
#pragma unroll
  for (int w = 0; w < kExpandRowsPerThread; ++w) {
#pragma unroll
    for (int e = 0; e < Width; ++e) sums[w][e] = T(0);
  }
#pragma unroll
  for (int j = 0; j < MaxRank; ++j) {
    if (j >= a.r) continue;
    const Pack<T, Width> h = *reinterpret_cast<const Pack<T, Width>*>(&b_tile[j][c]);
#pragma unroll
    for (int w = 0; w < kExpandRowsPerThread; ++w) {
      const T u = u_tile[threadIdx.y + w * kExpandThreadsY][j];
#pragma unroll
      for (int e = 0; e < Width; ++e) sums[w][e] = fma(u, h.v[e], sums[w][e]);
    }
  }
#pragma unroll
  for (int w = 0; w < kExpandRowsPerThread; ++w) {
    const std::int64_t i = i0 + threadIdx.y + w * kExpandThreadsY;
    if (i >= a.n) continue;
#pragma unroll
    for (int e = 0; e < Width; ++e) {
      const T value = fma(a.scale, sums[w][e], y[w].v[e] + bias.v[e]);
      y[w].v[e] = a.relu ? activation_value(Activation::relu, value) : value;
    }
    store_pack(a.Y + i * a.d + q, y[w]);
  }
}

// Columns q < Q1 sum M1[:, q] against V1 (and, if sums1, against 1); columns Q1 <= q < Q1 + Q2
// sum M2[:, q - Q1] against V2. Block (x, c) covers kColumnThreads columns and rows
// [c chunk_rows, (c + 1) chunk_rows); it writes partial[(c (r + 1) + j) (Q1 + Q2) + q], the plane
// j = r holding the plain column sums.
template <typename T>
struct ColumnPass {
  const T* M1;
  const T* V1;
  const T* M2;
  const T* V2;
  T* partial;
  std::int64_t n, chunk_rows;
  int Q1, Q2, r;
  bool sums1;
};

template <typename T, int MaxRank>
__global__ void __launch_bounds__(kColumnThreads) adapter_column_kernel(const ColumnPass<T> a) {
  __shared__ T tiles[2][kColumnTileRows * MaxRank];  // rows of V1 and of V2
  wait_for_previous_grid();
  allow_next_grid();
  const int q = blockIdx.x * kColumnThreads + threadIdx.x;
  const int columns = a.Q1 + a.Q2;
  const bool first_part = q < a.Q1;
  const T* M = first_part ? a.M1 + q : a.M2 + (q - a.Q1);
  const int stride = first_part ? a.Q1 : a.Q2;
  const int part = first_part ? 0 : 1;
  const std::int64_t begin = std::int64_t(blockIdx.y) * a.chunk_rows;
  const std::int64_t end = begin + a.chunk_rows < a.n ? begin + a.chunk_rows : a.n;
  // Which of the two row operands this block's columns read: staging only those halves the
  // shared-memory traffic of a block that lies within one part.
  const int block_first = blockIdx.x * kColumnThreads;
  const bool need1 = block_first < a.Q1;
  const bool need2 = block_first + kColumnThreads > a.Q1;

  T acc[MaxRank];
#pragma unroll
  for (int j = 0; j < MaxRank; ++j) acc[j] = T(0);
  T sum = T(0);
  for (std::int64_t i0 = begin; i0 < end; i0 += kColumnTileRows) {
    const int rows = int(end - i0 < kColumnTileRows ? end - i0 : kColumnTileRows);
    __syncthreads();  // the previous tile has been read
    // At most kColumnTileRows x MaxRank elements: every thread loads its few at once.
    constexpr int kPerThread = (kColumnTileRows * MaxRank + kColumnThreads - 1) / kColumnThreads;
    T staged1[kPerThread], staged2[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int e = int(threadIdx.x) + u * kColumnThreads;
      const bool valid = e < rows * a.r;
      staged1[u] = valid && need1 ? a.V1[i0 * a.r + e] : T(0);
      staged2[u] = valid && need2 ? a.V2[i0 * a.r + e] : T(0);
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int e = int(threadIdx.x) + u * kColumnThreads;
      if (e < rows * a.r) {
        const int at = e / a.r * MaxRank + e % a.r;
        tiles[0][at] = staged1[u];
        tiles[1][at] = staged2[u];
      }
    }
    __syncthreads();
    if (q >= columns) continue;
    // kColumnBatch loads in flight per thread, then their multiply-adds. The loads are
    // unconditional (a row past the tile repeats the last one, and is not added) so that the
    // compiler issues them all before the first multiply-add; one load at a time leaves the pass
    // waiting on memory latency.
    for (int i = 0; i < rows; i += kColumnBatch) {
      T m[kColumnBatch];
#pragma unroll
      for (int u = 0; u < kColumnBatch; ++u) m[u] = M[(i0 + min(i + u, rows - 1)) * stride];
#pragma unroll
      for (int u = 0; u < kColumnBatch; ++u) {
        if (i + u >= rows) break;
        sum += m[u];
        const T* v = &tiles[part][(i + u) * MaxRank];
#pragma unroll
        for (int j = 0; j < MaxRank; ++j) {
          if (j < a.r) acc[j] = fma(m[u], v[j], acc[j]);
        }
      }
    }
  }
  if (q >= columns) return;
  T* out = a.partial + std::int64_t(blockIdx.y) * (a.r + 1) * columns + q;
#pragma unroll
  for (int j = 0; j < MaxRank; ++j) {
    if (j < a.r) out[std::int64_t(j) * columns] = acc[j];
  }
  if (first_part && a.sums1) out[std::int64_t(a.r) * columns] = sum;
}

// dB[q, j] = s sum_c partial(c, j, q) and db[q] = sum_c partial(c, r, q) for q < Q1 (db when
// requested); dA[j, p] = sum_c partial(c, j, Q1 + p) for p < Q2.
template <typename T>
struct ReducePass {
  const T* partial;
  T* dB;
  T* db;  // null: not requested
  T* dA;
  T scale;
  int chunks, Q1, Q2, r;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) adapter_reduce_kernel(const ReducePass<T> a) {
  wait_for_previous_grid();
  allow_next_grid();
  const int columns = a.Q1 + a.Q2;
  const std::int64_t plane = std::int64_t(a.r + 1) * columns;  // one chunk's partials; e indexes within it
  for (std::int64_t e = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < plane;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const int j = int(e / columns), q = int(e % columns);
    if (j == a.r && (q >= a.Q1 || a.db == nullptr)) continue;
    T total = T(0);
#pragma unroll kReduceUnroll
    for (int c = 0; c < a.chunks; ++c) total += a.partial[c * plane + e];
    if (q < a.Q1) {
      if (j < a.r) {
        a.dB[q * a.r + j] = a.scale * total;
      } else {
        a.db[q] = total;
      }
    } else {
      a.dA[std::int64_t(j) * a.Q2 + (q - a.Q1)] = total;
    }
  }
}

template <typename T, int MaxRank>
void launch_row_pass(const RowPass<T>& pass, cudaStream_t stream, bool overlapped) {
  const std::int64_t rows_per_block = std::int64_t(kRowWarps) * kRowsPerWarp;
  const unsigned blocks = unsigned((pass.n + rows_per_block - 1) / rows_per_block);
  // 16-byte accesses need every row of M, O, A and B's slices (and the bias) to start 16-byte
  // aligned: cudaMalloc'd tensors do when the row lengths are multiples of the vector.
  constexpr int kVector = int(16 / sizeof(T));
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  const bool vector = pass.K % kVector == 0 && pass.Q % kVector == 0 && aligned(pass.M) && aligned(pass.G) &&
                      aligned(pass.H) && (pass.O == nullptr || aligned(pass.O)) &&
                      (pass.bias == nullptr || aligned(pass.bias));
  const auto kernel = vector ? &adapter_row_kernel<T, MaxRank, kVector> : &adapter_row_kernel<T, MaxRank, 1>;
  if (overlapped) {
    launch_overlapped(kernel, dim3(blocks), dim3(kRowWarps * 32), 0, stream, "launch of adapter_row_kernel", pass);
  } else {
    launch_plain(kernel, dim3(blocks), dim3(kRowWarps * 32), 0, stream, "launch of adapter_row_kernel", pass);
  }
}

// overlapped: launched with a programmatic edge to the kernel before it in `stream`.
template <typename T>
void row_pass(const RowPass<T>& pass, cudaStream_t stream, bool overlapped = true) {
  if (pass.r <= 8) return launch_row_pass<T, 8>(pass, stream, overlapped);
  if (pass.r <= 16) return launch_row_pass<T, 16>(pass, stream, overlapped);
  launch_row_pass<T, kMaxAdapterRank>(pass, stream, overlapped);
}

template <typename T, int MaxRank>
void launch_expand_pass(const ExpandPass<T>& pass, cudaStream_t stream) {
  constexpr int kVector = int(16 / sizeof(T));
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  const bool vector = pass.d % kVector == 0 && aligned(pass.Y) && (pass.bias == nullptr || aligned(pass.bias));
  const int width = vector ? kVector : 1;
  const dim3 grid(unsigned((pass.d + kExpandThreadsX * width - 1) / (kExpandThreadsX * width)),
                  unsigned((pass.n + kExpandRows - 1) / kExpandRows));
  const dim3 block(kExpandThreadsX, kExpandThreadsY);
  if (vector) {
    launch_plain(&adapter_expand_kernel<T, MaxRank, kVector>, grid, block, 0, stream, "launch of adapter_expand_kernel",
                 pass);
  } else {
    launch_plain(&adapter_expand_kernel<T, MaxRank, 1>, grid, block, 0, stream, "launch of adapter_expand_kernel",
                 pass);
  }
}

template <typename T>
void expand_pass(const ExpandPass<T>& pass, cudaStream_t stream) {
  if (pass.r <= 8) return launch_expand_pass<T, 8>(pass, stream);
  if (pass.r <= 16) return launch_expand_pass<T, 16>(pass, stream);
  launch_expand_pass<T, kMaxAdapterRank>(pass, stream);
}

template <typename T>
void column_pass(const ColumnPass<T>& pass, int chunks, cudaStream_t stream) {
  const dim3 grid(unsigned((pass.Q1 + pass.Q2 + kColumnThreads - 1) / kColumnThreads), unsigned(chunks));
  if (pass.r <= 8) {
    launch_overlapped(&adapter_column_kernel<T, 8>, grid, dim3(kColumnThreads), 0, stream,
                      "launch of adapter_column_kernel", pass);
  } else if (pass.r <= 16) {
    launch_overlapped(&adapter_column_kernel<T, 16>, grid, dim3(kColumnThreads), 0, stream,
                      "launch of adapter_column_kernel", pass);
  } else {
    launch_overlapped(&adapter_column_kernel<T, kMaxAdapterRank>, grid, dim3(kColumnThreads), 0, stream,
                      "launch of adapter_column_kernel", pass);
  }
}

}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

template <typename T>
bool CudaAdapterLoraLinear<T>::suits(const LoraConfig& config) {
  return config.rank <= kMaxAdapterRank && adapter_passes_apply(1, config.in_features, config.out_features, config.rank);
}

template <typename T>
bool CudaAdapterLoraLinear<T>::fast_path_for(Index rows) const {
  return adapter_passes_apply(rows, this->in_features(), this->out_features(), this->rank());
}

template <typename T>
void CudaAdapterLoraLinear<T>::project_beside_product(const Tensor<T>& X) {
  const Index n = X.rows(), k = X.cols(), d = this->out_features(), r = this->rank();
  // U = X A^T on the side stream while cuBLAS runs X W^T here: neither reads what the other
  // writes, and X W^T leaves SMs and issue slots to spare (docs/PERFORMANCE.md).
  CudaContext& be = cuda();
  be.fork_side();
  RowPass<T> project{X.data(), this->A_.data(), nullptr, nullptr, this->U_.data(), nullptr, T(1), T(0),
                     n, int(k), int(d), int(r), int(k), 1, 0, 0};  // G(j, p) = A[j, p]
  row_pass(project, be.side_stream(), /*overlapped=*/false);
  this->base_.product(X, this->Y_);  // Y = X W^T (on tensor cores for a 16-bit W)
  be.join_side();
}

template <typename T>
bool CudaAdapterLoraLinear<T>::adapter_forward(const Tensor<T>& X) {
  const Index n = X.rows(), k = X.cols(), d = this->out_features(), r = this->rank();
  if (this->merged() || this->dropout_in_use() || !adapter_passes_apply(n, k, d, r)) return false;
  this->begin_forward(X);
  project_beside_product(X);
  expand_pass(ExpandPass<T>{this->U_.data(), this->B_.data(), this->has_bias() ? this->base_.bias().data() : nullptr,
                            this->Y_.data(), this->scale_, n, int(d), int(r),
                            this->output_activation() == Activation::relu},
              cuda().stream());
  return true;
}

template <typename T>
const Tensor<T>& CudaAdapterLoraLinear<T>::forward(const Tensor<T>& X) {
  dU_ready_for_ = nullptr;
  if (adapter_forward(X)) return this->Y_;
  return LoraLinear<T>::forward(X);
}

template <typename T>
bool CudaAdapterLoraLinear<T>::adapter_backward(const Tensor<T>& dY, Tensor<T>* dX) {
  const Index n = this->batch_rows(), k = this->in_features(), d = this->out_features(), r = this->rank();
  if (!this->plain_backward() || !adapter_passes_apply(n, k, d, r)) return false;
  CudaContext& be = cuda();

  // Chunks of rows for the column pass: about two blocks per SM in all (with one, each SM's
  // warps stall on their own multiply-add chains), each chunk at least a tile of rows; the
  // partials then take chunks (r + 1) (k + d) elements of workspace.
  const Index column_blocks = (k + d + kColumnThreads - 1) / kColumnThreads;
  const Index wanted = std::max<Index>(1, (2 * be.sm_count() + column_blocks - 1) / column_blocks);
  const Index chunk_rows = std::max<Index>(kColumnTileRows, (n + wanted - 1) / wanted);
  const Index chunks = (n + chunk_rows - 1) / chunk_rows;
  const std::size_t partial_bytes = std::size_t(chunks) * std::size_t(r + 1) * std::size_t(k + d) * sizeof(T);
  if (!reserve_workspace(partial_bytes)) return false;
  be.activate();  // the launches below may come before any call that makes the device current

  const Tensor<T>& X = this->input();
  const bool dU_ready = dU_ready_for_ != nullptr && dU_ready_for_ == dY.data();
  if (dX) this->base_.input_gradient(dY, T(0), *dX);  // dX = dY W
  if (dX || !dU_ready) {  // dX += dU A needs the row pass anyway (it recomputes dU, the same bits)
    RowPass<T> rows{dY.data(), this->B_.data(), this->A_.data(), nullptr, this->dU_.data(),
                    dX ? dX->data() : nullptr, this->scale_, T(1), n, int(d), int(k), int(r),
                    1, int(r), 1, int(k)};  // G(j, c) = B[c, j]; H(p, j) = A[j, p]
    row_pass(rows, be.stream());
  }

  T* partial = workspace_.data();
  const bool db = this->bias_trains();
  ColumnPass<T> columns{dY.data(), this->U_.data(), X.data(), this->dU_.data(), partial, n, chunk_rows,
                        int(d), int(k), int(r), db};
  column_pass(columns, int(chunks), be.stream());

  ReducePass<T> reduce{partial, this->dB_.data(), db ? this->db_.data() : nullptr, this->dA_.data(),
                       this->scale_, int(chunks), int(d), int(k), int(r)};
  const int blocks = grid_for(std::int64_t(r + 1) * (k + d), be.sm_count(), 4);
  launch_overlapped(&adapter_reduce_kernel<T>, dim3(unsigned(blocks)), dim3(kThreads), 0, be.stream(),
                    "launch of adapter_reduce_kernel", reduce);
  return true;
}

template <typename T>
void CudaAdapterLoraLinear<T>::backward(const Tensor<T>& dY, Tensor<T>* dX) {
  this->begin_backward(dY, dX);
  if (!adapter_backward(dY, dX)) LoraLinear<T>::backward(dY, dX);
  dU_ready_for_ = nullptr;
  this->finish_backward(dX);
}

template <typename T>
bool CudaAdapterLoraLinear<T>::reserve_workspace(std::size_t bytes) {
  const std::size_t elements = (bytes + sizeof(T) - 1) / sizeof(T);
  if (std::size_t(workspace_.size()) >= elements) return true;
  // Growing frees the old buffer, which a queued step or a recorded graph may still name: not
  // while recording (the separate products run instead), and a ready recording goes stale (the
  // backend counts allocations).
  if (cuda().recorder().recording()) return false;
  this->backend_->synchronize();
  workspace_ = Tensor<T>();
  workspace_ = this->backend_->allocate(1, Index(elements));
  return true;
}

template class CudaAdapterLoraLinear<float>;
template class CudaAdapterLoraLinear<double>;

}  // namespace relora
