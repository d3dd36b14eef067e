#pragma once
// Row-major C += alpha op(A) op(B) on Eigen's GEMM kernels, with Eigen's packing buffers (blockA,
// blockB) in memory this object owns. Eigen's own product mallocs them on every product above its
// 128 KB stack limit; here they grow when a larger product first appears and are reused after,
// so a steady training step allocates nothing.
//
// Blocking sizes (computeProductBlockingSizes), the thread count, the split of the product over
// the threads and the kernels are Eigen's, so C is the same to the bit as
//   C.noalias() += alpha * op(A) * op(B)
// on the same number of threads (Eigen::nbThreads()). Products with a LoRA rank's side run as
// slabs instead, one per thread, each Eigen's single-threaded product (kNarrow in cpu_gemm.cpp
// says why). The beta of C = alpha op(A) op(B) + beta C is the caller's: CpuBackend::gemm
// scales C first, in parallel.
#include <cstddef>
#include <memory>

#include "relora/core/backend.hpp"

namespace relora {

template <typename T>
class CpuGemm {
 public:
  CpuGemm();
  ~CpuGemm();
  CpuGemm(const CpuGemm&) = delete;
  CpuGemm& operator=(const CpuGemm&) = delete;

  // C (m x n) += alpha op(A) op(B), op(A) m x k, op(B) k x n, every tensor contiguous row-major
  // and 64-byte aligned (as CpuBackend allocates them). Shapes are the caller's to check.
  // One caller at a time: the workspace is shared by the products of this object. Inside an
  // active parallel region it is not used: Eigen's own product runs instead (it allocates, but is
  // safe to call from several threads at once).
  void multiply_add(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B, Tensor<T>& C);

  // Bytes of packing memory held now (grows to the largest product seen, never shrinks).
  std::size_t workspace_bytes() const { return capacity_ * sizeof(T); }

 private:
  struct ParallelInfo;  // Eigen's per-thread GemmParallelInfo array, kept with the workspace

  T* reserve(std::size_t count);  // the workspace, at least count elements; outside parallel regions only
  ParallelInfo& reserve_info(std::ptrdiff_t threads);

  T* workspace_ = nullptr;
  std::size_t capacity_ = 0;  // elements
  std::unique_ptr<ParallelInfo> info_;
};

}  // namespace relora
