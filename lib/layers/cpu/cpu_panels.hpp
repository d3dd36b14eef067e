#pragma once
// Feature-major panels of a small batch and the arithmetic on them, for CpuTinyLoraLinear's
// passes (cpu_tiny_lora_linear.cpp, the only includer).
//
// A panel holds a row-major n x width matrix M transposed: feature f of row i at P[f * ld + i],
// ld = n rounded up to whole SIMD registers (`kLanes` rows of the batch per register), the lanes
// past n zero, so that every loop over lanes runs on full registers and the padding adds nothing to
// the reductions. The products then run as multiply-adds across lanes with the small matrices'
// entries broadcast: every lane a real row of the batch, where row-major the batch's long side
// would land on the micro-kernel's short side.
//
// Rows are transposed in groups of kGroup = 8 (two 4 x 4 blocks per AVX register); a register
// holds one or two groups (kLanes = 16 floats with AVX-512, 8 without).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <Eigen/Core>

#include "relora/core/tensor.hpp"

// Lanes<double> is 64 bytes, passed differently with and without AVX-512: only between functions
// of the one file that includes this, all compiled with the same flags.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace relora::cpu_panels {

// Rows of the batch per SIMD register of T: 64 bytes with AVX-512, else 8 (one AVX register of
// floats, two of doubles).
// RELORA_PANEL_LANES_256 keeps 256-bit lanes where AVX-512 is available, to compare the two
// widths (docs/PERFORMANCE.md).
#if defined(__AVX512F__) && !defined(RELORA_PANEL_LANES_256)
#define RELORA_PANEL_LANES_512 1
#else
#define RELORA_PANEL_LANES_512 0
#endif
template <typename T>
constexpr Index kLanes = RELORA_PANEL_LANES_512 ? Index(64 / sizeof(T)) : Index(8);
constexpr Index kGroup = 8;  // rows per transpose
static_assert(kLanes<float> % kGroup == 0 && kLanes<double> % kGroup == 0, "a register holds whole groups");

inline Index round_up(Index n, Index multiple) { return (n + multiple - 1) / multiple * multiple; }

// The leading dimension of a panel of n rows.
template <typename T>
Index panel_stride(Index n) {
  return round_up(n, kLanes<T>);
}

template <typename T>
T* panel(std::vector<T>& buffer, Index features, Index ld) {
  const std::size_t size = std::size_t(std::max<Index>(features * ld, 1));
  if (buffer.size() < size) buffer.resize(size);  // only while a layer is larger than any before it
  return buffer.data();
}

// ---- transposes of one group of rows: row-major (row i, feature f at M[i * width + f]) to
// feature-major (at out[f * ld + i]) and back

// Element by element: for a group of fewer than kGroup rows (the lanes past `rows` are zeroed)
// and for widths under one 4-wide block.
template <typename T>
void rows_to_lanes_scalar(const T* M, Index width, Index rows, T* out, Index ld) {
  for (Index f = 0; f < width; ++f) {
    for (Index i = 0; i < rows; ++i) out[f * ld + i] = M[i * width + f];
    for (Index i = rows; i < kGroup; ++i) out[f * ld + i] = T(0);
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
#define RELORA_INLINE __attribute__((always_inline)) inline

template <typename T>
RELORA_INLINE void rows_to_lanes(const T* M, Index width, T* out, Index ld) {
  rows_to_lanes_scalar(M, width, kGroup, out, ld);
}

template <typename T>
RELORA_INLINE void lanes_to_rows(const T* in, Index ld, Index width, T* M) {
  lanes_to_rows_scalar(in, ld, width, kGroup, M);
}

template <typename Block>
RELORA_INLINE void for_each_block_of_4(Index width, Block&& block) {
  Index f = 0;
  for (; f + 4 <= width; f += 4) block(f);
  if (f < width) block(width - 4);
}

#if defined(__AVX__)
// Transposes the 4 x 4 block in each 128-bit half of a, b, c, d: 8 in-lane shuffles. Row q of the
// group and row q + 4 share a register (one per half), so no shuffle crosses the halves (those
// cost 3 cycles on Intel) and the lanes come out in row order.
RELORA_INLINE void transpose_halves(__m256& a, __m256& b, __m256& c, __m256& d) {
  const __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
  const __m256 cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
  a = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(1, 0, 1, 0));
  b = _mm256_shuffle_ps(ab_lo, cd_lo, _MM_SHUFFLE(3, 2, 3, 2));
  c = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(1, 0, 1, 0));
  d = _mm256_shuffle_ps(ab_hi, cd_hi, _MM_SHUFFLE(3, 2, 3, 2));
}

