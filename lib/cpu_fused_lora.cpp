// A tiny LoRA layer's forward and backward in one pass each, on the CPU.
//
// Why: the seed demo's layer (n = 200, k = 10, d = 5, r = 4) costs about 1 us per product through
// Eigen's GEMM for a few thousand multiply-adds, six products a step: row-major, the product's
// long side (n) lands on the micro-kernel's short side and most SIMD lanes compute padding, and
// every call packs its operands again. Here each chunk of kChunk rows is transposed once into
// small feature-major tiles on the stack (one tile row per feature, kChunk lanes, so every lane
// is a real row of the batch), all the layer's products run as multiply-adds across those lanes
// with the small matrices' entries broadcast, and the results are transposed back. X is
// transposed once per pass instead of once per product. No allocation, no threads.
//
// Beyond the limits below the separate products are faster (Eigen's blocked kernels and its
// threads) and the backend answers "not fused".
#include <Eigen/Core>
#include <algorithm>
#include <type_traits>

#include "cpu_backend.hpp"
#include "fused_lora_checks.hpp"

namespace relora {
namespace {

constexpr Index kMaxWidth = 16;  // k and d
constexpr Index kMaxRank = 8;    // beyond it the reductions for dA and dB outweigh what fusing saves
constexpr Index kChunk = 32;     // rows per chunk: the lanes of a tile row
// Multiply-adds per step (forward and backward together) up to which the fused pass is used:
// beyond it Eigen's kernels, and its threads, catch up (relora_bench --custom, PERFORMANCE.md).
constexpr double kMaxWork = double(1 << 20);

// Feature-major tile: row(f)[c] is feature f of the chunk's row c.
template <typename T>
struct Tile {
  alignas(64) T v[kMaxWidth * kChunk];
  T* row(Index f) { return v + f * kChunk; }
  const T* row(Index f) const { return v + f * kChunk; }
};

// ---- transposes between the row-major n-row matrices and tiles

// to[j * to_stride + i] = from[i * from_stride + j] for i < rows, j < cols: scalar, for edges.
template <typename T>
void transpose_block(const T* from, Index from_stride, Index rows, Index cols, T* to, Index to_stride) {
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) to[j * to_stride + i] = from[i * from_stride + j];
  }
}

// The same for a whole rows x cols block, 4 x 4 at a time with SIMD shuffles where the
// architecture has 4-float packets: element by element a transpose costs more than the products.
template <typename T>
void transpose(const T* from, Index from_stride, Index rows, Index cols, T* to, Index to_stride) {
  Index i0 = 0;
#if defined(EIGEN_VECTORIZE_SSE) || defined(EIGEN_VECTORIZE_NEON)
  if constexpr (std::is_same_v<T, float>) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // PacketBlock<__m128>: the alignment is not needed
    using Packet4f = Eigen::internal::Packet4f;
    for (; i0 + 4 <= rows; i0 += 4) {
      Index j0 = 0;
      for (; j0 + 4 <= cols; j0 += 4) {
        Eigen::internal::PacketBlock<Packet4f, 4> block;
        for (int q = 0; q < 4; ++q) {
          block.packet[q] = Eigen::internal::ploadu<Packet4f>(from + (i0 + q) * from_stride + j0);
        }
        Eigen::internal::ptranspose(block);
        for (int q = 0; q < 4; ++q) Eigen::internal::pstoreu(to + (j0 + q) * to_stride + i0, block.packet[q]);
      }
#pragma GCC diagnostic pop
      transpose_block(from + i0 * from_stride + j0, from_stride, Index(4), cols - j0, to + j0 * to_stride + i0,
                      to_stride);
    }
  }
#endif
  transpose_block(from + i0 * from_stride, from_stride, rows - i0, cols, to + i0, to_stride);
}

// Rows [first, first + rows) of the row-major n x width matrix M into a tile; the lanes past
// `rows` are zeroed, so that arithmetic on them adds nothing to the reductions.
template <typename T>
void load_tile(const T* M, Index width, Index first, Index rows, Tile<T>& tile) {
  transpose(M + first * width, width, rows, width, tile.v, kChunk);
  if (rows < kChunk) {
    for (Index f = 0; f < width; ++f) std::fill(tile.row(f) + rows, tile.row(f) + kChunk, T(0));
  }
}

