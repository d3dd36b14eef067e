// relora_bench --ranks (apps/bench/data_parallel_cases.hpp): its rank counts are parsed and bad ones
// refused naming the value; a CUDA run that cannot have one GPU per rank is refused before it
// starts, saying why (no CUDA, no NCCL, or too few GPUs), in every build.
#include <doctest/doctest.h>

#include <stdexcept>

#include "data_parallel_cases.hpp"
#include "relora/relora.hpp"

using relora_bench::parse_rank_counts;

TEST_CASE("bench --ranks: N means 1..N, a list is taken as given") {
  CHECK(parse_rank_counts("1") == std::vector<int>{1});
  CHECK(parse_rank_counts("3") == std::vector<int>{1, 2, 3});
  CHECK(parse_rank_counts("1,2") == std::vector<int>{1, 2});
  CHECK(parse_rank_counts("2,4,8") == std::vector<int>{2, 4, 8});
}

TEST_CASE("bench --ranks: bad counts are refused, naming the value") {
  for (const char* bad : {"", "0", "2,1", "1,1", "1,,2", "x", "-2", "2,", "1000000"}) {
    CAPTURE(bad);
    std::string what;
    try {
      parse_rank_counts(bad);
    } catch (const std::invalid_argument& e) {
      what = e.what();
    }
    CHECK(what.find(std::string("--ranks: '") + bad + "'") == 0);
  }
}

TEST_CASE("bench --ranks: a CUDA run with more ranks than GPUs is refused before it starts") {
  relora_bench::DataParallelOptions options;
  options.device = relora::Device::cuda;
  options.ranks = {1, 4096};  // more GPUs than any machine has
  options.cases = {*relora_bench::find_anchor_case("seed_demo")};
  std::string what;
  try {
    relora_bench::run_data_parallel_cases(options);
  } catch (const relora::ConfigError& e) {
    what = e.what();
  }
  MESSAGE("refused: " << what);
  CHECK(what.find("--backend cuda --ranks") == 0);
  const bool names_why = what.find("needs one GPU per rank: ") != std::string::npos ||
                         what.find("needs NCCL: ") != std::string::npos ||
                         what.find("needs 4096 GPUs (one per rank), but GPU ") != std::string::npos;
  CHECK(names_why);
}
