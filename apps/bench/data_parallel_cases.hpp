#pragma once
// relora_bench --ranks: weak scaling of data-parallel training (apps/bench/data_parallel_cases.cpp).
// Called from relora_bench's main with the options it parsed.
#include <string>
#include <vector>

#include "anchor_cases.hpp"

namespace relora_bench {

struct DataParallelOptions {
  relora::Device device = relora::Device::cpu;  // cuda: one GPU per rank, NCCL; cpu: thread ranks
  relora::MathMode math = relora::MathMode::strict;
  relora::BasePrecision precision = relora::BasePrecision::fp32;  // how every layer's frozen W is stored
  bool fused = true;  // false: every layer is the reference LoraLinear (LayerChoice::reference)
  bool dora = false;  // every layer a DoraLinear
  std::vector<int> ranks;       // the rank counts to time, ascending (parse_rank_counts)
  std::vector<CaseSpec> cases;  // each rank's batch is the case's n rows
  int repeats = 15;             // timed batches of steps, at most
  int warmup = 5;               // steps before timing (the second step is recorded as a CUDA graph)
  int batch = 0;                // steps per timed batch; 0: chosen so that a batch lasts about batch_ms
  double batch_ms = 20;
  double max_seconds = 10;      // per case and rank count: fewer batches (never under 3) beyond it
  int threads = 0;              // cpu: OpenMP threads shared among the ranks; 0: OpenMP's default
  std::string json;             // "" : no JSON file
};

// --ranks's value: "N" is 1, 2, ..., N; a list "1,2,4" is those counts (each >= 1, ascending,
// none twice). Throws std::invalid_argument naming the value.
std::vector<int> parse_rank_counts(const std::string& text);

// Times every case at every rank count and prints the table (and writes the JSON); returns the
// process's exit status: 0, or 1 when the ranks of a run ended with different parameters. Throws
// relora::Error (a missing GPU or NCCL, with the reason) and std::runtime_error.
int run_data_parallel_cases(const DataParallelOptions& options);

}  // namespace relora_bench
