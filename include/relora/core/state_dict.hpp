#pragma once
// A component's saved state: host copies of its tensors and its scalar fields, by name. Every
// component that has state (a layer, an optimizer, a schedule, the ReLoRA controller) fills one
// in save_state() and reads one back in restore_state(); the checkpoint stores each under the
// component's own prefix and knows nothing of what is inside.
//
// Readers check as they read: a missing entry, a tensor of another shape, a non-finite value or a
// field out of range throws IoError naming the entry (and both shapes), so a component can check
// everything it needs before it changes anything. Messages name an entry as its store does: a
// checkpoint that keeps a component's entries under a prefix ("optim.") sets it as the origin.
#include <cstdint>
#include <map>
#include <string>
#include <variant>

#include "relora/core/half_precision.hpp"
#include "relora/core/host_matrix.hpp"

namespace relora {

template <typename T>
class StateDict {
 public:
  using Field = std::variant<std::int64_t, std::uint64_t, double, bool, std::string>;

  // The prefix of every tensor's name where the tensors are stored, for messages only.
  void set_origin(std::string prefix) { origin_ = std::move(prefix); }
  // A tensor's `name` as messages show it: "tensor '" + where(name) + "' ...".
  std::string where(const std::string& name) const { return origin_ + name; }

  void set_tensor(const std::string& name, HostMatrix<T> value) { tensors_[name] = std::move(value); }
  bool has_tensor(const std::string& name) const { return tensors_.count(name) != 0; }
  // The tensor `name`, which must be rows x cols and finite.
  const HostMatrix<T>& tensor(const std::string& name, Index rows, Index cols) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) throw IoError("state: tensor '" + where(name) + "' is missing");
    if (it->second.rows() != rows || it->second.cols() != cols) {
      throw IoError("state: tensor '" + where(name) + "' has shape " + shape_string(it->second.rows(), it->second.cols()) +
                    ", expected " + shape_string(rows, cols));
    }
    if (!it->second.allFinite()) throw IoError("state: tensor '" + where(name) + "' holds NaN or Inf");
    return it->second;
  }

  // 16-bit tensors (a bf16 or fp16 base weight) kept in their own format, bit for bit.
  void set_half_tensor(const std::string& name, HalfHostMatrix value) { half_tensors_[name] = std::move(value); }
  bool has_half_tensor(const std::string& name) const { return half_tensors_.count(name) != 0; }
  // The 16-bit tensor `name`, which must be rows x cols, in `format` and finite.
  const HalfHostMatrix& half_tensor(const std::string& name, Index rows, Index cols, BasePrecision format) const {
    const auto it = half_tensors_.find(name);
    if (it == half_tensors_.end()) {
      if (has_tensor(name)) {
        throw IoError("state: tensor '" + where(name) + "' is stored in fp32, expected " + precision_name(format));
      }
      throw IoError("state: tensor '" + where(name) + "' is missing");
    }
    const HalfHostMatrix& h = it->second;
    if (h.format != format) {
      throw IoError("state: tensor '" + where(name) + "' is " + precision_name(h.format) + ", expected " +
                    precision_name(format));
    }
    if (h.rows != rows || h.cols != cols || Index(h.bits.size()) != rows * cols) {
      throw IoError("state: tensor '" + where(name) + "' has shape " + shape_string(h.rows, h.cols) + ", expected " +
                    shape_string(rows, cols));
    }
    for (const std::uint16_t b : h.bits) {
      if (half_bits::is_nan_or_inf(b, format)) throw IoError("state: tensor '" + where(name) + "' holds NaN or Inf");
    }
    return h;
  }

  void set(const std::string& name, Field value) { fields_[name] = std::move(value); }
  bool has(const std::string& name) const { return fields_.count(name) != 0; }
  std::int64_t integer(const std::string& name, std::int64_t min = INT64_MIN, std::int64_t max = INT64_MAX) const {
    const Field& f = field(name);
    std::int64_t value = 0;
    if (const auto* i = std::get_if<std::int64_t>(&f)) {
      value = *i;
    } else if (const auto* u = std::get_if<std::uint64_t>(&f); u && *u <= std::uint64_t(INT64_MAX)) {
      value = std::int64_t(*u);
    } else {
      throw IoError("state: field '" + name + "' is not an integer");
    }
    if (value < min || value > max) {
      throw IoError("state: field '" + name + "' is " + std::to_string(value) + ", outside [" + std::to_string(min) +
                    ", " + std::to_string(max) + "]");
    }
    return value;
  }
  std::uint64_t unsigned_integer(const std::string& name) const {
    const Field& f = field(name);
    if (const auto* u = std::get_if<std::uint64_t>(&f)) return *u;
    if (const auto* i = std::get_if<std::int64_t>(&f); i && *i >= 0) return std::uint64_t(*i);
    throw IoError("state: field '" + name + "' is not a non-negative integer");
  }
  double number(const std::string& name) const {
    const Field& f = field(name);
    if (const auto* d = std::get_if<double>(&f)) return *d;
    if (const auto* i = std::get_if<std::int64_t>(&f)) return double(*i);
    if (const auto* u = std::get_if<std::uint64_t>(&f)) return double(*u);
    throw IoError("state: field '" + name + "' is not a number");
  }
  bool boolean(const std::string& name) const {
    const Field& f = field(name);
    if (const auto* b = std::get_if<bool>(&f)) return *b;
    throw IoError("state: field '" + name + "' is not true or false");
  }
  const std::string& text(const std::string& name) const {
    const Field& f = field(name);
    if (const auto* s = std::get_if<std::string>(&f)) return *s;
    throw IoError("state: field '" + name + "' is not a string");
  }

  const std::map<std::string, HostMatrix<T>>& tensors() const { return tensors_; }
  const std::map<std::string, Field>& fields() const { return fields_; }
  const std::map<std::string, HalfHostMatrix>& half_tensors() const { return half_tensors_; }

 private:
  const Field& field(const std::string& name) const {
    const auto it = fields_.find(name);
    if (it == fields_.end()) throw IoError("state: field '" + name + "' is missing");
    return it->second;
  }

  std::map<std::string, HostMatrix<T>> tensors_;
  std::map<std::string, Field> fields_;
  std::map<std::string, HalfHostMatrix> half_tensors_;
  std::string origin_;
};

}  // namespace relora
