#include "relora/io/atomic_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "relora/core/errors.hpp"

namespace relora {
namespace {

std::string errno_text(int error) { return std::strerror(error); }

[[noreturn]] void throw_io(const std::string& path, const std::string& what, int error) {
  throw IoError(path + ": " + what + ": " + errno_text(error));
}

std::string directory_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// After the rename, the directory entry itself must reach the disk, or a power cut can bring back
// the old name. Best effort: some file systems refuse fsync on a directory, and by now the new
// file is already in place, so a failure here is no reason to report the save as failed.
void sync_directory_of(const std::string& path) {
  const int fd = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  (void)::close(fd);
}

// Writes, flushes and fsyncs `file`; returns 0 or the errno of the first failure.
int write_and_sync(std::FILE* file, const std::uint8_t* data, std::size_t size) {
  if (size > 0 && std::fwrite(data, 1, size, file) != size) return errno != 0 ? errno : EIO;
  if (std::fflush(file) != 0) return errno != 0 ? errno : EIO;
  if (::fsync(::fileno(file)) != 0) return errno;
  return 0;
}

}  // namespace

std::vector<std::uint8_t> read_file_bytes(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) throw_io(path, "cannot open for reading", errno);
  std::vector<std::uint8_t> bytes;
  // Read in chunks until EOF rather than trusting a size from fseek/ftell: works for pipes and
  // for files that change size under us, and a directory fails here with EISDIR.
  std::uint8_t chunk[1 << 16];
  for (;;) {
    const std::size_t got = std::fread(chunk, 1, sizeof chunk, file);
    bytes.insert(bytes.end(), chunk, chunk + got);
    if (got < sizeof chunk) break;
  }
  const bool failed = std::ferror(file) != 0;
  const int error = errno;
  std::fclose(file);
  if (failed) throw_io(path, "cannot read", error != 0 ? error : EIO);
  return bytes;
}

void write_file_atomically(const std::string& path, const std::uint8_t* data, std::size_t size) {
  // The pid keeps two processes that save to the same path from writing the same temp file.
  const std::string temp_path = path + ".tmp-" + std::to_string(::getpid());
  std::FILE* file = std::fopen(temp_path.c_str(), "wb");
  if (file == nullptr) throw_io(path, "cannot create temporary file '" + temp_path + "'", errno);

  int error = write_and_sync(file, data, size);
  if (std::fclose(file) != 0 && error == 0) error = errno != 0 ? errno : EIO;
  if (error != 0) {
    std::remove(temp_path.c_str());
    throw_io(path, "cannot write temporary file '" + temp_path + "'", error);
  }
  if (std::rename(temp_path.c_str(), path.c_str()) != 0) {
    error = errno;
    std::remove(temp_path.c_str());
    throw_io(path, "cannot rename '" + temp_path + "' over it", error);
  }
  sync_directory_of(path);
}

}  // namespace relora
