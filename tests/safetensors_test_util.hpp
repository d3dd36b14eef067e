#pragma once
// Helpers shared by the safetensors tests: files assembled byte by byte, independent of the
// writer, and a way to see the message of a rejection.
#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "relora/core/errors.hpp"
#include "relora/io/safetensors.hpp"

namespace safetensors_test {

inline void append_u64_le(std::vector<std::uint8_t>& out, std::uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(value >> (8 * i)));
}

// 8-byte length of `header` (as given, no padding), the header, then `data`.
inline std::vector<std::uint8_t> assemble(const std::string& header, const std::vector<std::uint8_t>& data) {
  std::vector<std::uint8_t> bytes;
  append_u64_le(bytes, header.size());
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.insert(bytes.end(), data.begin(), data.end());
  return bytes;
}

// The IoError message that parsing `bytes` produces; fails the test when it parses, or throws
// anything else.
inline std::string rejection(const std::vector<std::uint8_t>& bytes, const std::string& source = "test.safetensors") {
  try {
    relora::SafetensorsFile::parse(bytes, source);
  } catch (const relora::IoError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected relora::IoError, got another exception: " << e.what());
    return {};
  }
  FAIL("expected relora::IoError, but the bytes parsed");
  return {};
}

inline bool contains(const std::string& text, const std::string& fragment) {
  return text.find(fragment) != std::string::npos;
}

}  // namespace safetensors_test
