#pragma once
// Reader and writer for the safetensors format (https://github.com/huggingface/safetensors):
//
//   8 bytes   N, the header length, unsigned little-endian
//   N bytes   a JSON object {name: {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [b, e]},
//             ..., optional "__metadata__": {string: string}}, padded with spaces
//   the rest  the data section: every tensor row-major little-endian, at [b, e) within it
//
// The reader validates as the reference Rust implementation does (header at most 100,000,000
// bytes and inside the file; known dtypes; offsets that start at 0, leave no gap, do not overlap
// and end exactly at the end of the file; each tensor's size = elements x dtype size), so a file
// that passes can be indexed without further checks. Every failure throws IoError naming the
// file, the tensor and what was wrong.
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace relora {

// The element types a file may declare. All can be read (shape, raw bytes); F32, F64, F16 and
// BF16 convert to float and double, the integer types and BOOL to integers.
enum class Dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

const char* dtype_name(Dtype dtype);
std::size_t dtype_size(Dtype dtype);  // bytes per element
std::optional<Dtype> dtype_from_name(const std::string& name);

// IEEE half and bfloat16 to float, exact (every value of either is a float), subnormals,
// infinities and NaN payloads included.
float half_to_float(std::uint16_t bits);
float bfloat16_to_float(std::uint16_t bits);

// Row-major shapes are written "[2 x 3]"; a scalar (no dimensions) is "[]".
std::string shape_text(const std::vector<std::int64_t>& shape);

// A parsed, validated file held in memory.
class SafetensorsFile {
 public:
  static constexpr std::uint64_t kMaxHeaderSize = 100000000;  // the reference's limit

  // Reads and validates `path`; messages start with the path.
  static SafetensorsFile read(const std::string& path);
  // Validates bytes already in memory; messages start with `source` (a path, or a description).
  static SafetensorsFile parse(const std::uint8_t* bytes, std::size_t size,
                               const std::string& source = "safetensors data");
  static SafetensorsFile parse(std::vector<std::uint8_t> bytes,
                               const std::string& source = "safetensors data");

  const std::string& source() const { return source_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A metadata value, or nullopt when the key is absent.
  std::optional<std::string> metadata_value(const std::string& key) const;

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  // Each throws IoError naming the file and `name` when there is no such tensor.
  Dtype dtype(const std::string& name) const;
  std::vector<std::int64_t> shape(const std::string& name) const;
  std::int64_t element_count(const std::string& name) const;
  // The tensor's bytes exactly as stored (little-endian), valid while this object lives.
  const std::uint8_t* raw_data(const std::string& name) const;
  std::size_t raw_size(const std::string& name) const;

  // Values converted from F32, F64, F16 or BF16 (F64 to float rounds to nearest); other dtypes
  // throw IoError. The values come out in row-major order.
  std::vector<float> to_float(const std::string& name) const;
  std::vector<double> to_double(const std::string& name) const;
  // Values of an integer dtype or BOOL; throws IoError for float dtypes or a U64 value above
  // INT64_MAX (to_int64) or a negative value (to_uint64).
  std::vector<std::int64_t> to_int64(const std::string& name) const;
  std::vector<std::uint64_t> to_uint64(const std::string& name) const;

  // Byte offset of the data section within the file (8 + header length).
  std::size_t data_start() const { return data_start_; }
  // The whole file, as read.
  const std::vector<std::uint8_t>& bytes() const { return bytes_; }

  struct TensorInfo {
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t begin;  // within the data section
    std::uint64_t end;
  };

 private:
  SafetensorsFile() = default;
  const TensorInfo& info(const std::string& name) const;
  [[noreturn]] void fail(const std::string& what) const;
  void require_floating(const std::string& name) const;
  void require_integer(const std::string& name) const;

  std::string source_;
  std::vector<std::uint8_t> bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors (copied when added) and metadata, then writes a file the reference loads.
// Tensors are laid out as the reference does: by dtype size, widest first, then by name, so that
// with the header padded to a multiple of 8 every tensor starts aligned to its element size.
class SafetensorsWriter {
 public:
  // `data` holds product(shape) values in row-major order. Throws ConfigError for the reserved
  // name "__metadata__", a name already added or a negative dimension. Any other name is fine,
  // the empty one included: whatever the reader accepts, the writer can write back.
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const float* data);      // F32
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const double* data);     // F64
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const std::int64_t* data);   // I64
  void add(const std::string& name, const std::vector<std::int64_t>& shape, const std::uint64_t* data);  // U64
  // Already-encoded little-endian bytes of any dtype: element_count(shape) * dtype_size bytes.
  void add_raw(const std::string& name, Dtype dtype, const std::vector<std::int64_t>& shape,
               const std::uint8_t* bytes);

  void set_metadata(const std::string& key, const std::string& value);

  std::vector<std::uint8_t> serialize() const;
  // See write_file_atomically in atomic_file.hpp: the old file survives any failure.
  void write_atomically(const std::string& path) const;

 private:
  struct PendingTensor {
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> bytes;
  };
  PendingTensor& start_tensor(const std::string& name, Dtype dtype,
                              const std::vector<std::int64_t>& shape);

  std::map<std::string, PendingTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace relora
