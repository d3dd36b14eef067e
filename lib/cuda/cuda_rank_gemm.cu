// Rank-sized products in 3xTF32 on tensor cores (cuda_rank_gemm.cuh says what and why).
//
// Both kernels give each warp a strip of the output and a stretch of the depth, and feed
// mma.sync.m16n8k8 (TF32 in, fp32 accumulated) straight from registers. The depth index an MMA
// lane holds is free to choose as long as both operands agree on it, so each thread reads the
// large operand as float4s: whole 32-byte sectors, the operand read once.
#include <algorithm>
#include <cstdint>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_rank_gemm.cuh"

namespace relora {
namespace cuda_detail {
namespace {

constexpr int kWarps = 4;  // warps per block
constexpr int kBlockThreads = 32 * kWarps;
constexpr std::int64_t kStep = 16;          // depth per iteration (two MMAs of depth 8)
constexpr std::int64_t kMinDepthPerWarp = 256;  // a split shorter than this costs more than it gains
constexpr int kWarpsPerSm = 16;             // splits are chosen to give about this many warps per SM

// The small operand S (K x R): S(k, r) = data[k stride_k + r stride_r], zero outside [0, k_end) x [0, R).
struct SmallOperand {
  const float* data;
  std::int64_t stride_k, stride_r;
  int R;
  __device__ __forceinline__ float at(std::int64_t k, int r, std::int64_t k_end) const {
    return k < k_end && r < R ? __ldg(data + k * stride_k + r * stride_r) : 0.0f;
  }
};

struct SplitValue {
  std::uint32_t hi, lo;
};

__device__ __forceinline__ std::uint32_t tf32_bits(float x) {
  std::uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return bits;
}

// x = hi + lo, both TF32, up to lo's own rounding. NaN and Inf are carried by hi alone (x - hi
// would be NaN for an infinite x), so they reach the result as in an fp32 product.
__device__ __forceinline__ SplitValue split(float x) {
  SplitValue s;
  s.hi = tf32_bits(x);
  const float rest = x - __uint_as_float(s.hi);
  s.lo = isfinite(rest) ? tf32_bits(rest) : 0u;
  return s;
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                         std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// c += a b in 3xTF32, the small terms first. a: the A fragment (rows g, g + 8 at depth t, then
// the same rows at depth t + 4); b: the B fragment (depth t, t + 4 at column g).
__device__ __forceinline__ void mma_3xtf32(float (&c)[4], const SplitValue (&a)[4], const SplitValue (&b)[2]) {
  mma_tf32(c, a[0].lo, a[1].lo, a[2].lo, a[3].lo, b[0].hi, b[1].hi);
  mma_tf32(c, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b[0].lo, b[1].lo);
  mma_tf32(c, a[0].hi, a[1].hi, a[2].hi, a[3].hi, b[0].hi, b[1].hi);
}

__device__ __forceinline__ float component(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Four values of a row from `first` on; zero for a row outside the operand or past `end`. `first`
// and `end` are multiples of 4 and the row 16-byte aligned (RankProducts::multiply takes only
// such operands), so four values are all inside or all outside, and the load is aligned.
__device__ __forceinline__ float4 load4(const float* row, std::int64_t first, std::int64_t end, bool row_inside) {
  if (!row_inside || first >= end) return make_float4(0.f, 0.f, 0.f, 0.f);
  return __ldg(reinterpret_cast<const float4*>(row + first));
}

// The small operand, split into TF32 (hi, lo) pairs once per product by split_small_kernel and laid
// out in the order the MMA lanes read it, so the product kernels load it as whole uint4s and split
// only the large operand.
//   rows:    [depth step of 16][column tile of 8][lane][4 depths 4t + e][hi, lo]: S(k, 8 nt + g)
//   columns: [depth step of 16][row tile of 16][lane][MMA of the step][fragment a0..a3][hi, lo]
struct SplitSmall {
  SmallOperand S;
  std::int64_t K;
  int tiles;          // NT (rows) or RT (columns)
  bool for_columns;
  std::uint32_t* out;
};

__global__ void __launch_bounds__(256) split_small_kernel(SplitSmall w) {
  const std::int64_t steps = (w.K + kStep - 1) / kStep;
  const std::int64_t total = steps * w.tiles * 32 * 8;  // eight values per lane and tile
  for (std::int64_t idx = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += std::int64_t(gridDim.x) * blockDim.x) {
    const int value = int(idx & 7), lane = int((idx >> 3) & 31);
    const std::int64_t rest = idx >> 8;
    const int tile = int(rest % w.tiles);
    const std::int64_t k0 = (rest / w.tiles) * kStep;
    const int g = lane >> 2, t = lane & 3;
    float x;
    if (!w.for_columns) {
      x = value < 4 ? w.S.at(k0 + 4 * t + value, tile * 8 + g, w.K) : 0.f;  // four values per lane
    } else {
      const int step = value >> 2, frag = value & 3;
      x = w.S.at(k0 + 8 * step + t + 4 * (frag >> 1), tile * 16 + g + 8 * (frag & 1), w.K);
    }
    const SplitValue v = split(x);
    if (!w.for_columns && value >= 4) continue;
    const std::int64_t slot = w.for_columns ? idx : (rest * 32 + lane) * 4 + value;
    w.out[2 * slot] = v.hi;
    w.out[2 * slot + 1] = v.lo;
  }
}

// c += t, where t collected one depth step's MMAs from zero: the tensor cores' own sums stay short,
// and the long sum over the depth is rounded as fp32 additions are.
__device__ __forceinline__ void add_fragment(float (&c)[4], float (&t)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    c[e] += t[e];
    t[e] = 0.f;
  }
}

// ---- rows: P (M x R) = L (M x K) S. A warp takes 16 MT rows of L and NT column tiles of 8
// (R <= 8 NT). Per depth step of 16 each thread reads L[row][k + 4t .. k + 4t + 3] for its rows g and
// g + 8 of every row tile; its two MMAs take depths (4t, 4t + 1) and then (4t + 2, 4t + 3) as the
// fragment's (t, t + 4).
struct RowsWork {
  const float* L;
  std::int64_t M, K, ld;
  const uint4* S;                // split_small_kernel's rows layout
  std::int64_t depth_per_split;  // a multiple of kStep
  float* partial;                // [split][M][8 NT]
};

template <int MT, int NT>
__global__ void __launch_bounds__(kBlockThreads) rank_rows_kernel(RowsWork w) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const std::int64_t row0 = (std::int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * (16 * MT);
  if (row0 >= w.M) return;
  const std::int64_t k_begin = std::int64_t(blockIdx.y) * w.depth_per_split;
  const std::int64_t k_end = min(w.K, k_begin + w.depth_per_split);

  const float* rows[MT][2];
  bool inside[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::int64_t r = row0 + mt * 16 + g + 8 * h;
      inside[mt][h] = r < w.M;
      rows[mt][h] = w.L + (inside[mt][h] ? r : 0) * w.ld;
    }
  }
  float acc[MT][NT][4] = {};
  float step_sum[MT][NT][4] = {};
  for (std::int64_t k = k_begin; k < k_end; k += kStep) {
    const std::int64_t k4 = k + 4 * t;
    float4 l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) l[mt][h] = load4(rows[mt][h], k4, k_end, inside[mt][h]);
    }
    uint4 s[NT][2];
    const uint4* step_s = w.S + ((k / kStep) * NT * 32 + lane) * 2;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][0] = __ldg(step_s + nt * 64);
      s[nt][1] = __ldg(step_s + nt * 64 + 1);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const SplitValue a[4] = {split(component(l[mt][0], 2 * half)), split(component(l[mt][1], 2 * half)),
                                 split(component(l[mt][0], 2 * half + 1)), split(component(l[mt][1], 2 * half + 1))};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const SplitValue b[2] = {{s[nt][half].x, s[nt][half].y}, {s[nt][half].z, s[nt][half].w}};
          mma_3xtf32(step_sum[mt][nt], a, b);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) add_fragment(acc[mt][nt], step_sum[mt][nt]);
    }
  }
  constexpr int Q = 8 * NT;
  float* out = w.partial + std::int64_t(blockIdx.y) * w.M * Q;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::int64_t r = row0 + mt * 16 + g + 8 * h;
      if (r >= w.M) continue;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        out[r * Q + nt * 8 + 2 * t] = acc[mt][nt][2 * h];
        out[r * Q + nt * 8 + 2 * t + 1] = acc[mt][nt][2 * h + 1];
      }
    }
  }
}

