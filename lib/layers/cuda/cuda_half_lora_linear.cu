// CudaHalfLoraLinear: the adapter layer on bf16 activations (cuda_lora_linear.hpp has the math).
// Its own kernels are the splits of fp32 operands into bf16 terms and the sums of the split
// products; every product is a cuBLAS one (HalfGemm, and FrozenBase's for W).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_half_gemm.cuh"
#include "cuda/cuda_resources.cuh"
#include "cuda/half_convert.cuh"
#include "layers/cuda/cuda_lora_linear.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// Where a split operand's terms go: element (i, j) of term slot t < slots at
// ptr[t * slot_stride + i * row_stride + j * col_stride], slot t holding term which[t] (0 hi,
// 1 mid, 2 lo) of the value.
struct TermLayout {
  std::uint16_t* ptr = nullptr;  // null: not written
  std::int64_t slot_stride = 0, row_stride = 0, col_stride = 1;
  int which[3] = {0, 1, 2};
  int slots = 3;
};

// value(i, j) = scale (sum over `slots`, 1 to 3, of P[t * p_slot + i * p_ld + j]) for i < rows,
// j < cols, the slots added from the last (smallest) to the first; written to `sum` (row-major, ld cols)
// when it is not null, and split into bf16 terms laid out as `first` and `second` say. `extra`,
// when not null, takes the column after the slots unscaled: extra[i] = P[i * p_ld + slots * p_slot].
struct SumAndSplit {
  const float* P;
  int slots;
  std::int64_t p_slot, p_ld;
  std::int64_t rows;
  int cols;
  float scale;
  float* sum;
  float* extra;
  TermLayout first, second;
};

// A layout whose consecutive columns are not adjacent in memory (a transposed one).
__host__ __device__ bool transposed(const TermLayout& layout) { return layout.ptr != nullptr && layout.col_stride != 1; }

__device__ void write_terms(const TermLayout& layout, std::int64_t i, int j, const std::uint16_t (&terms)[3]) {
  if (layout.ptr == nullptr) return;
  std::uint16_t* at = layout.ptr + i * layout.row_stride + j * layout.col_stride;
#pragma unroll
  for (int t = 0; t < 3; ++t) {
    // Selected, not indexed, so that the terms stay in registers.
    const int w = layout.which[t];
    if (t < layout.slots) at[t * layout.slot_stride] = w == 0 ? terms[0] : (w == 1 ? terms[1] : terms[2]);
  }
}

// The value of element (i, j) of a sum and split, e = i cols + j (rows x cols is far below 2^31:
// rank-sized operands and sums), its sum and extra written, and its bf16 terms.
__device__ void sum_element(const SumAndSplit& a, int i, int j, int e, std::uint16_t (&terms)[3]) {
  const float* p = a.P + i * a.p_ld + j;
  float value = p[0];
  if (a.slots == 3) {
    value = (p[2 * a.p_slot] + p[a.p_slot]) + p[0];  // the smallest terms first
  } else if (a.slots == 2) {
    value = p[a.p_slot] + p[0];
  }
  value *= a.scale;
  if (a.sum) a.sum[e] = value;
  if (a.extra && j == 0) a.extra[i] = a.P[i * a.p_ld + a.slots * a.p_slot];
  half_convert::split_bf16(value, terms);
}

__device__ void sum_and_split_element(const SumAndSplit& a, int i, int j, int e) {
  std::uint16_t terms[3];
  sum_element(a, i, j, e, terms);
  write_terms(a.first, i, j, terms);
  write_terms(a.second, i, j, terms);
}

// A sum and split with a transposed layout, one 32 x 32 tile a block (kThreads = 256 threads): the
// tile's terms are staged in shared memory and written down its columns, so that the writes of
// both layouts are coalesced (written element by element, the transposed layout's stores land 2
// bytes each on as many rows as a warp has threads).
constexpr int kTile = 32;
constexpr int kTileRowsAtOnce = kThreads / kTile;
static_assert(kThreads % kTile == 0, "a tile's rows are shared evenly by the block's warps");

