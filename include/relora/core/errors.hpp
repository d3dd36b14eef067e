#pragma once
// Exceptions thrown by relora. Every message names the offending value and, where shapes are
// involved, the shapes, so a user can find the mistake without a debugger.
#include <cstdint>
#include <stdexcept>
#include <string>

namespace relora {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Mismatched shapes between operands (inputs, targets, gradients, loaded tensors).
class ShapeError : public Error {
 public:
  using Error::Error;
};

// An invalid configuration value (rank, alpha, dropout, learning rate, restart period, ...).
class ConfigError : public Error {
 public:
  using Error::Error;
};

// NaN or Inf in an input, a loss or a gradient; the step that met it changed nothing.
class NonFiniteError : public Error {
 public:
  using Error::Error;
};

// A file that cannot be read or written, or whose content is corrupt, truncated or of another version.
class IoError : public Error {
 public:
  using Error::Error;
};

// A failure reported by the accelerator runtime (CUDA, cuBLAS), out-of-memory included.
class DeviceError : public Error {
 public:
  using Error::Error;
};

inline std::string shape_string(std::int64_t rows, std::int64_t cols) {
  // Appended piece by piece: GCC 12 warns (-Wrestrict, a false positive) on a chain of operator+.
  std::string text = "[";
  text += std::to_string(rows);
  text += " x ";
  text += std::to_string(cols);
  text += "]";
  return text;
}

}  // namespace relora
