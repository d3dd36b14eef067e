// A tiny LoRA layer's forward and backward in one pass each, on the CPU.
//
// Why: the seed demo's layer (n = 200, k = 10, d = 5, r = 4) costs about 1 us per product through
// Eigen's GEMM for a few thousand multiply-adds, six products a step: row-major, the product's
// long side (n) lands on the micro-kernel's short side and most SIMD lanes compute padding, and
// every call packs its operands again. Here the batch is computed feature-major: each group of
// kLanes rows is transposed into one SIMD register per feature (every lane a real row of the
// batch), the layer's products run as multiply-adds across those lanes with the small matrices'
// entries broadcast, and the results are transposed back. No allocation, no threads.
//
// Where the time goes (seed_demo's whole training step, 3.4 us at best on the 2-core AMD
// development machine, 6.7 us with the 32-row chunks and SSE transposes before): these products'
// multiply-adds about 40%, the transposes 28%, then Adam, MSE and the reductions over the batch
// for dA and dB. So each tensor is transposed at most once per step: the forward keeps its
// feature-major X and U in the backend (FusedLoraScratch), and the backward that follows it on the
// same X and U reads those instead of transposing them again. Sound because X and U are unchanged
// in between: LoraLinear requires X to be, U is its own, and every operation of this backend that
// writes a tensor drops the copies of what it overwrites (CpuBackend::wrote). A caller that writes
// X through its raw host pointer between a forward and its backward breaks LoraLinear's contract
// on every backend.
//
// Beyond the limits below the separate products are faster (Eigen's blocked kernels and its
// threads) and the backend answers "not fused".
#include <Eigen/Core>
#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu_backend.hpp"
#include "fused_lora_checks.hpp"

// Lanes<double> is 64 bytes, passed differently with and without AVX-512: only between functions
// of this file, all compiled with the same flags.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace relora {
namespace {

constexpr Index kMaxWidth = 16;  // k and d
constexpr Index kMaxRank = 8;    // beyond it the reductions for dA and dB outweigh what fusing saves
constexpr Index kLanes = 8;      // rows per group: one AVX register of floats
// Rows per strip: each pass runs over a strip of rows before the next, so that a large batch is
// computed while its rows are in L1 (the seed demo's 200 rows are one strip).
constexpr Index kStrip = 256;
// Multiply-adds per step (forward and backward together) up to which the fused pass is used:
// beyond it Eigen's kernels, and its threads, catch up (relora_bench --custom, PERFORMANCE.md).
constexpr double kMaxWork = double(1 << 20);

// The leading dimension of a feature-major panel of n rows: whole groups, so that every loop over
// lanes runs on full registers (the lanes past n hold zeros and add nothing to the reductions).
Index panel_stride(Index n) { return (n + kLanes - 1) / kLanes * kLanes; }

template <typename T>
T* panel(std::vector<T>& buffer, Index features, Index ld) {
  const std::size_t size = std::size_t(std::max<Index>(features * ld, 1));
  if (buffer.size() < size) buffer.resize(size);  // only while a layer is larger than any before it
  return buffer.data();
}

// ---- transposes of one group of rows: row-major (row i, feature f at M[i * width + f]) to
// feature-major (at out[f * ld + i]) and back

// Element by element: for a group of fewer than kLanes rows (the lanes past `rows` are zeroed)
// and for widths under one 4-wide block.
template <typename T>
void rows_to_lanes_scalar(const T* M, Index width, Index rows, T* out, Index ld) {
  for (Index f = 0; f < width; ++f) {
    for (Index i = 0; i < rows; ++i) out[f * ld + i] = M[i * width + f];
    for (Index i = rows; i < kLanes; ++i) out[f * ld + i] = T(0);
  }
}

template <typename T>
void lanes_to_rows_scalar(const T* in, Index ld, Index width, Index rows, T* M) {
  for (Index i = 0; i < rows; ++i) {
    for (Index f = 0; f < width; ++f) M[i * width + f] = in[f * ld + i];
  }
}

// A full group, SIMD where the architecture has it, in blocks of 4 features: an element-by-element
// transpose costs more than the layer's products. A width that is not a multiple of 4 ends with a
// block that overlaps the one before it (features width - 4 .. width - 1), which rewrites the same
// values rather than falling back to scalar moves; every access stays inside the group's rows.
template <typename T>
void rows_to_lanes(const T* M, Index width, T* out, Index ld) {
  rows_to_lanes_scalar(M, width, kLanes, out, ld);
}

template <typename T>
void lanes_to_rows(const T* in, Index ld, Index width, T* M) {
  lanes_to_rows_scalar(in, ld, width, kLanes, M);
}

template <typename Block>
void for_each_block_of_4(Index width, Block&& block) {
  Index f = 0;
  for (; f + 4 <= width; f += 4) block(f);
  if (f < width) block(width - 4);
}

#if defined(__AVX__)
// Transposes the 4 x 4 block in each 128-bit half of a, b, c, d: 8 in-lane shuffles. Row q of the
// group and row q + 4 share a register (one per half), so no shuffle crosses the halves (those
// cost 3 cycles on Intel) and the lanes come out in row order.
inline void transpose_halves(__m256& a, __m256& b, __m256& c, __m256& d) {
  const __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
  const __m256 cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
  a = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(1, 0, 1, 0));
  b = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(3, 2, 3, 2));
  c = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(1, 0, 1, 0));
  d = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(3, 2, 3, 2));
}