__device__ void sum_and_split_tile(const SumAndSplit& a, int tile) {
  // staged[t][column][row]; rows of 34 values (17 words, odd) put a warp's 32 columns on 32 banks.
  __shared__ std::uint16_t staged[3][kTile][kTile + 2];
  const int tiles_across = (a.cols + kTile - 1) / kTile;
  const int i0 = tile / tiles_across * kTile, j0 = tile % tiles_across * kTile;
  const int lane = threadIdx.x % kTile, row = threadIdx.x / kTile;
  for (int y = row; y < kTile; y += kTileRowsAtOnce) {
    const int i = i0 + y, j = j0 + lane;
    if (i >= a.rows || j >= a.cols) continue;
    std::uint16_t terms[3];
    sum_element(a, i, j, i * a.cols + j, terms);
    if (!transposed(a.first)) write_terms(a.first, i, j, terms);
    if (!transposed(a.second)) write_terms(a.second, i, j, terms);
#pragma unroll
    for (int t = 0; t < 3; ++t) staged[t][lane][y] = terms[t];
  }
  __syncthreads();
  for (int x = row; x < kTile; x += kTileRowsAtOnce) {
    const int i = i0 + lane, j = j0 + x;
    if (i >= a.rows || j >= a.cols) continue;
    const std::uint16_t terms[3] = {staged[0][x][lane], staged[1][x][lane], staged[2][x][lane]};
    if (transposed(a.first)) write_terms(a.first, i, j, terms);
    if (transposed(a.second)) write_terms(a.second, i, j, terms);
  }
}

__global__ void fill_kernel(std::int64_t count, std::uint16_t value, std::uint16_t* __restrict__ dst) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < count;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    dst[e] = value;
  }
}

// Up to three sums and splits that do not depend on one another, and one more with a transposed
// layout, in one launch: a step's small passes cost more in launches than in work. The tiled job
// takes the first blocks, a tile each; the others share the rest of the grid element by element.
struct SumsAndSplits {
  SumAndSplit job[3];
  int count = 0;
  int end[3] = {};  // job j covers the flat elements [end[j - 1], end[j]) (end[-1] = 0)
  SumAndSplit tiled{};
  int tiles = 0;

  void add(const SumAndSplit& a) {
    if (a.rows == 0 || a.cols == 0) return;
    if (transposed(a.first) || transposed(a.second)) {
      if (tiles > 0) {
        throw ConfigError("CudaHalfLoraLinear: two sums and splits with transposed layouts in one launch (the second " +
                          shape_string(a.rows, a.cols) + "); a launch tiles one");
      }
      tiled = a;
      tiles = int(((a.rows + kTile - 1) / kTile) * ((a.cols + kTile - 1) / kTile));
      return;
    }
    const std::int64_t before = elements();
    if (before + a.rows * a.cols > std::int64_t(1) << 30) {
      throw ShapeError("CudaHalfLoraLinear: rank-sized operands of " + std::to_string(before + a.rows * a.cols) +
                       " values in one pass (the last " + shape_string(a.rows, a.cols) + "), over 2^30");
    }
    job[count] = a;
    end[count] = int(before + a.rows * a.cols);
    ++count;
  }
  __host__ __device__ int elements() const { return count == 0 ? 0 : end[count - 1]; }
};

// Job j's element `local`.
__device__ void sum_and_split_local(const SumAndSplit& a, int local) {
  const int i = local / a.cols;
  sum_and_split_element(a, i, local - i * a.cols, local);
}

__global__ void sums_and_splits_kernel(const SumsAndSplits jobs) {
  if (int(blockIdx.x) < jobs.tiles) {  // the same for the whole block: its barrier is safe
    sum_and_split_tile(jobs.tiled, blockIdx.x);
    return;
  }
  const int total = jobs.elements();
  const int blocks = gridDim.x - jobs.tiles;
  for (int e = (blockIdx.x - jobs.tiles) * blockDim.x + threadIdx.x; e < total; e += blocks * blockDim.x) {
    // The job chosen by branches, not by an index: the jobs stay in the parameter space.
    if (e < jobs.end[0]) {
      sum_and_split_local(jobs.job[0], e);
    } else if (e < jobs.end[1]) {
      sum_and_split_local(jobs.job[1], e - jobs.end[0]);
    } else {
      sum_and_split_local(jobs.job[2], e - jobs.end[1]);
    }
  }
}

void run(const SumsAndSplits& jobs, CudaContext& context) {
  if (jobs.count == 0 && jobs.tiles == 0) return;
  context.activate();
  const int flat_blocks = jobs.count == 0 ? 0 : grid_for(jobs.elements(), context.sm_count());
  sums_and_splits_kernel<<<jobs.tiles + flat_blocks, kThreads, 0, context.stream()>>>(jobs);
  RELORA_CHECK_LAUNCH("sums_and_splits_kernel");
}

void sum_and_split(const SumAndSplit& a, CudaContext& context) {
  SumsAndSplits jobs;
  jobs.add(a);
  run(jobs, context);
}

