// relora_regression: seed 000's experiment (../shared/seeds/000_*.txt), done right.
//
// A linear regression y = X W_true^T + noise is fitted from a small base weight W0 by
//   full fine-tuning   W itself trains (the full-rank reference),
//   LoRA               a rank-r adapter on the frozen W0, never merged,
//   ReLoRA             the adapter merged into W every T steps, A re-drawn, B = 0, Adam's
//                      moments of A and B cleared (relora::ReloraController, via the Trainer),
//   the seed's ReLoRA  merged every T steps too, but A and B re-drawn N(0, 0.01) and the moments
//                      kept, as the seed's merge_lora() does,
//   DoRA               the same adapter on a DoraLinear: W's rows re-scaled by a trainable
//                      magnitude m (relora::DoraLinear), never merged,
//   ReLoRA with DoRA   ReLoRA's restarts on that layer.
// The residual W_true - W0 has rank min(k, d) = 5 > r = 4, so LoRA stalls at its rank ceiling; a
// sum of rank-4 updates can reach it, which is ReLoRA's point. PyTorch gives the same picture on
// the same task: ../shared/anchors/README.md and seed_relora_variants.py.
//
// Letters: n samples, k = in_features, d = out_features, r = rank; X is n x k, W is d x k.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "loss_plot.hpp"
#include "options.hpp"
#include "relora/relora.hpp"

namespace {

using relora::HostMatrix;
using relora::Index;
using relora::demo::Method;
using relora::demo::Options;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// Data: drawn on the host in the order the PyTorch reference draws it (x, true W, noise, W0),
// in double and rounded to float, so every method and every backend sees the same numbers.

struct Data {
  HostMatrix<float> X;   // n x k, N(0, 1)
  HostMatrix<float> y;   // n x d, X W_true^T + noise N(0, 1)
  HostMatrix<float> W0;  // d x k, 0.1 N(0, 1): the base weight every method starts from
};

Data make_data(const Options& o) {
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto draw = [&](Index rows, Index cols, double stddev) {
    Eigen::MatrixXd m(rows, cols);
    for (Index i = 0; i < rows; ++i) {
      for (Index j = 0; j < cols; ++j) m(i, j) = stddev * normal(rng);
    }
    return m;
  };
  const Eigen::MatrixXd X = draw(o.samples, o.in_features, 1.0);
  const Eigen::MatrixXd W_true = draw(o.out_features, o.in_features, 1.0);
  const Eigen::MatrixXd noise = draw(o.samples, o.out_features, o.noise);
  const Eigen::MatrixXd W0 = draw(o.out_features, o.in_features, 0.1);
  const Eigen::MatrixXd y = X * W_true.transpose() + noise;
  return {X.cast<float>(), y.cast<float>(), W0.cast<float>()};
}

// ---------------------------------------------------------------------------------------------
// Progress on a terminal: one line rewritten with \r, at most ten times a second. Nothing when
// stderr is a file or a pipe, so logs stay clean.

class Progress {
 public:
  Progress(std::size_t methods, std::int64_t steps)
      : methods_(methods), steps_(steps), tty_(isatty(fileno(stderr)) != 0) {}

