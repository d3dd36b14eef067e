#pragma once
// Whole-file reads and crash-safe writes, for checkpoints and adapter files.
//
// write_file_atomically writes `path + ".tmp-<pid>"`, flushes and fsyncs it, then renames it over
// `path`. rename() replaces a file in one step on POSIX file systems, so a crash or a full disk
// mid-save leaves either the old file or the new one, never a mixture.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace relora {

// Throws IoError naming `path` and the errno text when the file cannot be opened or read.
std::vector<std::uint8_t> read_file_bytes(const std::string& path);

// On any failure removes its temporary file, leaves an existing `path` untouched and throws
// IoError naming the path and the errno text.
void write_file_atomically(const std::string& path, const std::uint8_t* data, std::size_t size);

inline void write_file_atomically(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  write_file_atomically(path, bytes.data(), bytes.size());
}

}  // namespace relora
