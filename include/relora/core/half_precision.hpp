#pragma once
// 16-bit floating-point formats for a frozen base weight: bf16 (8 exponent bits, 7 stored mantissa
// bits, fp32's range) and fp16 (IEEE binary16: 5 exponent bits, 10 mantissa bits, largest finite
// 65504). Values travel as their raw bits (std::uint16_t), so the same functions run on the host
// and in CUDA kernels and give the same bits on both.
//
// Rounding from fp32:
//   nearest:    round to nearest, ties to even (IEEE's default; what a cast in PyTorch does).
//   stochastic: up (away from zero) with probability (|x| - |down|) / (|up| - |down|), where down
//               is x rounded toward zero and up the next value away from zero, so that the
//               expected result is x itself (unbiased). The uniform draw is element `index` of the
//               counter-based generator's draw `key`: reproducible, the same on every device.
// Both saturate: a finite x beyond the largest finite value becomes the largest finite value
// (fp16's 65504; bf16's is fp32's range, so only fp32 values above 3.39e38 saturate).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "relora/core/counter_rng.hpp"
#include "relora/core/tensor.hpp"

namespace relora {

// How a layer stores its frozen base weight (and frozen bias).
enum class BasePrecision { fp32, bf16, fp16 };

enum class HalfRounding { nearest, stochastic };

inline const char* precision_name(BasePrecision p) {
  switch (p) {
    case BasePrecision::fp32: return "fp32";
    case BasePrecision::bf16: return "bf16";
    case BasePrecision::fp16: return "fp16";
  }
  return "?";
}

// Bytes per element of a base stored in `p`.
inline int precision_bytes(BasePrecision p) { return p == BasePrecision::fp32 ? 4 : 2; }

// The largest finite value of a 16-bit format.
inline double half_max(BasePrecision p) { return p == BasePrecision::fp16 ? 65504.0 : 3.3895313892515355e38; }

// Relative rounding error bound (unit roundoff) of round-to-nearest: 2^-8 for bf16, 2^-11 for fp16.
inline double half_unit_roundoff(BasePrecision p) {
  return p == BasePrecision::bf16 ? 0x1.0p-8 : (p == BasePrecision::fp16 ? 0x1.0p-11 : 0x1.0p-24);
}

namespace half_bits {

RELORA_HOST_DEVICE inline std::uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

RELORA_HOST_DEVICE inline float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

RELORA_HOST_DEVICE inline float bf16_to_float(std::uint16_t h) { return bits_float(std::uint32_t(h) << 16); }

RELORA_HOST_DEVICE inline float fp16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1Fu;
  const std::uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // Inf, NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// x rounded toward zero (finite x; beyond the largest finite value: the largest finite value).
RELORA_HOST_DEVICE inline std::uint16_t bf16_toward_zero(float x) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return std::uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
  return std::uint16_t(u >> 16);
}

RELORA_HOST_DEVICE inline std::uint16_t fp16_toward_zero(float x) {
  const std::uint32_t u = float_bits(x);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t magnitude_bits = u & 0x7FFFFFFFu;
  if (magnitude_bits > 0x7F800000u) return std::uint16_t(sign | 0x7E00u);  // NaN
  if (magnitude_bits == 0x7F800000u) return std::uint16_t(sign | 0x7C00u);  // Inf
  const int exponent = int(magnitude_bits >> 23) - 127;
  if (exponent > 15) return std::uint16_t(sign | 0x7BFFu);  // beyond 65504: toward zero is 65504
  if (exponent >= -14) {
    return std::uint16_t(sign | (std::uint32_t(exponent + 15) << 10) | ((magnitude_bits >> 13) & 0x3FFu));
  }
  // subnormal: floor(|x| * 2^24) units of 2^-24 (the scaling by a power of two is exact)
  const float units = bits_float(magnitude_bits) * 16777216.0f;
  return std::uint16_t(sign | std::uint16_t(std::uint32_t(units)));
}

RELORA_HOST_DEVICE inline float half_to_float(std::uint16_t h, BasePrecision p) {
  return p == BasePrecision::bf16 ? bf16_to_float(h) : fp16_to_float(h);
}

RELORA_HOST_DEVICE inline std::uint16_t toward_zero(float x, BasePrecision p) {
  return p == BasePrecision::bf16 ? bf16_toward_zero(x) : fp16_toward_zero(x);
}

RELORA_HOST_DEVICE inline bool is_nan_or_inf(std::uint16_t h, BasePrecision p) {
  return p == BasePrecision::bf16 ? (h & 0x7F80u) == 0x7F80u : (h & 0x7C00u) == 0x7C00u;
}

// x rounded to the nearest bf16, ties to even, in a few integer operations: round_float(x, bf16,
// nearest, 0) for every float (the casts of X and dY before each product run it). Beyond the
// largest finite bf16 it saturates as round_float does; NaN and Inf keep toward_zero's bits.
RELORA_HOST_DEVICE inline std::uint16_t bf16_nearest(float x) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u) return bf16_toward_zero(x);
  const auto h = std::uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return (h & 0x7FFFu) == 0x7F80u ? std::uint16_t(h - 1u) : h;
}

// x rounded to `p`: to nearest (ties to even), or stochastically with the uniform u in [0, 1).
RELORA_HOST_DEVICE inline std::uint16_t round_float(float x, BasePrecision p, HalfRounding mode, float u) {
  const std::uint16_t down = toward_zero(x, p);
  if (is_nan_or_inf(down, p)) return down;
  const float low = half_to_float(down, p);
  if (low == x) return down;
  // The next value away from zero has the next magnitude bits (overflowing into Inf at the top).
  const std::uint16_t up = std::uint16_t(down + 1);
  const float high = half_to_float(up, p);
  const float below = fabsf(x - low), above = fabsf(high - x);  // both exact: x lies between
  if (mode == HalfRounding::stochastic) return u * (below + above) < below ? up : down;
  if (below < above) return down;
  if (above < below) return up;
  return (down & 1u) ? up : down;
}

// A uniform in [0, 1) from element `index` of draw `key` (24 bits: exact in fp32).
RELORA_HOST_DEVICE inline float rounding_uniform(RngKey key, std::uint64_t index) {
  return float(random_bits(key, index) >> 40) * 5.9604644775390625e-8f;
}

}  // namespace half_bits

// A host matrix of 16-bit values in their raw bits, row-major: how a low-precision base leaves
// and enters a layer (safetensors BF16/F16 tensors, checkpoints) without a round trip through fp32.
struct HalfHostMatrix {
  BasePrecision format = BasePrecision::bf16;
  Index rows = 0;
  Index cols = 0;
  std::vector<std::uint16_t> bits;  // rows * cols

  Index size() const { return rows * cols; }
  float value(Index i, Index j) const { return half_bits::half_to_float(bits[std::size_t(i * cols + j)], format); }
};

}  // namespace relora
