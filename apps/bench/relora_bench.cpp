// relora_bench: the time of one LoRA training step (forward, MSE, backward, Adam) through
// relora::Trainer<float>::step, for the anchor cases of ../shared/anchors/peft_anchor.py, beside
// the GEMM floor measured in the same run through the same backend's gemm.
//
// Letters as in shared/DESIGN.md: n rows, k = in_features, d = out_features, r = rank.
// Each case is an MLP of nn.Linear-like layers (frozen base W and bias, LoRA on every layer,
// alpha = 2 r as peft_anchor.py sets lora_alpha, dropout 0, ReLU between layers, none after the
// last), trained with Adam (lr 1e-3) on a random regression target, as the anchor does.
//
// Timing: warm-up steps, then `repeats` batches of K steps each; the device is synchronized once
// after each batch (the step itself never waits for the GPU), and the per-step time of a batch is
// its wall time over K. Medians, min/max and the inter-quartile range are over batches.
//
// The floor: the step's necessary large products (X W^T for every layer, dY W for every layer but
// the first) timed alone, same shapes, same backend, same math mode; "floor_all" adds the small
// LoRA products (U = X A^T, Y += s U B^T, dB, dU, dA, dX += dU A): every product the step needs,
// the floor issue 5's targets are stated against. step/fl is the ratio to the first, step/all to
// the second; what lies between floor_all and the step is element-wise work, launches and host
// overhead.
//
// Memory: the tensor bytes allocated through the backend (parameters, Adam moments, per-batch
// buffers, the batch itself), peak over construction and two steps, counted by a forwarding
// backend in a separate pass (so the timed run has no extra indirection). This is what
// torch.cuda.max_memory_allocated counts on the PyTorch side. On the CPU the peak RSS delta is
// reported too.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <sys/resource.h>
#include <unistd.h>

#include "anchor_cases.hpp"
#include "bench_json.hpp"
#include "command_line.hpp"
#include "data_parallel_cases.hpp"
#include "galore_cases.hpp"
#include "half_floor.hpp"
#include "relora/relora.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__FMA__) && defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using relora::Index;
using Clock = std::chrono::steady_clock;
using T = float;
using relora_bench::CaseSpec;
using relora_bench::CommandLine;
using relora_bench::split;
using relora_bench::anchor_cases;
using relora_bench::json_number;
using relora_bench::json_string;
using relora_bench::now_utc;
using relora_bench::write_file;

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
  relora::Device device = relora::Device::cpu;
  relora::MathMode math = relora::MathMode::strict;
  std::vector<std::string> cases;  // empty: the default list for the backend
  bool cases_given = false;
  int repeats = 15;
  int warmup = 5;
  int batch = 0;            // steps per timed batch; 0: chosen so that a batch lasts about batch_ms
  double batch_ms = 20;
  double max_seconds = 10;  // per case and per measurement: fewer repeats (never under 3) beyond it
  int threads = 0;          // 0: leave OpenMP's default
  bool scaling = false;
  bool memory = true;
  bool floor = true;
  bool fused = true;               // false: every layer is the reference LoraLinear (LayerChoice::reference)
  bool dora = false;               // every layer a DoraLinear (detached norm, PEFT's default)
  bool thread_sweep = false;       // CPU: every sweep size at 1 thread, the default and all cores
  std::vector<CaseSpec> custom;    // --custom n:k,d1,...:r
  relora::BasePrecision precision = relora::BasePrecision::fp32;  // --precision: how every W is stored
  relora::BasePrecision activations = relora::BasePrecision::fp32;  // --activations: between layers
  std::vector<int> ranks;          // --ranks: data-parallel weak scaling at these rank counts
  std::string json;
  double cpu_skip_seconds = 1;  // CPU default list: skip cases whose step is estimated above this
};

[[noreturn]] void usage(const char* why) {
  if (why) std::fprintf(stderr, "relora_bench: %s\n\n", why);
  std::fprintf(stderr,
               "usage: relora_bench [--backend cpu|cuda] [--math strict|tf32] [--cases a,b,...|all]\n"
               "                    [--repeats R] [--warmup W] [--batch K] [--batch-ms MS] [--max-seconds S]\n"
               "                    [--threads N] [--scaling] [--no-memory] [--no-floor] [--json FILE]\n"
               "                    [--unfused] [--layer lora|dora] [--custom n:k,d1,d2,...:r ...]\n"
               "                    [--thread-sweep] [--precision fp32|bf16|fp16] [--activations fp32|bf16|fp16]\n"
               "                    [--ranks N|1,2,...]\n"
               "cases: seed_demo layer1k layer4k mlp4x2k mlp4x4k llm_mlp (default: all on cuda; on the cpu\n"
               "       those whose step is estimated under --cpu-skip-seconds, 1 by default)\n"
               "--thread-sweep (cpu): models from the seed demo's to mlp4x2k (3 layers of width 16 to 2048,\n"
               "       n 64 to 4096), each at 1 thread, OpenMP's default and every core (two passes, the lower median); default/best is the\n"
               "       default's time over the faster of the other two\n"
               "--precision: how every layer's frozen W is stored (bf16, fp16: 16 bits, products on tensor cores)\n"
               "--activations: the format of the activations between layers (Model::set_activation_format)\n"
               "--ranks N|1,2,...: data-parallel weak scaling (data_parallel_cases.cpp): each case at 1..N ranks\n"
               "       (or the counts listed), every rank on its own batch of the case's n rows; cuda: one GPU\n"
               "       per rank through NCCL, cpu: thread ranks sharing the OpenMP threads (default cases:\n"
               "       mlp4x4k,llm_mlp on cuda, seed_demo on the cpu); takes --backend --math --precision\n"
               "       --cases --custom --layer --unfused --repeats --warmup --batch --batch-ms\n"
               "       --max-seconds --threads --json\n");
  std::exit(why ? 2 : 0);
}

