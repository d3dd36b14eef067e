// relora_bench --galore: one full-rank training step (forward, MSE, backward, optimizer) of an MLP
// whose every weight trains, with GaLore (include/relora/optimizers/galore.hpp) and with our
// full-rank Adam, through relora::Trainer<float>::step, on the cases of issue 15:
//
//   mlp4x2k  n 2048, 4 x (2048 -> 2048),     GaLore rank 128
//   mlp4x4k  n 4096, 4 x (4096 -> 4096),     GaLore rank 256
//   llm_mlp  n 4096, 4096 -> 11008 -> 4096,  GaLore rank 256
//   mlp4x1k  n 1024, 4 x (1024 -> 1024),     GaLore rank 64   (small enough for a laptop CPU)
//
// as apps/bench/galore_reference.py times PyTorch's GaLore-Adam (ReLU between layers, biases
// trained with plain Adam, lr 1e-3, scale 0.25, one-sided projection). Per case and SVD method:
//
//   step       a step without an SVD: median over batches of steps, the backend synchronised
//              once per batch (on CUDA the steady step is a replayed CUDA graph);
//   svd_step   a step that takes new subspaces for every weight (each timed alone, synchronised);
//   amortised  step + (svd_step - step) / T, the mean step at T = --gap (200 by default);
//   refresh    the SVDs' own share of svd_step, as GaLore measures it (Galore::refresh_seconds);
//   state      the optimizer's state in MiB (moments, update counts, P or Q), beside Adam's;
//   workspace  GaLore's reused buffers (R, N, the SVD's or range finder's) in MiB;
//   distance   the randomized finder's subspace against the exact SVD's, of the same gradient,
//              and the share of that gradient's energy it captures against the exact one's.
#include "galore_cases.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench_json.hpp"
#include "command_line.hpp"
#include "relora/relora.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace relora_bench {
namespace {

using relora::Index;
using T = float;
using Clock = std::chrono::steady_clock;

struct GaloreCase {
  const char* name;
  Index n;
  std::vector<Index> dims;
  Index rank;
};

const std::vector<GaloreCase>& galore_cases() {
  static const std::vector<GaloreCase> cases{
      {"mlp4x1k", 1024, {1024, 1024, 1024, 1024, 1024}, 64},
      {"mlp4x2k", 2048, {2048, 2048, 2048, 2048, 2048}, 128},
      {"mlp4x4k", 4096, {4096, 4096, 4096, 4096, 4096}, 256},
      {"llm_mlp", 4096, {4096, 11008, 4096}, 256},
  };
  return cases;
}

struct GaloreOptions {
  relora::Device device = relora::Device::cpu;
  std::vector<std::string> cases;
  std::vector<relora::SubspaceMethod> methods{relora::SubspaceMethod::exact, relora::SubspaceMethod::gram,
                                              relora::SubspaceMethod::randomized};
  std::int64_t gap = 200;
  int power_iterations = 4;  // the randomized finder's passes (GaloreConfig's default)
  int repeats = 5;
  int batch = 5;
  int svd_repeats = 2;
  int threads = 0;
  bool adam = true;
  std::string json;  // where the rows go as JSON, when set
};

[[noreturn]] void usage(const char* why) {
  if (why) std::fprintf(stderr, "relora_bench --galore: %s\n\n", why);
  std::fprintf(stderr,
               "usage: relora_bench --galore [--backend cpu|cuda] [--cases a,b,...] [--svd all|both|a,b,...]\n"
               "                             [--gap T] [--power-iterations Q] [--repeats R] [--batch K]\n"
               "                             [--svd-repeats S] [--threads N]\n"
               "                             [--no-adam] [--json FILE]\n"
               "svd: exact, gram, randomized (all: the three, the default; both: exact,randomized)\n"
               "cases: mlp4x1k mlp4x2k mlp4x4k llm_mlp (default: mlp4x2k,mlp4x4k,llm_mlp on cuda, mlp4x1k on the cpu)\n");
  std::exit(why ? 2 : 0);
}

GaloreOptions parse(int argc, char** argv) {
  GaloreOptions o;
  CommandLine line(argc, argv, 2, usage);
  while (line.next()) {
    if (line.is("--help") || line.is("-h")) usage(nullptr);
    else if (line.is("--backend")) o.device = line.device();
    else if (line.is("--cases")) {
      o.cases = line.names([](const std::string& name) {
        return std::any_of(galore_cases().begin(), galore_cases().end(),
                           [&](const GaloreCase& c) { return name == c.name; });
      });
    } else if (line.is("--svd")) {
      const std::string v = line.value();
      if (v == "all") continue;  // the default
      if (v == "both") {
        o.methods = {relora::SubspaceMethod::exact, relora::SubspaceMethod::randomized};
        continue;
      }
      o.methods.clear();
      for (const std::string& name : split(v, ',')) {
        try {
          o.methods.push_back(relora::parse_subspace(name));
        } catch (const relora::ConfigError& e) {
          line.refuse(std::string("--svd: ") + e.what());
        }
      }
      if (o.methods.empty()) line.refuse("--svd needs at least one name");
    } else if (line.is("--gap")) o.gap = line.whole(1);
    else if (line.is("--power-iterations")) o.power_iterations = int(line.whole(0));
    else if (line.is("--repeats")) o.repeats = int(line.whole(1));
    else if (line.is("--batch")) o.batch = int(line.whole(1));
    else if (line.is("--svd-repeats")) o.svd_repeats = int(line.whole(1));
    else if (line.is("--threads")) o.threads = int(line.whole(1));
    else if (line.is("--no-adam")) o.adam = false;
    else if (line.is("--json")) o.json = line.value();
    else line.refuse_unknown();
  }
  if (o.cases.empty()) {
    if (o.device == relora::Device::cuda) o.cases = {"mlp4x2k", "mlp4x4k", "llm_mlp"};
    else o.cases = {"mlp4x1k"};
  }
  return o;
}

// One row of the table as JSON; NaN (written null) where the row has no such figure.
struct ResultRow {
  std::string case_name, optimizer;
  double rank = std::nan(""), power_iterations = std::nan("");
  double step_ms = std::nan(""), svd_step_ms = std::nan(""), amortised_ms = std::nan(""), refresh_ms = std::nan("");
  double state_mib = std::nan(""), adam_mib = std::nan(""), work_mib = std::nan("");
  double amortised_over_adam = std::nan(""), subspace_distance = std::nan(""), energy_ratio = std::nan("");

