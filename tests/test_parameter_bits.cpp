// relora_bench --ranks's check that data-parallel ranks ended equal (apps/bench/parameter_bits.hpp):
// two models built from one case's configs and seeds hold the same bits; one flipped bit, a -0
// for a +0, another name, shape or count is found and named; the same NaN is no difference.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "anchor_cases.hpp"
#include "parameter_bits.hpp"
#include "relora/relora.hpp"

using namespace relora;
using relora_bench::ParameterValues;
using relora_bench::first_bit_difference;

namespace {

// The seed demo's case with two layers (10 -> 6 -> 5), so that more than one layer's adapters count.
std::vector<ParameterValues<float>> built_parameters() {
  auto backend = make_backend<float>(Device::cpu);
  Model<float> model(backend);
  relora_bench::add_case_layers(model, relora_bench::CaseSpec{"two_layers", 8, {10, 6, 5}, 4}, BasePrecision::fp32,
                                false);
  return relora_bench::download_parameters(model);
}

float with_last_bit_flipped(float x) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &x, sizeof bits);
  bits ^= 1u;
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

}  // namespace

TEST_CASE("parameter bits: models built alike are equal to the bit, one flipped bit is named") {
  const auto reference = built_parameters();
  auto same = built_parameters();
  REQUIRE(reference.size() == 4);  // A and B of each layer
  CHECK(reference[0].name == "layers.0.lora_A");
  CHECK(first_bit_difference(same, reference).empty());

  // Layer 1's A (Kaiming-drawn; B starts at zero).
  same[2].values(1, 3) = with_last_bit_flipped(same[2].values(1, 3));
  const std::string diff = first_bit_difference(same, reference);
  MESSAGE("one flipped bit: " << diff);
  CHECK(diff.find(same[2].name + ": element (1, 3) is 0x") == 0);
  CHECK(diff.find(" in the reference") != std::string::npos);
}

TEST_CASE("parameter bits: -0 differs from +0, the same NaN does not differ") {
  const auto reference = built_parameters();
  auto zeros = reference;
  const Index last = zeros.size() - 1;  // layer 1's B: zeros
  REQUIRE(zeros[std::size_t(last)].values(0, 0) == 0.0f);
  zeros[std::size_t(last)].values(0, 0) = -0.0f;
  const std::string diff = first_bit_difference(zeros, reference);
  MESSAGE("-0 against +0: " << diff);
  CHECK(diff.find("0x80000000 here and 0x00000000") != std::string::npos);

  auto nan_a = reference, nan_b = reference;
  nan_a[0].values(0, 0) = std::numeric_limits<float>::quiet_NaN();
  nan_b[0].values(0, 0) = std::numeric_limits<float>::quiet_NaN();
  CHECK(first_bit_difference(nan_a, nan_b).empty());
  CHECK_FALSE(first_bit_difference(nan_a, reference).empty());
}

TEST_CASE("parameter bits: another count, name or shape is named") {
  const auto reference = built_parameters();
  auto fewer = reference;
  fewer.pop_back();
  CHECK(first_bit_difference(fewer, reference) == "3 parameters here, 4 in the reference");

  auto renamed = reference;
  renamed[1].name = "layers.0.lora_C";
  CHECK(first_bit_difference(renamed, reference) ==
        "parameter 1 is layers.0.lora_C here, layers.0.lora_B in the reference");

  auto reshaped = reference;
  reshaped[0].values.resize(2, 20);
  CHECK(first_bit_difference(reshaped, reference) == "layers.0.lora_A is 2 x 20 here, 4 x 10 in the reference");
}
