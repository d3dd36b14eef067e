#pragma once
// Rank-sized products on tensor cores with fp32 accuracy: C = alpha op(A) op(B) + beta C where one
// side of C has at most 64 entries (a LoRA rank) and the depth is long, as in U = X A^T,
// dU = dY B, dB = dY^T U and dA = dU^T X. cuBLAS runs these as small SIMT products in strict fp32
// (a LoRA step's adapter products then cost as much as its large bf16 products) and as split-depth
// TF32 products otherwise; either way well under the speed at which the large operand streams from
// memory, and these products only need to read it once.
//
// The kernels read the large operand once and run the products as three TF32 tensor-core products
// of split operands ("3xTF32"): every fp32 value x is the sum of two TF32 values, hi = tf32(x) and
// lo = tf32(x - hi), and a b = hi_a hi_b + hi_a lo_b + lo_a hi_b up to lo_a lo_b and lo's own
// rounding, about 2^-22 |a b|, against fp32's 2^-24 for the product alone; the sums accumulate in
// fp32. So they serve the strict math mode (tests/test_cuda_rank_gemm.cpp bounds their error by
// a small multiple of an fp32 product's) and the TF32 one alike.
//
// Two shapes of work, by where the depth runs in the large operand L:
//   rows:    P (M x R) = L (M x K) S (K x R), the depth along L's rows (contiguous): X A^T, dY B;
//   columns: G (R x N) = S^T (R x K) L (K x N), the depth down L's columns: dA, dB.
// Every product of the kind is one of the two, or one of them transposed (C^T = op(B)^T op(A)^T).
// A first kernel splits the small operand into its TF32 pairs, in the order the MMA lanes read it.
// The depth is split over warps for parallelism; each split writes its partial sums into a
// workspace of the backend's, and a last kernel adds them in a fixed order (the result does not
// depend on timing) and writes alpha sum + beta C. Each warp sums one depth step of 16 from zero
// and adds it to its running sum in fp32: the tensor cores' accumulation is not rounded as an fp32
// addition is, and a long chain of it loses several times fp32's accuracy.
#include <cuda_runtime.h>

#include <cstdint>

#include "relora/core/backend.hpp"

namespace relora {
namespace cuda_detail {

class RankProducts {
 public:
  // Products run on `stream` with `workspace` (bytes) for the partial sums; both outlive this.
  RankProducts(cudaStream_t stream, int sm_count, void* workspace, std::size_t workspace_bytes);

  // Runs C = alpha op(A) op(B) + beta C (beta 0 ignores C) and returns true when the product is
  // rank-sized and long enough to gain (min(m, n) <= 64, the large operand at least 2^20 values
  // and 16-byte aligned rows); false, with nothing queued, otherwise. Shapes are the caller's to
  // check (CudaBackend::gemm has).
  bool multiply(Trans trans_a, Trans trans_b, float alpha, const Tensor<float>& A, const Tensor<float>& B, float beta,
                Tensor<float>& C);

  static constexpr std::int64_t kMaxRank = 64;
  static constexpr std::int64_t kMinLargeValues = std::int64_t(1) << 20;

 private:
  cudaStream_t stream_;
  int sm_count_;
  float* workspace_;
  std::int64_t workspace_floats_;
};

}  // namespace cuda_detail
}  // namespace relora
