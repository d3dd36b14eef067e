#include "options.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "relora/core/errors.hpp"

namespace relora::demo {

const char* method_key(Method method) {
  switch (method) {
    case Method::full_finetune: return "full";
    case Method::lora: return "lora";
    case Method::relora: return "relora";
    case Method::seed_relora: return "seed";
    case Method::dora: return "dora";
    case Method::relora_dora: return "relora_dora";
    case Method::galore: return "galore";
  }
  return "?";
}

const char* method_label(Method method) {
  switch (method) {
    case Method::full_finetune: return "full fine-tuning";
    case Method::lora: return "LoRA";
    case Method::relora: return "ReLoRA";
    case Method::seed_relora: return "seed's ReLoRA (B re-drawn, moments kept)";
    case Method::dora: return "DoRA";
    case Method::relora_dora: return "ReLoRA with DoRA";
    case Method::galore: return "GaLore";
  }
  return "?";
}

const char* method_column(Method method) {
  switch (method) {
    case Method::dora:
    case Method::relora_dora:
    case Method::galore: return method_key(method);
    default: return method_label(method);
  }
}

std::vector<Method> all_methods() {
  return {Method::full_finetune, Method::lora, Method::relora,      Method::seed_relora,
          Method::dora,          Method::relora_dora, Method::galore};
}

namespace {

[[noreturn]] void bad_value(const std::string& flag, const std::string& value, const std::string& expected) {
  throw ConfigError(flag + ": '" + value + "' is not " + expected);
}

// A whole-string integer >= lo: no sign other than '-', no spaces, no trailing characters.
std::int64_t parse_integer(const std::string& flag, const std::string& value, std::int64_t lo) {
  std::int64_t x = 0;
  const char* first = value.data();
  const char* last = value.data() + value.size();
  const auto [end, ec] = std::from_chars(first, last, x);
  const std::string expected = "an integer >= " + std::to_string(lo);
  if (ec != std::errc() || end != last || value.empty() || x < lo) bad_value(flag, value, expected);
  return x;
}

std::uint64_t parse_unsigned(const std::string& flag, const std::string& value) {
  std::uint64_t x = 0;
  const char* last = value.data() + value.size();
  const auto [end, ec] = std::from_chars(value.data(), last, x);
  if (ec != std::errc() || end != last || value.empty()) bad_value(flag, value, "an integer in [0, 2^64)");
  return x;
}

// A whole-string finite number, > 0 when `positive`, else >= 0.
double parse_real(const std::string& flag, const std::string& value, bool positive) {
  const char* first = value.c_str();
  char* end = nullptr;
  const double x = std::strtod(first, &end);
  const bool whole = !value.empty() && end == first + value.size() && !std::isspace(static_cast<unsigned char>(value[0]));
  const bool in_range = std::isfinite(x) && (positive ? x > 0 : x >= 0);
  if (!whole || !in_range) bad_value(flag, value, positive ? "a finite number > 0" : "a finite number >= 0");
  return x;
}

std::vector<Method> parse_methods(const std::string& flag, const std::string& value) {
  if (value == "all") return all_methods();
  std::vector<Method> methods;
  std::stringstream in(value);
  std::string key;
  while (std::getline(in, key, ',')) {
    if (key.empty()) continue;  // "lora," or "lora,,relora": a stray comma is no method
    const std::vector<Method> all = all_methods();
    const auto it = std::find_if(all.begin(), all.end(), [&](Method m) { return key == method_key(m); });
    if (it == all.end()) {
      throw ConfigError(flag + ": unknown method '" + key + "' in '" + value + "' (known: full, lora, relora, seed, dora, relora_dora, galore, all)");
    }
    if (std::find(methods.begin(), methods.end(), *it) == methods.end()) methods.push_back(*it);
  }
  if (methods.empty()) throw ConfigError(flag + ": '" + value + "' names no method");
  return methods;
}

}  // namespace

Options parse_options(const std::vector<std::string>& args) {
  Options o;
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i];
    std::string inline_value;
    bool has_inline = false;
    if (const std::size_t eq = flag.find('='); flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_inline = true;
    }
    const auto value = [&]() -> std::string {
      if (has_inline) return inline_value;
      if (i + 1 >= args.size()) throw ConfigError(flag + ": missing value");
      return args[++i];
    };

