#pragma once
// When an element-wise CPU pass runs on every OpenMP thread, and the loop that does it: shared by
// the CPU backend and the components' CPU kernels.
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
