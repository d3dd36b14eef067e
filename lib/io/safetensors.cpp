// The safetensors reader: header parsing, validation and conversion of tensors to host values.
#include "relora/io/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "io/little_endian.hpp"
#include "relora/io/atomic_file.hpp"
#include "relora/core/errors.hpp"

namespace relora {
namespace {

using nlohmann::json;

constexpr std::size_t kLengthPrefix = 8;
const char* const kMetadataKey = "__metadata__";

// Names come from the file, so they can be huge: keep error messages readable.
std::string quote_name(const std::string& name) {
  constexpr std::size_t kMax = 200;
  if (name.size() <= kMax) return "'" + name + "'";
  return "'" + name.substr(0, kMax) + "...' (" + std::to_string(name.size()) + " bytes)";
}

std::string tensor_label(const std::string& name) { return "tensor " + quote_name(name); }

std::string offsets_text(std::uint64_t begin, std::uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

const char* json_type(const json& value) { return value.type_name(); }

// nlohmann keeps the last of two equal keys without a word; a file that says two things about
// one tensor is ambiguous, so the parse callback records any repeat and the reader rejects it.
json parse_header_json(const std::uint8_t* begin, const std::uint8_t* end, std::string& duplicate) {
  std::vector<std::set<std::string>> open_objects;
  auto note_duplicates = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == json::parse_event_t::key && !open_objects.empty() && duplicate.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) duplicate = key;
    }
    return true;
  };
  return json::parse(begin, end, note_duplicates);
}

// Product of the dimensions times the element size, or nullopt when it overflows 64 bits.
std::optional<std::uint64_t> checked_byte_size(const std::vector<std::int64_t>& shape,
                                               std::size_t element_size) {
  std::uint64_t total = element_size;
  for (std::int64_t dim : shape) {
    const auto d = static_cast<std::uint64_t>(dim);
    if (d != 0 && total > std::numeric_limits<std::uint64_t>::max() / d) return std::nullopt;
    total *= d;
  }
  return total;
}

bool is_float_dtype(Dtype dtype) {
  return dtype == Dtype::F32 || dtype == Dtype::F64 || dtype == Dtype::F16 || dtype == Dtype::BF16;
}

// One element of a float dtype at `p`, as double (exact for every dtype accepted).
double load_float_element(Dtype dtype, const std::uint8_t* p) {
  switch (dtype) {
    case Dtype::F32: {
      const auto bits = load_le<std::uint32_t>(p);
      float value;
      std::memcpy(&value, &bits, sizeof value);
      return value;
    }
    case Dtype::F64: {
      const auto bits = load_le<std::uint64_t>(p);
      double value;
      std::memcpy(&value, &bits, sizeof value);
      return value;
    }
    case Dtype::F16: return half_to_float(load_le<std::uint16_t>(p));
    default: return bfloat16_to_float(load_le<std::uint16_t>(p));  // BF16
  }
}

bool is_integer_dtype(Dtype dtype) {
  switch (dtype) {
    case Dtype::BOOL: case Dtype::U8: case Dtype::I8: case Dtype::U16: case Dtype::I16:
    case Dtype::U32: case Dtype::I32: case Dtype::U64: case Dtype::I64: return true;
    default: return false;
  }
}

// One element of an integer dtype. A U64 value above INT64_MAX has no int64 form, so the element
// carries both views and a flag saying which one is valid.
struct IntegerElement {
  std::int64_t value;             // valid unless above_int64
  std::uint64_t unsigned_value;   // valid unless value < 0
  bool above_int64;
};

IntegerElement load_integer_element(Dtype dtype, const std::uint8_t* p) {
  auto from_signed = [](std::int64_t v) {
    return IntegerElement{v, static_cast<std::uint64_t>(v), false};
  };
  auto from_unsigned = [](std::uint64_t v) {
    const bool big = v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    return IntegerElement{big ? 0 : static_cast<std::int64_t>(v), v, big};
  };
  switch (dtype) {
    case Dtype::BOOL: return from_unsigned(p[0] != 0 ? 1 : 0);
    case Dtype::U8: return from_unsigned(p[0]);
    case Dtype::I8: return from_signed(static_cast<std::int8_t>(p[0]));
    case Dtype::U16: return from_unsigned(load_le<std::uint16_t>(p));
    case Dtype::I16: return from_signed(static_cast<std::int16_t>(load_le<std::uint16_t>(p)));
    case Dtype::U32: return from_unsigned(load_le<std::uint32_t>(p));
    case Dtype::I32: return from_signed(static_cast<std::int32_t>(load_le<std::uint32_t>(p)));
    case Dtype::U64: return from_unsigned(load_le<std::uint64_t>(p));
    default: return from_signed(static_cast<std::int64_t>(load_le<std::uint64_t>(p)));  // I64
  }
}

}  // namespace

