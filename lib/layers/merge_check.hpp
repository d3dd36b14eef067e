#pragma once
// The check before an adapter is folded into its base: every entry of F (W + s B A), where F
// scales rows (LoRA: none; DoRA: diag(g)), must be finite, or the merge is refused with W
// unchanged. Every entry is at most row_factor (max|W| + |s| r max|B| max|A|) in magnitude: where
// that bound is finite with room to spare (always, in practice) nothing more is needed, and no
// memory; otherwise the sums are formed a block of rows at a time, F applied, and checked.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "relora/core/backend.hpp"

namespace relora {

// refuse(where) throws, naming the layer. row_factor(), called once W, A and B are known to be
// finite, returns the largest of F's factors (1 without F), or refuses. finish_block(first_row,
// block) applies F to the rows [first_row, first_row + block.rows()) of W + s B A held in `block`.
template <typename T, typename Refuse, typename RowFactor, typename FinishBlock>
void check_merge_finite(Backend<T>& be, const Tensor<T>& W, T s, const Tensor<T>& B, const Tensor<T>& A,
                        Refuse&& refuse, RowFactor&& row_factor, FinishBlock&& finish_block) {
  const Index d = W.rows(), k = W.cols(), r = A.rows();
  const double a = double(be.max_abs(A)), b = double(be.max_abs(B)), w = double(be.max_abs(W));
  if (!std::isfinite(a)) refuse("lora_A holds NaN or Inf");
  if (!std::isfinite(b)) refuse("lora_B holds NaN or Inf");
  if (!std::isfinite(w)) refuse("W holds NaN or Inf");
  const double bound = row_factor() * (w + std::abs(double(s)) * double(r) * b * a);
  if (bound <= 0.5 * double(std::numeric_limits<T>::max())) return;
  const Index block_rows = std::max<Index>(1, std::min<Index>(d, (Index(1) << 22) / std::max<Index>(k, 1)));
  Tensor<T> block = be.allocate(block_rows, k);  // a merge, not a training step
  for (Index first = 0; first < d; first += block_rows) {
    const Index rows = std::min(block_rows, d - first);
    const Tensor<T> W_rows(const_cast<T*>(W.data()) + first * k, rows, k, W.device(), [](T*) {});
    const Tensor<T> B_rows(const_cast<T*>(B.data()) + first * r, rows, r, B.device(), [](T*) {});
    Tensor<T> sum(block.data(), rows, k, block.device(), [](T*) {});
    be.copy(W_rows, sum);
    be.gemm(Trans::no, Trans::no, s, B_rows, A, T(1), sum);
    finish_block(first, sum);
    if (!std::isfinite(double(be.max_abs(sum)))) {
      refuse("in rows [" + std::to_string(first) + ", " + std::to_string(first + rows) + ")");
    }
  }
}

}  // namespace relora