// The terms of a plain fp32 matrix (rows x cols, row-major), in one layout or two.
SumAndSplit split(const float* src, std::int64_t rows, int cols, const TermLayout& layout,
                  const TermLayout& second = TermLayout{}) {
  return SumAndSplit{src, 1, 0, cols, rows, cols, 1.0f, nullptr, nullptr, layout, second};
}

// A layout with its first `slots` slots only.
TermLayout first_slots(TermLayout layout, int slots) {
  layout.slots = slots;
  return layout;
}

// The row length of the 16-bit term buffers: 3r terms and two more columns (the bias's, or db's
// ones), rounded up to 8 values (16 bytes) so that every row starts aligned for the tensor cores.
Index terms_ld(Index r) { return (3 * r + 2 + 7) / 8 * 8; }

// Slots side by side along the columns of a buffer whose rows are `ld` long; stacked along its
// rows (rows x cols each); or the same for the transposed matrix (cols x rows each, stacked).
TermLayout side_by_side(std::uint16_t* ptr, int cols, Index ld, int a, int b, int c) {
  return TermLayout{ptr, cols, ld, 1, {a, b, c}, 3};
}
TermLayout stacked(std::uint16_t* ptr, std::int64_t rows, int cols, int a, int b, int c) {
  return TermLayout{ptr, rows * cols, cols, 1, {a, b, c}, 3};
}
TermLayout stacked_transposed(std::uint16_t* ptr, std::int64_t rows, int cols, int a, int b, int c) {
  return TermLayout{ptr, rows * cols, 1, rows, {a, b, c}, 3};
}

}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

bool CudaHalfLoraLinear::suits(const LoraConfig& config) { return config.base_precision == BasePrecision::bf16; }

int CudaHalfLoraLinear::split_terms() const { return this->backend_->math_mode() == MathMode::tf32 ? 2 : 3; }

std::uint32_t CudaHalfLoraLinear::step_signature() const {
  return CudaAdapterLoraLinear<float>::step_signature() | (format_ != BasePrecision::fp32 ? 16u : 0u) |
         (split_terms() == 2 ? 32u : 0u);
}

bool CudaHalfLoraLinear::take_half_activations(BasePrecision format) {
  const bool takes = format != BasePrecision::fp32 && this->base_.has_half_activation_products(format) &&
                     format == BasePrecision::bf16;  // the splits are bf16 terms
  format_ = takes ? format : BasePrecision::fp32;
  if (takes && !gemm_) gemm_ = std::make_shared<HalfGemm>(cuda());
  return takes;
}

void CudaHalfLoraLinear::size_half_batch(Index n, int terms) {
  if (n == half_rows_ && terms == half_terms_) return;
  Backend<float>& be = *this->backend_;
  const Index k = this->in_features(), d = this->out_features(), r = this->rank(), ld = terms_ld(r);
  if (n != half_rows_) {
    Y_half_ = HalfBuffer(be, n, d);
    products_ = be.allocate(1, std::max(n * 3 * r, d * ld + 3 * r * k));  // dB's and dA's side by side
    left_terms_ = HalfBuffer(be, n, ld);
    U_terms_ = HalfBuffer(be, n, ld);
    dU_terms_ = HalfBuffer(be, n, ld);
    wide_X_ = Tensor<float>(), wide_dY_ = Tensor<float>(), wide_dX_ = Tensor<float>();
  }
  if (A_forward_terms_.empty()) {
    A_forward_terms_ = HalfBuffer(be, 3 * r, k);
    A_backward_terms_ = HalfBuffer(be, 3 * r, k);
    B_forward_terms_ = HalfBuffer(be, ld, d);
    // Rows past b's terms stay zero: the product with the bias runs over all ld rows (a depth
    // that is a multiple of 8 takes cuBLAS's fast kernels; the left operand has ones there).
    const std::int64_t pad = (ld - 3 * r - 2) * d;
    if (pad > 0) {
      fill_kernel<<<grid_for(pad, cuda().sm_count()), kThreads, 0, cuda().stream()>>>(
          pad, std::uint16_t(0), B_forward_terms_.tensor().data() + (3 * r + 2) * d);
      RELORA_CHECK_LAUNCH("fill_kernel");
    }
    B_backward_terms_ = HalfBuffer(be, d, ld);
  }
  // Ones everywhere: the columns after the terms stay ones (the bias's pair in the forward's left
  // operand, db's column beside U's `terms` r terms); the terms are rewritten by every step. Again
  // when the number of terms changes, which moves db's column.
  CudaContext& context = cuda();
  context.activate();
  for (HalfBuffer* buffer : {&left_terms_, &U_terms_}) {
    const std::int64_t count = buffer->tensor().size();
    fill_kernel<<<grid_for(count, context.sm_count()), kThreads, 0, context.stream()>>>(
        count, half_bits::bf16_nearest(1.0f), buffer->tensor().data());
    RELORA_CHECK_LAUNCH("fill_kernel");
  }
  half_rows_ = n;
  half_terms_ = terms;
}

