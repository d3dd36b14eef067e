// safetensors: round trips, the byte layout against a file built by hand, and every way the
// reader rejects a malformed file (the message names the file, the tensor and the fault).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <ios>
#include <limits>

#include "relora/core/errors.hpp"
#include "relora/io/safetensors.hpp"
#include "safetensors_test_util.hpp"

using namespace relora;
using safetensors_test::assemble;
using safetensors_test::contains;
using safetensors_test::rejection;

namespace {

std::uint32_t bits_of(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

std::uint64_t bits_of(double value) {
  std::uint64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

float float_from_bits(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// A valid file with two F32 tensors, "a" [2] at [0, 8) and "b" [1] at [8, 12).
std::vector<std::uint8_t> two_tensor_file() {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})";
  return assemble(header, std::vector<std::uint8_t>(12, 0));
}

}  // namespace

TEST_CASE("safetensors round trip: several dtypes and shapes with metadata, bit for bit") {
  const float nan_with_payload = float_from_bits(0x7fc12345u);
  const std::vector<float> W = {1.5f, -0.0f, std::numeric_limits<float>::infinity(), nan_with_payload,
                                std::numeric_limits<float>::denorm_min(), 3.4028235e38f};  // 2 x 3
  const std::vector<double> b = {0.1, -1e-300, std::numeric_limits<double>::max()};
  const float scale = 0.25f;
  const std::vector<std::int64_t> step = {-7, 9000000000000000000};
  const std::vector<std::uint64_t> rng_state = {0xfedcba9876543210ull, 1};

  SafetensorsWriter writer;
  writer.add("layer.W", {2, 3}, W.data());
  writer.add("layer.b", {3}, b.data());
  writer.add("scale", {}, &scale);
  writer.add("empty", {0, 4}, static_cast<const float*>(nullptr));
  writer.add("step", {2}, step.data());
  writer.add("rng", {2}, rng_state.data());
  writer.set_metadata("format", "pt");
  writer.set_metadata("note", "ünïcode ✓");

  const auto bytes = writer.serialize();
  const auto file = SafetensorsFile::parse(bytes, "round_trip");

  CHECK(file.names() == std::vector<std::string>{"empty", "layer.W", "layer.b", "rng", "scale", "step"});
  CHECK(file.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"note", "ünïcode ✓"}});
  CHECK(file.metadata_value("format") == std::optional<std::string>("pt"));
  CHECK_FALSE(file.metadata_value("missing").has_value());

  CHECK(file.dtype("layer.W") == Dtype::F32);
  CHECK(file.shape("layer.W") == std::vector<std::int64_t>{2, 3});
  const auto W_read = file.to_float("layer.W");
  REQUIRE(W_read.size() == W.size());
  for (std::size_t i = 0; i < W.size(); ++i) CHECK(bits_of(W_read[i]) == bits_of(W[i]));

  CHECK(file.dtype("layer.b") == Dtype::F64);
  const auto b_read = file.to_double("layer.b");
  REQUIRE(b_read.size() == b.size());
  for (std::size_t i = 0; i < b.size(); ++i) CHECK(bits_of(b_read[i]) == bits_of(b[i]));

  CHECK(file.shape("scale").empty());
  CHECK(file.to_float("scale") == std::vector<float>{0.25f});
  CHECK(file.shape("empty") == std::vector<std::int64_t>{0, 4});
  CHECK(file.to_float("empty").empty());
  CHECK(file.to_int64("step") == step);
  CHECK(file.to_uint64("rng") == rng_state);

  // F32 read as double and F64 read as float, the conversions a loader relies on.
  CHECK(file.to_double("layer.W")[0] == 1.5);
  CHECK(file.to_float("layer.b")[0] == 0.1f);

  // Serialising what was read gives the same bytes again.
  SafetensorsWriter again;
  for (const auto& name : file.names()) {
    again.add_raw(name, file.dtype(name), file.shape(name), file.raw_data(name));
  }
  for (const auto& [key, value] : file.metadata()) again.set_metadata(key, value);
  CHECK(again.serialize() == bytes);
}

