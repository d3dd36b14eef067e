// A bf16 base's products on AMX tiles, the sibling of the reference CPU kernels
// (frozen_base_kernels_cpu.cpp) for CPUs with AMX-BF16 (Intel Xeon from Sapphire Rapids on).
// Chosen per product while the backend's math mode is tf32; strict mode and fp16 bases stay on
// the reference kernels.
//
// C (n x N) = A (n x K) B (K x N), fp32 accumulation: the forward Y = X W^T (A = X, B = W^T,
// K = k, N = d) and the backward dX = dY W + beta dX (A = dY, B = W, K = d, N = k). A is rounded
// to bf16 to nearest (as the CUDA backend rounds X and dY before its tensor-core products) into a
// buffer whose rows are padded with zeros to a multiple of 32 values; B is packed, zero-padded,
// into the tiles' pair-interleaved ("VNNI") layout: a tile holds 32 values of K by 16 columns,
// its row r the pairs (B[2r][c], B[2r+1][c]) of the 16 columns c. Each task computes a 32 x 32
// block of C in four accumulator tiles, stepping through K 32 values at a time (tiles 0-3: C;
// 4, 5: A's two row halves; 6, 7: B's two column halves). Both buffers are kept between products.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu/cpu_parallel.hpp"
#include "cpu/cpu_row_passes.hpp"
#include "layers/cpu/cpu_bf16_support.hpp"
#include "layers/cpu/cpu_bf16_sibling_kernels.hpp"
#include "layers/cpu/grown_buffer.hpp"