// "n:k,d1,d2,...:r", a model of the given widths (ReLU between layers), e.g. 1024:32,32:8.
CaseSpec parse_custom(const std::string& text) {
  const std::vector<std::string> parts = split(text, ':');
  CaseSpec c;
  try {
    if (parts.size() != 3) throw std::invalid_argument("three fields");
    c.n = std::stoll(parts[0]);
    for (const std::string& w : split(parts[1], ',')) c.dims.push_back(std::stoll(w));
    c.r = std::stoll(parts[2]);
  } catch (const std::exception&) {
    usage(("--custom: '" + text + "' is not n:k,d1,...:r (e.g. 1024:32,32:8)").c_str());
  }
  if (c.n < 1 || c.dims.size() < 2 || c.r < 1 ||
      std::any_of(c.dims.begin(), c.dims.end(), [&](Index w) { return w < c.r; })) {
    usage(("--custom: '" + text + "' needs n >= 1, two widths or more, and 1 <= r <= every width").c_str());
  }
  c.name = "custom_" + parts[0] + "_" + parts[1] + "_" + parts[2];
  return c;
}

Options parse(int argc, char** argv) {
  Options o;
  CommandLine line(argc, argv, 1, usage);
  while (line.next()) {
    if (line.is("--help") || line.is("-h")) usage(nullptr);
    else if (line.is("--backend")) o.device = line.device();
    else if (line.is("--math")) {
      const std::string v = line.value();
      if (v == "strict") o.math = relora::MathMode::strict;
      else if (v == "tf32") o.math = relora::MathMode::tf32;
      else line.refuse("--math: '" + v + "' is neither strict nor tf32");
    } else if (line.is("--cases")) {
      o.cases_given = true;
      o.cases = line.names([](const std::string& name) {
        return name == "all" || std::any_of(anchor_cases().begin(), anchor_cases().end(),
                                            [&](const CaseSpec& c) { return c.name == name; });
      });
      if (std::find(o.cases.begin(), o.cases.end(), "all") != o.cases.end()) {
        o.cases.clear();
        for (const CaseSpec& c : anchor_cases()) o.cases.push_back(c.name);
      }
    } else if (line.is("--repeats")) o.repeats = int(line.number(1));
    else if (line.is("--warmup")) o.warmup = int(line.number(0));
    else if (line.is("--batch")) o.batch = int(line.number(1));
    else if (line.is("--batch-ms")) o.batch_ms = line.number(0.001);
    else if (line.is("--max-seconds")) o.max_seconds = line.number(0.001);
    else if (line.is("--threads")) o.threads = int(line.number(1));
    else if (line.is("--cpu-skip-seconds")) o.cpu_skip_seconds = line.number(0);
    else if (line.is("--scaling")) o.scaling = true;
    else if (line.is("--no-memory")) o.memory = false;
    else if (line.is("--no-floor")) o.floor = false;
    else if (line.is("--unfused")) o.fused = false;
    else if (line.is("--layer")) {
      const std::string v = line.value();
      if (v == "lora") o.dora = false;
      else if (v == "dora") o.dora = true;
      else line.refuse("--layer: '" + v + "' is neither lora nor dora");
    } else if (line.is("--thread-sweep")) o.thread_sweep = true;
    else if (line.is("--custom")) o.custom.push_back(parse_custom(line.value()));
    else if (line.is("--precision")) {
      const std::string v = line.value();
      if (v == "fp32") o.precision = relora::BasePrecision::fp32;
      else if (v == "bf16") o.precision = relora::BasePrecision::bf16;
      else if (v == "fp16") o.precision = relora::BasePrecision::fp16;
      else line.refuse("--precision: '" + v + "' is not fp32, bf16 or fp16");
    } else if (line.is("--activations")) {
      const std::string v = line.value();
      if (v == "fp32") o.activations = relora::BasePrecision::fp32;
      else if (v == "bf16") o.activations = relora::BasePrecision::bf16;
      else if (v == "fp16") o.activations = relora::BasePrecision::fp16;
      else line.refuse("--activations: '" + v + "' is not fp32, bf16 or fp16");
    } else if (line.is("--ranks")) {
      try {
        o.ranks = relora_bench::parse_rank_counts(line.value());
      } catch (const std::invalid_argument& e) {
        line.refuse(e.what());
      }
    } else if (line.is("--json")) o.json = line.value();
    else line.refuse_unknown();
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// Statistics over the per-step times of the batches

struct Stats {
  double median = 0, min = 0, max = 0, q1 = 0, q3 = 0;
  int batches = 0;
  int steps_per_batch = 0;
};

double quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double pos = q * double(sorted.size() - 1);
  const std::size_t lo = std::size_t(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (pos - double(lo)) * (sorted[hi] - sorted[lo]);
}

Stats summarize(std::vector<double> ms, int per_batch) {
  std::sort(ms.begin(), ms.end());
  Stats s;
  s.median = quantile(ms, 0.5);
  s.q1 = quantile(ms, 0.25);
  s.q3 = quantile(ms, 0.75);
  s.min = ms.front();
  s.max = ms.back();
  s.batches = int(ms.size());
  s.steps_per_batch = per_batch;
  return s;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Warm-up, then batches of K calls of `work`, one synchronize after each batch.
Stats time_batches(const std::function<void()>& work, relora::Backend<T>& backend, const Options& o) {
  for (int i = 0; i < o.warmup; ++i) work();
  backend.synchronize();
  // One more call, timed alone, to choose K and the number of batches.
  auto t0 = Clock::now();
  work();
  backend.synchronize();
  const double one = std::max(seconds_since(t0), 1e-7);
  int K = o.batch > 0 ? o.batch : int(std::clamp(o.batch_ms * 1e-3 / one, 1.0, 2000.0));
  int repeats = o.repeats;
  const double budget_batches = o.max_seconds / (one * K);
  if (budget_batches < repeats) repeats = std::max(3, int(budget_batches));
  std::vector<double> ms;
  ms.reserve(std::size_t(repeats));
  for (int rep = 0; rep < repeats; ++rep) {
    t0 = Clock::now();
    for (int i = 0; i < K; ++i) work();
    backend.synchronize();
    ms.push_back(seconds_since(t0) * 1e3 / K);
  }
  return summarize(std::move(ms), K);
}

// ---------------------------------------------------------------------------------------------
// A backend that forwards every operation and counts the bytes of live tensors (peak too).
// Tensor's deleter is a plain function pointer, so the inner tensors live in a registry keyed by
// their data pointer; the outer tensor's deleter drops the registry entry.

struct Registry {
  std::unordered_map<const void*, std::pair<relora::Tensor<T>, std::size_t>> inner;
  std::size_t live = 0;
  std::size_t peak = 0;
  static Registry& get() {
    static Registry r;
    return r;
  }
};

void release_counted(T* p) {
  Registry& reg = Registry::get();
  auto it = reg.inner.find(p);
  if (it == reg.inner.end()) return;
  reg.live -= it->second.second;
  reg.inner.erase(it);  // the inner tensor's own deleter frees the memory
}

class CountingBackend final : public relora::Backend<T> {
 public:
  explicit CountingBackend(std::shared_ptr<relora::Backend<T>> inner) : in_(std::move(inner)) {}
  relora::Device device() const override { return in_->device(); }
  relora::Backend<T>& underlying() override { return in_->underlying(); }
  std::string description() const override { return in_->description(); }
  void set_math_mode(relora::MathMode mode) override { in_->set_math_mode(mode); }
  relora::MathMode math_mode() const override { return in_->math_mode(); }
  relora::Tensor<T> allocate(Index rows, Index cols) override {
    relora::Tensor<T> t = in_->allocate(rows, cols);
    T* data = t.data();
    const std::size_t bytes = std::size_t(std::max<Index>(rows * cols, 1)) * sizeof(T);
    Registry& reg = Registry::get();
    reg.live += bytes;
    reg.peak = std::max(reg.peak, reg.live);
    reg.inner.emplace(data, std::make_pair(std::move(t), bytes));
    return relora::Tensor<T>(data, rows, cols, in_->device(), &release_counted);
  }
  void upload(const T* host, relora::Tensor<T>& dst) override { in_->upload(host, dst); }
  void download(const relora::Tensor<T>& src, T* host) override { in_->download(src, host); }
  void copy(const relora::Tensor<T>& src, relora::Tensor<T>& dst) override { in_->copy(src, dst); }
  void fill(relora::Tensor<T>& x, T value) override { in_->fill(x, value); }
  void synchronize() override { in_->synchronize(); }
  void set_host_wait_check(const void* owner, std::function<void()> check) override {
    in_->set_host_wait_check(owner, std::move(check));
  }
  void gemm(relora::Trans ta, relora::Trans tb, T alpha, const relora::Tensor<T>& A, const relora::Tensor<T>& B,
            T beta, relora::Tensor<T>& C) override {
    in_->gemm(ta, tb, alpha, A, B, beta, C);
  }
  void gemm_bias_activation(relora::Trans ta, relora::Trans tb, T alpha, const relora::Tensor<T>& A,
                            const relora::Tensor<T>& B, T beta, const relora::Tensor<T>* b, relora::Activation f,
                            relora::Tensor<T>& C) override {
    in_->gemm_bias_activation(ta, tb, alpha, A, B, beta, b, f, C);
  }
  void add_row_vector(const relora::Tensor<T>& b, relora::Tensor<T>& Y) override { in_->add_row_vector(b, Y); }
  void column_sums(const relora::Tensor<T>& dY, T beta, relora::Tensor<T>& db) override {
    in_->column_sums(dY, beta, db);
  }
  void multiply(const relora::Tensor<T>& a, const relora::Tensor<T>& b, relora::Tensor<T>& out) override {
    in_->multiply(a, b, out);
  }
  void activation_forward(relora::Activation f, const relora::Tensor<T>& Y, relora::Tensor<T>& Z) override {
    in_->activation_forward(f, Y, Z);
  }
  void activation_backward(relora::Activation f, const relora::Tensor<T>& Y, const relora::Tensor<T>& dZ,
                           relora::Tensor<T>& dY) override {
    in_->activation_backward(f, Y, dZ, dY);
  }
  T max_abs(const relora::Tensor<T>& x) override { return in_->max_abs(x); }
  void mse(const relora::Tensor<T>& Y, const relora::Tensor<T>& target, relora::Tensor<T>& dY,
           relora::Tensor<T>& loss) override {
    in_->mse(Y, target, dY, loss);
  }
  void random_uniform(relora::RngKey key, T low, T high, relora::Tensor<T>& x) override {
    in_->random_uniform(key, low, high, x);
  }
  void random_normal(relora::RngKey key, T mean, T stddev, relora::Tensor<T>& x) override {
    in_->random_normal(key, mean, stddev, x);
  }
  void dropout_mask(relora::RngKey key, T p, relora::Tensor<T>& mask) override { in_->dropout_mask(key, p, mask); }

 private:
  std::shared_ptr<relora::Backend<T>> in_;
};

// ---------------------------------------------------------------------------------------------
// The model of a case, its batch and its trainer

struct Setup {
  std::unique_ptr<relora::Model<T>> model;
  std::unique_ptr<relora::Trainer<T>> trainer;
  relora::Tensor<T> X, target;
};

Setup build(const CaseSpec& c, const std::shared_ptr<relora::Backend<T>>& backend, bool fused, bool dora,
            relora::BasePrecision precision, relora::BasePrecision activations) {
  Setup s;
  s.model = std::make_unique<relora::Model<T>>(
      backend, fused ? relora::LayerChoice::fastest : relora::LayerChoice::reference);
  relora_bench::add_case_layers(*s.model, c, precision, dora);
  s.model->set_activation_format(activations);
  std::srand(1);
  const relora::HostMatrix<T> X = relora::HostMatrix<T>::Random(c.n, c.dims.front());
  const relora::HostMatrix<T> Y = relora::HostMatrix<T>::Random(c.n, c.dims.back());
  s.X = relora::to_backend<T>(*backend, X, "bench X");
  s.target = relora::to_backend<T>(*backend, Y, "bench target");
  relora::TrainerConfig tc;
  tc.method = relora::TrainingMethod::lora;
  tc.adam.lr = 1e-3;  // as peft_anchor.py
  s.trainer = std::make_unique<relora::Trainer<T>>(*s.model, tc);
  return s;
}

// ---------------------------------------------------------------------------------------------
// The step's products, for the flop count and the floor

struct Product {
  relora::Trans ta, tb;
  T alpha, beta;
  int a, b, c;  // indices into the floor's tensors
  double flops;
  bool large;
};

struct FloorSet {
  std::vector<relora::Tensor<T>> tensors;
  std::vector<Product> products;
  double large_flops = 0, lora_flops = 0;
};

// Same shapes as LoraLinear::forward/backward (no dropout): see lib/layers/lora_linear.cpp.
FloorSet make_floor(const CaseSpec& c, relora::Backend<T>* backend) {
  FloorSet f;
  using relora::Trans;
  const std::size_t L = c.dims.size() - 1;
  const Index n = c.n, r = c.r;
  std::uint64_t stream = 0;
  auto tensor = [&](Index rows, Index cols) {
    if (backend) {
      f.tensors.push_back(backend->allocate(rows, cols));
      // Never time on zeros: random values in [-1, 1].
      backend->random_uniform(relora::RngKey{7, stream++}, T(-1), T(1), f.tensors.back());
    } else {
      f.tensors.emplace_back();
    }
    return int(f.tensors.size() - 1);
  };
  const T s = T(2);
  for (std::size_t i = 0; i < L; ++i) {
    const Index k = c.dims[i], d = c.dims[i + 1];
    const int X = tensor(n, k), W = tensor(d, k), A = tensor(r, k), B = tensor(d, r), Y = tensor(n, d),
              U = tensor(n, r), dY = tensor(n, d), dU = tensor(n, r), dA = tensor(r, k), dB = tensor(d, r);
    auto add = [&](Trans ta, Trans tb, T alpha, int a, int b, T beta, int cc, Index m, Index nn, Index kk,
                   bool large) {
      const double flops = 2.0 * double(m) * double(nn) * double(kk);
      f.products.push_back({ta, tb, alpha, beta, a, b, cc, flops, large});
      (large ? f.large_flops : f.lora_flops) += flops;
    };
    add(Trans::no, Trans::yes, 1, X, W, 0, Y, n, d, k, true);    // Y = X W^T
    add(Trans::no, Trans::yes, 1, X, A, 0, U, n, r, k, false);   // U = X A^T
    add(Trans::no, Trans::yes, s, U, B, 1, Y, n, d, r, false);   // Y += s U B^T
    add(Trans::yes, Trans::no, s, dY, U, 0, dB, d, r, n, false);  // dB = s dY^T U
    add(Trans::no, Trans::no, s, dY, B, 0, dU, n, r, d, false);   // dU = s dY B
    add(Trans::yes, Trans::no, 1, dU, X, 0, dA, r, k, n, false);  // dA = dU^T X
    if (i > 0) {
      const int dX = tensor(n, k);
      add(Trans::no, Trans::no, 1, dY, W, 0, dX, n, k, d, true);   // dX = dY W
      add(Trans::no, Trans::no, 1, dU, A, 1, dX, n, k, r, false);  // dX += dU A
    }
  }
  return f;
}

void run_products(relora::Backend<T>& backend, FloorSet& f, bool large_only) {
  for (const Product& p : f.products) {
    if (large_only && !p.large) continue;
    backend.gemm(p.ta, p.tb, p.alpha, f.tensors[p.a], f.tensors[p.b], p.beta, f.tensors[p.c]);
  }
}

// ---------------------------------------------------------------------------------------------

struct CaseResult {
  CaseSpec spec;
  Stats step, floor, floor_all;
  double large_flops = 0, lora_flops = 0;
  double tensor_bytes_peak = -1;  // counted through the backend
  double tensor_bytes_steady = -1;
  double rss_delta_bytes = -1;    // CPU only
  double loss_first = NAN, loss_last = NAN;
  bool skipped = false;
  std::string why;
};

double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) * 1024.0;  // kilobytes on Linux
}

double necessary_flops(const CaseSpec& c) {
  FloorSet f = make_floor(c, nullptr);
  return f.large_flops + f.lora_flops;
}

CaseResult run_case(const CaseSpec& c, const Options& o, const std::shared_ptr<relora::Backend<T>>& backend) {
  CaseResult res;
  res.spec = c;
  const double rss0 = peak_rss_bytes();
  {
    Setup s = build(c, backend, o.fused, o.dora, o.precision, o.activations);
    s.trainer->step(s.X, s.target);
    res.loss_first = s.trainer->loss();
    res.step = time_batches([&] { s.trainer->step(s.X, s.target); }, *backend, o);
    res.loss_last = s.trainer->loss();
  }
  if (backend->device() == relora::Device::cpu) res.rss_delta_bytes = std::max(0.0, peak_rss_bytes() - rss0);
  {
    FloorSet f = make_floor(c, backend.get());
    res.large_flops = f.large_flops;
    res.lora_flops = f.lora_flops;
    if (o.floor) {
      backend->synchronize();
      if (o.precision == relora::BasePrecision::fp32) {
        res.floor = time_batches([&] { run_products(*backend, f, true); }, *backend, o);
        res.floor_all = time_batches([&] { run_products(*backend, f, false); }, *backend, o);
      } else {  // the large products on 16-bit W (half_floor.hpp), the LoRA products in fp32 as the step runs them
        relora_bench::HalfFloor h = relora_bench::make_half_floor(c.n, c.dims, *backend, o.precision);
        const auto lora_products = [&] {
          for (const Product& p : f.products) {
            if (!p.large) backend->gemm(p.ta, p.tb, p.alpha, f.tensors[p.a], f.tensors[p.b], p.beta, f.tensors[p.c]);
          }
        };
        res.floor = time_batches([&] { relora_bench::run_half_floor(h); }, *backend, o);
        res.floor_all = time_batches([&] { relora_bench::run_half_floor(h); lora_products(); }, *backend, o);
      }
    }
  }
  if (o.memory) {
    Registry& reg = Registry::get();
    reg.live = reg.peak = 0;
    auto counting = std::make_shared<CountingBackend>(backend);
    {
      Setup s = build(c, counting, o.fused, o.dora, o.precision, o.activations);
      s.trainer->step(s.X, s.target);
      s.trainer->step(s.X, s.target);
      counting->synchronize();
      res.tensor_bytes_steady = double(reg.live);
      res.tensor_bytes_peak = double(reg.peak);
    }
  }
  return res;
}

// ---------------------------------------------------------------------------------------------
// The CPU's FMA peak, measured: independent fused multiply-adds in registers on every thread.

double measure_fma_peak_gflops() {
#if defined(__FMA__) && defined(__AVX2__)
  const long iters = 20'000'000;
  double best = 0;
  for (int trial = 0; trial < 3; ++trial) {
    const auto t0 = Clock::now();
    int threads = 1;
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
#if defined(_OPENMP)
#pragma omp single
      threads = omp_get_num_threads();
#endif
      __m256 acc[10];
      for (int j = 0; j < 10; ++j) acc[j] = _mm256_set1_ps(float(j) * 1e-3f);
      const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
      for (long i = 0; i < iters; ++i) {
        for (int j = 0; j < 10; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
      }
      __m256 total = acc[0];
      for (int j = 1; j < 10; ++j) total = _mm256_add_ps(total, acc[j]);
      float out[8];
      _mm256_storeu_ps(out, total);
      sink += out[0];
    }
    const double s = seconds_since(t0);
    if (sink == 12345.f) std::puts("");  // keeps the loop alive
    best = std::max(best, double(threads) * double(iters) * 10 * 8 * 2 / s / 1e9);
  }
  return best;
#else
  return -1;
#endif
}

// ---------------------------------------------------------------------------------------------
// Output

std::string layers_text(const CaseSpec& c) {
  const std::size_t L = c.dims.size() - 1;
  bool same = true;
  for (std::size_t i = 0; i + 1 < c.dims.size(); ++i) same = same && c.dims[i] == c.dims[i + 1];
  if (L == 1 || !same) {
    std::string s;
    for (std::size_t i = 0; i < c.dims.size(); ++i) s += (i ? "->" : "") + std::to_string(c.dims[i]);
    return s;
  }
  return std::to_string(L) + "x" + std::to_string(c.dims[0]);
}

std::string json_stats(const Stats& s) {
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "{\"median_ms\": %.6g, \"min_ms\": %.6g, \"max_ms\": %.6g, \"q1_ms\": %.6g, \"q3_ms\": %.6g, "
                "\"batches\": %d, \"steps_per_batch\": %d}",
                s.median, s.min, s.max, s.q1, s.q3, s.batches, s.steps_per_batch);
  return buf;
}

