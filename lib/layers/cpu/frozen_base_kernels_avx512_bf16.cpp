// A bf16 base's products on AVX-512 BF16 dot products (VDPBF16PS), the sibling of the reference
// CPU kernels (frozen_base_kernels_cpu.cpp) for CPUs with AVX512_BF16 and without AMX. Chosen per
// product while the backend's math mode is tf32; strict mode and fp16 bases stay on the reference
// kernels.
//
// C (n x N) = A (n x K) B (K x N), fp32 accumulation: the forward Y = X W^T (A = X, B = W^T,
// K = k, N = d) and the backward dX = dY W + beta dX (A = dY, B = W, K = d, N = k). A is rounded
// to bf16 to nearest (as the CUDA backend rounds X and dY before its tensor-core products) into
// rows of an even length. B is packed a block at a time, 64 columns by up to kDepth values of K,
// into a thread's own buffer (512 KiB at most, kept in its core's L2): four groups of 16 columns,
// each group a run of pairs, pair p of a group 32 values, (B[2p][c], B[2p+1][c]) for its 16
// columns c, the layout one VDPBF16PS multiplies against a broadcast pair of A. A micro-kernel
// keeps a 6 x 64 block of C in 24 registers and steps through the block's depth a pair at a time.
// The instruction set is a function attribute on the functions that use it, not a flag on the
// file: the inline functions and templates the file instantiates stay portable, so the linker
// cannot hand another translation unit an AVX-512 copy of them.
#include "layers/cpu/cpu_bf16_support.hpp"

#if defined(RELORA_WITH_AVX512_BF16)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/cpu_parallel.hpp"
#include "cpu/cpu_row_passes.hpp"
#include "layers/cpu/cpu_bf16_sibling_kernels.hpp"
#include "layers/cpu/grown_buffer.hpp"

#define RELORA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace relora {
namespace {

constexpr Index kRows = 6;                          // rows of C per micro-kernel
constexpr Index kGroups = 4;                        // 16-column groups per micro-kernel
constexpr Index kBlockColumns = 16 * kGroups;       // columns of B per packed block
constexpr Index kDepth = 4096;                      // values of K per packed block (even)
// A VDPBF16PS does 32 multiply-adds where an fp32 FMA does 16: a thread is worth waking for
// proportionally more work than the reference kernels' threshold (cpu_parallel.hpp).
constexpr double kDotSpeedup = 2;
constexpr __mmask16 kAll = 0xFFFF;

Index round_up(Index x, Index multiple) { return (x + multiple - 1) / multiple * multiple; }

// The shape of one product, and where its operands are.
struct Product {
  const std::uint16_t* A;  // n x lda, bf16, rows zero-padded to an even length
  Index lda;
  const std::uint16_t* W;  // bf16, rows of k values
  Index k;
  bool transposed;  // B = W^T (the forward) or B = W (the backward)
  Index n, K, N;
  float beta;
  float* C;  // n x N, row-major
};

// dst (rows x ld) = src (rows x cols, fp32) rounded to bf16 to nearest, a zero after each row when
// ld > cols.
RELORA_AVX512_BF16 void round_rows(const float* src, Index first, Index last, Index cols, Index ld,
                                   std::uint16_t* dst) {
  for (Index i = first; i < last; ++i) {
    const float* in = src + i * cols;
    std::uint16_t* out = dst + i * ld;
    for (Index p = 0; p < cols; ++p) out[p] = half_bits::bf16_nearest(in[p]);
    for (Index p = cols; p < ld; ++p) out[p] = 0;
  }
}

// B's block of columns [c0, c0 + 64) and depth [k0, k0 + depth) packed as the file's header says;
// `pairs` = depth / 2 rounded up. Columns past N and the odd value past an odd depth are zeros.
RELORA_AVX512_BF16 void pack_block(const Product& p, Index c0, Index k0, Index depth, std::uint16_t* block) {
  const Index pairs = (depth + 1) / 2;
  for (Index g = 0; g < kGroups; ++g) {
    std::uint16_t* group = block + g * pairs * 32;
    const Index first = c0 + g * 16;
    const Index valid = std::max<Index>(0, std::min<Index>(16, p.N - first));
    if (valid == 0) {
      std::memset(group, 0, std::size_t(pairs) * 32 * sizeof(std::uint16_t));
      continue;
    }
    const __mmask16 columns = __mmask16((1u << valid) - 1u);
    if (p.transposed) {
      // Column c of B is row first + c of W: pair q of the 16 columns is one 32-bit value from
      // each of 16 rows, gathered. The gather reads whole pairs, so the last pair of an odd depth
      // is written value by value.
      const Index full = depth / 2;
      const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32(int(p.k * 2)));
      const std::uint16_t* rows = p.W + first * p.k + k0;
      for (Index q = 0; q < full; ++q) {
        const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), columns, offsets, rows + 2 * q, 1);
        _mm512_storeu_si512(group + q * 32, pair);
      }
      if (full < pairs) {
        std::uint16_t* last = group + full * 32;
        std::memset(last, 0, 32 * sizeof(std::uint16_t));
        for (Index c = 0; c < valid; ++c) last[2 * c] = rows[c * p.k + 2 * full];
      }
    } else {
      // Column c of B is column first + c of W: pair q interleaves 16 values of W's rows
      // k0 + 2q and k0 + 2q + 1.
      for (Index q = 0; q < pairs; ++q) {
        const Index r = k0 + 2 * q;
        const __m256i even = _mm256_maskz_loadu_epi16(columns, p.W + r * p.k + first);
        const __m256i odd = 2 * q + 1 < depth ? _mm256_maskz_loadu_epi16(columns, p.W + (r + 1) * p.k + first)
                                              : _mm256_setzero_si256();
        // (The zero-masked forms: GCC 12 warns about the unmasked ones' undefined lanes.)
        const __m512i pair = _mm512_or_si512(_mm512_maskz_cvtepu16_epi32(kAll, even),
                                             _mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, odd), 16));
        _mm512_storeu_si512(group + q * 32, pair);
      }
    }
  }
}