TEST_CASE("safetensors byte layout matches a file built by hand") {
  SafetensorsWriter writer;
  const std::vector<float> alpha = {1.0f, -2.0f};
  const double beta = 0.5;
  writer.add("alpha", {2}, alpha.data());
  writer.add("beta", {1}, &beta);
  writer.set_metadata("format", "pt");

  // The reference puts __metadata__ first and lays tensors out widest dtype first, then by name:
  // beta (F64) at [0, 8), alpha (F32) at [8, 16). The JSON is 146 bytes, padded with 6 spaces to
  // 152 = 0x98, a multiple of 8, so the data starts 8-byte aligned at byte 160.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"beta":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},)"
      R"("alpha":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}      )";
  REQUIRE(header.size() == 152);
  std::vector<std::uint8_t> expected = {0x98, 0, 0, 0, 0, 0, 0, 0};
  expected.insert(expected.end(), header.begin(), header.end());
  const std::vector<std::uint8_t> data = {
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe0, 0x3f,  // 0.5 = 0x3fe0000000000000, little-endian
      0x00, 0x00, 0x80, 0x3f,                          // 1.0f = 0x3f800000
      0x00, 0x00, 0x00, 0xc0,                          // -2.0f = 0xc0000000
  };
  expected.insert(expected.end(), data.begin(), data.end());

  const auto bytes = writer.serialize();
  CHECK(bytes.size() == 8 + 152 + 16);
  CHECK(bytes == expected);

  // And the hand-built file reads back.
  const auto file = SafetensorsFile::parse(expected);
  CHECK(file.data_start() == 160);
  CHECK(file.to_float("alpha") == alpha);
  CHECK(file.to_double("beta") == std::vector<double>{0.5});
}

TEST_CASE("safetensors writer: an empty file and the header padding") {
  const auto bytes = SafetensorsWriter().serialize();
  const std::vector<std::uint8_t> expected = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
  CHECK(bytes == expected);
  CHECK(SafetensorsFile::parse(bytes).names().empty());
}

TEST_CASE("safetensors writer rejects names and shapes it cannot write") {
  SafetensorsWriter writer;
  const float x = 1.0f;
  CHECK_THROWS_WITH_AS(writer.add("__metadata__", {1}, &x), doctest::Contains("reserved"), ConfigError);
  CHECK_THROWS_WITH_AS(writer.add("neg", {-1, 2}, &x), doctest::Contains("negative dimension in shape [-1 x 2]"), ConfigError);
  writer.add("x", {1}, &x);
  CHECK_THROWS_WITH_AS(writer.add("x", {1}, &x), doctest::Contains("'x' added twice"), ConfigError);
  CHECK_THROWS_AS(writer.add("huge", {std::int64_t(1) << 40, std::int64_t(1) << 40}, &x), ConfigError);
  writer.add("bad\xff", {1}, &x);  // not UTF-8: found when the header is written
  CHECK_THROWS_WITH_AS(writer.serialize(), doctest::Contains("UTF-8"), ConfigError);
}

// ---- F16 and BF16 ------------------------------------------------------------------------------

TEST_CASE("half_to_float on known bit patterns: normals, subnormals, zeros, inf and NaN") {
  CHECK(half_to_float(0x3c00) == 1.0f);
  CHECK(half_to_float(0xc000) == -2.0f);
  CHECK(half_to_float(0x3555) == 0.333251953125f);
  CHECK(half_to_float(0x7bff) == 65504.0f);                      // largest half
  CHECK(half_to_float(0x0400) == std::ldexp(1.0f, -14));         // smallest normal
  CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));         // smallest subnormal
  CHECK(half_to_float(0x8001) == -std::ldexp(1.0f, -24));
  CHECK(half_to_float(0x03ff) == std::ldexp(1023.0f, -24));      // largest subnormal
  CHECK(bits_of(half_to_float(0x0000)) == 0x00000000u);
  CHECK(bits_of(half_to_float(0x8000)) == 0x80000000u);          // -0 keeps its sign
  CHECK(bits_of(half_to_float(0x7c00)) == 0x7f800000u);          // +inf
  CHECK(bits_of(half_to_float(0xfc00)) == 0xff800000u);          // -inf
  CHECK(bits_of(half_to_float(0x7e00)) == 0x7fc00000u);          // quiet NaN
  CHECK(bits_of(half_to_float(0xfe01)) == 0xffc02000u);          // NaN sign and payload kept
  CHECK(std::isnan(half_to_float(0x7c01)));                      // signalling NaN stays NaN
}