void print_header() {
  std::printf("%-22s %6s %-16s %4s | %10s %10s %8s | %9s %10s %10s %7s %8s | %10s\n", "case", "n", "layers", "r",
              "ms/step", "min-max", "IQR", "TFLOP/s", "floor ms", "floor+lora", "step/fl", "step/all", "peak MiB");
}

void print_row(const CaseResult& r) {
  const CaseSpec& c = r.spec;
  if (r.skipped) {
    std::printf("%-22s %6lld %-16s %4lld | skipped: %s\n", c.name.c_str(), (long long)c.n, layers_text(c).c_str(),
                (long long)c.r, r.why.c_str());
    return;
  }
  char range[48], iqr[24], floor[24], floor_all[24], ratio[16], ratio_all[16], mem[24];
  std::snprintf(range, sizeof range, "%.4g-%.4g", r.step.min, r.step.max);
  std::snprintf(iqr, sizeof iqr, "%.3g", r.step.q3 - r.step.q1);
  std::snprintf(floor, sizeof floor, "%.4g", r.floor.median);
  std::snprintf(floor_all, sizeof floor_all, "%.4g", r.floor_all.median);
  std::snprintf(ratio, sizeof ratio, "%.3f", r.floor.median > 0 ? r.step.median / r.floor.median : NAN);
  std::snprintf(ratio_all, sizeof ratio_all, "%.3f",
                r.floor_all.median > 0 ? r.step.median / r.floor_all.median : NAN);
  std::snprintf(mem, sizeof mem, "%.1f", r.tensor_bytes_peak / 1048576.0);
  const double tflops = (r.large_flops + r.lora_flops) / (r.step.median * 1e-3) / 1e12;
  std::printf("%-22s %6lld %-16s %4lld | %10.4g %10s %8s | %9.4g %10s %10s %7s %8s | %10s\n", c.name.c_str(),
              (long long)c.n, layers_text(c).c_str(), (long long)c.r, r.step.median, range, iqr, tflops, floor,
              floor_all, ratio, ratio_all, mem);
}

