// libFuzzer harness for SafetensorsFile::parse. Any input must either parse or throw IoError;
// a crash, a leak, an out-of-bounds read or undefined behaviour is a bug (the sanitizers catch
// them). For inputs that parse, every accessor must work on every tensor, and writing the
// tensors back out and reading them again must give the same names, shapes and bytes.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "relora/io/checksum.hpp"
#include "relora/core/errors.hpp"
#include "relora/io/safetensors.hpp"

namespace {

void require(bool condition) {
  if (!condition) __builtin_trap();
}

// Conversions may refuse a dtype or a value with IoError; anything else is a bug.
template <typename Convert>
void try_conversion(const Convert& convert, std::size_t expected_count) {
  try {
    require(convert().size() == expected_count);
  } catch (const relora::IoError&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::optional<relora::SafetensorsFile> file;
  try {
    file.emplace(relora::SafetensorsFile::parse(data, size, "fuzz input"));
  } catch (const relora::IoError&) {
    return 0;
  }

  relora::SafetensorsWriter writer;
  for (const auto& name : file->names()) {
    const relora::Dtype dtype = file->dtype(name);
    const auto count = static_cast<std::size_t>(file->element_count(name));
    require(file->raw_size(name) == count * relora::dtype_size(dtype));
    (void)relora::fnv1a64(file->raw_data(name), file->raw_size(name));
    try_conversion([&] { return file->to_float(name); }, count);
    try_conversion([&] { return file->to_double(name); }, count);
    try_conversion([&] { return file->to_int64(name); }, count);
    try_conversion([&] { return file->to_uint64(name); }, count);
    writer.add_raw(name, dtype, file->shape(name), file->raw_data(name));
  }
  for (const auto& [key, value] : file->metadata()) writer.set_metadata(key, value);

  const auto again = relora::SafetensorsFile::parse(writer.serialize(), "fuzz rewrite");
  require(again.names() == file->names());
  require(again.metadata() == file->metadata());
  for (const auto& name : file->names()) {
    require(again.dtype(name) == file->dtype(name));
    require(again.shape(name) == file->shape(name));
    require(again.raw_size(name) == file->raw_size(name));
    require(file->raw_size(name) == 0 ||
            std::memcmp(again.raw_data(name), file->raw_data(name), file->raw_size(name)) == 0);
  }
  return 0;
}
