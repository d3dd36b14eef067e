#pragma once
// Counter-based random numbers: element i of a draw is a pure function of (seed, stream, i).
// CPU and CUDA therefore draw the same numbers in any order and any thread layout, a draw
// needs no state on the device, and a checkpoint only has to store the stream counter.
// The mixer is splitmix64 (Steele, Lea, Flood 2014), applied twice.
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RELORA_HOST_DEVICE __host__ __device__
#else
#define RELORA_HOST_DEVICE
#endif

namespace relora {

// Identifies one draw: `seed` is the owner's seed, `stream` counts the owner's draws. `first`
// offsets the counter: a uniform draw or dropout mask with first = f gives the elements f, f + 1,
// ... of the same draw with first = 0 (a normal draw takes two counters an element: 2 f), so that
// a part of a larger draw (a data-parallel rank's rows of the whole batch's dropout mask) is
// drawn on its own.
struct RngKey {
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
  std::uint64_t first = 0;
};

RELORA_HOST_DEVICE inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

RELORA_HOST_DEVICE inline std::uint64_t random_bits(RngKey key, std::uint64_t index) {
  return splitmix64(splitmix64(key.seed ^ splitmix64(key.stream)) + key.first + index);
}

// Uniform in [0, 1) with 53 random bits.
RELORA_HOST_DEVICE inline double uniform01(RngKey key, std::uint64_t index) {
  return static_cast<double>(random_bits(key, index) >> 11) * 0x1.0p-53;
}

// Standard normal by Box-Muller on two independent uniforms of the same element.
RELORA_HOST_DEVICE inline double standard_normal(RngKey key, std::uint64_t index) {
  const double u1 = 1.0 - uniform01(key, 2 * index);  // in (0, 1], so log is finite
  const double u2 = uniform01(key, 2 * index + 1);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586476925 * u2);
}

}  // namespace relora