template <typename T>
void store_tile(const Tile<T>& tile, Index width, Index first, Index rows, T* M) {
  transpose(tile.v, kChunk, width, rows, M + first * width, width);
}

// ---- arithmetic on tiles

// out.row(j) = factor * sum_i coef(j, i) in.row(i) (added to out.row(j) when `accumulate`), for
// j < outputs, i < inputs; coef(j, i) = coef[j * row_stride + i * col_stride], so the same loop
// serves a matrix and its transpose. Four outputs at a time: four independent chains of
// multiply-adds per lane keep the FMA units busy.
template <typename T>
void combine(const T* coef, Index row_stride, Index col_stride, Index outputs, Index inputs, T factor,
             const Tile<T>& in, Tile<T>& out, bool accumulate = false) {
  constexpr Index kGroup = 4;
  for (Index j0 = 0; j0 < outputs; j0 += kGroup) {
    const Index group = std::min(kGroup, outputs - j0);
    T acc[kGroup][kChunk] = {};
    for (Index i = 0; i < inputs; ++i) {
      const T* x = in.row(i);
      T w[kGroup];
      for (Index g = 0; g < kGroup; ++g) w[g] = g < group ? coef[(j0 + g) * row_stride + i * col_stride] : T(0);
      for (Index g = 0; g < kGroup; ++g) {
#pragma omp simd
        for (Index c = 0; c < kChunk; ++c) acc[g][c] += w[g] * x[c];
      }
    }
    for (Index g = 0; g < group; ++g) {
      T* o = out.row(j0 + g);
      if (accumulate) {
#pragma omp simd
        for (Index c = 0; c < kChunk; ++c) o[c] += factor * acc[g][c];
      } else {
#pragma omp simd
        for (Index c = 0; c < kChunk; ++c) o[c] = factor * acc[g][c];
      }
    }
  }
}

// Lanes kept per entry of a reduction over rows (dA, dB): a chunk's kChunk products fold into
// kPartial lanes with vertical adds; one horizontal sum per entry at the very end.
constexpr Index kPartial = 8;

template <typename T>
struct Partials {
  alignas(64) T v[kMaxWidth * kMaxRank][kPartial];
};

// G.v[j * b_rows + i] += the chunk's sum_c a.row(j)[c] b.row(i)[c], kept as kPartial lanes.
template <typename T>
void accumulate_outer(const Tile<T>& a, Index a_rows, const Tile<T>& b, Index b_rows, Partials<T>& G) {
  for (Index j = 0; j < a_rows; ++j) {
    const T* x = a.row(j);
    for (Index i = 0; i < b_rows; ++i) {
      const T* y = b.row(i);
      T* g = G.v[j * b_rows + i];
      for (Index c0 = 0; c0 < kChunk; c0 += kPartial) {
#pragma omp simd
        for (Index c = 0; c < kPartial; ++c) g[c] += x[c0 + c] * y[c0 + c];
      }
    }
  }
}

// out[e] = factor * the sum of G's lanes for entry e < entries.
template <typename T>
void finish_partials(const Partials<T>& G, Index entries, T factor, T* out) {
  for (Index e = 0; e < entries; ++e) {
    T sum = T(0);
    for (Index c = 0; c < kPartial; ++c) sum += G.v[e][c];
    out[e] = factor * sum;
  }
}

// A layer's shape and its operands, as both passes read them.
template <typename T>
struct LayerView {
  Index n, k, d, r;  // rows, in, out, rank
  const T* X;
  const T* W;
  const T* A;
  const T* B;
};

template <typename T>
LayerView<T> view_of(const LoraLayerTensors<T>& layer) {
  return {layer.X->rows(), layer.X->cols(), layer.W->rows(), layer.A->rows(),
          layer.X->data(), layer.W->data(),  layer.A->data(), layer.B->data()};
}

template <typename T>
bool small_enough(const LayerView<T>& s) {
  if (s.k > kMaxWidth || s.d > kMaxWidth || s.r > kMaxRank) return false;
  const double work = double(s.n) * double(2 * s.k * s.r + 2 * s.k * s.d + 3 * s.d * s.r);
  return work <= kMaxWork;
}

}  // namespace