// ---- columns: G (R x N) = S^T L, L (K x N). A warp takes 32 columns of L, j0 + [0, 32), and all of
// R in row tiles of 16 (R <= 16 RT). Per depth step of 16 (two MMAs of 8 rows of L) each thread
// reads L[i][j0 + 4g .. j0 + 4g + 3] for its rows i = t and t + 4 of the MMA: value q of the float4
// belongs to column tile q, whose fragment column g is L's column j0 + 4g + q.
struct ColumnsWork {
  const float* L;
  std::int64_t K, N, ld;
  const uint4* S;                // split_small_kernel's columns layout
  std::int64_t depth_per_split;  // a multiple of kStep
  float* partial;                // [split][16 RT][N]
};

template <int RT>
__global__ void __launch_bounds__(kBlockThreads) rank_columns_kernel(ColumnsWork w) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const std::int64_t j0 = (std::int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * 32;
  if (j0 >= w.N) return;
  const std::int64_t k_begin = std::int64_t(blockIdx.y) * w.depth_per_split;
  const std::int64_t k_end = min(w.K, k_begin + w.depth_per_split);
  const std::int64_t j = j0 + 4 * g;

  float acc[RT][4][4] = {};
  float step_sum[RT][4][4] = {};
  for (std::int64_t k = k_begin; k < k_end; k += kStep) {
    float4 l[2][2];  // [MMA of the step][fragment depth t or t + 4]
#pragma unroll
    for (int step = 0; step < 2; ++step) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const std::int64_t i = k + 8 * step + t + 4 * h;
        l[step][h] = load4(w.L + (i < k_end ? i : 0) * w.ld, j, w.N, i < k_end);
      }
    }
    uint4 s[RT][4];
    const uint4* step_s = w.S + ((k / kStep) * RT * 32 + lane) * 4;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int v = 0; v < 4; ++v) s[rt][v] = __ldg(step_s + rt * 128 + v);
    }