template <>
RELORA_INLINE void rows_to_lanes<float>(const float* M, Index width, float* out, Index ld) {
  if (width < 4) return rows_to_lanes_scalar(M, width, kGroup, out, ld);
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
RELORA_INLINE void lanes_to_rows<float>(const float* in, Index ld, Index width, float* M) {
  if (width < 4) return lanes_to_rows_scalar(in, ld, width, kGroup, M);
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
RELORA_INLINE void rows_to_lanes<float>(const float* M, Index width, float* out, Index ld) {
  using Eigen::internal::Packet4f;
  if (width < 4) return rows_to_lanes_scalar(M, width, kGroup, out, ld);
  for_each_block_of_4(width, [&](Index f0) {
    for (Index i0 = 0; i0 < kGroup; i0 += 4) {
      Eigen::internal::PacketBlock<Packet4f, 4> block;
      for (int q = 0; q < 4; ++q) block.packet[q] = Eigen::internal::ploadu<Packet4f>(M + (i0 + q) * width + f0);
      Eigen::internal::ptranspose(block);
      for (int f = 0; f < 4; ++f) Eigen::internal::pstoreu(out + (f0 + f) * ld + i0, block.packet[f]);
    }
  });
}

template <>
RELORA_INLINE void lanes_to_rows<float>(const float* in, Index ld, Index width, float* M) {
  using Eigen::internal::Packet4f;
  if (width < 4) return lanes_to_rows_scalar(in, ld, width, kGroup, M);
  for_each_block_of_4(width, [&](Index f0) {
    for (Index i0 = 0; i0 < kGroup; i0 += 4) {
      Eigen::internal::PacketBlock<Packet4f, 4> block;
      for (int f = 0; f < 4; ++f) block.packet[f] = Eigen::internal::ploadu<Packet4f>(in + (f0 + f) * ld + i0);
      Eigen::internal::ptranspose(block);
      for (int q = 0; q < 4; ++q) Eigen::internal::pstoreu(M + (i0 + q) * width + f0, block.packet[q]);
    }
  });
}
#pragma GCC diagnostic pop
#endif

// f(width) with width a compile-time constant for the widths of the tiny layers (1 to 16), so
// that the transposes below compile to straight-line blocks: with the width known only at run
// time they spend as many instructions on addresses as on moving data.
template <typename F>
RELORA_INLINE void with_width(Index width, F&& f) {
  switch (width) {
#define RELORA_WIDTH(w) \
  case w: return f(std::integral_constant<Index, w>{});
    RELORA_WIDTH(1) RELORA_WIDTH(2) RELORA_WIDTH(3) RELORA_WIDTH(4) RELORA_WIDTH(5) RELORA_WIDTH(6)
    RELORA_WIDTH(7) RELORA_WIDTH(8) RELORA_WIDTH(9) RELORA_WIDTH(10) RELORA_WIDTH(11) RELORA_WIDTH(12)
    RELORA_WIDTH(13) RELORA_WIDTH(14) RELORA_WIDTH(15) RELORA_WIDTH(16)
#undef RELORA_WIDTH
    default: return f(width);
  }
}

// `rows` rows of the row-major matrix M into the lanes of the panel P (stride ld), group by group,
// then zeros up to the end of the last register; and back (the real rows only).
template <typename T>
void load_rows(const T* M, Index width_now, Index rows, T* P, Index ld) {
  with_width(width_now, [&](auto width_constant) {
    const Index width = width_constant;
    Index i = 0;
    for (; i + kGroup <= rows; i += kGroup) rows_to_lanes(M + i * width, width, P + i, ld);
    if (i < rows) {
      rows_to_lanes_scalar(M + i * width, width, rows - i, P + i, ld);
      i += kGroup;
    }
    const Index end = panel_stride<T>(rows);
    if (i < end) {
      for (Index f = 0; f < width; ++f) std::fill(P + f * ld + i, P + f * ld + end, T(0));
    }
  });
}

template <typename T>
void store_rows(const T* P, Index ld, Index width_now, Index rows, T* M) {
  with_width(width_now, [&](auto width_constant) {
    const Index width = width_constant;
    Index i = 0;
    for (; i + kGroup <= rows; i += kGroup) lanes_to_rows(P + i, ld, width, M + i * width);
    if (i < rows) lanes_to_rows_scalar(P + i, ld, width, rows - i, M + i * width);
  });
}

// ---- arithmetic on panels

// One register of lanes as a GCC/Clang vector: arrays of these stay in registers, where GCC keeps
// the same loops' T[kLanes] arrays on the stack (and zeroes them with `rep stos`).
template <typename T>
struct LanesOf {
  typedef T type __attribute__((vector_size(kLanes<T> * sizeof(T))));
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
  for (std::size_t c = 1; c < sizeof(V) / sizeof(v[0]); ++c) sum += v[c];
  return sum;
}

// out_j = base_j + factor * sum_i coef(j, i) in_i on `lanes` lanes (a multiple of kLanes), for G
// outputs, where coef(j, i) = coef[j * row_stride + i * col_stride] (so that the same loop serves
// a matrix and its transpose) and base_j is out_j itself when `accumulate`, else bias[j] (zero
// when bias is null). G is a template argument so that the accumulators stay in registers, one
// chain of multiply-adds each. V registers of lanes at a time: each broadcast coefficient (a load)
// then feeds V multiply-adds, which the loads would otherwise bound. Always inlined into the loop
// over the strip: as a call of its own GCC keeps the accumulators on the stack.
template <typename T, int G, int V>
__attribute__((always_inline)) inline void combine_groups(const T* coef, Index row_stride, Index col_stride,
                                                          Index inputs, T factor, const T* in, Index in_ld, T* out,
                                                          Index out_ld, const T* bias, bool accumulate) {
  constexpr Index L = kLanes<T>;
  Lanes<T> acc[G][V];
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < V; ++u) acc[g][u] = Lanes<T>{};
  }
  for (Index i = 0; i < inputs; ++i) {
    Lanes<T> x[V];
    for (int u = 0; u < V; ++u) x[u] = load_lanes(in + i * in_ld + u * L);
    for (int g = 0; g < G; ++g) {
      const T w = coef[g * row_stride + i * col_stride];
      for (int u = 0; u < V; ++u) acc[g][u] += w * x[u];
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < V; ++u) {
      T* o = out + g * out_ld + u * L;
      const Lanes<T> base = accumulate ? load_lanes(o) : Lanes<T>{} + (bias ? bias[g] : T(0));
      store_lanes(o, base + factor * acc[g][u]);
    }
  }
}