namespace relora {
namespace {

constexpr Index kStep = 32;                          // values of K per tile product; rows of C per task
constexpr Index kTileValues = 16 * 32;               // bf16 values in one tile (16 rows of 64 bytes)
constexpr int kRowBytes = 64;                        // bytes of a tile row
// AMX multiplies more than ten times as fast as a core's fp32 vector units: a thread is worth
// waking for proportionally more work than the reference kernels' threshold (cpu_parallel.hpp).
constexpr double kTileSpeedup = 16;

struct alignas(64) TileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

Index round_up(Index x, Index multiple) { return (x + multiple - 1) / multiple * multiple; }

// f(i) for every i in [0, count), on every thread when the pass is large.
template <typename F>
void for_each_row(Index count, Index values_per_row, F&& f) {
  if (run_parallel(count * values_per_row)) {
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < count; ++i) f(i);
  } else {
    for (Index i = 0; i < count; ++i) f(i);
  }
}

// dst (rows_padded x cols_padded) = src (rows x cols, fp32) rounded to bf16 to nearest, zeros
// around it.
void round_padded(const float* src, Index rows, Index cols, Index rows_padded, Index cols_padded, std::uint16_t* dst) {
  for_each_row(rows_padded, cols_padded, [&](Index i) {
    std::uint16_t* out = dst + i * cols_padded;
    if (i >= rows) {
      std::fill_n(out, cols_padded, std::uint16_t(0));
      return;
    }
    const float* in = src + i * cols;
    for (Index p = 0; p < cols; ++p) {
      out[p] = half_bits::round_float(in[p], BasePrecision::bf16, HalfRounding::nearest, 0.0f);
    }
    std::fill(out + cols, out + cols_padded, std::uint16_t(0));
  });
}

// Where B[kk][c] goes in the packed tiles of a B with `k_steps` steps of K.
inline Index packed_index(Index kk, Index c, Index k_steps) {
  const Index tile = (c / 16) * k_steps + kk / kStep;
  return tile * kTileValues + ((kk % kStep) / 2) * 32 + (c % 16) * 2 + (kk % 2);
}

// The packed tiles of B = W^T (K = k, N = d) from W (d x k), or of B = W (K = d, N = k).
void pack(const std::uint16_t* W, Index d, Index k, bool transpose, Index k_padded, Index n_padded,
          std::uint16_t* packed) {
  const Index k_steps = k_padded / kStep;
  const Index K = transpose ? k : d, N = transpose ? d : k;
  if (K != k_padded || N != n_padded) std::fill_n(packed, k_padded * n_padded, std::uint16_t(0));
  // One row of W at a time, read in order; each row's values land in places no other row writes.
  for_each_row(d, k, [&](Index j) {
    const std::uint16_t* row = W + j * k;
    if (transpose) {
      for (Index p = 0; p < k; ++p) packed[packed_index(p, j, k_steps)] = row[p];  // B[p][j] = W[j][p]
    } else {
      for (Index p = 0; p < k; ++p) packed[packed_index(j, p, k_steps)] = row[p];  // B[j][p] = W[j][p]
    }
  });
}

// C (rows x cols, leading dimension ldc) = beta C + A B, A (rows_padded x k_padded, bf16) and B
// packed (k_padded x n_padded); rows_padded and n_padded are multiples of 32.
void multiply(const std::uint16_t* A, Index rows, Index rows_padded, Index k_padded, const std::uint16_t* B,
              Index cols, Index n_padded, float beta, float* C, Index ldc) {
  const Index k_steps = k_padded / kStep;
  const Index row_blocks = rows_padded / kStep, col_blocks = n_padded / kStep;
  const Index tasks = row_blocks * col_blocks;
  const double multiply_adds = double(rows) * double(cols) * double(k_padded) / kTileSpeedup;
  const int parts = threads_for_multiply_adds(multiply_adds, tasks);
  parallel_parts(parts, [&](int part, int part_count) {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = 16;
      config.colsb[t] = kRowBytes;
    }
    _tile_loadconfig(&config);
    alignas(64) float block[kStep * kStep];
    // A contiguous range of tasks, row block by row block: a thread reuses its rows of A.
    const Index first = tasks * part / part_count, last = tasks * (part + 1) / part_count;
    for (Index task = first; task < last; ++task) {
      const Index rb = task / col_blocks, cb = task % col_blocks;
      const std::uint16_t* a0 = A + rb * kStep * k_padded;
      const std::uint16_t* a1 = a0 + 16 * k_padded;
      const std::uint16_t* b0 = B + (2 * cb) * k_steps * kTileValues;
      const std::uint16_t* b1 = b0 + k_steps * kTileValues;
      const int a_stride = int(k_padded * Index(sizeof(std::uint16_t)));
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (Index s = 0; s < k_steps; ++s) {
        _tile_loadd(4, a0 + s * kStep, a_stride);
        _tile_loadd(5, a1 + s * kStep, a_stride);
        _tile_loadd(6, b0 + s * kTileValues, kRowBytes);
        _tile_loadd(7, b1 + s * kTileValues, kRowBytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      const int c_stride = int(kStep * Index(sizeof(float)));
      _tile_stored(0, block, c_stride);
      _tile_stored(1, block + 16, c_stride);
      _tile_stored(2, block + 16 * kStep, c_stride);
      _tile_stored(3, block + 16 * kStep + 16, c_stride);
      const Index valid_rows = std::min(kStep, rows - rb * kStep), valid_cols = std::min(kStep, cols - cb * kStep);
      for (Index i = 0; i < valid_rows; ++i) {
        float* out = C + (rb * kStep + i) * ldc + cb * kStep;
        const float* in = block + i * kStep;
        if (beta == 0.0f) {
          std::copy_n(in, valid_cols, out);
        } else {
          for (Index j = 0; j < valid_cols; ++j) out[j] = beta * out[j] + in[j];
        }
      }
    }
    _tile_release();
  });
}

class AmxFrozenBaseKernels final : public CpuBf16SiblingKernels {
 public:
  AmxFrozenBaseKernels(Backend<float>& backend, std::unique_ptr<FrozenBaseKernels> reference)
      : CpuBf16SiblingKernels(backend, std::move(reference)) {}

  void forward_product(const Tensor<float>& X, const std::uint16_t* W, BasePrecision format, const float* bias,
                       float beta, bool relu, Tensor<float>& Y) override {
    const Index n = X.rows(), k = X.cols(), d = Y.cols();
    if (!runs_product(format, n, k, d)) return reference_->forward_product(X, W, format, bias, beta, relu, Y);
    const Index rows_padded = round_up(n, kStep), k_padded = round_up(k, kStep), n_padded = round_up(d, kStep);
    std::uint16_t* A = operand_.get(rows_padded * k_padded);
    std::uint16_t* B = packed_.get(k_padded * n_padded);
    round_padded(X.data(), n, k, rows_padded, k_padded, A);
    pack(W, d, k, true, k_padded, n_padded, B);
    multiply(A, n, rows_padded, k_padded, B, d, n_padded, beta, Y.data(), d);
    finish_rows(bias, relu, Y);
  }

  void input_gradient_product(const Tensor<float>& dY, const std::uint16_t* W, BasePrecision format, float beta,
                              Tensor<float>& dX) override {
    const Index n = dY.rows(), d = dY.cols(), k = dX.cols();
    if (!runs_product(format, n, k, d)) return reference_->input_gradient_product(dY, W, format, beta, dX);
    const Index rows_padded = round_up(n, kStep), k_padded = round_up(d, kStep), n_padded = round_up(k, kStep);
    std::uint16_t* A = operand_.get(rows_padded * k_padded);
    std::uint16_t* B = packed_.get(k_padded * n_padded);
    round_padded(dY.data(), n, d, rows_padded, k_padded, A);
    pack(W, d, k, false, k_padded, n_padded, B);
    multiply(A, n, rows_padded, k_padded, B, k, n_padded, beta, dX.data(), k);
  }

 private:
  GrownBuffer<std::uint16_t> operand_;  // X or dY rounded to bf16, padded
  GrownBuffer<std::uint16_t> packed_;   // W^T or W in the tiles' layout, padded
};

}  // namespace

std::unique_ptr<FrozenBaseKernels> make_amx_frozen_base_kernels(Backend<float>& backend,
                                                                 std::unique_ptr<FrozenBaseKernels> reference) {
  return std::make_unique<AmxFrozenBaseKernels>(backend, std::move(reference));
}

}  // namespace relora
