#pragma once
// Command-line flags of the regression demo (relora_regression), parsed apart from main so that
// the tests can drive the parser with argument lists and catch its errors.
#include <cstdint>
#include <string>
#include <vector>

#include "relora/core/tensor.hpp"
#include "relora/layers/lora_config.hpp"
#include "relora/optimizers/galore.hpp"

namespace relora::demo {

// The training methods the demo compares, in their default order.
enum class Method {
  full_finetune,  // W itself trains: the full-rank reference
  lora,           // a rank-r adapter, never merged: stuck at its rank ceiling
  relora,         // merged and restarted every T steps: B = 0, Adam moments cleared
  seed_relora,    // seed 000's own restart: A and B re-drawn N(0, 0.01), Adam moments kept
  dora,           // DoRA (DoraLinear): LoRA's adapter plus a trainable row magnitude m, never merged
  relora_dora,    // ReLoRA's restarts on the DoRA layer: W <- diag(g) (W + s B A), m = row norms
  galore,         // W itself trains with GaLore: Adam's state in a rank --galore-rank gradient subspace
};

// The name --methods takes ("full", "lora", "relora", "seed", "dora", "relora_dora", "galore").
const char* method_key(Method method);
// The name in the table and the plot's legend.
const char* method_label(Method method);
// The method's column in losses.csv: the label for the first four methods, as the CSV has always
// had them, and the short key for the later ones ("dora", "relora_dora", "galore").
const char* method_column(Method method);
std::vector<Method> all_methods();

struct Options {
  std::int64_t steps = 300;          // training steps per method (full batch each)
  Index rank = 4;                    // r, 1 <= r <= min(in_features, out_features)
  std::int64_t restart_every = 50;   // T, ReLoRA's restart period
  double lr = 1e-2;                  // Adam's learning rate
  Index samples = 200;               // n, rows of X
  Index in_features = 10;            // k
  Index out_features = 5;            // d
  double noise = 0.1;                // standard deviation of the target's noise
  std::uint64_t seed = 42;           // data, base weight and adapter draws
  int threads = 0;                   // OpenMP threads; 0 leaves OpenMP's default
  std::string out_dir = ".";         // where losses.csv and losses.svg go
  Device backend = Device::cpu;
  std::int64_t restart_warmup = 0;   // ReLoRA's linear re-warmup after each restart, 0 <= w <= T
  Index galore_rank = 4;             // GaLore's projection rank, 1 <= r <= min(in_features, out_features)
  std::int64_t galore_gap = 50;      // GaLore's T: steps between two SVDs of W's gradient
  double galore_scale = 1;           // GaLore's alpha (its paper's 0.25 is for large models' lr)
  relora::SubspaceMethod galore_subspace = relora::SubspaceMethod::gram;  // how P and Q are found
  std::vector<Method> methods = all_methods();
  std::string save_adapter;          // when set: LoRA's trained adapter as a PEFT adapter folder
  BasePrecision precision = BasePrecision::fp32;  // how W is stored (full fine-tuning: an fp32 master)
  BaseMerge base_merge = BaseMerge::stochastic;   // how a merge lands in a bf16 or fp16 W
  bool help = false;                 // --help was given: print usage_text() and stop
};

// Parses the arguments after the program name. Accepts "--flag value" and "--flag=value".
// Throws ConfigError naming the flag and the value for an unknown flag, a missing value, a value
// that is not a number of the right kind, a count that is zero or negative, or a combination out
// of range (rank or GaLore rank above min(in, out), re-warmup longer than the restart period).
Options parse_options(const std::vector<std::string>& args);

// The --help text: every flag with its default.
std::string usage_text();

}  // namespace relora::demo
