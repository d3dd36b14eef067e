#pragma once
// When an element-wise CPU pass runs on every OpenMP thread, and the loop that does it: shared by
// the CPU backend and the components' CPU kernels.
#include <algorithm>
#include <cmath>

#include "relora/core/tensor.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace relora {

// Element-wise passes over more elements than this run on every OpenMP thread; below it the
// threads' start costs more than the pass (a 256 KiB pass is a few microseconds on one core).
// An OpenMP `if` clause is not enough below it: GCC still opens a one-thread team (GOMP_parallel),
// about a microsecond, which is most of a tiny step. So the loops branch instead.
constexpr Index kParallelElements = 65536;

// Whether a pass over size elements opens a parallel region: not on one thread either, where
// libgomp would still allocate a one-thread team for every region.
inline bool run_parallel(Index size) {
#if defined(_OPENMP)
  return size > kParallelElements && omp_get_max_threads() > 1;
#else
  (void)size;
  return false;
#endif
}

// Every parallel region opens the same team, OpenMP's default size: libgomp ends the threads a
// smaller team leaves out and starts them again for the next larger one, which costs far more
// than a mid-size product (thread creation in every region). A pass that needs fewer threads
// leaves the rest of the team idle instead (parallel_parts).
inline int team_size() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The least work, in multiply-adds, worth a thread of its own in a product: waking the team for a
// region costs more than a small share of a product, and a skinny product (n x w x w) split by
// columns makes each thread read all of X, so a product of fewer than two such shares runs on the
// calling thread. The value is measured by relora_bench --thread-sweep (docs/PERFORMANCE.md).
constexpr double kMultiplyAddsPerThread = double(1 << 20);

// The threads a product of `multiply_adds` uses, at most `limit` (and the team).
inline int threads_for_multiply_adds(double multiply_adds, Index limit) {
  const double by_work = multiply_adds / kMultiplyAddsPerThread;
  const double most = double(std::min<Index>(limit, team_size()));
  return int(std::max(1.0, std::min(most, std::floor(by_work))));
}

// f(part, parts) for every part in [0, parts), each on a thread of its own when parts > 1, on the
// team every region opens (the threads past `parts` wait at the region's end). parts must not
// exceed team_size(); OpenMP may still give a smaller team, whose threads then take several parts.
template <typename F>
void parallel_parts(int parts, F&& f) {
  if (parts <= 1) {
    f(0, 1);
    return;
  }
#pragma omp parallel
  {
#if defined(_OPENMP)
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int thread = 0, team = 1;
#endif
    for (int part = thread; part < parts; part += team) f(part, parts);
  }
}

// f(i) for i in [0, size): on every thread above kParallelElements, else on this one.
template <typename F>
void for_each_element(Index size, F&& f) {
  if (run_parallel(size)) {
#pragma omp parallel for simd schedule(static)
    for (Index i = 0; i < size; ++i) f(i);
  } else {
#pragma omp simd
    for (Index i = 0; i < size; ++i) f(i);
  }
}

}  // namespace relora