template <typename T>
bool CpuBackend<T>::fused_lora_forward(const LoraLayerTensors<T>& layer, Tensor<T>& U, Tensor<T>& Y) {
  if (!fused_small_layers_) return false;
  check_fused_forward(layer, U, Y);
  const LayerView<T> v = view_of(layer);
  if (!small_enough(v)) return false;
  const Index n = v.n, k = v.k, d = v.d, r = v.r;
  const T* b = layer.b ? layer.b->data() : nullptr;
  Tile<T> x, u, y;
  for (Index first = 0; first < n; first += kChunk) {
    const Index rows = std::min(kChunk, n - first);
    load_tile(v.X, k, first, rows, x);
    combine(v.A, k, Index(1), r, k, T(1), x, u);  // U = X A^T
    combine(v.W, k, Index(1), d, k, T(1), x, y);  // Y = X W^T
    if (b) {
      for (Index o = 0; o < d; ++o) {
        T* yo = y.row(o);
#pragma omp simd
        for (Index c = 0; c < kChunk; ++c) yo[c] += b[o];
      }
    }
    combine(v.B, r, Index(1), d, r, layer.scale, u, y, /*accumulate=*/true);  // Y += s U B^T
    store_tile(u, r, first, rows, U.data());
    store_tile(y, d, first, rows, Y.data());
  }
  return true;
}

template <typename T>
bool CpuBackend<T>::fused_lora_backward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& dY,
                                        const LoraLayerGradients<T>& grads) {
  if (!fused_small_layers_) return false;
  check_fused_backward(layer, U, dY, grads);
  const LayerView<T> v = view_of(layer);
  if (!small_enough(v)) return false;
  const Index n = v.n, k = v.k, d = v.d, r = v.r;
  const T s = layer.scale;
  T* db = grads.db ? grads.db->data() : nullptr;
  if (db) std::fill(db, db + d, T(0));
  Partials<T> dB_sums, dA_sums;  // dY^T U and dU^T X
  std::fill(&dB_sums.v[0][0], &dB_sums.v[0][0] + d * r * kPartial, T(0));
  std::fill(&dA_sums.v[0][0], &dA_sums.v[0][0] + r * k * kPartial, T(0));

  Tile<T> x, u, dy, du, dx;
  for (Index first = 0; first < n; first += kChunk) {
    const Index rows = std::min(kChunk, n - first);
    load_tile(dY.data(), d, first, rows, dy);
    load_tile(U.data(), r, first, rows, u);
    load_tile(v.X, k, first, rows, x);
    combine(v.B, Index(1), r, r, d, s, dy, du);  // dU = s dY B: coef(q, o) = B[o, q]
    accumulate_outer(dy, d, u, r, dB_sums);
    accumulate_outer(du, r, x, k, dA_sums);
    if (db) {
      for (Index o = 0; o < d; ++o) {
        const T* g = dy.row(o);
        T sum = T(0);
#pragma omp simd reduction(+ : sum)
        for (Index c = 0; c < kChunk; ++c) sum += g[c];
        db[o] += sum;
      }
    }
    store_tile(du, r, first, rows, grads.dU->data());
    if (grads.dX) {
      combine(v.W, Index(1), k, k, d, T(1), dy, dx);                       // dX = dY W
      combine(v.A, Index(1), k, k, r, T(1), du, dx, /*accumulate=*/true);  // dX += dU A
      store_tile(dx, k, first, rows, grads.dX->data());
    }
  }
  finish_partials(dB_sums, d * r, s, grads.dB->data());  // dB = s dY^T U
  finish_partials(dA_sums, r * k, T(1), grads.dA->data());  // dA = dU^T X
  return true;
}

template bool CpuBackend<float>::fused_lora_forward(const LoraLayerTensors<float>&, Tensor<float>&, Tensor<float>&);
template bool CpuBackend<double>::fused_lora_forward(const LoraLayerTensors<double>&, Tensor<double>&, Tensor<double>&);
template bool CpuBackend<float>::fused_lora_backward(const LoraLayerTensors<float>&, const Tensor<float>&,
                                                     const Tensor<float>&, const LoraLayerGradients<float>&);
template bool CpuBackend<double>::fused_lora_backward(const LoraLayerTensors<double>&, const Tensor<double>&,
                                                      const Tensor<double>&, const LoraLayerGradients<double>&);

}  // namespace relora