template <>
void rows_to_lanes<float>(const float* M, Index width, float* out, Index ld) {
  if (width < 4) return rows_to_lanes_scalar(M, width, kLanes, out, ld);
  for_each_block_of_4(width, [&](Index f0) {
    __m256 v[4];
    for (int q = 0; q < 4; ++q) {
      v[q] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(M + q * width + f0)),
                                  _mm_loadu_ps(M + (q + 4) * width + f0), 1);
    }
    transpose_halves(v[0], v[1], v[2], v[3]);
    for (int f = 0; f < 4; ++f) _mm256_storeu_ps(out + (f0 + f) * ld, v[f]);
  });
}

template <>
void lanes_to_rows<float>(const float* in, Index ld, Index width, float* M) {
  if (width < 4) return lanes_to_rows_scalar(in, ld, width, kLanes, M);
  for_each_block_of_4(width, [&](Index f0) {
    __m256 v[4];
    for (int f = 0; f < 4; ++f) v[f] = _mm256_loadu_ps(in + (f0 + f) * ld);
    transpose_halves(v[0], v[1], v[2], v[3]);
    for (int q = 0; q < 4; ++q) {
      _mm_storeu_ps(M + q * width + f0, _mm256_castps256_ps128(v[q]));
      _mm_storeu_ps(M + (q + 4) * width + f0, _mm256_extractf128_ps(v[q], 1));
    }
  });
}
#elif defined(EIGEN_VECTORIZE_SSE) || defined(EIGEN_VECTORIZE_NEON)
// 4-float packets: the group as two 4 x 4 blocks of rows.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // PacketBlock<__m128>: the alignment is not needed
template <>
void rows_to_lanes<float>(const float* M, Index width, float* out, Index ld) {
  using Eigen::internal::Packet4f;
  if (width < 4) return rows_to_lanes_scalar(M, width, kLanes, out, ld);
  for_each_block_of_4(width, [&](Index f0) {
    for (Index i0 = 0; i0 < kLanes; i0 += 4) {
      Eigen::internal::PacketBlock<Packet4f, 4> block;
      for (int q = 0; q < 4; ++q) block.packet[q] = Eigen::internal::ploadu<Packet4f>(M + (i0 + q) * width + f0);
      Eigen::internal::ptranspose(block);
      for (int f = 0; f < 4; ++f) Eigen::internal::pstoreu(out + (f0 + f) * ld + i0, block.packet[f]);
    }
  });
}

template <>
void lanes_to_rows<float>(const float* in, Index ld, Index width, float* M) {
  using Eigen::internal::Packet4f;
  if (width < 4) return lanes_to_rows_scalar(in, ld, width, kLanes, M);
  for_each_block_of_4(width, [&](Index f0) {
    for (Index i0 = 0; i0 < kLanes; i0 += 4) {
      Eigen::internal::PacketBlock<Packet4f, 4> block;
      for (int f = 0; f < 4; ++f) block.packet[f] = Eigen::internal::ploadu<Packet4f>(in + (f0 + f) * ld + i0);
      Eigen::internal::ptranspose(block);
      for (int q = 0; q < 4; ++q) Eigen::internal::pstoreu(M + (i0 + q) * width + f0, block.packet[q]);
    }
  });
}
#pragma GCC diagnostic pop
#endif

// `rows` rows of the row-major matrix M into the lanes of the feature-major panel P (stride ld),
// group by group, the lanes past `rows` in the last group zeroed; and back.
template <typename T>
void load_rows(const T* M, Index width, Index rows, T* P, Index ld) {
  Index i = 0;
  for (; i + kLanes <= rows; i += kLanes) rows_to_lanes(M + i * width, width, P + i, ld);
  if (i < rows) rows_to_lanes_scalar(M + i * width, width, rows - i, P + i, ld);
}

