#pragma once
// Whether data-parallel ranks ended with the same model: every trainable parameter of a rank's
// model, downloaded to the host, compared to another rank's bit for bit (memcmp, not ==: -0 and
// +0 differ, and a NaN equals the same NaN). The ranks of a group must end identical to the bit,
// since each takes the same step from the same summed gradients.
#include <string>
#include <vector>

#include "relora/relora.hpp"

namespace relora_bench {

// One parameter's name and values, as the model's parameters() lists them.
template <typename T>
struct ParameterValues {
  std::string name;
  relora::HostMatrix<T> values;
};

// Every parameter the model trains now, in the model's order, downloaded from its backend.
template <typename T>
std::vector<ParameterValues<T>> download_parameters(relora::Model<T>& model);

// "" when `a` and `b` hold the same parameters (names, shapes, bits); else the first difference:
// "layers.1.lora_B: element (3, 0) is 0x3f800000 here and 0x3f800001 in the reference", or the
// names, shapes or counts that differ.
template <typename T>
std::string first_bit_difference(const std::vector<ParameterValues<T>>& a,
                                 const std::vector<ParameterValues<T>>& reference);

extern template std::vector<ParameterValues<float>> download_parameters(relora::Model<float>&);
extern template std::vector<ParameterValues<double>> download_parameters(relora::Model<double>&);
extern template std::string first_bit_difference(const std::vector<ParameterValues<float>>&,
                                                 const std::vector<ParameterValues<float>>&);
extern template std::string first_bit_difference(const std::vector<ParameterValues<double>>&,
                                                 const std::vector<ParameterValues<double>>&);

}  // namespace relora_bench