TEST_CASE("half_to_float matches a naive formula on all 65536 patterns") {
  int mismatches = 0;
  for (std::uint32_t h = 0; h <= 0xffff; ++h) {
    const int sign = (h >> 15) ? -1 : 1;
    const int exponent = (h >> 10) & 0x1f;
    const int mantissa = h & 0x3ff;
    // Naive reference, straight from IEEE 754 binary16.
    double expected;
    if (exponent == 0) expected = sign * std::ldexp(mantissa, -24);
    else if (exponent == 31) expected = mantissa == 0 ? sign * HUGE_VAL : NAN;
    else expected = sign * std::ldexp(1024 + mantissa, exponent - 25);
    const float got = half_to_float(static_cast<std::uint16_t>(h));
    const bool same = std::isnan(expected) ? std::isnan(got)
                                           : (got == expected && std::signbit(got) == std::signbit(expected));
    if (!same && ++mismatches <= 5) {
      INFO("half 0x" << std::hex << h << " -> " << got << ", expected " << expected);
      CHECK(same);
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("bfloat16_to_float on known bit patterns") {
  CHECK(bfloat16_to_float(0x3f80) == 1.0f);
  CHECK(bfloat16_to_float(0xc000) == -2.0f);
  CHECK(bits_of(bfloat16_to_float(0x3eab)) == 0x3eab0000u);
  CHECK(bits_of(bfloat16_to_float(0x7f7f)) == 0x7f7f0000u);  // largest finite
  CHECK(bits_of(bfloat16_to_float(0x0001)) == 0x00010000u);  // smallest subnormal
  CHECK(bfloat16_to_float(0x0001) == std::ldexp(1.0f, -133));
  CHECK(bits_of(bfloat16_to_float(0x8000)) == 0x80000000u);
  CHECK(bits_of(bfloat16_to_float(0x7f80)) == 0x7f800000u);
  CHECK(bits_of(bfloat16_to_float(0xff80)) == 0xff800000u);
  CHECK(bits_of(bfloat16_to_float(0x7fc0)) == 0x7fc00000u);
}

TEST_CASE("F16 and BF16 tensors in a hand-built file convert to float and double") {
  const std::string header =
      R"({"h":{"dtype":"F16","shape":[3],"data_offsets":[0,6]},"g":{"dtype":"BF16","shape":[2],"data_offsets":[6,10]}})";
  const std::vector<std::uint8_t> data = {0x00, 0x3c, 0x01, 0x00, 0x00, 0xfc,  // 1, 2^-24, -inf
                                          0x80, 0x3f, 0x00, 0xc0};             // 1, -2
  const auto file = SafetensorsFile::parse(assemble(header, data));
  CHECK(file.to_float("h") == std::vector<float>{1.0f, std::ldexp(1.0f, -24), -HUGE_VALF});
  CHECK(file.to_double("h") == std::vector<double>{1.0, std::ldexp(1.0, -24), -HUGE_VAL});
  CHECK(file.to_float("g") == std::vector<float>{1.0f, -2.0f});
  CHECK(file.raw_size("h") == 6);
}

// ---- rejections ------------------------------------------------------------------------------

TEST_CASE("safetensors rejects a file truncated at every length") {
  const auto whole = two_tensor_file();
  REQUIRE_NOTHROW(SafetensorsFile::parse(whole));
  const std::size_t header_end = whole.size() - 12;
  for (std::size_t length = 0; length < whole.size(); ++length) {
    const std::vector<std::uint8_t> cut(whole.begin(), whole.begin() + static_cast<std::ptrdiff_t>(length));
    const std::string message = rejection(cut, "cut.safetensors");
    INFO("truncated to " << length << " bytes: " << message);
    CHECK(message.rfind("cut.safetensors: ", 0) == 0);
    if (length < 8) CHECK(contains(message, "too short for the 8-byte header length"));
    else if (length < header_end) CHECK(contains(message, "truncated: the header length says"));
    else CHECK(contains(message, "truncated: the tensors need 12 bytes of data"));
  }
}

TEST_CASE("safetensors rejects a header length beyond the limit or the file") {
  auto too_big = two_tensor_file();
  too_big[0] = 0x01;  // 100,000,001 = 0x05f5e101
  too_big[1] = 0xe1;
  too_big[2] = 0xf5;
  too_big[3] = 0x05;
  CHECK(contains(rejection(too_big), "header length 100000001 exceeds the limit of 100000000 bytes"));

  auto all_ones = two_tensor_file();
  for (int i = 0; i < 8; ++i) all_ones[i] = 0xff;
  CHECK(contains(rejection(all_ones), "header length 18446744073709551615 exceeds the limit"));

  std::vector<std::uint8_t> past_end = {16, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
  CHECK(contains(rejection(past_end), "header length says 16 bytes of header but the file has only 2"));
}

TEST_CASE("safetensors rejects a header that is not a JSON object of the right shape") {
  CHECK(contains(rejection(assemble(R"({"a":)", {})), "header is not valid JSON"));
  CHECK(contains(rejection(assemble("", {})), "header is not valid JSON"));
  CHECK(contains(rejection(assemble(R"({} x)", {})), "header is not valid JSON"));
  CHECK(contains(rejection(assemble(std::string("{}\0", 3), {})), "header is not valid JSON: NUL byte at header offset 2"));
  CHECK(contains(rejection(assemble(std::string("{\"a\0\":1}", 8), {})), "NUL byte at header offset 3"));
  CHECK(contains(rejection(assemble("{\"\xff\":1}", {})), "header is not valid JSON"));  // not UTF-8
  CHECK(contains(rejection(assemble("[1,2]", {})), "header is a JSON array, not an object"));
  CHECK(contains(rejection(assemble(R"({"a":3})", {})), "tensor 'a' is described by a JSON number, not an object"));
  CHECK(contains(rejection(assemble(R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})",
                                    std::vector<std::uint8_t>(4, 0))),
                 "header names the key 'a' twice"));
  // Padding with spaces, as the writer does, is fine.
  CHECK_NOTHROW(SafetensorsFile::parse(assemble("{}      ", {})));
}

TEST_CASE("safetensors rejects unknown dtypes and malformed fields") {
  const std::vector<std::uint8_t> four(4, 0);
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", four)),
                 "tensor 'x' has unknown dtype 'F33'"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":5,"shape":[1],"data_offsets":[0,4]}})", four)),
                 "tensor 'x' has a \"dtype\" that is not a string"));
  CHECK(contains(rejection(assemble(R"({"x":{"shape":[1],"data_offsets":[0,4]}})", four)), "tensor 'x' has no \"dtype\""));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","data_offsets":[0,4]}})", four)), "tensor 'x' has no \"shape\""));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[1]}})", four)), "tensor 'x' has no \"data_offsets\""));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", four)),
                 "shape entry -1 that is not a non-negative integer"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", four)),
                 "shape entry 1.0 that is not a non-negative integer"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", four)),
                 "\"shape\" that is not an array"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", four)),
                 "not two non-negative integers [begin, end]"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", four)),
                 "not two non-negative integers [begin, end]"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", four)),
                 "tensor 'x' has data_offsets [4, 0] that end before they begin"));
}

