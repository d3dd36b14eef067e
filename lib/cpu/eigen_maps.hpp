#pragma once
// Host tensors seen as Eigen matrices and arrays, without a copy: the CPU backend's buffers are
// row-major and 64-byte aligned.
#include <Eigen/Core>

#include "relora/core/tensor.hpp"

namespace relora {

template <typename T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using MatrixMap = Eigen::Map<RowMatrix<T>, Eigen::Aligned64>;
template <typename T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>, Eigen::Aligned64>;
template <typename T>
using ArrayMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>, Eigen::Aligned64>;
template <typename T>
using ConstArrayMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>, Eigen::Aligned64>;

template <typename T>
MatrixMap<T> as_matrix(Tensor<T>& t) { return MatrixMap<T>(t.data(), t.rows(), t.cols()); }
template <typename T>
ConstMatrixMap<T> as_matrix(const Tensor<T>& t) { return ConstMatrixMap<T>(t.data(), t.rows(), t.cols()); }
template <typename T>
ArrayMap<T> as_array(Tensor<T>& t) { return ArrayMap<T>(t.data(), t.size()); }
template <typename T>
ConstArrayMap<T> as_array(const Tensor<T>& t) { return ConstArrayMap<T>(t.data(), t.size()); }

}  // namespace relora