// ---- parsing and validation ---------------------------------------------------------------

namespace {

// Parses the fields of one header entry; `fail` throws.
template <typename Fail>
SafetensorsFile::TensorInfo parse_tensor_entry(const std::string& name, const json& entry,
                                               const Fail& fail) {
  const std::string label = tensor_label(name);
  if (!entry.is_object()) fail(label + " is described by a JSON " + json_type(entry) + ", not an object");

  const auto dtype_field = entry.find("dtype");
  if (dtype_field == entry.end()) fail(label + " has no \"dtype\"");
  if (!dtype_field->is_string()) fail(label + " has a \"dtype\" that is not a string");
  const auto dtype = dtype_from_name(dtype_field->get_ref<const std::string&>());
  if (!dtype) fail(label + " has unknown dtype " + quote_name(dtype_field->get_ref<const std::string&>()));

  const auto shape_field = entry.find("shape");
  if (shape_field == entry.end()) fail(label + " has no \"shape\"");
  if (!shape_field->is_array()) fail(label + " has a \"shape\" that is not an array");
  std::vector<std::int64_t> shape;
  shape.reserve(shape_field->size());
  for (const auto& dim : *shape_field) {
    // Non-negative JSON integers parse as unsigned; negative ones and fractions do not.
    if (!dim.is_number_unsigned()) {
      fail(label + " has a shape entry " + dim.dump() + " that is not a non-negative integer");
    }
    const auto value = dim.get<std::uint64_t>();
    if (value > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      fail(label + " has a shape dimension " + std::to_string(value) + " beyond 2^63 - 1");
    }
    shape.push_back(static_cast<std::int64_t>(value));
  }

  const auto offsets_field = entry.find("data_offsets");
  if (offsets_field == entry.end()) fail(label + " has no \"data_offsets\"");
  if (!offsets_field->is_array() || offsets_field->size() != 2 ||
      !(*offsets_field)[0].is_number_unsigned() || !(*offsets_field)[1].is_number_unsigned()) {
    fail(label + " has \"data_offsets\" " + offsets_field->dump().substr(0, 200) +
         ", not two non-negative integers [begin, end]");
  }
  const auto begin = (*offsets_field)[0].get<std::uint64_t>();
  const auto end = (*offsets_field)[1].get<std::uint64_t>();
  if (end < begin) fail(label + " has data_offsets " + offsets_text(begin, end) + " that end before they begin");
  return {*dtype, std::move(shape), begin, end};
}

}  // namespace

void SafetensorsFile::fail(const std::string& what) const { throw IoError(source_ + ": " + what); }

SafetensorsFile SafetensorsFile::read(const std::string& path) {
  return parse(read_file_bytes(path), path);
}

SafetensorsFile SafetensorsFile::parse(const std::uint8_t* bytes, std::size_t size,
                                       const std::string& source) {
  return parse(std::vector<std::uint8_t>(bytes, bytes + size), source);
}