  std::string json() const {
    return "{\"case\": " + json_string(case_name) + ", \"optimizer\": " + json_string(optimizer) +
           ", \"rank\": " + json_number(rank) + ", \"power_iterations\": " + json_number(power_iterations) +
           ", \"step_ms\": " + json_number(step_ms) + ", \"svd_step_ms\": " + json_number(svd_step_ms) +
           ", \"amortised_ms\": " + json_number(amortised_ms) + ", \"refresh_ms\": " + json_number(refresh_ms) +
           ", \"state_mib\": " + json_number(state_mib) + ", \"adam_mib\": " + json_number(adam_mib) +
           ", \"work_mib\": " + json_number(work_mib) + ", \"amortised_over_adam\": " +
           json_number(amortised_over_adam) + ", \"subspace_distance\": " + json_number(subspace_distance) +
           ", \"energy_ratio\": " + json_number(energy_ratio) + "}";
  }
};

struct Run {
  std::unique_ptr<relora::Model<T>> model;
  std::unique_ptr<relora::Trainer<T>> trainer;
  relora::Tensor<T> X, target;
};

// The MLP of `c`, every weight and bias trained (full fine-tuning), with `factory`'s optimizer.
Run build(const GaloreCase& c, const std::shared_ptr<relora::Backend<T>>& backend,
          std::shared_ptr<const relora::OptimizerFactory> factory) {
  Run run;
  run.model = std::make_unique<relora::Model<T>>(backend);
  const std::size_t L = c.dims.size() - 1;
  for (std::size_t i = 0; i < L; ++i) {
    relora::LoraConfig cfg;
    cfg.in_features = c.dims[i];
    cfg.out_features = c.dims[i + 1];
    cfg.rank = 1;  // the adapter is not trained; full fine-tuning trains W and b
    cfg.bias = relora::BiasMode::trainable;
    cfg.seed = 1000 + i;
    run.model->add(cfg, i + 1 < L ? relora::Activation::relu : relora::Activation::identity);
  }
  std::srand(1);
  run.X = relora::to_backend<T>(*backend, relora::HostMatrix<T>::Random(c.n, c.dims.front()), "bench X");
  run.target = relora::to_backend<T>(*backend, relora::HostMatrix<T>::Random(c.n, c.dims.back()), "bench target");
  relora::TrainerConfig tc;
  tc.method = relora::TrainingMethod::full_finetune;
  tc.optimizer = std::move(factory);
  run.trainer = std::make_unique<relora::Trainer<T>>(*run.model, tc);
  return run;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Median ms per step over `repeats` batches of `batch` steps.
double time_steps(Run& run, relora::Backend<T>& backend, int repeats, int batch) {
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < batch; ++i) run.trainer->step(run.X, run.target);
    backend.synchronize();
    ms.push_back(seconds_since(t0) * 1e3 / batch);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

}  // namespace

bool galore_requested(int argc, char** argv) { return argc >= 2 && std::string(argv[1]) == "--galore"; }

int run_galore_cases(int argc, char** argv) {
  const GaloreOptions o = parse(argc, argv);
  try {
#if defined(_OPENMP)
    if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
    auto backend = relora::make_backend<T>(o.device);
    std::vector<std::string> rows;  // JSON objects, one per optimizer and case
    const double none = std::nan("");
    std::printf("relora_bench --galore  backend %s (%s), T = %lld, one-sided, scale 0.25, lr 1e-3\n",
                relora::device_name(o.device), backend->description().c_str(), static_cast<long long>(o.gap));
    std::printf("%-8s %-11s %5s %10s %12s %12s %11s %10s %10s %10s\n", "case", "optimizer", "rank", "step ms",
                "svd step ms", "amortised", "refresh ms", "state MiB", "Adam MiB", "work MiB");
    for (const std::string& name : o.cases) {
      const GaloreCase& c = *std::find_if(galore_cases().begin(), galore_cases().end(),
                                          [&](const GaloreCase& x) { return name == x.name; });
      double adam_step = -1, adam_state = 0;
      for (Index i = 0; i + 1 < Index(c.dims.size()); ++i) {
        adam_state += 2.0 * double(c.dims[i] * c.dims[i + 1] + c.dims[i + 1]) * sizeof(T);
      }
      if (o.adam) {
        Run adam = build(c, backend, relora::optimizer_factory<relora::Adam>(relora::AdamConfig{.lr = 1e-3}));
        for (int i = 0; i < 3; ++i) adam.trainer->step(adam.X, adam.target);
        backend->synchronize();
        adam_step = time_steps(adam, *backend, o.repeats, o.batch);
        std::printf("%-8s %-11s %5s %10.3f %12s %12s %11s %10s %10.1f %10s\n", c.name, "adam", "-", adam_step, "-", "-",
                    "-", "-", mib(adam_state), "-");
        rows.push_back(ResultRow{.case_name = c.name, .optimizer = "adam", .power_iterations = double(o.power_iterations),
                                 .step_ms = adam_step, .amortised_ms = adam_step, .state_mib = mib(adam_state),
                                 .adam_mib = mib(adam_state), .amortised_over_adam = 1.0}
                           .json());
        std::fflush(stdout);
      }
      relora::HostMatrix<T> exact_basis;
      double exact_energy = 0;
      for (relora::SubspaceMethod method : o.methods) {
        const relora::GaloreConfig config{.lr = 1e-3, .rank = c.rank, .update_gap = o.gap, .scale = 0.25,
                                          .subspace = method, .power_iterations = o.power_iterations};
        Run run = build(c, backend, relora::optimizer_factory<relora::Galore>(config));
        auto& galore = dynamic_cast<relora::Galore<T>&>(run.trainer->optimizer());
        // The first step takes the subspaces; the next ones (fewer than T) are steady steps.
        run.trainer->step(run.X, run.target);
        // The first weight's subspace, of the same first gradient in every run: the randomized
        // finder's distance from the exact SVD's, ||B B^T - E E^T||_F / sqrt(2 r) (0: the same
        // subspace, 1: orthogonal ones).
        const bool uses_p = c.dims[1] <= c.dims[0];  // W is dims[1] x dims[0]: P when m <= n
        const relora::HostMatrix<T> basis = relora::to_host(*backend, uses_p ? galore.P(0) : galore.Q(0));
        // And the share of the gradient's energy ||P^T G||^2 (||G Q||^2) it captures, against the
        // exact SVD's (the best any rank-r subspace can do).
        const Eigen::MatrixXd g = relora::to_host(*backend, *galore.parameter(0).grad).template cast<double>();
        const Eigen::MatrixXd b = basis.template cast<double>();
        const double energy = (uses_p ? Eigen::MatrixXd(b.transpose() * g) : Eigen::MatrixXd(g * b)).squaredNorm();
        double distance = -1, energy_ratio = -1;
        if (method == relora::SubspaceMethod::exact) {
          exact_basis = basis;
          exact_energy = energy;
        } else if (exact_basis.size() == basis.size()) {
          const Eigen::MatrixXd e = exact_basis.template cast<double>();
          distance = (b * b.transpose() - e * e.transpose()).norm() / std::sqrt(2.0 * double(c.rank));
          energy_ratio = energy / exact_energy;
        }
        for (int i = 0; i < 3; ++i) run.trainer->step(run.X, run.target);
        backend->synchronize();
        const int steady_budget = int(o.gap) - 5;
        const int batch = std::max(1, std::min(o.batch, steady_budget / std::max(1, o.repeats)));
        const double step = time_steps(run, *backend, o.repeats, batch);
        // Steps with an SVD: reset_state makes every weight take a new subspace at its next step.
        std::vector<double> svd_ms;
        const std::int64_t refreshes_before = galore.refreshes();
        const double refresh_before = galore.refresh_seconds();
        for (int r = 0; r < o.svd_repeats; ++r) {
          galore.reset_state([](const relora::Parameter<T>&) { return true; });
          backend->synchronize();
          const auto t0 = Clock::now();
          run.trainer->step(run.X, run.target);
          backend->synchronize();
          svd_ms.push_back(seconds_since(t0) * 1e3);
        }
        std::sort(svd_ms.begin(), svd_ms.end());
        const double svd_step = svd_ms[svd_ms.size() / 2];
        const double refresh_ms = (galore.refresh_seconds() - refresh_before) * 1e3 / o.svd_repeats;
        const double amortised = step + (svd_step - step) / double(o.gap);
        const std::string optimizer = std::string("galore/") + (method == relora::SubspaceMethod::exact  ? "svd"
                                                                : method == relora::SubspaceMethod::gram ? "gram"
                                                                                                         : "rsvd");
        rows.push_back(ResultRow{.case_name = c.name, .optimizer = optimizer, .rank = double(c.rank),
                                 .power_iterations = double(o.power_iterations), .step_ms = step, .svd_step_ms = svd_step,
                                 .amortised_ms = amortised, .refresh_ms = refresh_ms,
                                 .state_mib = mib(double(galore.state_bytes())), .adam_mib = mib(adam_state),
                                 .work_mib = mib(double(galore.workspace_bytes())),
                                 .amortised_over_adam = adam_step > 0 ? amortised / adam_step : none,
                                 .subspace_distance = distance >= 0 ? distance : none,
                                 .energy_ratio = distance >= 0 ? energy_ratio : none}
                           .json());
        std::printf("%-8s %-11s %5lld %10.3f %12.1f %12.3f %11.1f %10.1f %10.1f %10.1f\n", c.name,
                    optimizer.c_str(),
                    static_cast<long long>(c.rank), step, svd_step, amortised, refresh_ms,
                    mib(double(galore.state_bytes())), mib(adam_state), mib(double(galore.workspace_bytes())));
        std::printf("%-8s %-11s        refreshes %lld", "", "",
                    static_cast<long long>(galore.refreshes() - refreshes_before));
        if (adam_step > 0) std::printf(", amortised / Adam step = %.3f", amortised / adam_step);
        if (distance >= 0) {
          std::printf(", subspace distance from the exact SVD's = %.2e, energy captured / exact's = %.4f", distance,
                      energy_ratio);
        }
        std::printf("\n");
        std::fflush(stdout);
      }
    }
    if (!o.json.empty()) {
      std::string text = "{\"tool\": \"relora_bench --galore\", \"date\": " + json_string(now_utc()) +
                         ", \"backend\": " + json_string(backend->description()) +
                         ", \"update_gap\": " + json_number(double(o.gap)) + ", \"results\": [";
      for (std::size_t i = 0; i < rows.size(); ++i) text += (i ? ",\n  " : "\n  ") + rows[i];
      write_file(o.json, text + "\n]}\n");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "relora_bench --galore: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace relora_bench
