// The regression demo's flag parser (apps/regression/options.cpp, compiled into the test binary
// by tests/CMakeLists.txt): good flags, unknown flags, malformed numbers, counts out of range,
// --help. Every error must name the flag and the value it refused.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "options.hpp"
#include "relora/core/errors.hpp"

using relora::ConfigError;
using relora::Device;
using relora::demo::Method;
using relora::demo::Options;
using relora::demo::parse_options;

namespace {

// The ConfigError message parse_options throws for `args`, or "" if it throws nothing.
std::string error_of(const std::vector<std::string>& args) {
  try {
    parse_options(args);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

// The message must name both the flag and the refused value.
void check_refused(const std::vector<std::string>& args, const std::string& flag, const std::string& value) {
  const std::string message = error_of(args);
  INFO("args: ", args.size() ? args[0] : "", " ", args.size() > 1 ? args[1] : "", " -> message: '", message, "'");
  CHECK_FALSE(message.empty());
  CHECK(message.find(flag) != std::string::npos);
  CHECK(message.find("'" + value + "'") != std::string::npos);
}

}  // namespace

TEST_CASE("regression options: no flags give the seed experiment's defaults") {
  const Options o = parse_options({});
  CHECK(o.steps == 300);
  CHECK(o.rank == 4);
  CHECK(o.restart_every == 50);
  CHECK(o.lr == doctest::Approx(1e-2));
  CHECK(o.samples == 200);
  CHECK(o.in_features == 10);
  CHECK(o.out_features == 5);
  CHECK(o.noise == doctest::Approx(0.1));
  CHECK(o.threads == 0);
  CHECK(o.out_dir == ".");
  CHECK(o.backend == Device::cpu);
  CHECK(o.restart_warmup == 0);
  CHECK(o.methods == relora::demo::all_methods());
  CHECK_FALSE(o.help);
}

TEST_CASE("regression options: every flag, as '--flag value' and '--flag=value'") {
  const Options o = parse_options({"--steps", "1000", "--rank=2", "--restart-every", "25", "--lr", "3e-3",
                                   "--samples=64", "--in-features", "8", "--out-features", "6", "--noise=0",
                                   "--seed", "18446744073709551615", "--threads", "3", "--out", "runs/a",
                                   "--backend=cuda", "--restart-warmup", "5", "--methods", "relora,lora",
                                   "--save-adapter", "adapters/lora"});
  CHECK(o.steps == 1000);
  CHECK(o.rank == 2);
  CHECK(o.restart_every == 25);
  CHECK(o.lr == doctest::Approx(3e-3));
  CHECK(o.samples == 64);
  CHECK(o.in_features == 8);
  CHECK(o.out_features == 6);
  CHECK(o.noise == 0);
  CHECK(o.seed == 18446744073709551615ull);
  CHECK(o.threads == 3);
  CHECK(o.out_dir == "runs/a");
  CHECK(o.backend == Device::cuda);
  CHECK(o.restart_warmup == 5);
  CHECK(o.methods == std::vector<Method>{Method::relora, Method::lora});
  CHECK(o.save_adapter == "adapters/lora");
  CHECK(parse_options({}).save_adapter.empty());
}

TEST_CASE("regression options: --methods keeps the order given, drops repeats, takes 'all'") {
  CHECK(parse_options({"--methods", "seed,full,seed"}).methods ==
        std::vector<Method>{Method::seed_relora, Method::full_finetune});
  CHECK(parse_options({"--methods", "all"}).methods == relora::demo::all_methods());
  CHECK(parse_options({"--methods", "relora_dora,dora"}).methods ==
        std::vector<Method>{Method::relora_dora, Method::dora});
  check_refused({"--methods", "lora,qlora"}, "--methods", "qlora");
  CHECK(error_of({"--methods", ""}).find("--methods") != std::string::npos);
  CHECK(error_of({"--methods", ","}).find("names no method") != std::string::npos);
}

TEST_CASE("regression options: --help, alone or among other flags") {
  CHECK(parse_options({"--help"}).help);
  CHECK(parse_options({"-h"}).help);
  CHECK(parse_options({"--steps", "10", "--help"}).help);
  // Help wins over a combination that would be refused, so the user can read what is allowed.
  CHECK(parse_options({"--rank", "9", "--help"}).help);
  const std::string usage = relora::demo::usage_text();
  for (const char* flag : {"--steps", "--rank", "--restart-every", "--restart-warmup", "--lr", "--samples",
                           "--in-features", "--out-features", "--noise", "--seed", "--threads", "--out",
                           "--backend", "--methods", "--galore-rank", "--galore-gap", "--galore-scale", "--galore-subspace",
                           "--help"}) {
    INFO("flag: ", flag);
    CHECK(usage.find(flag) != std::string::npos);
  }
}

TEST_CASE("regression options: every method's key parses back; the DoRA and GaLore methods' CSV columns") {
  const std::vector<Method> all = relora::demo::all_methods();
  CHECK(all.size() == 7);
  for (const Method m : all) {
    CHECK(parse_options({"--methods", relora::demo::method_key(m)}).methods == std::vector<Method>{m});
  }
  // The first four keep the CSV header they had (their labels); the DoRA ones take their keys.
  CHECK(std::string(relora::demo::method_column(Method::lora)) == "LoRA");
  CHECK(std::string(relora::demo::method_column(Method::seed_relora)) == relora::demo::method_label(Method::seed_relora));
  CHECK(std::string(relora::demo::method_column(Method::dora)) == "dora");
  CHECK(std::string(relora::demo::method_column(Method::relora_dora)) == "relora_dora");
  CHECK(std::string(relora::demo::method_column(Method::galore)) == "galore");
}

TEST_CASE("regression options: GaLore's rank, gap, scale and subspace") {
  const Options o = parse_options({"--galore-rank", "3", "--galore-gap=20", "--galore-scale", "0.5"});
  CHECK(o.galore_rank == 3);
  CHECK(o.galore_gap == 20);
  CHECK(o.galore_scale == 0.5);
  CHECK(o.galore_subspace == relora::GaloreConfig{}.subspace);
  CHECK(parse_options({"--galore-subspace", "randomized"}).galore_subspace == relora::SubspaceMethod::randomized);
  CHECK(parse_options({"--galore-subspace=exact"}).galore_subspace == relora::SubspaceMethod::exact);
  check_refused({"--galore-subspace", "lanczos"}, "--galore-subspace", "lanczos");
  CHECK(parse_options({"--methods", "galore"}).methods == std::vector<Method>{Method::galore});
  check_refused({"--galore-rank", "0"}, "--galore-rank", "0");
  check_refused({"--galore-rank", "6"}, "--galore-rank", "6");
  check_refused({"--galore-gap", "0"}, "--galore-gap", "0");
  check_refused({"--galore-scale", "-1"}, "--galore-scale", "-1");
}

TEST_CASE("regression options: an unknown flag is refused by name") {
  check_refused({"--step", "10"}, "unknown flag", "--step");
  check_refused({"--steps", "10", "--verbose"}, "unknown flag", "--verbose");
  check_refused({"300"}, "unknown flag", "300");
  check_refused({"--colour=red"}, "unknown flag", "--colour=red");
}

TEST_CASE("regression options: malformed numbers are refused, naming flag and value") {
  check_refused({"--steps", "abc"}, "--steps", "abc");
  check_refused({"--steps", "10x"}, "--steps", "10x");
  check_refused({"--steps", "1.5"}, "--steps", "1.5");
  check_refused({"--steps", ""}, "--steps", "");
  check_refused({"--steps", "99999999999999999999999"}, "--steps", "99999999999999999999999");
  check_refused({"--rank", " 4"}, "--rank", " 4");
  check_refused({"--lr", "fast"}, "--lr", "fast");
  check_refused({"--lr", "1e-2x"}, "--lr", "1e-2x");
  check_refused({"--lr", "nan"}, "--lr", "nan");
  check_refused({"--lr", "inf"}, "--lr", "inf");
  check_refused({"--noise", " 0.1"}, "--noise", " 0.1");
  check_refused({"--seed", "-1"}, "--seed", "-1");
  check_refused({"--seed", "0x10"}, "--seed", "0x10");
  check_refused({"--threads", "two"}, "--threads", "two");
  check_refused({"--backend", "tpu"}, "--backend", "tpu");
}

TEST_CASE("regression options: zero and negative values are refused where they make no sense") {
  check_refused({"--steps", "0"}, "--steps", "0");
  check_refused({"--steps", "-5"}, "--steps", "-5");
  check_refused({"--rank", "0"}, "--rank", "0");
  check_refused({"--restart-every", "0"}, "--restart-every", "0");
  check_refused({"--samples", "-1"}, "--samples", "-1");
  check_refused({"--in-features", "0"}, "--in-features", "0");
  check_refused({"--out-features", "0"}, "--out-features", "0");
  check_refused({"--lr", "0"}, "--lr", "0");
  check_refused({"--lr", "-1e-3"}, "--lr", "-1e-3");
  check_refused({"--noise", "-0.1"}, "--noise", "-0.1");
  check_refused({"--threads", "0"}, "--threads", "0");
  check_refused({"--restart-warmup", "-1"}, "--restart-warmup", "-1");
  // Zero is fine where it means something: no noise, no re-warmup, seed 0.
  CHECK(parse_options({"--noise", "0", "--restart-warmup", "0", "--seed", "0"}).noise == 0);
}

TEST_CASE("regression options: combinations out of range") {
  // Rank above min(in, out) = 5 by default; allowed once the layer is wide enough.
  check_refused({"--rank", "6"}, "--rank", "6");
  check_refused({"--rank", "4", "--out-features", "3"}, "--rank", "4");
  CHECK(parse_options({"--rank", "6", "--out-features", "6"}).rank == 6);
  CHECK(parse_options({"--rank", "5"}).rank == 5);
  // The re-warmup may last the whole period, not longer.
  CHECK(parse_options({"--restart-warmup", "50"}).restart_warmup == 50);
  check_refused({"--restart-warmup", "51"}, "--restart-warmup", "51");
  check_refused({"--restart-every", "10", "--restart-warmup", "20"}, "--restart-warmup", "20");
}

TEST_CASE("regression options: a flag without its value is refused") {
  for (const char* flag : {"--steps", "--lr", "--out", "--backend", "--methods"}) {
    const std::string message = error_of({flag});
    INFO("flag: ", flag, " -> '", message, "'");
    CHECK(message.find(flag) != std::string::npos);
    CHECK(message.find("missing value") != std::string::npos);
  }
  CHECK(error_of({"--help=yes"}).find("--help") != std::string::npos);
  CHECK(error_of({"--out="}).find("--out") != std::string::npos);
}