#pragma unroll
    for (int step = 0; step < 2; ++step) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const SplitValue b[2] = {split(component(l[step][0], q)), split(component(l[step][1], q))};
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          const uint4& f0 = s[rt][2 * step];
          const uint4& f1 = s[rt][2 * step + 1];
          const SplitValue a[4] = {{f0.x, f0.y}, {f0.z, f0.w}, {f1.x, f1.y}, {f1.z, f1.w}};
          mma_3xtf32(step_sum[rt][q], a, b);
        }
      }
    }
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int q = 0; q < 4; ++q) add_fragment(acc[rt][q], step_sum[rt][q]);
    }
  }
  float* out = w.partial + std::int64_t(blockIdx.y) * (16 * RT) * w.N;
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const std::int64_t r = rt * 16 + g + 8 * (e >> 1);
        const std::int64_t col = j0 + 4 * (2 * t + (e & 1)) + q;
        if (col < w.N) out[r * w.N + col] = acc[rt][q][e];
      }
    }
  }
}

// ---- C(p, q) = alpha (sum of the splits' partial(p, q), in split order) + beta C(p, q), for the
// p < P_used, q < Q_used that are C's; partials are P x Q per split.
struct FinishWork {
  const float* partial;
  std::int64_t splits, P, Q, P_used, Q_used;
  float* C;
  std::int64_t stride_p, stride_q;
  float alpha, beta;
};