template <typename T>
void store_rows(const T* P, Index ld, Index width, Index rows, T* M) {
  Index i = 0;
  for (; i + kLanes <= rows; i += kLanes) lanes_to_rows(P + i, ld, width, M + i * width);
  if (i < rows) lanes_to_rows_scalar(P + i, ld, width, rows - i, M + i * width);
}

// ---- arithmetic on feature-major panels

// One group of lanes as a GCC/Clang vector (one AVX register of floats, two of doubles): arrays of
// these stay in registers where the same loops over T[kLanes] arrays went through the stack
// (GCC zeroed them with `rep stos`, a quarter of the pass).
template <typename T>
struct LanesOf {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
using Lanes = typename LanesOf<T>::type;

template <typename T>
Lanes<T> load_lanes(const T* p) {
  Lanes<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
void store_lanes(T* p, const Lanes<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename V>
auto sum_lanes(const V& v) {
  auto sum = v[0];
  for (Index c = 1; c < kLanes; ++c) sum += v[c];
  return sum;
}

// out_j = base_j + factor * sum_i coef(j, i) in_i on `lanes` lanes (a multiple of kLanes), for G
// outputs, where coef(j, i) = coef[j * row_stride + i * col_stride] (so that the same loop serves
// a matrix and its transpose) and base_j is out_j itself when `accumulate`, else bias[j] (zero
// when bias is null). G is a template argument so that the accumulators stay in registers, one
// chain of multiply-adds each. V groups of lanes at a time: each broadcast coefficient (a load)
// then feeds V multiply-adds, which the loads would otherwise bound. Always inlined into the loop
// over the strip: as a call of its own it kept the accumulators on the stack (6% of the step).
template <typename T, int G, int V>
__attribute__((always_inline)) inline void combine_groups(const T* coef, Index row_stride, Index col_stride,
                                                          Index inputs, T factor, const T* in, Index in_ld, T* out,
                                                          Index out_ld, const T* bias, bool accumulate) {
  Lanes<T> acc[G][V];
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < V; ++u) acc[g][u] = Lanes<T>{};
  }
  for (Index i = 0; i < inputs; ++i) {
    Lanes<T> x[V];
    for (int u = 0; u < V; ++u) x[u] = load_lanes(in + i * in_ld + u * kLanes);
    for (int g = 0; g < G; ++g) {
      const T w = coef[g * row_stride + i * col_stride];
      for (int u = 0; u < V; ++u) acc[g][u] += w * x[u];
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < V; ++u) {
      T* o = out + g * out_ld + u * kLanes;
      const Lanes<T> base = accumulate ? load_lanes(o) : Lanes<T>{} + (bias ? bias[g] : T(0));
      store_lanes(o, base + factor * acc[g][u]);
    }
  }
}

// One call covers a whole strip of rows: per group of lanes the call and the dispatch would cost
// as much as the arithmetic.
template <typename T, int G>
void combine_block(const T* coef, Index row_stride, Index col_stride, Index inputs, T factor, const T* in,
                   Index in_ld, T* out, Index out_ld, Index lanes, const T* bias, bool accumulate) {
  Index l0 = 0;
  for (; l0 + 2 * kLanes <= lanes; l0 += 2 * kLanes) {
    combine_groups<T, G, 2>(coef, row_stride, col_stride, inputs, factor, in + l0, in_ld, out + l0, out_ld, bias,
                            accumulate);
  }
  if (l0 < lanes) {
    combine_groups<T, G, 1>(coef, row_stride, col_stride, inputs, factor, in + l0, in_ld, out + l0, out_ld, bias,
                            accumulate);
  }
}

// T itself, in a parameter that must not take part in deducing T (a null bias).
template <typename T>
struct NoDeduce {
  using type = T;
};

// The same for any number of outputs, in blocks of at most 6 of about equal size (10 = 5 + 5):
// 6 outputs x 2 groups are 12 accumulators, as many as AVX2's 16 registers hold beside the
// inputs; and no accumulator computes a padding output.
template <typename T>
void combine(const T* coef, Index row_stride, Index col_stride, Index outputs, Index inputs, T factor, const T* in,
             Index in_ld, T* out, Index out_ld, Index lanes, const typename NoDeduce<T>::type* bias = nullptr,
             bool accumulate = false) {
  constexpr Index kMaxBlock = 6;
  const Index blocks = (outputs + kMaxBlock - 1) / kMaxBlock;
  for (Index j0 = 0, block = 0; block < blocks; ++block) {
    const Index size = (outputs - j0) / (blocks - block);  // the larger blocks last
    const T* c = coef + j0 * row_stride;
    T* o = out + j0 * out_ld;
    const T* b = bias ? bias + j0 : nullptr;
    const auto run = [&](auto g) {
      combine_block<T, decltype(g)::value>(c, row_stride, col_stride, inputs, factor, in, in_ld, o, out_ld, lanes, b,
                                           accumulate);
    };
    switch (size) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 5: run(std::integral_constant<int, 5>{}); break;
      default: run(std::integral_constant<int, 6>{}); break;
    }
    j0 += size;
  }
}

