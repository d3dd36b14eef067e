#pragma once
// Scratch of the CPU kernels of a 16-bit base (the reference kernels and the AMX ones): a
// 64-byte-aligned buffer that grows to the largest size asked for and is kept, so that a steady
// step allocates nothing.
#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>

#include "relora/core/tensor.hpp"

namespace relora {

template <typename T>
class GrownBuffer {
 public:
  static constexpr std::size_t kAlignment = 64;  // CpuGemm's requirement, and a tile row's length

  // At least `count` elements (one at least), valid until a larger request.
  T* get(Index count) {
    count = std::max<Index>(count, 1);
    if (count > capacity_) {
      data_.reset(static_cast<T*>(::operator new[](std::size_t(count) * sizeof(T), std::align_val_t(kAlignment))));
      capacity_ = count;
    }
    return data_.get();
  }

  // A rows x cols tensor viewing the buffer (valid until a larger request).
  Tensor<T> view(Index rows, Index cols) { return Tensor<T>(get(rows * cols), rows, cols, Device::cpu, [](T*) {}); }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(kAlignment)); }
  };
  std::unique_ptr<T, Free> data_;
  Index capacity_ = 0;
};

}  // namespace relora