__global__ void __launch_bounds__(256) rank_finish_kernel(FinishWork w) {
  const std::int64_t total = w.P_used * w.Q_used;
  for (std::int64_t idx = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t p = idx / w.Q_used, q = idx % w.Q_used;
    float sum = 0.f;
    for (std::int64_t s = 0; s < w.splits; ++s) sum += w.partial[(s * w.P + p) * w.Q + q];
    float* c = w.C + p * w.stride_p + q * w.stride_q;
    *c = w.beta == 0.f ? w.alpha * sum : w.alpha * sum + w.beta * *c;
  }
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace

RankProducts::RankProducts(cudaStream_t stream, int sm_count, void* workspace, std::size_t workspace_bytes)
    : stream_(stream),
      sm_count_(sm_count),
      workspace_(static_cast<float*>(workspace)),
      workspace_floats_(std::int64_t(workspace_bytes / sizeof(float))) {}

bool RankProducts::multiply(Trans trans_a, Trans trans_b, float alpha, const Tensor<float>& A,
                            const Tensor<float>& B, float beta, Tensor<float>& C) {
  const std::int64_t m = C.rows(), n = C.cols();
  const std::int64_t K = trans_a == Trans::no ? A.cols() : A.rows();
  if (std::min(m, n) > kMaxRank || K < kStep || m == 0 || n == 0) return false;

  // The orientation: which operand is large, whether the depth runs along its rows (the rows
  // kernel) or down its columns (the columns kernel), and where output (p, q) lands in C.
  const bool rank_columns = n <= kMaxRank && n <= m;  // C (m x R): the large operand is op(A)
  const Tensor<float>& large = rank_columns ? A : B;
  const Tensor<float>& small = rank_columns ? B : A;
  const bool depth_along_rows = rank_columns ? trans_a == Trans::no : trans_b == Trans::yes;
  // S (K x R) = op(B) when C's columns are rank-sized, op(A)^T when its rows are.
  const bool small_depth_major = rank_columns ? trans_b == Trans::no : trans_a == Trans::yes;
  SmallOperand S{small.data(), small_depth_major ? small.cols() : 1, small_depth_major ? 1 : small.cols(),
                 int(rank_columns ? n : m)};
  const std::int64_t width = rank_columns ? m : n;  // the large operand's other side
  if (width * K < kMinLargeValues) return false;
  if (reinterpret_cast<std::uintptr_t>(large.data()) % 16 != 0 || large.cols() % 4 != 0) return false;

  const std::int64_t R = S.R;
  const std::int64_t target_warps = std::int64_t(sm_count_) * kWarpsPerSm;
  // (p, q) of the partials and their place in C: rows kernel (p = large's row, q = r), columns
  // kernel (p = r, q = large's column); C holds (large side, r) when its columns are rank-sized.
  std::int64_t P, Q, P_used, Q_used, stride_p, stride_q, base_warps, split_words;
  const std::int64_t steps = ceil_div(K, kStep);
  int tiles;
  if (depth_along_rows) {
    Q = R <= 8 ? 8 : R <= 16 ? 16 : R <= 32 ? 32 : 64;
    tiles = int(Q / 8);
    P = width, P_used = width, Q_used = R;
    base_warps = ceil_div(width, 16 * (Q <= 16 ? 4 : 2));
    stride_p = rank_columns ? C.cols() : 1;
    stride_q = rank_columns ? 1 : C.cols();
    split_words = steps * tiles * 32 * 8;
  } else {
    P = R <= 16 ? 16 : R <= 32 ? 32 : 64;
    tiles = int(P / 16);
    Q = width, P_used = R, Q_used = width;
    base_warps = ceil_div(width, 32);
    stride_p = rank_columns ? 1 : C.cols();
    stride_q = rank_columns ? C.cols() : 1;
    split_words = steps * tiles * 32 * 16;
  }
  // The workspace: the split small operand, then the partial sums (16-byte aligned).
  const std::int64_t split_floats = ceil_div(split_words, 4) * 4;
  const std::int64_t partial_room = workspace_floats_ - split_floats;
  std::int64_t splits = std::clamp<std::int64_t>(ceil_div(target_warps, base_warps), 1,
                                                 std::max<std::int64_t>(1, K / kMinDepthPerWarp));
  if (partial_room < P * Q) return false;
  splits = std::min(splits, partial_room / (P * Q));
  const std::int64_t depth = ceil_div(ceil_div(K, splits), kStep) * kStep;
  splits = ceil_div(K, depth);
  auto* split_small = reinterpret_cast<std::uint32_t*>(workspace_);
  float* partial = workspace_ + split_floats;

  const SplitSmall sw{S, K, tiles, !depth_along_rows, split_small};
  const std::int64_t split_blocks = std::min<std::int64_t>(ceil_div(split_words / 2, 256), std::int64_t(sm_count_) * 8);
  split_small_kernel<<<unsigned(split_blocks), 256, 0, stream_>>>(sw);
  RELORA_CHECK_LAUNCH("split_small_kernel");
  const dim3 grid(unsigned(ceil_div(base_warps, kWarps)), unsigned(splits));
  const auto* split_vectors = reinterpret_cast<const uint4*>(split_small);
  if (depth_along_rows) {
    const RowsWork w{large.data(), width, K, large.cols(), split_vectors, depth, partial};
    if (Q == 8) rank_rows_kernel<4, 1><<<grid, kBlockThreads, 0, stream_>>>(w);
    if (Q == 16) rank_rows_kernel<4, 2><<<grid, kBlockThreads, 0, stream_>>>(w);
    if (Q == 32) rank_rows_kernel<2, 4><<<grid, kBlockThreads, 0, stream_>>>(w);
    if (Q == 64) rank_rows_kernel<2, 8><<<grid, kBlockThreads, 0, stream_>>>(w);
    RELORA_CHECK_LAUNCH("rank_rows_kernel");
  } else {
    const ColumnsWork w{large.data(), K, width, large.cols(), split_vectors, depth, partial};
    if (P == 16) rank_columns_kernel<1><<<grid, kBlockThreads, 0, stream_>>>(w);
    if (P == 32) rank_columns_kernel<2><<<grid, kBlockThreads, 0, stream_>>>(w);
    if (P == 64) rank_columns_kernel<4><<<grid, kBlockThreads, 0, stream_>>>(w);
    RELORA_CHECK_LAUNCH("rank_columns_kernel");
  }
  const FinishWork f{partial, splits, P, Q, P_used, Q_used, C.data(), stride_p, stride_q, alpha, beta};
  const std::int64_t blocks = std::min<std::int64_t>(ceil_div(P_used * Q_used, 256), std::int64_t(sm_count_) * 8);
  rank_finish_kernel<<<unsigned(blocks), 256, 0, stream_>>>(f);
  RELORA_CHECK_LAUNCH("rank_finish_kernel");
  return true;
}

}  // namespace cuda_detail
}  // namespace relora
