#pragma once
// The floor of a step whose bases are stored in bf16 or fp16 (relora_bench --precision): every
// layer's X W^T and (all but the first layer's) dY W, timed alone through FrozenBase, the same
// component the layers use. On CUDA that is cublasGemmEx on 16-bit inputs with fp32 accumulation,
// plus the rounding of the fp32 operand (X, dY) into a 16-bit buffer that each product needs while
// activations travel between layers in fp32 (a profiler shows those roundings apart, as
// round_kernel: the most that bf16 activations between layers could save). Header-only:
// relora_bench.cpp is its one user.
#include <memory>
#include <vector>

#include "relora/relora.hpp"

namespace relora_bench {

struct HalfFloor {
  std::vector<std::unique_ptr<relora::FrozenBase<float>>> bases;
  std::vector<relora::Tensor<float>> X, Y, dY, dX;
};

// Layer i maps dims[i] -> dims[i + 1] on n rows.
inline HalfFloor make_half_floor(relora::Index n, const std::vector<relora::Index>& dims,
                                 relora::Backend<float>& backend, relora::BasePrecision precision) {
  HalfFloor f;
  std::uint64_t stream = 0;
  const auto random = [&](relora::Index rows, relora::Index cols) {
    relora::Tensor<float> t = backend.allocate(rows, cols);
    backend.random_uniform(relora::RngKey{11, stream++}, -1.0f, 1.0f, t);  // never time on zeros
    return t;
  };
  for (std::size_t i = 0; i + 1 < dims.size(); ++i) {
    const relora::Index k = dims[i], d = dims[i + 1];
    f.bases.push_back(std::make_unique<relora::FrozenBase<float>>(backend, d, k, relora::BiasMode::none, precision,
                                                                  relora::BaseMerge::stochastic, 1000 + i,
                                                                  "bench floor"));
    f.bases.back()->random_weight(relora::RngKey{13, stream++}, -0.02f, 0.02f);
    f.X.push_back(random(n, k));
    f.Y.push_back(random(n, d));
    f.dY.push_back(random(n, d));
    f.dX.push_back(i > 0 ? random(n, k) : relora::Tensor<float>());
  }
  return f;
}

inline void run_half_floor(HalfFloor& f) {
  for (std::size_t i = 0; i < f.bases.size(); ++i) {
    f.bases[i]->forward(f.X[i], f.Y[i]);                               // Y = X W^T
    if (i > 0) f.bases[i]->input_gradient(f.dY[i], 0.0f, f.dX[i]);  // dX = dY W
  }
}

}  // namespace relora_bench
