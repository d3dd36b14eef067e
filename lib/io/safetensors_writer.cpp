// The safetensors writer: lays tensors out as the reference implementation does and emits the
// header, the padding and the data in one buffer.
#include <algorithm>
#include <cstring>
#include <limits>

#include <nlohmann/json.hpp>

#include "io/little_endian.hpp"
#include "relora/io/atomic_file.hpp"
#include "relora/core/errors.hpp"
#include "relora/io/safetensors.hpp"

namespace relora {
namespace {

constexpr std::size_t kHeaderAlignment = 8;

std::size_t element_count_or_throw(const std::string& name, const std::vector<std::int64_t>& shape) {
  std::uint64_t count = 1;
  for (std::int64_t dim : shape) {
    if (dim < 0) {
      throw ConfigError("safetensors: tensor '" + name + "' has a negative dimension in shape " +
                        shape_text(shape));
    }
    const auto d = static_cast<std::uint64_t>(dim);
    // Bounded by what a vector can hold (times 8 bytes per element at most).
    if (d != 0 && count > (std::numeric_limits<std::size_t>::max() / 8) / d) {
      throw ConfigError("safetensors: tensor '" + name + "' shape " + shape_text(shape) +
                        " has too many elements");
    }
    count *= d;
  }
  return static_cast<std::size_t>(count);
}

// Encodes `count` values of an arithmetic type as little-endian bytes through their bit pattern.
template <typename Value, typename Bits>
void encode_le(const Value* values, std::size_t count, std::uint8_t* out) {
  static_assert(sizeof(Value) == sizeof(Bits), "bit pattern width");
  for (std::size_t i = 0; i < count; ++i) {
    Bits bits;
    std::memcpy(&bits, &values[i], sizeof bits);
    store_le<Bits>(bits, out + i * sizeof bits);
  }
}

}  // namespace

SafetensorsWriter::PendingTensor& SafetensorsWriter::start_tensor(
    const std::string& name, Dtype dtype, const std::vector<std::int64_t>& shape) {
  if (name == "__metadata__") {
    throw ConfigError("safetensors: '__metadata__' is reserved for the metadata, not a tensor name");
  }
  if (tensors_.count(name) != 0) throw ConfigError("safetensors: tensor '" + name + "' added twice");
  const std::size_t count = element_count_or_throw(name, shape);
  PendingTensor& tensor = tensors_[name];
  tensor.dtype = dtype;
  tensor.shape = shape;
  tensor.bytes.resize(count * dtype_size(dtype));
  return tensor;
}

void SafetensorsWriter::add(const std::string& name, const std::vector<std::int64_t>& shape, const float* data) {
  auto& t = start_tensor(name, Dtype::F32, shape);
  encode_le<float, std::uint32_t>(data, t.bytes.size() / 4, t.bytes.data());
}

void SafetensorsWriter::add(const std::string& name, const std::vector<std::int64_t>& shape, const double* data) {
  auto& t = start_tensor(name, Dtype::F64, shape);
  encode_le<double, std::uint64_t>(data, t.bytes.size() / 8, t.bytes.data());
}

void SafetensorsWriter::add(const std::string& name, const std::vector<std::int64_t>& shape,
                            const std::int64_t* data) {
  auto& t = start_tensor(name, Dtype::I64, shape);
  encode_le<std::int64_t, std::uint64_t>(data, t.bytes.size() / 8, t.bytes.data());
}

void SafetensorsWriter::add(const std::string& name, const std::vector<std::int64_t>& shape,
                            const std::uint64_t* data) {
  auto& t = start_tensor(name, Dtype::U64, shape);
  encode_le<std::uint64_t, std::uint64_t>(data, t.bytes.size() / 8, t.bytes.data());
}

void SafetensorsWriter::add_raw(const std::string& name, Dtype dtype, const std::vector<std::int64_t>& shape,
                                const std::uint8_t* bytes) {
  auto& t = start_tensor(name, dtype, shape);
  if (!t.bytes.empty()) std::memcpy(t.bytes.data(), bytes, t.bytes.size());
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  metadata_[key] = value;
}

std::vector<std::uint8_t> SafetensorsWriter::serialize() const {
  // Widest dtype first, then by name (the reference's order): with the header padded to 8,
  // every tensor then starts at a multiple of its element size.
  std::vector<const std::pair<const std::string, PendingTensor>*> order;
  order.reserve(tensors_.size());
  for (const auto& entry : tensors_) order.push_back(&entry);
  std::stable_sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return dtype_size(a->second.dtype) > dtype_size(b->second.dtype);
  });

  // ordered_json keeps insertion order: __metadata__ first, then the tensors in data order, each
  // with its fields as the reference writes them (dtype, shape, data_offsets).
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  std::uint64_t offset = 0;
  for (const auto* entry : order) {
    const PendingTensor& t = entry->second;
    nlohmann::ordered_json info = nlohmann::ordered_json::object();
    info["dtype"] = dtype_name(t.dtype);
    info["shape"] = t.shape;
    info["data_offsets"] = {offset, offset + t.bytes.size()};
    header[entry->first] = std::move(info);
    offset += t.bytes.size();
  }

  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::ordered_json::exception& e) {
    throw ConfigError(std::string("safetensors: a tensor name or metadata string is not valid UTF-8: ") + e.what());
  }
  text.append((kHeaderAlignment - text.size() % kHeaderAlignment) % kHeaderAlignment, ' ');

  std::vector<std::uint8_t> bytes(8 + text.size() + offset);
  store_le<std::uint64_t>(text.size(), bytes.data());
  std::memcpy(bytes.data() + 8, text.data(), text.size());
  std::uint8_t* data = bytes.data() + 8 + text.size();
  for (const auto* entry : order) {
    const auto& payload = entry->second.bytes;
    if (!payload.empty()) std::memcpy(data, payload.data(), payload.size());
    data += payload.size();
  }
  return bytes;
}

void SafetensorsWriter::write_atomically(const std::string& path) const {
  write_file_atomically(path, serialize());
}

}  // namespace relora