// ---- reductions over the whole batch (dA, dB, db), on feature-major panels

// out[ja * out_row + ib * out_col] = factor * <a_ja, b_ib> (dot products over all ld lanes) for a
// block of GA x GB rows of the panels a and b: GA * GB accumulators in registers, GA + GB loads
// for GA * GB multiply-adds, and one horizontal sum per entry at the very end.
template <typename T, int GA, int GB>
void dot_block(const T* a, const T* b, Index ld, T factor, T* out, Index out_row, Index out_col) {
  Lanes<T> acc[GA][GB];
  for (int ja = 0; ja < GA; ++ja) {
    for (int ib = 0; ib < GB; ++ib) acc[ja][ib] = Lanes<T>{};
  }
  for (Index l0 = 0; l0 < ld; l0 += kLanes) {
    Lanes<T> x[GA], y[GB];
    for (int ja = 0; ja < GA; ++ja) x[ja] = load_lanes(a + ja * ld + l0);
    for (int ib = 0; ib < GB; ++ib) y[ib] = load_lanes(b + ib * ld + l0);
    for (int ja = 0; ja < GA; ++ja) {
      for (int ib = 0; ib < GB; ++ib) acc[ja][ib] += x[ja] * y[ib];
    }
  }
  for (int ja = 0; ja < GA; ++ja) {
    for (int ib = 0; ib < GB; ++ib) out[ja * out_row + ib * out_col] = factor * sum_lanes(acc[ja][ib]);
  }
}

template <typename T, int GA>
void dot_rows(const T* a, const T* b, Index nb, Index ld, T factor, T* out, Index out_row, Index out_col) {
  Index ib = 0;
  for (; ib + 2 <= nb; ib += 2) dot_block<T, GA, 2>(a, b + ib * ld, ld, factor, out + ib * out_col, out_row, out_col);
  if (ib < nb) dot_block<T, GA, 1>(a, b + ib * ld, ld, factor, out + ib * out_col, out_row, out_col);
}

// Every dot product of a row of a (na rows) with a row of b (nb rows), in blocks of 4 x 2.
template <typename T>
void dot_all(const T* a, Index na, const T* b, Index nb, Index ld, T factor, T* out, Index out_row, Index out_col) {
  Index ja = 0;
  for (; ja + 4 <= na; ja += 4) dot_rows<T, 4>(a + ja * ld, b, nb, ld, factor, out + ja * out_row, out_row, out_col);
  const T* a_rest = a + ja * ld;
  T* out_rest = out + ja * out_row;
  switch (na - ja) {
    case 3: dot_rows<T, 3>(a_rest, b, nb, ld, factor, out_rest, out_row, out_col); break;
    case 2: dot_rows<T, 2>(a_rest, b, nb, ld, factor, out_rest, out_row, out_col); break;
    case 1: dot_rows<T, 1>(a_rest, b, nb, ld, factor, out_rest, out_row, out_col); break;
    default: break;
  }
}

