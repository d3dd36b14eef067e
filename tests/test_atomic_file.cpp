// write_file_atomically: the old file survives every failure, and no temporary file is left.
// Runs as root in CI, where permission bits do not stop writes, so failures are provoked by a
// missing directory, a directory in the way, and a file-size limit (RLIMIT_FSIZE).
#include <doctest/doctest.h>

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "test_support.hpp"
#include "relora/io/atomic_file.hpp"
#include "relora/core/errors.hpp"
#include "relora/io/safetensors.hpp"

using namespace relora;
namespace fs = std::filesystem;
using relora::testing::TempDir;

namespace {

std::vector<std::uint8_t> bytes_of(const std::string& text) { return {text.begin(), text.end()}; }

}  // namespace

TEST_CASE("write_file_atomically creates and then replaces a file, leaving no temporary behind") {
  TempDir dir;
  const std::string path = (dir.path() / "state.bin").string();
  write_file_atomically(path, bytes_of("first"));
  CHECK(read_file_bytes(path) == bytes_of("first"));
  write_file_atomically(path, bytes_of("second, longer"));
  CHECK(read_file_bytes(path) == bytes_of("second, longer"));
  write_file_atomically(path, std::vector<std::uint8_t>{});
  CHECK(read_file_bytes(path).empty());
  CHECK(dir.entries() == std::vector<std::string>{"state.bin"});
}

TEST_CASE("write_file_atomically into a directory that does not exist throws and creates nothing") {
  TempDir dir;
  const std::string path = (dir.path() / "missing" / "model.safetensors").string();
  std::string message;
  try {
    write_file_atomically(path, bytes_of("x"));
  } catch (const IoError& e) {
    message = e.what();
  }
  INFO("message: " << message);
  CHECK(message.rfind(path + ": cannot create temporary file", 0) == 0);
  CHECK(message.find("No such file or directory") != std::string::npos);
  CHECK(dir.entries().empty());
  CHECK_FALSE(fs::exists(dir.path() / "missing"));
}

TEST_CASE("write_file_atomically over a directory fails at the rename and removes its temporary") {
  TempDir dir;
  const fs::path target = dir.path() / "occupied";
  fs::create_directory(target);
  fs::path marker = target / "keep";
  { std::FILE* f = std::fopen(marker.c_str(), "w"); REQUIRE(f != nullptr); std::fclose(f); }
  CHECK_THROWS_WITH_AS(write_file_atomically(target.string(), bytes_of("x")),
                       doctest::Contains("cannot rename"), IoError);
  CHECK(fs::is_directory(target));
  CHECK(fs::exists(marker));
  CHECK(dir.entries() == std::vector<std::string>{"occupied"});
}

TEST_CASE("a write that fails part way leaves the old file's contents unchanged") {
  TempDir dir;
  const std::string path = (dir.path() / "checkpoint.safetensors").string();
  const std::vector<float> old_values = {1.0f, 2.0f, 3.0f};
  SafetensorsWriter old_writer;
  old_writer.add("W", {3}, old_values.data());
  old_writer.write_atomically(path);
  const auto old_bytes = read_file_bytes(path);

  // A file-size limit below the new file's size makes the write fail with EFBIG, as a full disk
  // would fail it with ENOSPC. SIGXFSZ would otherwise kill the process.
  const std::vector<float> new_values(4096, 0.5f);
  SafetensorsWriter new_writer;
  new_writer.add("W", {4096}, new_values.data());
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
  const auto saved_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = saved;
  small.rlim_cur = 1024;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  std::string message;
  try {
    new_writer.write_atomically(path);
  } catch (const IoError& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, saved_handler);

  INFO("message: " << message);
  CHECK(message.rfind(path + ": cannot write temporary file", 0) == 0);
  CHECK(message.find("File too large") != std::string::npos);
  CHECK(read_file_bytes(path) == old_bytes);
  CHECK(SafetensorsFile::read(path).to_float("W") == old_values);
  CHECK(dir.entries() == std::vector<std::string>{"checkpoint.safetensors"});
}