// One call covers a whole strip of rows: per register the call and the dispatch would cost as
// much as the arithmetic.
template <typename T, int G>
void combine_block(const T* coef, Index row_stride, Index col_stride, Index inputs, T factor, const T* in,
                   Index in_ld, T* out, Index out_ld, Index lanes, const T* bias, bool accumulate) {
  constexpr Index L = kLanes<T>;
  Index l0 = 0;
  for (; l0 + 2 * L <= lanes; l0 += 2 * L) {
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
// 6 outputs x 2 registers are 12 accumulators, as many as AVX2's 16 registers hold beside the
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

// ---- reductions over the whole batch (dA, dB, db, the loss)

// out[ja * out_row + ib * out_col] = factor * <a_ja, b_ib> (dot products over all ld lanes) for a
// block of GA x GB rows of the panels a and b: GA * GB accumulators in registers, GA + GB loads
// for GA * GB multiply-adds, and one horizontal sum per entry at the very end.
template <typename T, int GA, int GB>
void dot_block(const T* a, const T* b, Index ld, T factor, T* out, Index out_row, Index out_col) {
  Lanes<T> acc[GA][GB];
  for (int ja = 0; ja < GA; ++ja) {
    for (int ib = 0; ib < GB; ++ib) acc[ja][ib] = Lanes<T>{};
  }
  for (Index l0 = 0; l0 < ld; l0 += kLanes<T>) {
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
    for (Index l0 = 0; l0 < ld; l0 += kLanes<T>) acc += load_lanes(P + f * ld + l0);
    out[f] = sum_lanes(acc);
  }
}

// The MSE on panels, for `rows` real rows of each of `width` features: the panel D gets
// grad_scale (Y - target) from the panels Y and (target) Tg, as CpuBackend::mse writes it (the same
// float operations, so the same bits); the lanes past `rows` are left zero, whatever Y holds there
// (a bias). Returns the sum of the squared differences: each lane adds at most a strip's rows over
// kLanes (16 to 32) squares in T, and those partial sums are added in double, so that a large
// batch keeps its digits. (Squaring in double lane by lane, as CpuBackend::mse does, sends GCC
// through the stack for a vector wider than AVX2's registers.)
template <typename T>
double squared_errors_in_lanes(const T* Y, Index y_ld, const T* Tg, Index t_ld, T* D, Index d_ld, Index width,
                               Index rows, T grad_scale) {
  constexpr Index L = kLanes<T>;
  const Index full = rows / L * L;
  double sum = 0;
  for (Index f = 0; f < width; ++f) {
    const T* y = Y + f * y_ld;
    const T* t = Tg + f * t_ld;
    T* d = D + f * d_ld;
    Lanes<T> acc{};
    for (Index l0 = 0; l0 < full; l0 += L) {
      const Lanes<T> diff = load_lanes(y + l0) - load_lanes(t + l0);
      store_lanes(d + l0, grad_scale * diff);
      acc += diff * diff;
    }
    for (Index c = 0; c < L; ++c) sum += double(acc[c]);
    for (Index i = full; i < rows; ++i) {
      const T diff = y[i] - t[i];
      d[i] = grad_scale * diff;
      sum += double(diff) * double(diff);
    }
    for (Index i = rows; i < panel_stride<T>(rows); ++i) d[i] = T(0);
  }
  return sum;
}

#undef RELORA_INLINE

}  // namespace relora::cpu_panels
