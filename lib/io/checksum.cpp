#include "relora/io/checksum.hpp"

#include "relora/core/errors.hpp"

namespace relora {

void Fnv1a64::update(const void* data, std::size_t size) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  std::uint64_t hash = hash_;
  for (std::size_t i = 0; i < size; ++i) {
    hash ^= bytes[i];
    hash *= kPrime;  // wraps modulo 2^64, as FNV intends
  }
  hash_ = hash;
}

std::uint64_t fnv1a64(const void* data, std::size_t size) {
  Fnv1a64 hash;
  hash.update(data, size);
  return hash.value();
}

std::string checksum_hex(std::uint64_t checksum) {
  static const char kDigits[] = "0123456789abcdef";
  std::string text(16, '0');
  for (int i = 15; i >= 0; --i) {
    text[static_cast<std::size_t>(i)] = kDigits[checksum & 0xf];
    checksum >>= 4;
  }
  return text;
}

std::uint64_t parse_checksum_hex(const std::string& text) {
  if (text.size() != 16) {
    throw IoError("checksum '" + text + "' is not 16 hex digits");
  }
  std::uint64_t value = 0;
  for (char c : text) {
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else {
      throw IoError("checksum '" + text + "' is not 16 hex digits");
    }
    value = (value << 4) | static_cast<std::uint64_t>(digit);
  }
  return value;
}

}  // namespace relora
