#pragma once
// GaLore's per-weight state, shared by its two sources: the optimizer (galore.cpp) and its saved
// state (galore_state.cpp). Internal to the library.
#include <string>

#include "relora/optimizers/galore.hpp"

namespace relora {

// One projected weight W (m x n). Moments, R and N have the moment shape: r x n (P only),
// m x r (Q only) or r x r (both).
template <typename T>
struct Galore<T>::Projected {
  const Parameter<T>* param = nullptr;
  std::size_t index = 0;  // among the projected weights: the range finder's stream
  Index rows = 0, cols = 0;
  bool uses_p = false, uses_q = false;
  double lr = 0, weight_decay = 0;
  Tensor<T> P, Q;     // m x r, n x r (empty when not used)
  Tensor<T> R, N;     // the projected gradient; the direction -lr alpha N that Adam's kernels leave
  Tensor<T> m, v, step;
  std::int64_t refreshed_at = -1;  // step of the last SVD; -1: none yet (or reset): refresh at the next step
  Index moment_rows() const { return uses_p ? P.cols() : rows; }
  Index moment_cols() const { return uses_q ? Q.cols() : cols; }
};

// A saved tensor's name: "<parameter name>.<what>".
inline std::string galore_entry(const std::string& param, const char* what) { return param + "." + what; }

}  // namespace relora