std::string json_case(const CaseResult& r, const std::string& backend, const std::string& math) {
  const CaseSpec& c = r.spec;
  std::string dims;
  for (std::size_t i = 0; i < c.dims.size(); ++i) dims += (i ? ", " : "") + std::to_string(c.dims[i]);
  std::string j = "{\"case\": " + json_string(c.name) + ", \"backend\": " + json_string(backend) +
                  ", \"math\": " + json_string(math) + ", \"n\": " + std::to_string(c.n) + ", \"dims\": [" + dims +
                  "], \"r\": " + std::to_string(c.r);
  if (r.skipped) return j + ", \"skipped\": " + json_string(r.why) + "}";
  const double flops = r.large_flops + r.lora_flops;
  j += ", \"step_ms\": " + json_number(r.step.median) + ", \"step\": " + json_stats(r.step);
  j += ", \"large_gemm_flops\": " + json_number(r.large_flops) + ", \"lora_gemm_flops\": " + json_number(r.lora_flops);
  j += ", \"achieved_tflops\": " + json_number(flops / (r.step.median * 1e-3) / 1e12);
  if (r.floor.batches > 0) {
    j += ", \"floor_ms\": " + json_number(r.floor.median) + ", \"floor\": " + json_stats(r.floor);
    j += ", \"floor_all_ms\": " + json_number(r.floor_all.median) + ", \"floor_all\": " + json_stats(r.floor_all);
    j += ", \"step_over_floor\": " + json_number(r.step.median / r.floor.median);
    j += ", \"step_over_floor_all\": " + json_number(r.step.median / r.floor_all.median);
    j += ", \"floor_tflops\": " + json_number(r.large_flops / (r.floor.median * 1e-3) / 1e12);
  }
  j += ", \"tensor_bytes_peak\": " + json_number(r.tensor_bytes_peak);
  j += ", \"tensor_bytes_steady\": " + json_number(r.tensor_bytes_steady);
  if (r.rss_delta_bytes >= 0) j += ", \"peak_rss_delta_bytes\": " + json_number(r.rss_delta_bytes);
  j += ", \"loss_first\": " + json_number(r.loss_first) + ", \"loss_last\": " + json_number(r.loss_last);
  return j + "}";
}

