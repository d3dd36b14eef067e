// relora_bench --ranks: weak scaling of data-parallel training. For each case and each rank count
// N, N ranks train the case's model together, each on its own batch of the case's n rows (so the
// global batch is N n), and the bench times their step.
//
// The ranks: one thread each, each with its own backend, model, trainer and data. Every rank
// builds the model from the same configs and seeds (add_case_layers), so the ranks start equal;
// each draws its batch from a random stream of its own (X and the target uniform in [-1, 1], as
// the one-rank bench's). The trainer is given the rank's communicator, so each step sums the
// gradients over the ranks as the backward goes (include/relora/training/trainer.hpp).
//   cuda  one GPU per rank, rank i on device i; the communicators are NCCL's, made together
//         (make_nccl_communicators). The trainer records its steady step, all-reduces included, as
//         a CUDA graph and replays it (TrainerConfig::use_graphs, on by default).
//   cpu   the ranks are threads of one group (ThreadCommunicator); the process's OpenMP threads
//         are split evenly among them (each rank thread sets its own OpenMP count, and Eigen
//         follows it), so N ranks share the cores one rank had: the CPU mode tests the machinery
//         (the all-reduces, the bit identity), it cannot scale.
//
// Timing, per rank: warm-up steps, then batches of K steps, each batch started together (a
// barrier) and ended by synchronising the rank's backend; the per-step time of a batch is its
// wall time over K. K and the number of batches come from the mean over the ranks of one step's
// time (an all-reduce), so that every rank takes the same steps. A rank's time is its median over
// the batches; the step's time for N ranks is the slowest rank's. Weak-scaling efficiency is
// t(1) / t(N): 1 when N ranks take N times the samples in the time one rank takes its own.
//
// After the run every rank downloads its trainable parameters and the bench compares each rank's
// to rank 0's, bit for bit: data-parallel ranks take the same step from the same summed
// gradients, so they must end identical.
#include "data_parallel_cases.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "bench_json.hpp"
#include "parameter_bits.hpp"
#include "relora/distributed/nccl_communicator.hpp"
#include "relora/distributed/thread_communicator.hpp"
#include "relora/relora.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace relora_bench {
namespace {

using relora::Index;
using T = float;
using Clock = std::chrono::steady_clock;
using Communicators = std::vector<std::shared_ptr<relora::Communicator<T>>>;
using Backends = std::vector<std::shared_ptr<relora::Backend<T>>>;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median_of(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// What one rank measured and how it ended.
struct RankResult {
  std::vector<double> batch_ms;  // per-step time of each timed batch
  double median_ms = 0;
  int steps_per_batch = 0;
  double loss_first = 0, loss_last = 0;  // the global batch's loss (every rank reports the same)
  std::int64_t replayed_steps = 0;       // steps run as a replayed CUDA graph
  std::vector<ParameterValues<T>> parameters;
};

// One case at one rank count.
struct RunResult {
  int ranks = 0;
  int omp_threads = 0;  // cpu: each rank's OpenMP threads
  std::vector<RankResult> per_rank;
  int slowest = 0;       // the rank whose median is the largest
  double step_ms = 0;    // its median
  std::string difference;  // "": every rank's parameters equal rank 0's to the bit; else the first difference
};

// The mean over the ranks of `value` (a collective): the same bits on every rank, so that every
// rank derives the same number of steps from it. `scratch` is a 1 x 1 tensor on the rank's
// backend, allocated before the trainer's first step (an allocation after the step's recording
// would make the trainer record anew).
double mean_over_ranks(relora::Communicator<T>& comm, relora::Backend<T>& backend, relora::Tensor<T>& scratch,
                       double value) {
  T x = T(value);
  backend.upload(&x, scratch);
  comm.all_reduce_sum(scratch.data(), 1, T(1) / T(comm.size()));
  comm.wait();
  backend.download(scratch, &x);
  return double(x);
}

// Rank comm.rank()'s part of a run: builds its model and trainer, trains, times, and downloads its
// trainable parameters. Every rank of the group runs it at once, on a thread of its own.
RankResult run_rank(const CaseSpec& c, const DataParallelOptions& o, const std::shared_ptr<relora::Backend<T>>& backend,
                    const std::shared_ptr<relora::Communicator<T>>& comm, int omp_threads) {
#if defined(_OPENMP)
  if (omp_threads > 0) omp_set_num_threads(omp_threads);  // this thread's own count: OpenMP keeps one per thread
#else
  (void)omp_threads;
#endif
  relora::Backend<T>& b = *backend;
  relora::Model<T> model(backend, o.fused ? relora::LayerChoice::fastest : relora::LayerChoice::reference);
  add_case_layers(model, c, o.precision, o.dora);
  // This rank's own batch: another random stream on every rank.
  const std::uint64_t rank = std::uint64_t(comm->rank());
  relora::Tensor<T> X = b.allocate(c.n, c.dims.front());
  relora::Tensor<T> target = b.allocate(c.n, c.dims.back());
  b.random_uniform(relora::RngKey{100 + rank, 0}, T(-1), T(1), X);
  b.random_uniform(relora::RngKey{100 + rank, 1}, T(-1), T(1), target);
  relora::Tensor<T> scratch = b.allocate(1, 1);
  relora::TrainerConfig tc;
  tc.method = relora::TrainingMethod::lora;
  tc.adam.lr = 1e-3;  // as peft_anchor.py
  relora::Trainer<T> trainer(model, tc, nullptr, nullptr, comm);

  RankResult res;
  trainer.step(X, target);
  res.loss_first = double(trainer.loss());
  for (int i = 0; i < o.warmup; ++i) trainer.step(X, target);
  b.synchronize();
  comm->barrier();
  // One step timed alone; its mean over the ranks chooses K and the number of batches.
  auto t0 = Clock::now();
  trainer.step(X, target);
  b.synchronize();
  const double one = std::max(mean_over_ranks(*comm, b, scratch, seconds_since(t0)), 1e-7);
  const int K = o.batch > 0 ? o.batch : int(std::clamp(o.batch_ms * 1e-3 / one, 1.0, 2000.0));
  int repeats = o.repeats;
  const double budget_batches = o.max_seconds / (one * K);
  if (budget_batches < repeats) repeats = std::max(3, int(budget_batches));
  for (int rep = 0; rep < repeats; ++rep) {
    comm->barrier();  // every rank starts the batch together
    t0 = Clock::now();
    for (int i = 0; i < K; ++i) trainer.step(X, target);
    b.synchronize();
    res.batch_ms.push_back(seconds_since(t0) * 1e3 / K);
  }
  res.median_ms = median_of(res.batch_ms);
  res.steps_per_batch = K;
  res.loss_last = double(trainer.loss());
  res.replayed_steps = trainer.replayed_steps();
  res.parameters = download_parameters(model);
  comm->barrier();  // every rank's collectives done before the communicators are destroyed
  return res;
}

// Runs fn(rank) on one thread per rank and joins them. A rank that throws aborts the group, so
// that no rank waits for it in a collective; the first exception thrown (the cause; the others'
// CommunicatorErrors follow from it) is rethrown here once every thread has ended. Each thread
// then lets its rank's communicator go (comms[rank] is null afterwards), on the thread that drove
// the rank's backend: destroying it drops the backend's recorded step, which holds its
// collectives (NCCL finishes a group's communicators, at the last one's destroy, only once every
// graph holding their collectives is gone).
void run_on_rank_threads(Communicators& comms, const std::function<void(int)>& fn) {
  std::mutex mutex;
  std::exception_ptr first;
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < comms.size(); ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(int(r));
      } catch (const std::exception& e) {
        {
          std::lock_guard<std::mutex> lock(mutex);
          if (!first) first = std::current_exception();
        }
        comms[r]->abort(e.what());
      }
      comms[r].reset();
    });
  }
  for (std::thread& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

// The communicators of a group of the first `ranks` backends: NCCL's on GPUs, a thread group's
// on the CPU.
Communicators make_group(const DataParallelOptions& o, const Backends& backends, int ranks) {
  if (o.device == relora::Device::cpu) return relora::make_thread_communicators<T>(ranks);
  const Backends mine(backends.begin(), backends.begin() + ranks);
  Communicators group;
  for (auto& comm : relora::make_nccl_communicators<T>(mine)) group.push_back(std::move(comm));
  return group;
}

// One backend per rank for the largest rank count: on CUDA, device i for rank i. Refuses a CUDA
// run without a GPU, without NCCL, or with fewer GPUs than ranks, saying which.
Backends make_rank_backends(const DataParallelOptions& o, int ranks) {
  const std::string what = "--backend " + std::string(relora::device_name(o.device)) + " --ranks";
  Backends backends;
  if (o.device == relora::Device::cuda) {
    std::string why;
    if (!relora::cuda_available(&why)) throw relora::ConfigError(what + " needs one GPU per rank: " + why);
    if (!relora::nccl_available(&why)) throw relora::ConfigError(what + " needs NCCL: " + why);
  }
  for (int i = 0; i < ranks; ++i) {
    relora::BackendOptions bo;
    bo.math = o.math;
    bo.device_id = o.device == relora::Device::cuda ? i : 0;
    try {
      backends.push_back(relora::make_backend<T>(o.device, bo));
    } catch (const relora::Error& e) {
      throw relora::ConfigError(what + " " + std::to_string(ranks) + " needs " + std::to_string(ranks) +
                                " GPUs (one per rank), but GPU " + std::to_string(i) + " cannot be used: " + e.what());
    }
  }
  return backends;
}

RunResult run_case(const CaseSpec& c, const DataParallelOptions& o, const Backends& backends, int ranks,
                   int omp_threads) {
  RunResult run;
  run.ranks = ranks;
  run.omp_threads = omp_threads;
  run.per_rank.resize(std::size_t(ranks));
  for (int r = 0; r < ranks; ++r) backends[std::size_t(r)]->synchronize();
  {
    Communicators comms = make_group(o, backends, ranks);
    run_on_rank_threads(comms, [&](int r) {
      run.per_rank[std::size_t(r)] = run_rank(c, o, backends[std::size_t(r)], comms[std::size_t(r)], omp_threads);
    });
  }
  for (int r = 0; r < ranks; ++r) {
    const RankResult& rank = run.per_rank[std::size_t(r)];
    if (rank.median_ms > run.per_rank[std::size_t(run.slowest)].median_ms) run.slowest = r;
    if (r > 0 && run.difference.empty()) {
      const std::string diff = first_bit_difference(rank.parameters, run.per_rank[0].parameters);
      if (!diff.empty()) run.difference = "rank " + std::to_string(r) + " against rank 0: " + diff;
    }
  }
  run.step_ms = run.per_rank[std::size_t(run.slowest)].median_ms;
  return run;
}

std::string layers_text(const CaseSpec& c) {
  std::string s;
  for (std::size_t i = 0; i < c.dims.size(); ++i) s += (i ? "->" : "") + std::to_string(c.dims[i]);
  return s;
}

// t(1) / t(N), or NaN when the run had no one-rank count.
double efficiency(const std::vector<RunResult>& runs, const RunResult& run) {
  for (const RunResult& one : runs) {
    if (one.ranks == 1) return one.step_ms / run.step_ms;
  }
  return NAN;
}

double samples_per_second(const CaseSpec& c, const RunResult& run) {
  return double(c.n) * run.ranks / (run.step_ms * 1e-3);
}

void print_row(const CaseSpec& c, const std::vector<RunResult>& runs, const RunResult& run) {
  const RankResult& slow = run.per_rank[std::size_t(run.slowest)];
  std::string medians;
  for (const RankResult& r : run.per_rank) {
    char text[32];
    std::snprintf(text, sizeof text, "%s%.4g", medians.empty() ? "" : " ", r.median_ms);
    medians += text;
  }
  char range[48], eff[16];
  std::snprintf(range, sizeof range, "%.4g-%.4g",
                *std::min_element(slow.batch_ms.begin(), slow.batch_ms.end()),
                *std::max_element(slow.batch_ms.begin(), slow.batch_ms.end()));
  const double e = efficiency(runs, run);
  if (std::isfinite(e)) std::snprintf(eff, sizeof eff, "%.3f", e);
  else std::snprintf(eff, sizeof eff, "-");
  std::printf("%-10s %6lld %-18s %4lld | %5d | %10.4g %15s %-20s | %10s %12.4g | %s\n", c.name.c_str(),
              (long long)c.n, layers_text(c).c_str(), (long long)c.r, run.ranks, run.step_ms, range, medians.c_str(),
              eff, samples_per_second(c, run), run.difference.empty() ? "yes" : ("NO: " + run.difference).c_str());
  std::fflush(stdout);
}

std::string json_run(const CaseSpec& c, const std::vector<RunResult>& runs, const RunResult& run) {
  const RankResult& slow = run.per_rank[std::size_t(run.slowest)];
  std::string dims, medians, replays;
  for (std::size_t i = 0; i < c.dims.size(); ++i) dims += (i ? ", " : "") + std::to_string(c.dims[i]);
  for (const RankResult& r : run.per_rank) {
    medians += (medians.empty() ? "" : ", ") + json_number(r.median_ms);
    replays += (replays.empty() ? "" : ", ") + std::to_string(r.replayed_steps);
  }
  std::string j = "{\"case\": " + json_string(c.name) + ", \"n\": " + std::to_string(c.n) + ", \"dims\": [" + dims +
                  "], \"r\": " + std::to_string(c.r) + ", \"ranks\": " + std::to_string(run.ranks) +
                  ", \"global_batch\": " + std::to_string(c.n * run.ranks);
  if (run.omp_threads > 0) j += ", \"threads_per_rank\": " + std::to_string(run.omp_threads);
  j += ", \"step_ms\": " + json_number(run.step_ms) + ", \"slowest_rank\": " + std::to_string(run.slowest);
  j += ", \"step\": {\"median_ms\": " + json_number(slow.median_ms) +
       ", \"min_ms\": " + json_number(*std::min_element(slow.batch_ms.begin(), slow.batch_ms.end())) +
       ", \"max_ms\": " + json_number(*std::max_element(slow.batch_ms.begin(), slow.batch_ms.end())) +
       ", \"batches\": " + std::to_string(slow.batch_ms.size()) +
       ", \"steps_per_batch\": " + std::to_string(slow.steps_per_batch) + "}";
  j += ", \"rank_median_ms\": [" + medians + "]";
  j += ", \"efficiency\": " + json_number(efficiency(runs, run));
  j += ", \"samples_per_s\": " + json_number(samples_per_second(c, run));
  j += std::string(", \"bit_identical\": ") + (run.difference.empty() ? "true" : "false");
  if (!run.difference.empty()) j += ", \"difference\": " + json_string(run.difference);
  j += ", \"graph_replays\": [" + replays + "]";
  j += ", \"loss_first\": " + json_number(run.per_rank[0].loss_first) +
       ", \"loss_last\": " + json_number(run.per_rank[0].loss_last);
  return j + "}";
}

}  // namespace

