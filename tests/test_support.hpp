#pragma once
// What several test files need: a scratch directory, the CUDA skip with its reason, the seed of a
// randomised test, the message of an exception, and whether compute-sanitizer runs the tests.
#include <doctest/doctest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <random>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "relora/core/backend.hpp"

namespace relora::testing {

// Whether the tests run under compute-sanitizer (scripts/sanitize_cuda.sh sets
// RELORA_UNDER_SANITIZER): there every kernel launch costs milliseconds, and the tests that launch
// thousands take fewer steps or entries through the same kernels.
inline bool under_sanitizer() {
  const char* text = std::getenv("RELORA_UNDER_SANITIZER");
  return text != nullptr && *text != '\0' && *text != '0';
}

// The message of the exception f throws, or "(no exception)".
inline std::string what_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

// A fresh directory under the system temp directory, removed with everything in it at the end.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "relora_test_XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // The path of `name` inside the directory (the directory itself for "").
  std::string file(const std::string& name = "") const { return name.empty() ? path_.string() : (path_ / name).string(); }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path_)) {
      names.push_back(entry.path().filename().string());
    }
    return names;
  }

 private:
  std::filesystem::path path_;
};

// True where a GPU is usable; otherwise prints why `suite` is skipped, so a skip is never silent.
inline bool cuda_or_skip(const char* suite) {
  std::string why;
  if (cuda_available(&why)) return true;
  MESSAGE(std::string(suite) << " skipped: " << why);
  return false;
}

// The seed of a randomised test: RELORA_TEST_SEED from the environment when it is set (to replay
// a failure), else a fresh one. Callers INFO it, so that every failure prints the seed to replay.
inline std::uint64_t test_seed() {
  if (const char* text = std::getenv("RELORA_TEST_SEED")) return std::strtoull(text, nullptr, 10);
  static std::random_device device;
  return (std::uint64_t(device()) << 32) ^ device();
}

}  // namespace relora::testing