const HalfTensor& CudaHalfLoraLinear::forward_half(const HalfTensor& X) {
  if (format_ == BasePrecision::fp32) {
    throw ConfigError("CudaHalfLoraLinear forward_half: 16-bit activations were not taken");
  }
  const Index n = X.rows(), k = this->in_features(), d = this->out_features(), r = this->rank();
  if (X.cols() != k || n <= 0) {
    throw ShapeError("LoraLinear forward (16-bit): X is " + X.shape() + " but the layer takes [n x " +
                     std::to_string(k) + "] with n >= 1");
  }
  const int terms = split_terms();
  size_half_batch(n, terms);
  X_half_ = &X;
  CudaContext& context = cuda();
  HalfTensor& Y = Y_half_.tensor();
  last_forward_fp32_ = through_fp32();
  if (last_forward_fp32_) {
    if (!wide_X_.same_shape(n, k)) wide_X_ = this->backend_->allocate(n, k);
    half_convert::widen(X.data(), X.size(), format_, wide_X_.data(), context.stream(), context.sm_count());
    const Tensor<float>& Y32 = CudaAdapterLoraLinear<float>::forward(wide_X_);
    half_convert::round_to_nearest(Y32.data(), Y32.size(), format_, Y.data(), context.stream(), context.sm_count());
    return Y;
  }
  const Index ld = terms_ld(r);
  const int rank = int(r);
  std::uint16_t* left = left_terms_.tensor().data();
  std::uint16_t* right = B_forward_terms_.tensor().data();
  const bool bias = this->has_bias();
  // b's two terms after B's, against the left operand's two columns of ones.
  const SumAndSplit bias_terms =
      split(this->base_.bias().data(), d, 1, TermLayout{right + 3 * r * d, d, 1, 1, {0, 1, 2}, 2});
  if (this->merged()) {
    // Y = round(b), then Y = round(f(X W^T + Y)).
    if (bias) {
      sum_and_split(bias_terms, context);
      gemm_->multiply(Trans::no, Trans::no, n, d, ld - 3 * r, 1.0f, left + 3 * r, ld, right + 3 * r * d, d, 0.0f, Y.data(), d,
                      format_, HalfGemm::Output::half);
    }
    this->base_.forward_half(X, bias ? 1.0f : 0.0f, this->output_activation(), Y);
    return Y;
  }
  float* P = products_.data();
  // A's and B's terms for this step, forward's and backward's layouts at once (the optimizer
  // changes them only after the backward), and b's, in one pass. The products against X and dY
  // (bf16 already) take `terms` terms of A and B; the adapter's terms of Y and dX three.
  SumsAndSplits parameters;
  parameters.add(split(this->A_.data(), r, int(k), first_slots(stacked(A_forward_terms_.tensor().data(), r, int(k), 0, 1, 2), terms),
                       stacked(A_backward_terms_.tensor().data(), r, int(k), 0, 1, 0)));
  parameters.add(split(this->B_.data(), d, rank, stacked_transposed(right, d, rank, 0, 1, 0),
                       first_slots(side_by_side(B_backward_terms_.tensor().data(), rank, ld, 0, 1, 2), terms)));
  if (bias) parameters.add(bias_terms);
  run(parameters, context);
  // U = X A^T from A's terms; s U's terms for the adapter's term of Y and (with db's ones after
  // them) for dB.
  const Index tr = terms * r;
  gemm_->multiply(Trans::no, Trans::yes, n, tr, k, 1.0f, X.data(), k, A_forward_terms_.tensor().data(), k, 0.0f, P,
                  tr, format_, HalfGemm::Output::fp32);
  sum_and_split(SumAndSplit{P, terms, r, tr, n, rank, this->scale_, nullptr, nullptr, side_by_side(left, rank, ld, 0, 0, 1),
                            first_slots(side_by_side(U_terms_.tensor().data(), rank, ld, 0, 1, 2), terms)},
                context);
  // Y = round(s U B^T + b), then Y = round(f(X W^T + Y)).
  gemm_->multiply(Trans::no, Trans::no, n, d, bias ? ld : 3 * r, 1.0f, left, ld, right, d, 0.0f, Y.data(), d,
                  format_, HalfGemm::Output::half);
  this->base_.forward_half(X, 1.0f, this->output_activation(), Y);
  return Y;
}