    if (flag == "--help" || flag == "-h") {
      if (has_inline) throw ConfigError(flag + ": takes no value, got '" + inline_value + "'");
      o.help = true;
    } else if (flag == "--steps") o.steps = parse_integer(flag, value(), 1);
    else if (flag == "--rank") o.rank = parse_integer(flag, value(), 1);
    else if (flag == "--restart-every") o.restart_every = parse_integer(flag, value(), 1);
    else if (flag == "--lr") o.lr = parse_real(flag, value(), true);
    else if (flag == "--samples") o.samples = parse_integer(flag, value(), 1);
    else if (flag == "--in-features") o.in_features = parse_integer(flag, value(), 1);
    else if (flag == "--out-features") o.out_features = parse_integer(flag, value(), 1);
    else if (flag == "--noise") o.noise = parse_real(flag, value(), false);
    else if (flag == "--seed") o.seed = parse_unsigned(flag, value());
    else if (flag == "--threads") {
      const std::string v = value();
      const std::int64_t threads = parse_integer(flag, v, 1);
      if (threads > 4096) bad_value(flag, v, "an integer in [1, 4096]");
      o.threads = static_cast<int>(threads);
    } else if (flag == "--out") {
      o.out_dir = value();
      if (o.out_dir.empty()) throw ConfigError(flag + ": '' is not a folder name");
    } else if (flag == "--backend") {
      const std::string v = value();
      if (v == "cpu") o.backend = Device::cpu;
      else if (v == "cuda") o.backend = Device::cuda;
      else bad_value(flag, v, "cpu or cuda");
    } else if (flag == "--restart-warmup") o.restart_warmup = parse_integer(flag, value(), 0);
    else if (flag == "--methods") o.methods = parse_methods(flag, value());
    else if (flag == "--galore-rank") o.galore_rank = parse_integer(flag, value(), 1);
    else if (flag == "--galore-gap") o.galore_gap = parse_integer(flag, value(), 1);
    else if (flag == "--galore-scale") o.galore_scale = parse_real(flag, value(), true);
    else if (flag == "--galore-subspace") {
      const std::string v = value();
      try {
        o.galore_subspace = parse_subspace(v);
      } catch (const ConfigError& e) {
        throw ConfigError("--galore-subspace: " + std::string(e.what()));
      }
    }
    else if (flag == "--precision") {
      const std::string v = value();
      if (v == "fp32") o.precision = BasePrecision::fp32;
      else if (v == "bf16") o.precision = BasePrecision::bf16;
      else if (v == "fp16") o.precision = BasePrecision::fp16;
      else bad_value(flag, v, "fp32, bf16 or fp16");
    } else if (flag == "--base-merge") {
      const std::string v = value();
      if (v == "stochastic") o.base_merge = BaseMerge::stochastic;
      else if (v == "master") o.base_merge = BaseMerge::fp32_master;
      else if (v == "nearest") o.base_merge = BaseMerge::nearest;
      else bad_value(flag, v, "stochastic, master or nearest");
    } else if (flag == "--save-adapter") {
      o.save_adapter = value();
      if (o.save_adapter.empty()) throw ConfigError(flag + ": '' is not a folder name");
    }
    else throw ConfigError("unknown flag '" + args[i] + "'");
  }
  if (o.help) return o;

  // Combinations, once every flag is known.
  const Index max_rank = std::min(o.in_features, o.out_features);
  if (o.rank > max_rank) {
    throw ConfigError("--rank: '" + std::to_string(o.rank) + "' is above min(--in-features, --out-features) = " +
                      std::to_string(max_rank));
  }
  if (o.galore_rank > max_rank) {
    throw ConfigError("--galore-rank: '" + std::to_string(o.galore_rank) +
                      "' is above min(--in-features, --out-features) = " + std::to_string(max_rank));
  }
  if (o.restart_warmup > o.restart_every) {
    throw ConfigError("--restart-warmup: '" + std::to_string(o.restart_warmup) +
                      "' is longer than --restart-every = " + std::to_string(o.restart_every));
  }
  return o;
}

std::string usage_text() {
  const Options d;
  std::ostringstream s;
  s << "usage: relora_regression [flags]\n"
       "\n"
       "Seed 000's regression task: y = X W_true^T + noise, fitted from a base weight W0 by full\n"
       "fine-tuning, LoRA, ReLoRA, the seed's own (faulty) restart, DoRA, ReLoRA with DoRA and GaLore,\n"
       "from the same data and W0.\n"
       "Prints a loss table, writes losses.csv and losses.svg into --out.\n"
       "\n"
       "  --steps N            training steps per method, full batch (default "
    << d.steps << ")\n"
    << "  --rank R             adapter rank, 1 <= R <= min(in, out) (default " << d.rank << ")\n"
    << "  --restart-every T    ReLoRA's restart period in steps (default " << d.restart_every << ")\n"
    << "  --restart-warmup W   ReLoRA's linear lr re-warmup after each restart, 0 <= W <= T (default "
    << d.restart_warmup << ")\n"
    << "  --lr LR              Adam's learning rate (default " << d.lr << ")\n"
    << "  --samples N          rows of X (default " << d.samples << ")\n"
    << "  --in-features K      columns of X (default " << d.in_features << ")\n"
    << "  --out-features D     columns of y (default " << d.out_features << ")\n"
    << "  --noise S            standard deviation of the target's noise (default " << d.noise << ")\n"
    << "  --seed S             seed of the data, W0 and the adapters (default " << d.seed << ")\n"
    << "  --threads N          OpenMP threads (default: OpenMP's own choice)\n"
    << "  --out DIR            folder for losses.csv and losses.svg, created if missing (default \""
    << d.out_dir << "\")\n"
    << "  --backend cpu|cuda   where the training runs (default cpu)\n"
    << "  --galore-rank R      GaLore's projection rank, 1 <= R <= min(in, out) (default " << d.galore_rank << ")\n"
    << "  --galore-gap T       GaLore's steps between two SVDs of the gradient (default " << d.galore_gap << ")\n"
    << "  --galore-scale A     GaLore's scale alpha of the projected update (default " << d.galore_scale << ")\n"
    << "  --galore-subspace S  how GaLore finds P and Q: gram, exact or randomized (default "
    << subspace_name(d.galore_subspace) << ")\n"
    << "  --methods LIST       comma list of full, lora, relora, seed, dora, relora_dora, galore; or all\n"
    << "                       (default all)\n"
    << "  --precision P        how W is stored: fp32, bf16 or fp16 (default fp32); adapters stay fp32\n"
    << "  --base-merge M       how a merge lands in a bf16/fp16 W: stochastic, master (an fp32 copy of W)\n"
    << "                       or nearest (default stochastic)\n"
    << "  --save-adapter DIR   write LoRA's trained adapter there as a PEFT adapter (adapter_model.safetensors,\n"
    << "                       adapter_config.json) with the base weight (base_model.safetensors, module 'proj')\n"
    << "  --help               this text\n"
    << "\n"
       "Flags take their value as \"--flag value\" or \"--flag=value\". A bad flag exits with code 2.\n";
  return s.str();
}

}  // namespace relora::demo