// out[f] = the sum of row f of the panel P.
template <typename T>
void row_sums(const T* P, Index rows, Index ld, T* out) {
  for (Index f = 0; f < rows; ++f) {
    Lanes<T> acc{};
    for (Index l0 = 0; l0 < ld; l0 += kLanes) acc += load_lanes(P + f * ld + l0);
    out[f] = sum_lanes(acc);
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
  const Index n = v.n, k = v.k, d = v.d, r = v.r, ld = panel_stride(n);
  const T* b = layer.b ? layer.b->data() : nullptr;
  fused_.X = fused_.U = {};  // until the panels below hold this forward's X and U
  T* Xt = panel(fused_.Xt, k, ld);
  T* Ut = panel(fused_.Ut, r, ld);
  T* Yt = panel(fused_.strip, d, kStrip);
  for (Index first = 0; first < n; first += kStrip) {
    const Index rows = std::min(kStrip, n - first), lanes = panel_stride(rows);
    T* xt = Xt + first;
    T* ut = Ut + first;
    load_rows(v.X + first * k, k, rows, xt, ld);
    combine(v.A, k, Index(1), r, k, T(1), xt, ld, ut, ld, lanes);         // U = X A^T
    combine(v.W, k, Index(1), d, k, T(1), xt, ld, Yt, kStrip, lanes, b);  // Y = X W^T + b
    combine(v.B, r, Index(1), d, r, layer.scale, ut, ld, Yt, kStrip, lanes, nullptr,
            /*accumulate=*/true);  // Y += s U B^T
    store_rows(ut, ld, r, rows, U.data() + first * r);
    store_rows(Yt, kStrip, d, rows, Y.data() + first * d);
  }
  wrote(U);
  wrote(Y);
  fused_.X = {v.X, n, k};
  fused_.U = {U.data(), n, r};
  return true;
}

template <typename T>
bool CpuBackend<T>::fused_lora_backward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& dY,
                                        const LoraLayerGradients<T>& grads) {
  if (!fused_small_layers_) return false;
  check_fused_backward(layer, U, dY, grads);
  const LayerView<T> v = view_of(layer);
  if (!small_enough(v)) return false;
  const Index n = v.n, k = v.k, d = v.d, r = v.r, ld = panel_stride(n);
  const T s = layer.scale;

  // X and U feature-major: the forward's copies when this backward follows it (see the top).
  T* Xt = panel(fused_.Xt, k, ld);
  T* Ut = panel(fused_.Ut, r, ld);
  if (!fused_.X.is(*layer.X)) {
    load_rows(v.X, k, n, Xt, ld);
    fused_.X = {v.X, n, k};
  }
  if (!fused_.U.is(U)) {
    load_rows(U.data(), r, n, Ut, ld);
    fused_.U = {U.data(), n, r};
  }

  T* dYt = panel(fused_.dYt, d, ld);
  T* dUt = panel(fused_.dUt, r, ld);
  T* dXt = grads.dX ? panel(fused_.strip, k, kStrip) : nullptr;
  for (Index first = 0; first < n; first += kStrip) {
    const Index rows = std::min(kStrip, n - first), lanes = panel_stride(rows);
    T* dyt = dYt + first;
    T* dut = dUt + first;
    load_rows(dY.data() + first * d, d, rows, dyt, ld);
    combine(v.B, Index(1), r, r, d, s, dyt, ld, dut, ld, lanes);  // dU = s dY B: coef(q, o) = B[o, q]
    store_rows(dut, ld, r, rows, grads.dU->data() + first * r);
    if (dXt) {
      combine(v.W, Index(1), k, k, d, T(1), dyt, ld, dXt, kStrip, lanes);                               // dX = dY W
      combine(v.A, Index(1), k, k, r, T(1), dut, ld, dXt, kStrip, lanes, nullptr, /*accumulate=*/true);  // += dU A
      store_rows(dXt, kStrip, k, rows, grads.dX->data() + first * k);
    }
  }
  dot_all(Ut, r, dYt, d, ld, s, grads.dB->data(), Index(1), r);     // dB[o, q] = s <dY_o, U_q>
  dot_all(dUt, r, Xt, k, ld, T(1), grads.dA->data(), k, Index(1));  // dA[q, j] = <dU_q, X_j>
  if (grads.db) row_sums(dYt, d, ld, grads.db->data());

  for (Tensor<T>* out : {grads.dU, grads.dA, grads.dB, grads.db, grads.dX}) {
    if (out) wrote(*out);
  }
  return true;
}

template bool CpuBackend<float>::fused_lora_forward(const LoraLayerTensors<float>&, Tensor<float>&, Tensor<float>&);
template bool CpuBackend<double>::fused_lora_forward(const LoraLayerTensors<double>&, Tensor<double>&, Tensor<double>&);
template bool CpuBackend<float>::fused_lora_backward(const LoraLayerTensors<float>&, const Tensor<float>&,
                                                     const Tensor<float>&, const LoraLayerGradients<float>&);
template bool CpuBackend<double>::fused_lora_backward(const LoraLayerTensors<double>&, const Tensor<double>&,
                                                      const Tensor<double>&, const LoraLayerGradients<double>&);

}  // namespace relora
