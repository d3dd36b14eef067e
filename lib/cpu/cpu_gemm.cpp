// Eigen's GEMM on packing memory we own (see cpu_gemm.hpp for why).
//
// Eigen 3.4 takes its packing buffers from a level3_blocking object: the single-threaded kernel
// (general_matrix_matrix_product::run without GemmParallelInfo) uses blocking.blockA()/blockB()
// when they are set, so a level3_blocking whose blocks point into our workspace is enough there.
// The multi-threaded path is not reachable that way: Eigen's driver (parallelize_gemm, in
// Eigen/src/Core/products/Parallelizer.h) allocates the shared blockA with aligned_new, and its
// kernel (the `if(info)` branch of run in GeneralMatrixMatrix.h) declares each thread's blockB
// with no buffer argument, on the heap above 128 KB. Those two pieces are copied below from
// Eigen 3.4.0 (MPL 2.0, as the vendored Eigen), unchanged except that blockA and blockB come
// from the workspace; everything they call (packing, gebp kernel, blocking sizes) is Eigen's.
// If the vendored Eigen is upgraded, compare them with its Parallelizer.h and
// GeneralMatrixMatrix.h again.
#include "cpu/cpu_gemm.hpp"
#include "cpu/cpu_parallel.hpp"
#include "cpu/eigen_maps.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <new>

#if defined(_OPENMP)
#include <omp.h>
#endif

static_assert(EIGEN_WORLD_VERSION == 3 && EIGEN_MAJOR_VERSION == 4 && EIGEN_MINOR_VERSION == 0,
              "cpu_gemm.cpp copies Eigen 3.4.0's parallel GEMM driver; check it against this Eigen");

