#pragma once
// 16-bit values between the host and a backend in the tests: a HalfBuffer's storage is written and
// read through a float view of it, two values a float (the storage holds ceil(size / 2) floats).
#include <cstdint>
#include <cstring>
#include <vector>

#include "relora/relora.hpp"

namespace relora::testing {

inline Tensor<float> float_view_of(const HalfTensor& h) {
  return Tensor<float>(reinterpret_cast<float*>(const_cast<std::uint16_t*>(h.data())), 1, (h.size() + 1) / 2, h.device(),
                       [](float*) {});
}

// The bits of h, a HalfBuffer's tensor (or a view whose storage reaches ceil(size / 2) floats).
inline std::vector<std::uint16_t> download_half_bits(Backend<float>& backend, const HalfTensor& h) {
  std::vector<std::uint16_t> bits(std::size_t(h.size() + 1) / 2 * 2);
  std::vector<float> words(bits.size() / 2);
  backend.download(float_view_of(h), words.data());
  std::memcpy(bits.data(), words.data(), bits.size() * sizeof(std::uint16_t));
  bits.resize(std::size_t(h.size()));
  return bits;
}

// A rows x cols 16-bit buffer on `backend` holding `bits` (row-major).
inline HalfBuffer upload_half_bits(Backend<float>& backend, const std::vector<std::uint16_t>& bits, Index rows,
                                   Index cols) {
  HalfBuffer buffer(backend, rows, cols);
  std::vector<std::uint16_t> padded(std::size_t(rows * cols + 1) / 2 * 2, 0);
  std::memcpy(padded.data(), bits.data(), std::size_t(rows * cols) * sizeof(std::uint16_t));
  std::vector<float> words(padded.size() / 2);
  std::memcpy(words.data(), padded.data(), padded.size() * sizeof(std::uint16_t));
  Tensor<float> view = float_view_of(buffer.tensor());
  backend.upload(words.data(), view);
  return buffer;
}

}  // namespace relora::testing