std::vector<CaseSpec> scaling_cases(relora::Device device) {
  // Two layers w -> w -> w (so dX appears once), varying one of n, w, r around a base.
  const bool gpu = device == relora::Device::cuda;
  const Index n0 = gpu ? 4096 : 1024, w0 = gpu ? 4096 : 512, r0 = 16;
  const std::vector<Index> ns = gpu ? std::vector<Index>{256, 1024, 4096, 16384} : std::vector<Index>{128, 512, 1024, 2048};
  const std::vector<Index> ws = gpu ? std::vector<Index>{256, 1024, 2048, 4096, 8192} : std::vector<Index>{128, 256, 512, 1024};
  const std::vector<Index> rs = {4, 16, 64, 256};
  std::vector<CaseSpec> out;
  auto name = [](Index n, Index w, Index r) {
    return "n" + std::to_string(n) + "_w" + std::to_string(w) + "_r" + std::to_string(r);
  };
  for (Index n : ns) out.push_back({"scale_" + name(n, w0, r0), n, {w0, w0, w0}, r0});
  for (Index w : ws) {
    if (w != w0) out.push_back({"scale_" + name(n0, w, r0), n0, {w, w, w}, r0});
  }
  for (Index r : rs) {
    if (r != r0) out.push_back({"scale_" + name(n0, w0, r), n0, {w0, w0, w0}, r});
  }
  return out;
}

