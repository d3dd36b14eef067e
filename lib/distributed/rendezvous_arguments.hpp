#pragma once
// The checks every rendezvous makes of its arguments, and the wording of its waits.
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "relora/core/errors.hpp"
#include "relora/distributed/rendezvous.hpp"

namespace relora {
namespace rendezvous_detail {

constexpr std::size_t kMaxKeyBytes = 4096;

inline void check_rendezvous_arguments(const std::string& what, int rank, int world_size, const std::string& key,
                                       std::chrono::milliseconds timeout) {
  if (world_size < 1) throw ConfigError(what + ": world size " + std::to_string(world_size) + " must be at least 1");
  if (rank < 0 || rank >= world_size) {
    throw ConfigError(what + ": rank " + std::to_string(rank) + " must be in [0, " + std::to_string(world_size) + ")");
  }
  if (key.size() > kMaxKeyBytes) {
    throw ConfigError(what + ": job key of " + std::to_string(key.size()) + " bytes, above the limit of " +
                      std::to_string(kMaxKeyBytes));
  }
  if (timeout.count() <= 0) {
    throw ConfigError(what + ": timeout " + std::to_string(timeout.count()) + " ms must be positive");
  }
}

inline void check_blob(const std::string& what, const std::vector<std::uint8_t>& blob) {
  if (blob.size() > kMaxRendezvousBlobBytes) {
    throw ConfigError(what + ": blob of " + std::to_string(blob.size()) + " bytes, above the limit of " +
                      std::to_string(kMaxRendezvousBlobBytes));
  }
}

// "12.5 s", for the messages of a rendezvous that waited.
inline std::string seconds_text(std::chrono::steady_clock::duration waited) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f s", std::chrono::duration<double>(waited).count());
  return text;
}

}  // namespace rendezvous_detail
}  // namespace relora