TEST_CASE("safetensors rejects offsets that do not start at 0, leave gaps or overlap") {
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                    std::vector<std::uint8_t>(8, 0))),
                 "tensor 'x' comes first in the data but its data_offsets [4, 8] do not start at 0"));
  CHECK(contains(rejection(assemble(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                    std::vector<std::uint8_t>(12, 0))),
                 "gap of 4 bytes in the data: tensor 'a' ends at 4 but tensor 'b' has data_offsets [8, 12]"));
  CHECK(contains(rejection(assemble(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                    std::vector<std::uint8_t>(12, 0))),
                 "tensor 'b' has data_offsets [4, 12] that overlap tensor 'a', which ends at 8"));
  // Two tensors sharing the same bytes is an overlap too.
  CHECK(contains(rejection(assemble(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                    std::vector<std::uint8_t>(4, 0))),
                 "overlap"));
  // Zero-size tensors may sit anywhere in the sequence, as the reference allows.
  CHECK_NOTHROW(SafetensorsFile::parse(assemble(
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
      std::vector<std::uint8_t>(4, 0))));
}

TEST_CASE("safetensors rejects a size that does not match the shape and dtype") {
  const auto message = rejection(assemble(R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})",
                                          std::vector<std::uint8_t>(12, 0)),
                                 "model.safetensors");
  CHECK(message == "model.safetensors: tensor 'x' has data_offsets [0, 12] but shape [2 x 2] of F32 needs 16 bytes");
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F64","shape":[],"data_offsets":[0,4]}})",
                                    std::vector<std::uint8_t>(4, 0))),
                 "shape [] of F64 needs 8 bytes"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,4]}})",
                                    std::vector<std::uint8_t>(4, 0))),
                 "whose size in bytes overflows 64 bits"));
  // 2^62 elements of 4 bytes overflow too, though the count alone fits.
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", {})),
                 "overflows 64 bits"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,0]}})", {})),
                 "beyond 2^63 - 1"));
}

TEST_CASE("safetensors rejects trailing bytes and offsets past the end") {
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                    std::vector<std::uint8_t>(5, 0))),
                 "1 trailing bytes after the last tensor"));
  CHECK(contains(rejection(assemble("{}", {0})), "1 trailing bytes"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}})", {})),
                 "beyond 2^63 - 1"));
  CHECK(contains(rejection(assemble(R"({"x":{"dtype":"U8","shape":[1000],"data_offsets":[0,1000]}})", {1, 2})),
                 "truncated: the tensors need 1000 bytes of data but the file holds 2"));
}

