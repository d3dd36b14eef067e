#pragma once
// What the tests of 16-bit bases share: a layer with a bf16 or fp16 base and an fp32 reference
// layer holding the same (rounded) weights, and the loss L = sum(Y .* G) whose gradient is G.
#include <algorithm>
#include <random>

#include "relora/relora.hpp"
#include "test_data.hpp"

namespace relora::testing {

// W rounded to nearest in `format` and widened back: the weights a 16-bit base holds.
inline HostMatrix<float> rounded(const HostMatrix<float>& W, BasePrecision format) {
  HostMatrix<float> r(W.rows(), W.cols());
  for (Index i = 0; i < W.size(); ++i) {
    r.data()[i] = half_bits::half_to_float(
        half_bits::round_float(W.data()[i], format, HalfRounding::nearest, 0.0f), format);
  }
  return r;
}

// The largest relative error of a row of `a` against the same row of `b` (a product that goes
// wrong in one block of rows cannot hide in a norm over the whole matrix).
inline double worst_row_error(const HostMatrix<float>& a, const HostMatrix<float>& b) {
  double worst = 0;
  for (Index i = 0; i < a.rows(); ++i) {
    worst = std::max(worst, double((a.row(i) - b.row(i)).norm()) / std::max(double(b.row(i).norm()), 1e-30));
  }
  return worst;
}

// A 16-bit layer and an fp32 one on the same rounded W, b, A and B.
struct HalfAndReference {
  std::unique_ptr<LoraLinear<float>> half, reference;
  HalfAndReference(Backend<float>& backend, LoraConfig config, BasePrecision format, std::mt19937_64& gen) {
    const HostMatrix<float> W = normal_matrix<float>(config.out_features, config.in_features, gen, 0.3);
    const HostMatrix<float> B = normal_matrix<float>(config.out_features, config.rank, gen, 0.2);
    const HostMatrix<float> b = normal_matrix<float>(1, config.out_features, gen, 0.1);
    LoraConfig half_config = config;
    half_config.base_precision = format;
    half = make_lora_linear<float>(backend, half_config, W);
    reference = make_lora_linear<float>(backend, config, rounded(W, format), LayerChoice::reference);
    half->set_B(B);
    reference->set_B(B);
    reference->set_A(to_host(backend, half->A()));
    if (config.bias != BiasMode::none) {
      const HostMatrix<float> b_used = config.bias == BiasMode::frozen ? rounded(b, format) : b;
      half->set_b(b);
      reference->set_b(b_used);
    }
  }
};

}  // namespace relora::testing