void CudaHalfLoraLinear::backward_half(const HalfTensor& dY, HalfTensor* dX) {
  if (X_half_ == nullptr) throw ConfigError("LoraLinear backward (16-bit): forward_half was not called");
  if (this->merged()) {
    throw ConfigError("LoraLinear " + std::to_string(this->in_features()) + " -> " +
                      std::to_string(this->out_features()) +
                      ": cannot train while the adapter is merged into W; unmerge() or reinit() first");
  }
  const Index n = half_rows_, k = this->in_features(), d = this->out_features(), r = this->rank();
  require_shape(dY, n, d, "LoraLinear backward dY (16-bit)");
  if (dX) require_shape(*dX, n, k, "LoraLinear backward dX (16-bit)");
  CudaContext& context = cuda();
  if (last_forward_fp32_) {
    Backend<float>& be = *this->backend_;
    if (!wide_dY_.same_shape(n, d)) wide_dY_ = be.allocate(n, d);
    half_convert::widen(dY.data(), dY.size(), format_, wide_dY_.data(), context.stream(), context.sm_count());
    if (dX && !wide_dX_.same_shape(n, k)) wide_dX_ = be.allocate(n, k);
    CudaAdapterLoraLinear<float>::backward(wide_dY_, dX ? &wide_dX_ : nullptr);
    if (dX) {
      half_convert::round_to_nearest(wide_dX_.data(), wide_dX_.size(), format_, dX->data(), context.stream(),
                                     context.sm_count());
    }
    return;
  }
  if (split_terms() != half_terms_) {
    throw ConfigError("LoraLinear backward (16-bit): the math mode changed between the forward and the backward");
  }
  const HalfTensor& X = *X_half_;
  const int terms = half_terms_;
  const Index ld = terms_ld(r), tr = terms * r;
  const int rank = int(r);
  float* P = products_.data();
  std::uint16_t* dU_terms = dU_terms_.tensor().data();
  std::uint16_t* left = left_terms_.tensor().data();
  // dU = s dY B from B's terms; dU's terms for dA and (three) for dX.
  gemm_->multiply(Trans::no, Trans::no, n, tr, d, 1.0f, dY.data(), d, B_backward_terms_.tensor().data(), ld, 0.0f, P,
                  tr, format_, HalfGemm::Output::fp32);
  sum_and_split(SumAndSplit{P, terms, r, tr, n, rank, this->scale_, nullptr, nullptr,
                            first_slots(side_by_side(dU_terms, rank, ld, 0, 1, 2), terms),
                            dX ? side_by_side(left, rank, ld, 0, 0, 1) : TermLayout{}},
                context);
  // dB = dY^T (s U) and db = dY^T 1 in one product, and dA = dU^T X, both summed in one pass.
  const bool db = this->bias_trains();
  float* P_dB = P;
  float* P_dA = P + d * ld;
  gemm_->multiply(Trans::yes, Trans::no, d, db ? ld : tr, n, 1.0f, dY.data(), d, U_terms_.tensor().data(), ld,
                  0.0f, P_dB, ld, format_, HalfGemm::Output::fp32);
  gemm_->multiply(Trans::yes, Trans::no, tr, k, n, 1.0f, dU_terms, ld, X.data(), k, 0.0f, P_dA, k, format_,
                  HalfGemm::Output::fp32);
  SumsAndSplits gradients;
  gradients.add(SumAndSplit{P_dB, terms, r, ld, d, rank, 1.0f, this->dB_.data(), db ? this->db_.data() : nullptr,
                            TermLayout{}, TermLayout{}});
  gradients.add(SumAndSplit{P_dA, terms, r * k, k, r, int(k), 1.0f, this->dA_.data(), nullptr, TermLayout{}, TermLayout{}});
  run(gradients, context);
  if (dX) {
    // dX = round(dU A), then dX = round(dY W + dX).
    gemm_->multiply(Trans::no, Trans::no, n, k, 3 * r, 1.0f, left, ld, A_backward_terms_.tensor().data(), k, 0.0f,
                    dX->data(), k, format_, HalfGemm::Output::half);
    this->base_.input_gradient_half(dY, 1.0f, *dX);
  }
}

}  // namespace relora