// --thread-sweep: three layers of width w (w -> w -> w -> w, rank w / 4 up to 16) at batch sizes n,
// from the seed demo's size to mlp4x2k's, so that every size between the fused tiny step and the
// large products shows how the default thread count does against one thread and every core.
std::vector<CaseSpec> thread_sweep_cases() {
  std::vector<CaseSpec> out = {anchor_cases()[0]};
  for (Index w : {16, 32, 64, 128, 256, 512, 1024, 2048}) {
    for (Index n : {64, 256, 1024, 4096}) {
      if (w == 2048 && n == 4096) continue;  // mlp4x2k (below) is the largest
      out.push_back({"sweep_n" + std::to_string(n) + "_w" + std::to_string(w), n, {w, w, w, w},
                     std::min<Index>(16, w / 4)});
    }
  }
  out.push_back(anchor_cases()[3]);  // mlp4x2k
  return out;
}

// Sets OpenMP's and Eigen's thread counts; 0 gives back the process's default.
void set_threads(int threads, int default_threads) {
#if defined(_OPENMP)
  omp_set_num_threads(threads > 0 ? threads : default_threads);
#else
  (void)default_threads;
#endif
  Eigen::setNbThreads(threads);  // 0: follow OpenMP
}

// The sweep's table (and JSON rows): each size at 1 thread, the default and every core, in two
// passes of opposite order (1, default, all; all, default, 1), each setting's figure the lower of
// its two medians: a hiccup of a shared machine's cores during one pass then does not decide a row.
std::string run_thread_sweep(const Options& o, const std::shared_ptr<relora::Backend<T>>& backend, int default_threads) {
#if defined(_OPENMP)
  const int all_cores = omp_get_num_procs();
#else
  const int all_cores = 1;
#endif
  std::printf("thread sweep: 1 thread, default %d, all cores %d\n", default_threads, all_cores);
  std::printf("%-22s %6s %-16s %4s | %10s %10s %10s | %12s\n", "case", "n", "layers", "r", "1 thr ms",
              "default ms", "all ms", "default/best");
  Options quick = o;
  quick.memory = false;
  quick.floor = false;
  std::string json;
  for (const CaseSpec& c : thread_sweep_cases()) {
    const int settings[3] = {1, 0, all_cores};
    double ms[3] = {0, 0, 0};
    for (int pass = 0; pass < 2; ++pass) {
      for (int j = 0; j < 3; ++j) {
        const int i = pass == 0 ? j : 2 - j;
        set_threads(settings[i], default_threads);
        const double median = run_case(c, quick, backend).step.median;
        ms[i] = pass == 0 ? median : std::min(ms[i], median);
      }
    }
    set_threads(0, default_threads);
    const double best = std::min(ms[0], ms[2]);
    std::printf("%-22s %6lld %-16s %4lld | %10.4g %10.4g %10.4g | %12.3f%s\n", c.name.c_str(), (long long)c.n,
                layers_text(c).c_str(), (long long)c.r, ms[0], ms[1], ms[2], ms[1] / best,
                ms[1] > 1.1 * best ? "  OVER" : "");
    std::fflush(stdout);
    json += std::string(json.empty() ? "" : ",\n") + "  {\"case\": " + json_string(c.name) +
            ", \"n\": " + std::to_string(c.n) + ", \"width\": " + std::to_string(c.dims[0]) +
            ", \"layers\": " + std::to_string(c.dims.size() - 1) + ", \"r\": " + std::to_string(c.r) +
            ", \"one_thread_ms\": " + json_number(ms[0]) + ", \"default_ms\": " + json_number(ms[1]) +
            ", \"all_cores_ms\": " + json_number(ms[2]) + ", \"default_over_best\": " + json_number(ms[1] / best) +
            "}";
  }
  return "{\n \"tool\": \"relora_bench --thread-sweep\", \"date\": " + json_string(now_utc()) +
         ", \"default_threads\": " + std::to_string(default_threads) + ", \"all_cores\": " +
         std::to_string(all_cores) + ",\n \"results\": [\n" + json + "\n ]\n}\n";
}

