#pragma once
// A 64-bit FNV-1a hash over bytes. Checkpoints store it (as 16 hex digits) in their metadata so
// that a flipped or truncated byte is reported as corruption instead of being trained on.
// FNV-1a is not cryptographic: it guards against accidents, not against an adversary.
#include <cstddef>
#include <cstdint>
#include <string>

namespace relora {

// Incremental form, for data that arrives in pieces (a header, then each tensor).
class Fnv1a64 {
 public:
  static constexpr std::uint64_t kOffsetBasis = 14695981039346656037ull;
  static constexpr std::uint64_t kPrime = 1099511628211ull;

  void update(const void* data, std::size_t size);
  std::uint64_t value() const { return hash_; }

 private:
  std::uint64_t hash_ = kOffsetBasis;
};

std::uint64_t fnv1a64(const void* data, std::size_t size);

// 16 lower-case hex digits, zero padded: the form stored in safetensors metadata.
std::string checksum_hex(std::uint64_t checksum);

// Inverse of checksum_hex; throws IoError naming `text` unless it is exactly 16 hex digits.
std::uint64_t parse_checksum_hex(const std::string& text);

}  // namespace relora
