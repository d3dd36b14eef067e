#pragma once
// A row-major matrix whose memory belongs to a backend: host memory for the CPU backend,
// device memory for the CUDA backend. Row-major with PyTorch's shapes (W is out x in), so
// tensors move to and from PyTorch and safetensors files without transposes.
#include <cstdint>
#include <memory>
#include <string>

#include "relora/core/errors.hpp"

namespace relora {

using Index = std::int64_t;

enum class Device { cpu, cuda };

inline const char* device_name(Device device) { return device == Device::cpu ? "cpu" : "cuda"; }

template <typename T>
class Tensor {
 public:
  using Deleter = void (*)(T*);

  Tensor() = default;
  // Takes ownership of `data` (rows * cols elements on `device`), released with `release`.
  Tensor(T* data, Index rows, Index cols, Device device, Deleter release)
      : data_(data, release), rows_(rows), cols_(cols), device_(device) {}

  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  Index size() const { return rows_ * cols_; }
  bool empty() const { return size() == 0; }
  Device device() const { return device_; }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::string shape() const { return shape_string(rows_, cols_); }
  bool same_shape(Index rows, Index cols) const { return rows_ == rows && cols_ == cols; }

 private:
  std::unique_ptr<T, Deleter> data_{nullptr, nullptr};
  Index rows_ = 0;
  Index cols_ = 0;
  Device device_ = Device::cpu;
};

// A non-owning rows x cols view of the start of `t`'s memory: a buffer sized once and reused for
// smaller shapes, without an allocation. ShapeError when rows * cols exceeds t.size().
template <typename T>
Tensor<T> leading_view(const Tensor<T>& t, Index rows, Index cols) {
  if (rows * cols > t.size()) {
    throw ShapeError("a view of " + shape_string(rows, cols) + " does not fit the buffer " + t.shape());
  }
  return Tensor<T>(const_cast<T*>(t.data()), rows, cols, t.device(), [](T*) {});
}

// Throws ShapeError naming `what` and both shapes unless `t` is rows x cols.
// `what` is a C string so that the check, which runs on every step, builds no std::string.
template <typename T>
void require_shape(const Tensor<T>& t, Index rows, Index cols, const char* what) {
  if (!t.same_shape(rows, cols)) {
    throw ShapeError(std::string(what) + ": expected shape " + shape_string(rows, cols) + ", got " + t.shape());
  }
}

}  // namespace relora
