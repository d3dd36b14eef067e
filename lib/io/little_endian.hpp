#pragma once
// Little-endian loads and stores, byte by byte: the file format is little-endian whatever the
// host is, and byte access has no alignment requirement (tensors may sit at any offset).
#include <cstddef>
#include <cstdint>

namespace relora {

template <typename UInt>
UInt load_le(const std::uint8_t* bytes) {
  UInt value = 0;
  for (std::size_t i = 0; i < sizeof(UInt); ++i) value |= static_cast<UInt>(bytes[i]) << (8 * i);
  return value;
}

template <typename UInt>
void store_le(UInt value, std::uint8_t* bytes) {
  for (std::size_t i = 0; i < sizeof(UInt); ++i) bytes[i] = static_cast<std::uint8_t>(value >> (8 * i));
}

}  // namespace relora
