#pragma once
// What every adapter layer (LoraLinear, DoraLinear) does alike when it is set up or given values:
// the draw of A's init, and a d-vector taken as a row or a column.
#include <cmath>
#include <string>

#include "relora/core/backend.hpp"
#include "relora/core/host_matrix.hpp"
#include "relora/layers/lora_config.hpp"

namespace relora {

// A (r x k) drawn as PEFT draws lora_A: Kaiming uniform with a = sqrt(5) (gain sqrt(2 / 6), bound
// gain * sqrt(3 / k) = 1 / sqrt(k)), or normal with config.init_std.
template <typename T>
void draw_adapter_A(Backend<T>& backend, const LoraConfig& config, RngKey key, Tensor<T>& A) {
  if (config.init == LoraInit::kaiming_uniform) {
    const T bound = T(1) / std::sqrt(T(config.in_features));
    backend.random_uniform(key, -bound, bound, A);
  } else {
    backend.random_normal(key, T(0), T(config.init_std), A);
  }
}

// v (1 x d or d x 1) as a 1 x d row; ShapeError naming `what` unless it holds d values in a row
// or a column.
template <typename T>
HostMatrix<T> as_row_vector(const Eigen::Ref<const HostMatrix<T>>& v, Index d, const std::string& what) {
  if (v.size() != d || (v.rows() != 1 && v.cols() != 1)) {
    throw ShapeError(what + ": expected " + std::to_string(d) + " values, got " + shape_string(v.rows(), v.cols()));
  }
  const HostMatrix<T> packed = v;  // a row or a column: the same values in the same order
  return Eigen::Map<const HostMatrix<T>>(packed.data(), 1, packed.size());
}

}  // namespace relora
