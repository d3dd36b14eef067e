// FNV-1a 64 against the published test vectors, and the hex form stored in metadata.
#include <doctest/doctest.h>

#include <string>

#include "relora/io/checksum.hpp"
#include "relora/core/errors.hpp"

using namespace relora;

TEST_CASE("fnv1a64 matches the published test vectors") {
  CHECK(fnv1a64("", 0) == 0xcbf29ce484222325ull);  // the offset basis
  CHECK(fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);
  CHECK(fnv1a64("foobar", 6) == 0x85944171f73967e8ull);
}

TEST_CASE("fnv1a64 fed in pieces equals fnv1a64 of the whole, and sees a single flipped bit") {
  const std::string text = "header then tensor data";
  Fnv1a64 pieces;
  pieces.update(text.data(), 6);
  pieces.update(text.data() + 6, 0);
  pieces.update(text.data() + 6, text.size() - 6);
  CHECK(pieces.value() == fnv1a64(text.data(), text.size()));

  std::string flipped = text;
  flipped[10] ^= 0x01;
  CHECK(fnv1a64(flipped.data(), flipped.size()) != fnv1a64(text.data(), text.size()));
}

TEST_CASE("checksum hex form round trips and rejects anything but 16 hex digits") {
  CHECK(checksum_hex(0x85944171f73967e8ull) == "85944171f73967e8");
  CHECK(checksum_hex(0x1ull) == "0000000000000001");
  CHECK(parse_checksum_hex("85944171f73967e8") == 0x85944171f73967e8ull);
  CHECK(parse_checksum_hex("FFFFFFFFFFFFFFFF") == 0xffffffffffffffffull);
  CHECK_THROWS_AS(parse_checksum_hex("85944171f73967e"), IoError);
  CHECK_THROWS_WITH_AS(parse_checksum_hex("85944171f73967eg"), doctest::Contains("'85944171f73967eg' is not 16 hex digits"), IoError);
}