// --ranks: data-parallel weak scaling (data_parallel_cases.cpp) of the cases named, with this run's
// options.
int run_data_parallel(const Options& o) {
  if (o.scaling || o.thread_sweep) {
    usage("--ranks times the anchor and --custom cases: not with --scaling or --thread-sweep");
  }
  relora_bench::DataParallelOptions d;
  d.device = o.device;
  d.math = o.math;
  d.precision = o.precision;
  d.fused = o.fused;
  d.dora = o.dora;
  d.ranks = o.ranks;
  d.repeats = o.repeats;
  d.warmup = o.warmup;
  d.batch = o.batch;
  d.batch_ms = o.batch_ms;
  d.max_seconds = o.max_seconds;
  d.threads = o.threads;
  d.json = o.json;
  std::vector<std::string> names = o.cases;
  if (!o.cases_given && o.custom.empty()) {
    names = o.device == relora::Device::cuda ? std::vector<std::string>{"mlp4x4k", "llm_mlp"}
                                             : std::vector<std::string>{"seed_demo"};
  }
  for (const std::string& name : names) d.cases.push_back(*relora_bench::find_anchor_case(name));
  d.cases.insert(d.cases.end(), o.custom.begin(), o.custom.end());
  return relora_bench::run_data_parallel_cases(d);
}

}  // namespace