  // `method`: the running method's label; `index`: its place among the methods, from 0.
  void update(const char* method, std::size_t index, std::int64_t step) {
    if (!tty_) return;
    const Clock::time_point now = Clock::now();
    if (step + 1 < steps_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    std::fprintf(stderr, "\r[%zu/%zu] %-42s step %lld/%lld ", index + 1, methods_, method,
                 static_cast<long long>(step + 1), static_cast<long long>(steps_));
    std::fflush(stderr);
  }
  void done() {
    if (!tty_) return;
    std::fprintf(stderr, "\r%*s\r", 90, "");
    std::fflush(stderr);
  }

 private:
  std::size_t methods_;
  std::int64_t steps_;
  bool tty_;
  Clock::time_point last_{};
};

// ---------------------------------------------------------------------------------------------
// One method, trained from W0 for o.steps full-batch steps. Returns the loss of every step,
// measured before that step's update, as PyTorch's loop records it.

// The seed's merge_lora() draws: N(0, 0.01) entries, from a generator of their own so that the
// data stays the same whichever methods run.
HostMatrix<float> seed_draw(std::mt19937_64& rng, Index rows, Index cols) {
  std::normal_distribution<double> normal(0.0, 0.01);
  HostMatrix<float> m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<float>(normal(rng));
  }
  return m;
}

std::vector<double> train(Method method, const std::shared_ptr<relora::Backend<float>>& backend, const Data& data,
                          const relora::Tensor<float>& X, const relora::Tensor<float>& y, const Options& o,
                          std::size_t index, Progress& progress) {
  relora::Model<float> model(backend);
  // alpha = r: scale s = 1, the reference's W + B A. One layer, no activation, no bias: the
  // model is exactly X (W + s B A)^T, or X (diag(g) (W + s B A))^T for DoRA.
  const relora::LoraConfig lora_config{.in_features = o.in_features,
                                       .out_features = o.out_features,
                                       .rank = o.rank,
                                       .alpha = static_cast<double>(o.rank),
                                       .seed = o.seed,
                                       .base_precision = o.precision,
                                       .base_merge = o.base_merge};
  const bool dora = method == Method::dora || method == Method::relora_dora;
  // The LoRA layer, which the seed's restart re-draws by hand; null for DoRA.
  relora::LoraLinear<float>* lora_layer = nullptr;
  if (dora) {
    // The same adapter config and seed as LoRA's, so A starts the same; m starts at W0's row
    // norms. The detached-norm gradient, as the paper and PEFT train it.
    model.add(std::make_unique<relora::DoraLinear<float>>(*backend, relora::DoraConfig{.lora = lora_config}, data.W0),
              relora::Activation::identity, "proj");
  } else {
    lora_layer = &model.add(lora_config, relora::Activation::identity, data.W0, "proj");
  }

  relora::TrainerConfig config;
  config.adam.lr = o.lr;  // PyTorch's Adam defaults otherwise: betas (0.9, 0.999), eps 1e-8, no decay
  std::shared_ptr<relora::Schedule> schedule;
  switch (method) {
    case Method::full_finetune: config.method = relora::TrainingMethod::full_finetune; break;
    case Method::galore:
      // All of W trains, as in full fine-tuning, with Adam's moments in a rank-r subspace of its
      // gradient that is taken anew every --galore-gap steps.
      config.method = relora::TrainingMethod::full_finetune;
      config.optimizer = relora::optimizer_factory<relora::Galore>(relora::GaloreConfig{
          .lr = o.lr, .rank = o.galore_rank, .update_gap = o.galore_gap, .scale = o.galore_scale,
          .subspace = o.galore_subspace});
      break;
    case Method::lora:
    case Method::dora: config.method = relora::TrainingMethod::lora; break;
    case Method::seed_relora: config.method = relora::TrainingMethod::lora; break;  // restarts below, by hand
    case Method::relora:
    case Method::relora_dora:
      // On the DoRA layer a restart merges W <- diag(g) (W + s B A), re-draws A, sets B = 0 and
      // m = the merged rows' norms, so the output carries on unchanged; Adam's moments of A, B
      // and m are cleared.
      config.method = relora::TrainingMethod::relora;
      config.relora = {.restart_every = o.restart_every,
                       .reset = relora::OptimizerReset::full,
                       .restart_warmup_steps = o.restart_warmup};
      if (o.restart_warmup > 0) {
        // min_lr_ratio 1: the cosine envelope stays flat, so only the re-warmup shapes the rate,
        // as in the reference's 10-step linear re-warmup.
        schedule = std::make_shared<relora::JaggedCosineSchedule>(
            relora::jagged_schedule(config.relora, o.steps, /*warmup_steps=*/0, /*min_lr_ratio=*/1.0));
      }
      break;
  }

  std::mt19937_64 seed_rng(o.seed + 1);
  if (method == Method::seed_relora) {
    // The seed starts from A, B ~ N(0, 0.01), not from LoRA's Kaiming A and zero B.
    lora_layer->set_A(seed_draw(seed_rng, o.rank, o.in_features));
    lora_layer->set_B(seed_draw(seed_rng, o.out_features, o.rank));
  }

  relora::Trainer<float> trainer(model, config, schedule);
  std::vector<double> losses;
  losses.reserve(static_cast<std::size_t>(o.steps));
  for (std::int64_t step = 0; step < o.steps; ++step) {
    trainer.step(X, y);
    // loss() waits for the backend: on CUDA a device sync per step. Fine for a demo this small;
    // a real loop would read the loss every so many steps.
    losses.push_back(static_cast<double>(trainer.loss()));
    if (method == Method::seed_relora && (step + 1) % o.restart_every == 0) {
      // The seed's merge_lora(): W += B A, then A and B re-drawn non-zero (so the output jumps)
      // while Adam keeps the moments of the old A and B. reinit() clears the merged flag.
      lora_layer->merge();
      lora_layer->reinit();
      lora_layer->set_A(seed_draw(seed_rng, o.rank, o.in_features));
      lora_layer->set_B(seed_draw(seed_rng, o.out_features, o.rank));
    }
    progress.update(relora::demo::method_label(method), index, step);
  }
  if (method == Method::lora && !o.save_adapter.empty()) {
    // PEFT loads it onto nn.Sequential(OrderedDict(proj=nn.Linear(in, out, bias=False))).
    std::filesystem::create_directories(o.save_adapter);
    relora::export_peft_adapter(model, o.save_adapter, {.base_model_name_or_path = "relora_regression"});
    relora::save_base_weights(model, o.save_adapter + "/base_model.safetensors");
  }
  return losses;
}

// ---------------------------------------------------------------------------------------------
// Output

std::string format_loss(double loss) {
  char text[32];
  std::snprintf(text, sizeof text, "%.4g", loss);
  return text;
}

// A Markdown table, aligned so it reads on a terminal too: the loss every 50 steps and at the
// last step, one column per method.
void print_table(const relora::demo::LossCurves& curves, std::int64_t steps) {
  std::vector<std::int64_t> rows;
  for (std::int64_t s = 0; s < steps; s += 50) rows.push_back(s);
  if (rows.back() != steps - 1) rows.push_back(steps - 1);

  // Every cell first, so that each column is as wide as its widest cell.
  std::vector<std::vector<std::string>> cells{{"step"}};
  for (const std::string& name : curves.names) cells[0].push_back(name);
  for (const std::int64_t s : rows) {
    cells.push_back({std::to_string(s)});
    for (const std::vector<double>& losses : curves.losses) {
      cells.back().push_back(format_loss(losses[static_cast<std::size_t>(s)]));
    }
  }
  std::vector<std::size_t> width(cells[0].size(), 0);
  for (const auto& row : cells) {
    for (std::size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  const auto print_row = [&](const std::vector<std::string>& row) {
    std::string line = "|";
    for (std::size_t c = 0; c < row.size(); ++c) {
      line.append(1, ' ').append(width[c] - row[c].size(), ' ').append(row[c]).append(" |");
    }
    std::printf("%s\n", line.c_str());
  };
  print_row(cells[0]);
  std::string rule = "|";
  for (const std::size_t w : width) rule += std::string(w + 1, '-') + ":|";
  std::printf("%s\n", rule.c_str());
  for (std::size_t r = 1; r < cells.size(); ++r) print_row(cells[r]);
}

int run(const Options& o) {
#ifdef _OPENMP
  if (o.threads > 0) omp_set_num_threads(o.threads);
#else
  if (o.threads > 1) std::fprintf(stderr, "relora_regression: built without OpenMP, --threads %d ignored\n", o.threads);
#endif

  std::shared_ptr<relora::Backend<float>> backend;
  try {
    backend = relora::make_backend<float>(o.backend);
  } catch (const relora::DeviceError& e) {
    std::fprintf(stderr, "relora_regression: --backend %s unavailable: %s\n", relora::device_name(o.backend),
                 e.what());
    return 1;
  }

  std::error_code ec;
  std::filesystem::create_directories(o.out_dir, ec);
  if (ec) {
    std::fprintf(stderr, "relora_regression: --out '%s': cannot create the folder: %s\n", o.out_dir.c_str(),
                 ec.message().c_str());
    return 1;
  }

  std::printf("relora_regression: n = %lld samples, %lld -> %lld, rank %lld, %lld steps, Adam lr %g, "
              "restart every %lld",
              static_cast<long long>(o.samples), static_cast<long long>(o.in_features),
              static_cast<long long>(o.out_features), static_cast<long long>(o.rank),
              static_cast<long long>(o.steps), o.lr, static_cast<long long>(o.restart_every));
  if (o.restart_warmup > 0) std::printf(" (re-warmup %lld)", static_cast<long long>(o.restart_warmup));
  if (o.precision != relora::BasePrecision::fp32) {
    std::printf(", W in %s (merges: %s)", relora::precision_name(o.precision), relora::base_merge_name(o.base_merge));
  }
  std::printf(", noise %g, seed %llu\nbackend: %s\n\n", o.noise, static_cast<unsigned long long>(o.seed),
              backend->description().c_str());

  const Data data = make_data(o);
  const relora::Tensor<float> X = relora::to_backend<float>(*backend, data.X, "X");
  const relora::Tensor<float> y = relora::to_backend<float>(*backend, data.y, "y");

  relora::demo::LossCurves curves;
  std::vector<double> seconds;
  Progress progress(o.methods.size(), o.steps);
  for (std::size_t m = 0; m < o.methods.size(); ++m) {
    const Method method = o.methods[m];
    const Clock::time_point start = Clock::now();
    curves.losses.push_back(train(method, backend, data, X, y, o, m, progress));
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
    curves.names.push_back(relora::demo::method_label(method));
    curves.columns.push_back(relora::demo::method_column(method));
  }
  progress.done();

  print_table(curves, o.steps);

  const double noise_variance = o.noise * o.noise;
  std::printf("\nnoise variance (noise^2): %g\n", noise_variance);
  std::printf("final losses:\n");
  for (std::size_t m = 0; m < curves.names.size(); ++m) {
    std::printf("  %-42s %-10s", curves.names[m].c_str(), format_loss(curves.losses[m].back()).c_str());
    if (noise_variance > 0) std::printf(" = %7.3g x noise variance", curves.losses[m].back() / noise_variance);
    std::printf("   (%.3f s)\n", seconds[m]);
  }

  // The criterion: ReLoRA within 1.5x of the noise variance and at least 10x below LoRA.
  const auto final_of = [&](Method method) -> double {
    for (std::size_t m = 0; m < o.methods.size(); ++m) {
      if (o.methods[m] == method) return curves.losses[m].back();
    }
    return NAN;
  };
  const double relora_final = final_of(Method::relora), lora_final = final_of(Method::lora);
  if (!std::isnan(relora_final) && !std::isnan(lora_final) && noise_variance > 0) {
    const double to_noise = relora_final / noise_variance, lora_over = lora_final / relora_final;
    const bool met = to_noise <= 1.5 && lora_over >= 10;
    std::printf("verdict: ReLoRA final / noise variance = %.3g (want <= 1.5), LoRA final / ReLoRA final = %.3g "
                "(want >= 10): %s\n",
                to_noise, lora_over, met ? "met" : "NOT met");
  }

  const std::filesystem::path dir(o.out_dir);
  const std::string csv = (dir / "losses.csv").string(), svg = (dir / "losses.svg").string();
  relora::demo::write_loss_csv(curves, csv);
  char title[200];
  std::snprintf(title, sizeof title, "Training loss of a linear regression: n = %lld, %lld -> %lld, rank %lld, restart every %lld",
                static_cast<long long>(o.samples), static_cast<long long>(o.in_features),
                static_cast<long long>(o.out_features), static_cast<long long>(o.rank),
                static_cast<long long>(o.restart_every));
  relora::demo::write_loss_svg(curves, svg, title);
  std::printf("wrote %s and %s\n", csv.c_str(), svg.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = relora::demo::parse_options(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const relora::ConfigError& e) {
    std::fprintf(stderr, "relora_regression: %s; see --help\n", e.what());
    return 2;
  }
  if (options.help) {
    std::fputs(relora::demo::usage_text().c_str(), stdout);
    return 0;
  }
  try {
    return run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "relora_regression: %s\n", e.what());
    return 1;
  }
}