namespace relora {
namespace {

namespace ei = Eigen::internal;
using EIndex = Eigen::Index;


constexpr std::size_t kAlignment = 64;

// count elements rounded up to whole 64-byte lines, so that every block starts aligned (Eigen's
// packing stores aligned packets).
template <typename T>
std::size_t aligned_count(EIndex count) {
  constexpr std::size_t per_line = kAlignment / sizeof(T);
  return (std::size_t(count) + per_line - 1) / per_line * per_line;
}

// Products with a LoRA rank's side (m, n or the depth at most kNarrow) and at least kSplitWork
// multiply-adds: Eigen parallelises a product along one dimension with a shared
// packing step, which for these shapes keeps most of the threads waiting. Here each thread
// takes a contiguous slab of the longer side of C and runs Eigen's single-threaded kernel
// on it (Eigen does not nest inside a parallel region). The depth is never split, so every
// element is the same sum as in one product.
constexpr EIndex kNarrow = 256;
constexpr double kSplitWork = 1 << 20;

// One product C (m x n, leading dimension ldc) += alpha op(A) op(B), as pointers and strides.
template <typename T>
struct Product {
  EIndex m, n, k;
  const T* a;
  EIndex lda;
  bool trans_a;
  const T* b;
  EIndex ldb;
  bool trans_b;
  T* c;
  EIndex ldc;
  T alpha;
};

// Whether Eigen's product of these sizes reaches its blocked GEMM (generic_product_impl's
// GemmProduct addTo/scaleAndAddTo): tiny ones go to the coefficient-based product, a single
// row or column of C to GEMV. Those run as Eigen expressions; they allocate nothing unless GEMV
// copies a strided vector (an operand's column, or C's one column) of more than 128 KB (32768
// floats) into a contiguous temporary: a layer with one output and a batch above that would.
bool takes_gemm(EIndex m, EIndex n, EIndex k) {
  return m + n + k >= EIGEN_GEMM_TO_COEFFBASED_THRESHOLD && m > 1 && n > 1;
}

// Blocking sizes in the terms of Eigen's column-major kernel, which computes the row-major
// C = op(A) op(B) as its transpose C' = op(B)' op(A)': n rows (mc), m columns (nc), depth kc.
struct Blocking {
  EIndex kc, mc, nc;
};

// gemm_blocking_space's constructor with l3 blocking, one thread (the single-threaded kernel).
template <typename T>
Blocking sequential_blocking(EIndex m, EIndex n, EIndex k) {
  Blocking b{k, n, m};
  ei::computeProductBlockingSizes<T, T, 1>(b.kc, b.mc, b.nc, EIndex(1));
  return b;
}

// gemm_blocking_space::initParallel: mc stays n, since blockA holds all of op(B)' (each thread
// packs its share of it); kc and nc are cut for this many threads.
template <typename T>
Blocking parallel_blocking(EIndex m, EIndex n, EIndex k, EIndex threads) {
  Blocking b{k, n, m};
  EIndex mc = b.mc;
  ei::computeProductBlockingSizes<T, T, 1>(b.kc, mc, b.nc, threads);
  return b;
}

template <typename T>
EIndex sequential_block_count(const Blocking& b) {
  return EIndex(aligned_count<T>(b.mc * b.kc) + aligned_count<T>(b.kc * b.nc));
}

// Eigen's blocking object with its blocks in our workspace (gemm_blocking_space would own them).
template <typename T>
class WorkspaceBlocking : public ei::level3_blocking<T, T> {
 public:
  WorkspaceBlocking(const Blocking& b, T* block_a, T* block_b) {
    this->m_kc = b.kc;
    this->m_mc = b.mc;
    this->m_nc = b.nc;
    this->m_blockA = block_a;
    this->m_blockB = block_b;
  }
};

// The threads of Eigen's parallel product for a row-major destination (its `transpose`): at most
// one per nr columns of the kernel, as parallelize_gemm allows, and one per
// kMultiplyAddsPerThread of work (parallelize_gemm's own limit, 50000, is below what a region
// costs on a many-core machine); 1 inside someone else's parallel region.
template <typename T>
EIndex gemm_threads(EIndex m, EIndex n, EIndex k) {
#if defined(EIGEN_HAS_OPENMP) && !defined(EIGEN_USE_BLAS)
  using Traits = ei::gebp_traits<T, T>;
  if (omp_get_num_threads() > 1) return 1;
  const EIndex by_columns = std::max<EIndex>(1, m / Traits::nr);
  const double work = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  return threads_for_multiply_adds(work, std::min<EIndex>(Eigen::nbThreads(), by_columns));
#else
  (void)m, (void)n, (void)k;
  return 1;
#endif
}

// Eigen's single-threaded kernel, blocks from block (sequential_block_count elements).
template <typename T, int LhsOrder, int RhsOrder>
void run_sequential(const Product<T>& p, const Blocking& b, T* block) {
  WorkspaceBlocking<T> blocking(b, block, block + aligned_count<T>(b.mc * b.kc));
  ei::general_matrix_matrix_product<EIndex, T, LhsOrder, false, T, RhsOrder, false, Eigen::RowMajor, 1>::run(
      p.m, p.n, p.k, p.a, p.lda, p.b, p.ldb, p.c, 1, p.ldc, p.alpha, blocking);
}

template <typename T>
void sequential(const Product<T>& p, const Blocking& b, T* block) {
  // Eigen's storage orders of op(A), op(B): a row-major tensor transposed reads column-major.
  if (!p.trans_a && !p.trans_b) {
    run_sequential<T, Eigen::RowMajor, Eigen::RowMajor>(p, b, block);
  } else if (!p.trans_a) {
    run_sequential<T, Eigen::RowMajor, Eigen::ColMajor>(p, b, block);
  } else if (!p.trans_b) {
    run_sequential<T, Eigen::ColMajor, Eigen::RowMajor>(p, b, block);
  } else {
    run_sequential<T, Eigen::ColMajor, Eigen::ColMajor>(p, b, block);
  }
}

using Info = ei::GemmParallelInfo<EIndex>;

#if defined(EIGEN_HAS_OPENMP) && !defined(EIGEN_USE_BLAS)
// The `if(info)` branch of general_matrix_matrix_product<..., ColMajor>::run (Eigen 3.4.0), on a
// thread of the team: C' (rows x cols, this thread's columns) += alpha L R, where L = op(B)' is
// shared by all threads and packed into blockA in pieces, one per thread. Only blockB differs from
// Eigen: this thread's slice of the workspace instead of ei_declare_aligned_stack_constructed_variable.
template <typename T, int LhsOrder, int RhsOrder>
void parallel_kernel(EIndex rows, EIndex cols, EIndex depth, const T* lhs_data, EIndex lhsStride, const T* rhs_data,
                     EIndex rhsStride, T* res_data, EIndex resStride, T alpha, const Blocking& blocking, T* blockA,
                     T* blockB, Info* info, int tid, int threads) {
  using Traits = ei::gebp_traits<T, T>;
  using LhsMapper = ei::const_blas_data_mapper<T, EIndex, LhsOrder>;
  using RhsMapper = ei::const_blas_data_mapper<T, EIndex, RhsOrder>;
  using ResMapper = ei::blas_data_mapper<T, EIndex, Eigen::ColMajor, Eigen::Unaligned, 1>;
  LhsMapper lhs(lhs_data, lhsStride);
  RhsMapper rhs(rhs_data, rhsStride);
  ResMapper res(res_data, resStride, 1);

  const EIndex kc = blocking.kc;                      // cache block size along the K direction
  const EIndex nc = (std::min)(cols, blocking.nc);    // cache block size along the N direction

  ei::gemm_pack_lhs<T, EIndex, LhsMapper, Traits::mr, Traits::LhsProgress, typename Traits::LhsPacket4Packing,
                    LhsOrder>
      pack_lhs;
  ei::gemm_pack_rhs<T, EIndex, RhsMapper, Traits::nr, RhsOrder> pack_rhs;
  ei::gebp_kernel<T, T, EIndex, ResMapper, Traits::mr, Traits::nr, false, false> gebp;

  // For each horizontal panel of the rhs, and corresponding vertical panel of the lhs...
  for (EIndex k = 0; k < depth; k += kc) {
    const EIndex actual_kc = (std::min)(k + kc, depth) - k;  // => rows of B', and cols of the A'

    // Pack B' first, to lower the chance of waiting for the other threads.
    pack_rhs(blockB, rhs.getSubMapper(k, 0), actual_kc, nc);

    // Each thread packs its sub-block A_k,i into A'_i, once no other thread still reads A'_i
    // (users == 0); users is then set to the number of threads that will read it.
    while (info[tid].users != 0) {
    }
    info[tid].users = threads;

    pack_lhs(blockA + info[tid].lhs_start * actual_kc, lhs.getSubMapper(info[tid].lhs_start, k), actual_kc,
             info[tid].lhs_length);

    // Notify the other threads that A'_i is ready.
    info[tid].sync = k;

    // C_i += A' * B' per A'_i, waiting for thread i's part (our own B' needs no wait).
    for (int shift = 0; shift < threads; ++shift) {
      const int i = (tid + shift) % threads;
      if (shift > 0) {
        while (info[i].sync != k) {
        }
      }
      gebp(res.getSubMapper(info[i].lhs_start, 0), blockA + info[i].lhs_start * actual_kc, blockB,
           info[i].lhs_length, actual_kc, nc, alpha);
    }

    // Then the remaining B' as usual.
    for (EIndex j = nc; j < cols; j += nc) {
      const EIndex actual_nc = (std::min)(j + nc, cols) - j;
      pack_rhs(blockB, rhs.getSubMapper(k, j), actual_kc, actual_nc);
      gebp(res.getSubMapper(0, j), blockA, blockB, rows, actual_kc, actual_nc, alpha);
    }

    // Release this thread's use of every A'_i.
    for (EIndex i = 0; i < threads; ++i) info[i].users -= 1;
  }
}

// parallelize_gemm (Eigen 3.4.0) from `#pragma omp parallel` on, for a row-major destination
// (transpose = true): the threads split C's rows (the kernel's columns) and share the packing of
// op(B)'. blockA holds n x kc, block_b_stride elements of blockB follow per thread.
template <typename T, int LhsOrder, int RhsOrder>
void run_parallel(const Product<T>& p, EIndex threads, const Blocking& blocking, T* blockA, T* blockB,
                  std::size_t block_b_stride, Info* info) {
  using Traits = ei::gebp_traits<T, T>;
  const EIndex rows = p.n, cols = p.m;  // swapped, as parallelize_gemm does for `transpose`
  // The whole team (see team_size), of which the first `threads` take a share.
#pragma omp parallel
  {
    const EIndex i = omp_get_thread_num();
    // The team may be smaller than asked for.
    const EIndex actual_threads = std::min<EIndex>(threads, omp_get_num_threads());
    if (i < actual_threads) {
      const EIndex blockCols = (cols / actual_threads) & ~EIndex(0x3);
      EIndex blockRows = (rows / actual_threads);
      blockRows = (blockRows / Traits::mr) * Traits::mr;

      const EIndex r0 = i * blockRows;
      const EIndex actualBlockRows = (i + 1 == actual_threads) ? rows - r0 : blockRows;

      const EIndex c0 = i * blockCols;
      const EIndex actualBlockCols = (i + 1 == actual_threads) ? cols - c0 : blockCols;

      info[i].lhs_start = r0;
      info[i].lhs_length = actualBlockRows;

      // gemm_functor(c0, actualBlockCols, 0, rows, info), then the row-major run's transposition:
      // the kernel's lhs is op(B), its rhs op(A) from row c0, its result C from row c0.
      const T* a = p.trans_a ? p.a + c0 : p.a + c0 * p.lda;
      parallel_kernel<T, LhsOrder, RhsOrder>(rows, actualBlockCols, p.k, p.b, p.ldb, a, p.lda, p.c + c0 * p.ldc,
                                             p.ldc, p.alpha, blocking, blockA,
                                             blockB + std::size_t(i) * block_b_stride, info, int(i),
                                             int(actual_threads));
    }
  }
}

template <typename T>
void parallel(const Product<T>& p, EIndex threads, const Blocking& blocking, T* blockA, T* blockB,
              std::size_t block_b_stride, Info* info) {
  // The column-major kernel's operands: L = op(B)' (column-major when op(B) is row-major), R = op(A)'.
  constexpr int Col = Eigen::ColMajor, Row = Eigen::RowMajor;
  if (!p.trans_a && !p.trans_b) {
    run_parallel<T, Col, Col>(p, threads, blocking, blockA, blockB, block_b_stride, info);
  } else if (!p.trans_a) {
    run_parallel<T, Row, Col>(p, threads, blocking, blockA, blockB, block_b_stride, info);
  } else if (!p.trans_b) {
    run_parallel<T, Col, Row>(p, threads, blocking, blockA, blockB, block_b_stride, info);
  } else {
    run_parallel<T, Row, Row>(p, threads, blocking, blockA, blockB, block_b_stride, info);
  }
}
#endif

// c += alpha op_a op_b as Eigen evaluates it (the coefficient-based product or GEMV where
// takes_gemm is false, or everything inside someone else's parallel region).
template <typename C, typename A, typename B, typename T>
void eigen_product(C&& c, const A& op_a, const B& op_b, T alpha) {
  c.noalias() += alpha * op_a * op_b;
}

}  // namespace

template <typename T>
struct CpuGemm<T>::ParallelInfo {
  std::unique_ptr<Info[]> entries;
  EIndex count = 0;
};

template <typename T>
CpuGemm<T>::CpuGemm() : info_(std::make_unique<ParallelInfo>()) {}

template <typename T>
CpuGemm<T>::~CpuGemm() {
  if (workspace_ != nullptr) ::operator delete[](workspace_, std::align_val_t(kAlignment));
}

template <typename T>
T* CpuGemm<T>::reserve(std::size_t count) {
  if (count > capacity_) {
    T* grown = static_cast<T*>(::operator new[](count * sizeof(T), std::align_val_t(kAlignment)));
    if (workspace_ != nullptr) ::operator delete[](workspace_, std::align_val_t(kAlignment));
    workspace_ = grown;
    capacity_ = count;
  }
  return workspace_;
}

template <typename T>
typename CpuGemm<T>::ParallelInfo& CpuGemm<T>::reserve_info(std::ptrdiff_t threads) {
  if (threads > info_->count) {
    info_->entries.reset(new Info[std::size_t(threads)]);
    info_->count = threads;
  }
  // As Eigen's freshly constructed array: a stale sync from the last product would let a thread
  // read a block before it is packed.
  for (EIndex i = 0; i < threads; ++i) {
    info_->entries[i].sync = -1;
    info_->entries[i].users = 0;
    info_->entries[i].lhs_start = 0;
    info_->entries[i].lhs_length = 0;
  }
  return *info_;
}

template <typename T>
void CpuGemm<T>::multiply_add(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B,
                              Tensor<T>& C) {
  const EIndex m = C.rows(), n = C.cols();
  const EIndex k = trans_a == Trans::no ? A.cols() : A.rows();
  if (k == 0 || m == 0 || n == 0) return;
  auto c = MatrixMap<T>(C.data(), m, n);
  const auto a = ConstMatrixMap<T>(A.data(), A.rows(), A.cols());
  const auto b = ConstMatrixMap<T>(B.data(), B.rows(), B.cols());
  const Product<T> whole{m, n, k, A.data(), A.cols(), trans_a == Trans::yes, B.data(), B.cols(), trans_b == Trans::yes,
                         C.data(), n, alpha};

  bool in_parallel = false;
  int slabs = 1;
#if defined(_OPENMP)
  in_parallel = omp_in_parallel();
  if (std::min({m, n, k}) <= kNarrow && double(m) * double(n) * double(k) >= kSplitWork && !in_parallel) {
    slabs = threads_for_multiply_adds(double(m) * double(n) * double(k), std::max(m, n) / 16);
  }
#endif
  const bool split_rows = m >= n;
  const EIndex long_side = split_rows ? m : n;

  auto run = [&](const auto& op_a, const auto& op_b) {
    if (in_parallel) {
      eigen_product(c, op_a, op_b, alpha);
      return;
    }
    if (slabs <= 1) {
      if (!takes_gemm(m, n, k)) {
        eigen_product(c, op_a, op_b, alpha);
        return;
      }
      const EIndex threads = gemm_threads<T>(m, n, k);
#if defined(EIGEN_HAS_OPENMP) && !defined(EIGEN_USE_BLAS)
      if (threads > 1) {
        Eigen::initParallel();
        const Blocking blocking = parallel_blocking<T>(m, n, k, threads);
        const std::size_t size_a = aligned_count<T>(blocking.mc * blocking.kc);
        const std::size_t size_b = aligned_count<T>(blocking.kc * blocking.nc);
        T* block = reserve(size_a + std::size_t(threads) * size_b);
        Info* info = reserve_info(threads).entries.get();
        parallel(whole, threads, blocking, block, block + size_a, size_b, info);
        return;
      }
#endif
      const Blocking blocking = sequential_blocking<T>(m, n, k);
      sequential(whole, blocking, reserve(std::size_t(sequential_block_count<T>(blocking))));
      return;
    }
    // One slab per thread, each on Eigen's single-threaded kernel with its own slice of the
    // workspace, sized here for the largest slab before the threads start.
    std::size_t slice = 0;
    for (int t = 0; t < slabs; ++t) {
      const EIndex count = long_side * (t + 1) / slabs - long_side * t / slabs;
      const EIndex sm = split_rows ? count : m, sn = split_rows ? n : count;
      if (takes_gemm(sm, sn, k)) {
        slice = std::max(slice, std::size_t(sequential_block_count<T>(sequential_blocking<T>(sm, sn, k))));
      }
    }
    T* workspace = slice > 0 ? reserve(slice * std::size_t(slabs)) : nullptr;
    parallel_parts(slabs, [&](int t, int) {
      const EIndex begin = long_side * t / slabs, count = long_side * (t + 1) / slabs - begin;
      Product<T> part = whole;
      if (split_rows) {
        part.m = count;
        part.a = whole.trans_a ? whole.a + begin : whole.a + begin * whole.lda;
        part.c = whole.c + begin * whole.ldc;
      } else {
        part.n = count;
        part.b = whole.trans_b ? whole.b + begin * whole.ldb : whole.b + begin;
        part.c = whole.c + begin;
      }
      if (takes_gemm(part.m, part.n, k)) {
        sequential(part, sequential_blocking<T>(part.m, part.n, k), workspace + std::size_t(t) * slice);
      } else if (split_rows) {
        eigen_product(c.middleRows(begin, count), op_a.middleRows(begin, count), op_b, alpha);
      } else {
        eigen_product(c.middleCols(begin, count), op_a, op_b.middleCols(begin, count), alpha);
      }
    });
  };
  if (trans_a == Trans::no && trans_b == Trans::no) {
    run(a, b);
  } else if (trans_a == Trans::no) {
    run(a, b.transpose());
  } else if (trans_b == Trans::no) {
    run(a.transpose(), b);
  } else {
    run(a.transpose(), b.transpose());
  }
}

template class CpuGemm<float>;
template class CpuGemm<double>;

}  // namespace relora