int main(int argc, char** argv) {
  if (relora_bench::galore_requested(argc, argv)) return relora_bench::run_galore_cases(argc, argv);
  Options o = parse(argc, argv);
  try {
    if (!o.ranks.empty()) return run_data_parallel(o);
#if defined(_OPENMP)
    if (o.threads > 0) omp_set_num_threads(o.threads);
    const int threads = omp_get_max_threads();
#else
    const int threads = 1;
#endif
    if (o.threads > 0) Eigen::setNbThreads(o.threads);

    relora::BackendOptions bo;
    bo.math = o.math;
    std::shared_ptr<relora::Backend<T>> backend = relora::make_backend<T>(o.device, bo);
    const std::string backend_name = relora::device_name(o.device);
    const std::string math_name = o.math == relora::MathMode::tf32 ? "tf32" : "strict";
    const bool cpu = o.device == relora::Device::cpu;

    char host[256] = "";
    gethostname(host, sizeof host - 1);
    const double fma_peak = cpu ? measure_fma_peak_gflops() : -1;
    std::printf("relora_bench  %s  backend %s, math %s, layer %s, base %s, activations %s, fast layers %s  (%s)\n",
                now_utc().c_str(), backend_name.c_str(), math_name.c_str(), o.dora ? "dora" : "lora",
                relora::precision_name(o.precision), relora::precision_name(o.activations), o.fused ? "on" : "off",
                backend->description().c_str());
    if (cpu) {
      std::printf("cpu: %d OpenMP threads, Eigen %d threads, measured FMA peak %.1f GFLOP/s\n", threads,
                  Eigen::nbThreads(), fma_peak);
    }

    if (o.thread_sweep) {
      if (!cpu) usage("--thread-sweep measures the CPU backend: use it with --backend cpu");
      const std::string j = run_thread_sweep(o, backend, threads);
      if (!o.json.empty()) write_file(o.json, j);
      return 0;
    }

    std::vector<CaseSpec> cases;
    if (o.scaling) {
      cases = scaling_cases(o.device);
    } else if (!o.custom.empty() && !o.cases_given) {
      cases = o.custom;
    } else {
      std::vector<std::string> names = o.cases;
      if (names.empty()) {
        for (const CaseSpec& c : anchor_cases()) names.push_back(c.name);
      }
      for (const std::string& name : names) {
        for (const CaseSpec& c : anchor_cases()) {
          if (c.name == name) cases.push_back(c);
        }
      }
      cases.insert(cases.end(), o.custom.begin(), o.custom.end());
    }

    print_header();
    std::vector<CaseResult> results;
    for (const CaseSpec& c : cases) {
      // On the CPU, the default list leaves out steps that would take more than a few seconds.
      if (cpu && !o.cases_given && !o.scaling && fma_peak > 0) {
        const double estimate = necessary_flops(c) / (0.6 * fma_peak * 1e9);
        if (estimate > o.cpu_skip_seconds) {
          CaseResult r;
          r.spec = c;
          r.skipped = true;
          char why[96];
          std::snprintf(why, sizeof why, "estimated %.1f s/step (name it in --cases to run it)", estimate);
          r.why = why;
          print_row(r);
          results.push_back(std::move(r));
          continue;
        }
      }
      results.push_back(run_case(c, o, backend));
      print_row(results.back());
      std::fflush(stdout);
    }

    if (!o.json.empty()) {
      std::string j = "{\n \"tool\": \"relora_bench\", \"date\": " + json_string(now_utc()) +
                      ", \"host\": " + json_string(host) + ",\n \"backend\": " + json_string(backend_name) +
                      ", \"math\": " + json_string(math_name) +
                      ", \"precision\": " + json_string(relora::precision_name(o.precision)) +
                      ", \"activations\": " + json_string(relora::precision_name(o.activations)) +
                      ", \"device\": " + json_string(backend->description()) +
                      ",\n \"threads\": " + std::to_string(threads) + ", \"fma_peak_gflops\": " + json_number(fma_peak) +
                      ", \"scaling\": " + (o.scaling ? "true" : "false") +
                      ", \"fast_layers\": " + (o.fused ? "true" : "false") +
                      ", \"layer\": " + (o.dora ? "\"dora\"" : "\"lora\"") +
                      ",\n \"alpha_over_r\": 2, \"dropout\": 0, \"bias\": \"frozen\", \"adam_lr\": 0.001,\n \"results\": [\n";
      for (std::size_t i = 0; i < results.size(); ++i) {
        j += "  " + json_case(results[i], backend_name, math_name) + (i + 1 < results.size() ? ",\n" : "\n");
      }
      j += " ]\n}\n";
      write_file(o.json, j);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "relora_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