// C[0:R, 0:64] (leading dimension ldc; the columns `masks` leave out untouched) = A B over one
// packed block of `pairs` pairs, plus: nothing (add == 0), C (add == 1, a later block of K), or
// beta C (the first block when beta != 0).
template <int R>
RELORA_AVX512_BF16 void multiply_block(const std::uint16_t* a, Index lda, const std::uint16_t* block, Index pairs,
                                       float* c, Index ldc, const __mmask16 (&masks)[kGroups], float add) {
  __m512 acc[R][kGroups];
  for (int i = 0; i < R; ++i) {
    for (int g = 0; g < kGroups; ++g) acc[i][g] = _mm512_setzero_ps();
  }
  const std::uint16_t* b0 = block;
  const Index group_stride = pairs * 32;
  for (Index q = 0; q < pairs; ++q) {
    __m512bh b[kGroups];
    for (int g = 0; g < kGroups; ++g) b[g] = (__m512bh)_mm512_loadu_si512(b0 + g * group_stride + q * 32);
    for (int i = 0; i < R; ++i) {
      std::int32_t pair;
      std::memcpy(&pair, a + i * lda + 2 * q, sizeof(pair));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      for (int g = 0; g < kGroups; ++g) acc[i][g] = _mm512_dpbf16_ps(acc[i][g], x, b[g]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int g = 0; g < kGroups; ++g) {
      if (masks[g] == 0) continue;
      float* out = c + i * ldc + g * 16;
      __m512 value = acc[i][g];
      if (add != 0.0f) value = _mm512_fmadd_ps(_mm512_set1_ps(add), _mm512_maskz_loadu_ps(masks[g], out), value);
      _mm512_mask_storeu_ps(out, masks[g], value);
    }
  }
}

RELORA_AVX512_BF16 void multiply_rows(const Product& p, Index first_row, Index last_row, Index c0, Index k0,
                                      const std::uint16_t* block, Index pairs, float add) {
  __mmask16 masks[kGroups];
  for (Index g = 0; g < kGroups; ++g) {
    const Index valid = std::max<Index>(0, std::min<Index>(16, p.N - c0 - g * 16));
    masks[g] = __mmask16((1u << valid) - 1u);
  }
  for (Index i = first_row; i < last_row; i += kRows) {
    const std::uint16_t* a = p.A + i * p.lda + k0;
    float* c = p.C + i * p.N + c0;
    switch (std::min(kRows, last_row - i)) {
      case 6: multiply_block<6>(a, p.lda, block, pairs, c, p.N, masks, add); break;
      case 5: multiply_block<5>(a, p.lda, block, pairs, c, p.N, masks, add); break;
      case 4: multiply_block<4>(a, p.lda, block, pairs, c, p.N, masks, add); break;
      case 3: multiply_block<3>(a, p.lda, block, pairs, c, p.N, masks, add); break;
      case 2: multiply_block<2>(a, p.lda, block, pairs, c, p.N, masks, add); break;
      default: multiply_block<1>(a, p.lda, block, pairs, c, p.N, masks, add); break;
    }
  }
}

// One task: C's rows [first_row, last_row) and columns [c0, c0 + 64), every block of K.
void run_task(const Product& p, Index first_row, Index last_row, Index c0, std::uint16_t* block) {
  for (Index k0 = 0; k0 < p.K; k0 += kDepth) {
    const Index depth = std::min(kDepth, p.K - k0), pairs = (depth + 1) / 2;
    pack_block(p, c0, k0, depth, block);
    multiply_rows(p, first_row, last_row, c0, k0, block, pairs, k0 == 0 ? p.beta : 1.0f);
  }
}

class Avx512Bf16FrozenBaseKernels final : public CpuBf16SiblingKernels {
 public:
  Avx512Bf16FrozenBaseKernels(Backend<float>& backend, std::unique_ptr<FrozenBaseKernels> reference)
      : CpuBf16SiblingKernels(backend, std::move(reference)), blocks_(std::size_t(team_size())) {}

  void forward_product(const Tensor<float>& X, const std::uint16_t* W, BasePrecision format, const float* bias,
                       float beta, bool relu, Tensor<float>& Y) override {
    const Index n = X.rows(), k = X.cols(), d = Y.cols();
    if (!runs_product(format, n, k, d)) return reference_->forward_product(X, W, format, bias, beta, relu, Y);
    multiply(X, Product{nullptr, 0, W, k, true, n, k, d, beta, Y.data()});
    finish_rows(bias, relu, Y);
  }

  void input_gradient_product(const Tensor<float>& dY, const std::uint16_t* W, BasePrecision format, float beta,
                              Tensor<float>& dX) override {
    const Index n = dY.rows(), d = dY.cols(), k = dX.cols();
    if (!runs_product(format, n, k, d)) return reference_->input_gradient_product(dY, W, format, beta, dX);
    multiply(dY, Product{nullptr, 0, W, k, false, n, d, k, beta, dX.data()});
  }

 private:
  // C = A B + beta C with A = `left` rounded to bf16 (p.A and p.lda are set here).
  void multiply(const Tensor<float>& left, Product p) {
    p.lda = round_up(p.K, 2);
    std::uint16_t* A = operand_.get(p.n * p.lda);
    p.A = A;
    const float* src = left.data();
    if (run_parallel(p.n * p.lda)) {
      parallel_parts(team_size(), [&](int part, int parts) {
        round_rows(src, p.n * part / parts, p.n * (part + 1) / parts, p.K, p.lda, A);
      });
    } else {
      round_rows(src, 0, p.n, p.K, p.lda, A);
    }
    // Tasks: every block of 64 columns, split into row ranges when there are fewer blocks than
    // threads; a thread takes a contiguous run of them and packs each block it meets once.
    const Index column_blocks = (p.N + kBlockColumns - 1) / kBlockColumns;
    const double multiply_adds = double(p.n) * double(p.N) * double(p.K) / kDotSpeedup;
    const Index row_blocks = (p.n + kRows - 1) / kRows;
    const int threads = threads_for_multiply_adds(multiply_adds, std::max(column_blocks, row_blocks));
    // Enough tasks for the threads to share evenly (four each), but rows of at least 16 blocks a
    // task: a task packs its block of B again, a cost its rows repay.
    const Index wanted = threads > 1 ? (4 * threads + column_blocks - 1) / column_blocks : 1;
    const Index row_parts = std::max<Index>(1, std::min(wanted, row_blocks / 16));
    const Index tasks = column_blocks * row_parts;
    const Index block_values = kBlockColumns * round_up(std::min(kDepth, p.K), 2);
    const int parts = int(std::min<Index>(threads, tasks));
    if (blocks_.size() < std::size_t(parts)) blocks_.resize(std::size_t(parts));  // the team grew
    for (int t = 0; t < parts; ++t) blocks_[std::size_t(t)].get(block_values);    // before the threads start
    parallel_parts(parts, [&](int part, int part_count) {
      std::uint16_t* block = blocks_[std::size_t(part)].get(block_values);
      for (Index task = tasks * part / part_count; task < tasks * (part + 1) / part_count; ++task) {
        const Index cb = task / row_parts, rp = task % row_parts;
        // Row ranges in multiples of the micro-kernel's rows.
        const Index first = std::min(p.n, row_blocks * rp / row_parts * kRows);
        const Index last = std::min(p.n, row_blocks * (rp + 1) / row_parts * kRows);
        if (first < last) run_task(p, first, last, cb * kBlockColumns, block);
      }
    });
  }

  GrownBuffer<std::uint16_t> operand_;             // X or dY rounded to bf16
  std::vector<GrownBuffer<std::uint16_t>> blocks_;  // each thread's packed block of B
};

}  // namespace

std::unique_ptr<FrozenBaseKernels> make_avx512_bf16_frozen_base_kernels(Backend<float>& backend,
                                                                         std::unique_ptr<FrozenBaseKernels> reference) {
  return std::make_unique<Avx512Bf16FrozenBaseKernels>(backend, std::move(reference));
}

}  // namespace relora

#endif  // RELORA_WITH_AVX512_BF16
