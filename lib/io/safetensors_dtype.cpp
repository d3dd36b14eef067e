// The dtype table and the hand-written half and bfloat16 decoders of safetensors.hpp.
#include <cstring>

#include "relora/io/safetensors.hpp"

namespace relora {
namespace {

struct DtypeEntry {
  Dtype dtype;
  const char* name;
  std::size_t size;
};

// Spelled as the reference writes them. The sub-byte formats (F4, F6_*) and complex types are
// left out: nothing relora reads or writes uses them, and they would need bit-level offsets.
constexpr DtypeEntry kDtypes[] = {
    {Dtype::BOOL, "BOOL", 1}, {Dtype::U8, "U8", 1},     {Dtype::I8, "I8", 1},
    {Dtype::F8_E5M2, "F8_E5M2", 1}, {Dtype::F8_E4M3, "F8_E4M3", 1}, {Dtype::I16, "I16", 2},
    {Dtype::U16, "U16", 2},   {Dtype::F16, "F16", 2},   {Dtype::BF16, "BF16", 2},
    {Dtype::I32, "I32", 4},   {Dtype::U32, "U32", 4},   {Dtype::F32, "F32", 4},
    {Dtype::I64, "I64", 8},   {Dtype::U64, "U64", 8},   {Dtype::F64, "F64", 8},
};

const DtypeEntry& entry(Dtype dtype) {
  for (const auto& e : kDtypes) {
    if (e.dtype == dtype) return e;
  }
  return kDtypes[0];  // unreachable: every enumerator is in the table
}

float float_from_bits(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace

const char* dtype_name(Dtype dtype) { return entry(dtype).name; }
std::size_t dtype_size(Dtype dtype) { return entry(dtype).size; }

std::optional<Dtype> dtype_from_name(const std::string& name) {
  for (const auto& e : kDtypes) {
    if (name == e.name) return e.dtype;
  }
  return std::nullopt;
}

// half: 1 sign, 5 exponent (bias 15), 10 mantissa bits; float: 1, 8 (bias 127), 23.
float half_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  std::uint32_t exponent = (bits >> 10) & 0x1fu;
  std::uint32_t mantissa = bits & 0x3ffu;

  if (exponent == 0x1f) {  // inf (mantissa 0) or NaN, payload kept in the top mantissa bits
    return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent == 0) {
    if (mantissa == 0) return float_from_bits(sign);  // +-0
    // Subnormal half, mantissa x 2^-24: normal as a float. Shift the mantissa until its leading
    // one reaches the implicit-bit position (bit 10), lowering the exponent once per shift.
    std::uint32_t float_exponent = 127 - 15 + 1;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --float_exponent;
    }
    mantissa &= 0x3ffu;
    return float_from_bits(sign | (float_exponent << 23) | (mantissa << 13));
  }
  exponent += 127 - 15;
  return float_from_bits(sign | (exponent << 23) | (mantissa << 13));
}

// bfloat16 is the top half of a float: same sign and exponent, mantissa cut to 7 bits.
float bfloat16_to_float(std::uint16_t bits) {
  return float_from_bits(static_cast<std::uint32_t>(bits) << 16);
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += " x ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

}  // namespace relora