TEST_CASE("safetensors rejects metadata that is not a map of strings") {
  CHECK(contains(rejection(assemble(R"({"__metadata__":{"step":150}})", {})),
                 "__metadata__ value for key 'step' is a JSON number, not a string"));
  CHECK(contains(rejection(assemble(R"({"__metadata__":{"a":{"b":"c"}}})", {})),
                 "__metadata__ value for key 'a' is a JSON object, not a string"));
  CHECK(contains(rejection(assemble(R"({"__metadata__":["a"]})", {})), "__metadata__ is a JSON array, not an object"));
  CHECK(SafetensorsFile::parse(assemble(R"({"__metadata__":null})", {})).metadata().empty());
}

TEST_CASE("safetensors access: unknown names and unsupported conversions throw IoError") {
  const float x = 2.0f;
  const std::int64_t i = -3;
  const std::uint64_t big = 0xffffffffffffffffull;
  SafetensorsWriter writer;
  writer.add("x", {1}, &x);
  writer.add("i", {1}, &i);
  writer.add("big", {1}, &big);
  const std::uint8_t flag = 7;
  writer.add_raw("flag", Dtype::BOOL, {1}, &flag);
  const auto file = SafetensorsFile::parse(writer.serialize(), "access.safetensors");

  CHECK_THROWS_WITH_AS(file.shape("nope"), "access.safetensors: has no tensor 'nope'", IoError);
  CHECK_THROWS_WITH_AS(file.to_float("i"), doctest::Contains("tensor 'i' has dtype I64, which does not convert to floating point"), IoError);
  CHECK_THROWS_WITH_AS(file.to_double("flag"), doctest::Contains("dtype BOOL"), IoError);
  CHECK_THROWS_WITH_AS(file.to_int64("x"), doctest::Contains("tensor 'x' has dtype F32, not an integer type"), IoError);
  CHECK_THROWS_WITH_AS(file.to_int64("big"), doctest::Contains("does not fit in int64"), IoError);
  CHECK_THROWS_WITH_AS(file.to_uint64("i"), doctest::Contains("is negative"), IoError);
  CHECK(file.to_int64("flag") == std::vector<std::int64_t>{1});
  CHECK(file.to_uint64("big") == std::vector<std::uint64_t>{big});
}

TEST_CASE("safetensors read: a missing or corrupt file names its path") {
  CHECK_THROWS_WITH_AS(SafetensorsFile::read("/nonexistent/dir/model.safetensors"),
                       doctest::Contains("/nonexistent/dir/model.safetensors: cannot open for reading: No such file or directory"),
                       IoError);
  CHECK_THROWS_WITH_AS(SafetensorsFile::read("/"), doctest::Contains("/: cannot read"), IoError);
}

TEST_CASE("the fuzz seeds, written by Python's struct and json, read back as written") {
  // fuzz/make_seed_corpus.py builds these without relora, so they cross-check reader and writer.
  const std::string repo = std::string(__FILE__).substr(0, std::string(__FILE__).rfind("/tests/"));
  const auto adapter = SafetensorsFile::read(repo + "/fuzz/corpus/safetensors/peft_adapter.safetensors");
  CHECK(adapter.metadata_value("format") == std::optional<std::string>("pt"));
  CHECK(adapter.shape("base_model.model.fc1.lora_A.weight") == std::vector<std::int64_t>{2, 3});
  CHECK(adapter.to_float("base_model.model.fc1.lora_A.weight") == std::vector<float>{1, -2, 0.5f, 0, -0.0f, 3});

  const auto halves = SafetensorsFile::read(repo + "/fuzz/corpus/safetensors/half_types.safetensors");
  const auto h = halves.to_float("h");
  REQUIRE(h.size() == 4);
  CHECK(h[0] == 1.0f);
  CHECK(h[1] == std::ldexp(1.0f, -24));
  CHECK(h[2] == HUGE_VALF);
  CHECK(std::isnan(h[3]));
  CHECK(halves.to_double("d") == std::vector<double>{0.1});

  const auto state = SafetensorsFile::read(repo + "/fuzz/corpus/safetensors/checkpoint_like.safetensors");
  CHECK(state.to_int64("step") == std::vector<std::int64_t>{150});
  CHECK(state.to_uint64("rng") == std::vector<std::uint64_t>{0xfedcba9876543210ull, 1});
  CHECK(state.to_int64("mask") == std::vector<std::int64_t>{0, 1, 1});
  CHECK(state.to_int64("i") == std::vector<std::int64_t>{-5});
  CHECK(state.shape("none") == std::vector<std::int64_t>{0, 5});
}