std::vector<int> parse_rank_counts(const std::string& text) {
  const auto bad = [&](const std::string& why) {
    return std::invalid_argument("--ranks: '" + text + "' " + why + " (e.g. --ranks 2, or --ranks 1,2)");
  };
  std::vector<int> counts;
  std::string part;
  for (std::size_t at = 0; at <= text.size(); ++at) {
    if (at < text.size() && text[at] != ',') {
      part += text[at];
      continue;
    }
    if (part.empty() || part.size() > 6 || part.find_first_not_of("0123456789") != std::string::npos) {
      throw bad("is not a rank count or a list of them");
    }
    const int n = std::stoi(part);
    if (n < 1) throw bad("has a count below 1");
    if (!counts.empty() && n <= counts.back()) throw bad("is not in ascending order without repeats");
    counts.push_back(n);
    part.clear();
  }
  if (counts.size() == 1) {
    const int n = counts[0];
    counts.clear();
    for (int i = 1; i <= n; ++i) counts.push_back(i);
  }
  return counts;
}

int run_data_parallel_cases(const DataParallelOptions& o) {
  if (o.ranks.empty() || o.cases.empty()) throw std::invalid_argument("relora_bench --ranks: no rank count or no case");
  const int most = o.ranks.back();
  const bool cpu = o.device == relora::Device::cpu;
#if defined(_OPENMP)
  const int total_threads = o.threads > 0 ? o.threads : omp_get_max_threads();
#else
  const int total_threads = 1;
#endif
  if (cpu) Eigen::setNbThreads(0);  // Eigen follows each rank thread's OpenMP count
  const Backends backends = make_rank_backends(o, most);
  const std::string backend_name = relora::device_name(o.device);
  const std::string math_name = o.math == relora::MathMode::tf32 ? "tf32" : "strict";
  const std::string communicator = cpu ? "threads" : "nccl";
  char host[256] = "";
  gethostname(host, sizeof host - 1);

  std::printf("relora_bench --ranks  %s  backend %s, communicator %s, math %s, layer %s, base %s, fast layers %s\n",
              now_utc().c_str(), backend_name.c_str(), communicator.c_str(), math_name.c_str(),
              o.dora ? "dora" : "lora", relora::precision_name(o.precision), o.fused ? "on" : "off");
  if (cpu) {
    std::printf("cpu: %d OpenMP threads split evenly among the ranks: N ranks get max(1, %d / N) each\n",
                total_threads, total_threads);
  } else {
    for (int r = 0; r < most; ++r) std::printf("rank %d: %s\n", r, backends[std::size_t(r)]->description().c_str());
  }
  std::printf("weak scaling: every rank trains on its own batch of the case's n rows; step ms is the slowest rank's "
              "median; efficiency = t(1) / t(N)\n");
  std::printf("%-10s %6s %-18s %4s | %5s | %10s %15s %-20s | %10s %12s | %s\n", "case", "n/rank", "layers", "r",
              "ranks", "step ms", "min-max", "rank medians", "efficiency", "samples/s", "ranks bit-identical");

  std::string json;
  bool identical = true;
  for (const CaseSpec& c : o.cases) {
    std::vector<RunResult> runs;
    for (int ranks : o.ranks) {
      const int omp_threads = cpu ? std::max(1, total_threads / ranks) : 0;
      runs.push_back(run_case(c, o, backends, ranks, omp_threads));
      print_row(c, runs, runs.back());
      identical = identical && runs.back().difference.empty();
    }
    for (const RunResult& run : runs) json += std::string(json.empty() ? "" : ",\n") + "  " + json_run(c, runs, run);
  }

  if (!o.json.empty()) {
    std::string devices;
    for (int r = 0; r < most && !cpu; ++r) {
      devices += (r ? ", " : "") + json_string(backends[std::size_t(r)]->description());
    }
    const std::string j =
        "{\n \"tool\": \"relora_bench --ranks\", \"date\": " + json_string(now_utc()) + ", \"host\": " +
        json_string(host) + ",\n \"backend\": " + json_string(backend_name) + ", \"communicator\": " +
        json_string(communicator) + ", \"math\": " + json_string(math_name) + ", \"precision\": " +
        json_string(relora::precision_name(o.precision)) + ", \"devices\": [" + devices + "]" +
        (cpu ? ", \"threads\": " + std::to_string(total_threads) : std::string()) +
        ", \"fast_layers\": " + (o.fused ? "true" : "false") + ", \"layer\": " + (o.dora ? "\"dora\"" : "\"lora\"") +
        ",\n \"weak_scaling\": true, \"alpha_over_r\": 2, \"dropout\": 0, \"bias\": \"frozen\", \"adam_lr\": 0.001,"
        "\n \"results\": [\n" + json + "\n ]\n}\n";
    write_file(o.json, j);
  }
  if (!identical) {
    std::fprintf(stderr, "relora_bench --ranks: the ranks of a run ended with different parameters (above)\n");
    return 1;
  }
  return 0;
}

}  // namespace relora_bench
