#include "parameter_bits.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

namespace relora_bench {
namespace {

template <typename T>
std::string hex_bits(T x) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "float or double");
  using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  Bits bits = 0;
  std::memcpy(&bits, &x, sizeof bits);
  char text[24];
  std::snprintf(text, sizeof text, sizeof(T) == 4 ? "0x%08llx" : "0x%016llx", static_cast<unsigned long long>(bits));
  return text;
}

std::string shape_text(relora::Index rows, relora::Index cols) {
  return std::to_string(rows) + " x " + std::to_string(cols);
}

}  // namespace

template <typename T>
std::vector<ParameterValues<T>> download_parameters(relora::Model<T>& model) {
  std::vector<ParameterValues<T>> out;
  for (const relora::Parameter<T>& p : model.parameters()) {
    out.push_back({p.name, relora::to_host(model.backend(), *p.value)});
  }
  return out;
}

template <typename T>
std::string first_bit_difference(const std::vector<ParameterValues<T>>& a,
                                 const std::vector<ParameterValues<T>>& reference) {
  if (a.size() != reference.size()) {
    return std::to_string(a.size()) + " parameters here, " + std::to_string(reference.size()) + " in the reference";
  }
  for (std::size_t i = 0; i < a.size(); ++i) {
    const ParameterValues<T>& x = a[i];
    const ParameterValues<T>& ref = reference[i];
    if (x.name != ref.name) {
      return "parameter " + std::to_string(i) + " is " + x.name + " here, " + ref.name + " in the reference";
    }
    if (x.values.rows() != ref.values.rows() || x.values.cols() != ref.values.cols()) {
      return x.name + " is " + shape_text(x.values.rows(), x.values.cols()) + " here, " +
             shape_text(ref.values.rows(), ref.values.cols()) + " in the reference";
    }
    for (relora::Index col = 0; col < x.values.cols(); ++col) {
      for (relora::Index row = 0; row < x.values.rows(); ++row) {
        const T u = x.values(row, col), v = ref.values(row, col);
        if (std::memcmp(&u, &v, sizeof(T)) != 0) {
          return x.name + ": element (" + std::to_string(row) + ", " + std::to_string(col) + ") is " + hex_bits(u) +
                 " here and " + hex_bits(v) + " in the reference";
        }
      }
    }
  }
  return "";
}

template std::vector<ParameterValues<float>> download_parameters(relora::Model<float>&);
template std::vector<ParameterValues<double>> download_parameters(relora::Model<double>&);
template std::string first_bit_difference(const std::vector<ParameterValues<float>>&,
                                          const std::vector<ParameterValues<float>>&);
template std::string first_bit_difference(const std::vector<ParameterValues<double>>&,
                                          const std::vector<ParameterValues<double>>&);

}  // namespace relora_bench