SafetensorsFile SafetensorsFile::parse(std::vector<std::uint8_t> bytes, const std::string& source) {
  SafetensorsFile file;
  file.source_ = source;
  file.bytes_ = std::move(bytes);
  const auto fail = [&file](const std::string& what) { file.fail(what); };
  const std::size_t size = file.bytes_.size();

  if (size < kLengthPrefix) {
    fail("file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  }
  const auto header_size = load_le<std::uint64_t>(file.bytes_.data());
  if (header_size > kMaxHeaderSize) {
    fail("header length " + std::to_string(header_size) + " exceeds the limit of " +
         std::to_string(kMaxHeaderSize) + " bytes");
  }
  if (header_size > size - kLengthPrefix) {
    fail("truncated: the header length says " + std::to_string(header_size) +
         " bytes of header but the file has only " + std::to_string(size - kLengthPrefix) +
         " bytes after the length");
  }
  file.data_start_ = kLengthPrefix + static_cast<std::size_t>(header_size);

  const std::uint8_t* header_begin = file.bytes_.data() + kLengthPrefix;
  // nlohmann's lexer takes a NUL byte for the end of the input and would accept "{}\0garbage";
  // a NUL is never valid JSON (not even inside a string), so reject it before parsing.
  if (const void* nul = std::memchr(header_begin, 0, static_cast<std::size_t>(header_size))) {
    fail("header is not valid JSON: NUL byte at header offset " +
         std::to_string(static_cast<const std::uint8_t*>(nul) - header_begin));
  }
  json header;
  std::string duplicate;
  try {
    header = parse_header_json(header_begin, header_begin + header_size, duplicate);
  } catch (const json::exception& e) {
    fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (!duplicate.empty()) fail("header names the key " + quote_name(duplicate) + " twice");
  if (!header.is_object()) fail(std::string("header is a JSON ") + json_type(header) + ", not an object");

  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      if (value.is_null()) continue;  // the reference reads a null __metadata__ as none
      if (!value.is_object()) fail("__metadata__ is a JSON " + std::string(json_type(value)) + ", not an object");
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string()) {
          fail("__metadata__ value for key " + quote_name(meta_key) + " is a JSON " +
               json_type(meta_value) + ", not a string");
        }
        file.metadata_.emplace(meta_key, meta_value.get<std::string>());
      }
      continue;
    }
    file.tensors_.emplace(key, parse_tensor_entry(key, value, fail));
  }

  // Walk the tensors in data order: each must start where the previous ended (the first at 0),
  // hold exactly elements x dtype size bytes, and the last must end where the file ends.
  std::vector<std::pair<const std::string*, const TensorInfo*>> by_offset;
  by_offset.reserve(file.tensors_.size());
  for (const auto& [name, info] : file.tensors_) by_offset.emplace_back(&name, &info);
  std::sort(by_offset.begin(), by_offset.end(), [](const auto& a, const auto& b) {
    return std::make_pair(a.second->begin, a.second->end) < std::make_pair(b.second->begin, b.second->end);
  });

  std::uint64_t data_end = 0;
  const std::string* previous = nullptr;
  for (const auto& [name, info] : by_offset) {
    const std::string label = tensor_label(*name);
    const std::string offsets = offsets_text(info->begin, info->end);
    if (info->begin != data_end) {
      if (previous == nullptr) {
        fail(label + " comes first in the data but its data_offsets " + offsets +
             " do not start at 0");
      } else if (info->begin > data_end) {
        fail("gap of " + std::to_string(info->begin - data_end) + " bytes in the data: " +
             tensor_label(*previous) + " ends at " + std::to_string(data_end) + " but " + label +
             " has data_offsets " + offsets);
      } else {
        fail(label + " has data_offsets " + offsets + " that overlap " + tensor_label(*previous) +
             ", which ends at " + std::to_string(data_end));
      }
    }
    const auto needed = checked_byte_size(info->shape, dtype_size(info->dtype));
    if (!needed) {
      fail(label + " has shape " + shape_text(info->shape) + " of " + dtype_name(info->dtype) +
           " whose size in bytes overflows 64 bits");
    }
    if (info->end - info->begin != *needed) {
      fail(label + " has data_offsets " + offsets + " but shape " + shape_text(info->shape) +
           " of " + dtype_name(info->dtype) + " needs " + std::to_string(*needed) + " bytes");
    }
    data_end = info->end;
    previous = name;
  }

  const std::uint64_t data_size = size - file.data_start_;
  if (data_end > data_size) {
    fail("truncated: the tensors need " + std::to_string(data_end) +
         " bytes of data but the file holds " + std::to_string(data_size));
  }
  if (data_end < data_size) {
    fail(std::to_string(data_size - data_end) + " trailing bytes after the last tensor (the tensors need " +
         std::to_string(data_end) + " bytes of data, the file holds " + std::to_string(data_size) + ")");
  }
  return file;
}

