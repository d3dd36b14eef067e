#pragma once
// The anchor cases of ../shared/anchors/peft_anchor.py (the same n, widths and ranks), and the
// model every relora_bench mode builds for a case: one step's time (relora_bench.cpp) and the
// data-parallel step's (data_parallel_cases.cpp) are of the same model.
//
// Letters as in shared/DESIGN.md: n rows, k = in_features, d = out_features, r = rank.
// A case is an MLP of nn.Linear-like layers: frozen base W and bias, LoRA on every layer with
// alpha = 2 r (peft_anchor.py's lora_alpha), dropout 0, ReLU between layers, none after the last.
#include <memory>
#include <string>
#include <vector>

#include "relora/relora.hpp"

namespace relora_bench {

struct CaseSpec {
  std::string name;
  relora::Index n;
  std::vector<relora::Index> dims;  // dims[0] = k of the first layer, dims[i + 1] = d of layer i
  relora::Index r;
};

inline const std::vector<CaseSpec>& anchor_cases() {
  static const std::vector<CaseSpec> cases = {
      {"seed_demo", 200, {10, 5}, 4},
      {"layer1k", 1024, {1024, 1024}, 16},
      {"layer4k", 4096, {4096, 4096}, 16},
      {"mlp4x2k", 2048, {2048, 2048, 2048, 2048, 2048}, 16},
      {"mlp4x4k", 4096, {4096, 4096, 4096, 4096, 4096}, 64},
      {"llm_mlp", 4096, {4096, 11008, 4096}, 16},  // a transformer MLP's up and down projections
  };
  return cases;
}

// The anchor case named `name`, or null.
inline const CaseSpec* find_anchor_case(const std::string& name) {
  for (const CaseSpec& c : anchor_cases()) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

// Appends the case's layers to `model`, on the model's backend. Layer i draws its W, bias and A
// from seed 1000 + i, so every model built for a case is the same model, on any rank.
template <typename T>
void add_case_layers(relora::Model<T>& model, const CaseSpec& c, relora::BasePrecision precision, bool dora) {
  const std::size_t L = c.dims.size() - 1;
  for (std::size_t i = 0; i < L; ++i) {
    relora::LoraConfig cfg;
    cfg.in_features = c.dims[i];
    cfg.out_features = c.dims[i + 1];
    cfg.rank = c.r;
    cfg.alpha = 2.0 * double(c.r);  // peft_anchor.py: lora_alpha = 2 r, so s = 2
    cfg.dropout = 0;
    cfg.bias = relora::BiasMode::frozen;  // nn.Linear has a bias; PEFT (bias="none") freezes it
    cfg.seed = 1000 + i;
    cfg.base_precision = precision;
    const relora::Activation f = i + 1 < L ? relora::Activation::relu : relora::Activation::identity;
    if (dora) {
      model.add(std::make_unique<relora::DoraLinear<T>>(model.backend(), relora::DoraConfig{.lora = cfg}), f);
    } else {
      model.add(cfg, f);
    }
  }
}

}  // namespace relora_bench