// ---- access ---------------------------------------------------------------------------------

std::optional<std::string> SafetensorsFile::metadata_value(const std::string& key) const {
  const auto it = metadata_.find(key);
  if (it == metadata_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& entry : tensors_) names.push_back(entry.first);
  return names;
}

const SafetensorsFile::TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) fail("has no tensor " + quote_name(name));
  return it->second;
}

Dtype SafetensorsFile::dtype(const std::string& name) const { return info(name).dtype; }
std::vector<std::int64_t> SafetensorsFile::shape(const std::string& name) const { return info(name).shape; }

std::int64_t SafetensorsFile::element_count(const std::string& name) const {
  const auto& t = info(name);
  // Validated: (end - begin) = elements x size, and it lies inside the file.
  return static_cast<std::int64_t>((t.end - t.begin) / dtype_size(t.dtype));
}

const std::uint8_t* SafetensorsFile::raw_data(const std::string& name) const {
  return bytes_.data() + data_start_ + info(name).begin;
}

std::size_t SafetensorsFile::raw_size(const std::string& name) const {
  const auto& t = info(name);
  return static_cast<std::size_t>(t.end - t.begin);
}

void SafetensorsFile::require_floating(const std::string& name) const {
  const Dtype d = info(name).dtype;
  if (!is_float_dtype(d)) {
    fail(tensor_label(name) + " has dtype " + dtype_name(d) +
         ", which does not convert to floating point (F32, F64, F16 and BF16 do)");
  }
}

std::vector<double> SafetensorsFile::to_double(const std::string& name) const {
  require_floating(name);
  const auto& t = info(name);
  const std::size_t step = dtype_size(t.dtype);
  const auto count = static_cast<std::size_t>(element_count(name));
  const std::uint8_t* p = raw_data(name);
  std::vector<double> values(count);
  for (std::size_t i = 0; i < count; ++i) values[i] = load_float_element(t.dtype, p + i * step);
  return values;
}

std::vector<float> SafetensorsFile::to_float(const std::string& name) const {
  require_floating(name);
  const auto& t = info(name);
  const std::size_t step = dtype_size(t.dtype);
  const auto count = static_cast<std::size_t>(element_count(name));
  const std::uint8_t* p = raw_data(name);
  std::vector<float> values(count);
  // F64 -> float rounds to nearest; the other dtypes are exact as floats already.
  for (std::size_t i = 0; i < count; ++i) {
    values[i] = static_cast<float>(load_float_element(t.dtype, p + i * step));
  }
  return values;
}

void SafetensorsFile::require_integer(const std::string& name) const {
  const Dtype d = info(name).dtype;
  if (!is_integer_dtype(d)) fail(tensor_label(name) + " has dtype " + dtype_name(d) + ", not an integer type");
}

std::vector<std::int64_t> SafetensorsFile::to_int64(const std::string& name) const {
  require_integer(name);
  const auto& t = info(name);
  const std::size_t step = dtype_size(t.dtype);
  const auto count = static_cast<std::size_t>(element_count(name));
  const std::uint8_t* p = raw_data(name);
  std::vector<std::int64_t> values(count);
  for (std::size_t i = 0; i < count; ++i) {
    const auto element = load_integer_element(t.dtype, p + i * step);
    if (element.above_int64) {
      fail(tensor_label(name) + " element " + std::to_string(i) + " = " +
           std::to_string(element.unsigned_value) + " does not fit in int64");
    }
    values[i] = element.value;
  }
  return values;
}

std::vector<std::uint64_t> SafetensorsFile::to_uint64(const std::string& name) const {
  require_integer(name);
  const auto& t = info(name);
  const std::size_t step = dtype_size(t.dtype);
  const auto count = static_cast<std::size_t>(element_count(name));
  const std::uint8_t* p = raw_data(name);
  std::vector<std::uint64_t> values(count);
  for (std::size_t i = 0; i < count; ++i) {
    const auto element = load_integer_element(t.dtype, p + i * step);
    if (!element.above_int64 && element.value < 0) {
      fail(tensor_label(name) + " element " + std::to_string(i) + " = " +
           std::to_string(element.value) + " is negative");
    }
    values[i] = element.unsigned_value;
  }
  return values;
}

}  // namespace relora
