// Adam's CUDA kernels against its CPU loop: the same optimizer over the same parameters, state and
// gradients on both backends. Both compute one rounding rule (lib/optimizers/adam_rule.hpp), the
// bias corrections included, so float and double results agree bit for bit. The NaN guard refuses a whole step on the device and
// synchronize() names the parameter; pruning zeroes the same entries on both. Randomised cases
// print their seed on failure; RELORA_TEST_SEED=<seed> replays one.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "relora/relora.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::what_of;

namespace {

template <typename T>
std::vector<T> random_values(std::size_t n, std::mt19937_64& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<T> values(n);
  for (auto& v : values) v = T(normal(rng));
  return values;
}

template <typename T>
std::vector<T> fetch(Backend<T>& backend, const Tensor<T>& t) {
  std::vector<T> host(std::size_t(t.size()));
  backend.download(t, host.data());
  return host;
}

// max_i |a_i - b_i| / max(|b_i|, tiny): element-wise, so a near-zero moment is not hidden in a norm.
template <typename T>
double max_rel_error(const T* a, const T* b, std::size_t n) {
  double worst = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::abs(double(a[i]) - double(b[i]));
    const double scale = std::max(std::abs(double(b[i])), 1e-300);
    const double e = d == 0 ? 0 : d / scale;
    if (!(e <= worst)) worst = e;  // NaN sticks
  }
  return worst;
}

// One optimizer over the same parameters (values and gradients) on one backend.
template <typename T>
struct Side {
  std::shared_ptr<Backend<T>> backend;
  std::vector<Tensor<T>> values, grads;
  std::unique_ptr<Adam<T>> adam;
};

// The same parameters, groups and Adam on the CPU and the GPU. Parameter s has its own group
// (lr, weight decay) and starts from the state `state` gives both sides.
template <typename T>
struct AdamTwin {
  Side<T> cpu, gpu;
  std::vector<std::string> names;

  AdamTwin(const std::vector<Index>& sizes, std::mt19937_64& rng, const AdamConfig& config) {
    cpu.backend = make_backend<T>(Device::cpu);
    gpu.backend = make_backend<T>(Device::cuda);
    std::uniform_real_distribution<double> uniform(0.0, 1.0);
    for (std::size_t s = 0; s < sizes.size(); ++s) {
      names.push_back("layer" + std::to_string(s / 2) + (s % 2 ? ".lora_B" : ".lora_A"));
      const auto p = random_values<T>(std::size_t(sizes[s]), rng);
      for (Side<T>* side : {&cpu, &gpu}) {
        side->values.push_back(side->backend->allocate(1, sizes[s]));
        side->grads.push_back(side->backend->allocate(1, sizes[s]));
        side->backend->upload(p.data(), side->values.back());
      }
    }
    std::vector<double> lr, wd;
    for (std::size_t s = 0; s < sizes.size(); ++s) {
      lr.push_back(1e-3 * (1 + uniform(rng)));
      wd.push_back(s % 2 ? 0.01 : 0.0);
    }
    for (Side<T>* side : {&cpu, &gpu}) {
      std::vector<ParamGroup<T>> groups;
      for (std::size_t s = 0; s < sizes.size(); ++s) {
        groups.push_back(ParamGroup<T>{names[s], {Parameter<T>{names[s], s % 2 ? ParamRole::lora_B : ParamRole::lora_A,
                                                               &side->values[s], &side->grads[s]}},
                                       lr[s], wd[s]});
      }
      side->adam = std::make_unique<Adam<T>>(side->backend, std::move(groups), config);
    }
    // Moments drawn at random, counts differing by parameter (one reset at a restart, say).
    StateDict<T> state;
    for (std::size_t s = 0; s < sizes.size(); ++s) {
      const Index n = sizes[s];
      auto m = random_values<T>(std::size_t(n), rng, 0.1);
      auto v = random_values<T>(std::size_t(n), rng, 0.01);
      for (auto& e : v) e = e * e;
      state.set_tensor(names[s] + ".m", Eigen::Map<HostMatrix<T>>(m.data(), 1, n));
      state.set_tensor(names[s] + ".v", Eigen::Map<HostMatrix<T>>(v.data(), 1, n));
      HostMatrix<T> count(1, 1);
      count(0, 0) = T(s % 3 == 0 ? 0 : 5 * s);
      state.set_tensor(names[s] + ".step", count);
    }
    state.set("steps_taken", std::int64_t(1000));
    state.set("prune_draws", std::uint64_t(0));
    cpu.adam->restore_state(state);
    gpu.adam->restore_state(state);
  }

  void new_gradients(std::mt19937_64& rng) {
    for (std::size_t s = 0; s < names.size(); ++s) {
      const auto g = random_values<T>(std::size_t(cpu.grads[s].size()), rng);
      cpu.backend->upload(g.data(), cpu.grads[s]);
      gpu.backend->upload(g.data(), gpu.grads[s]);
    }
  }
  void step(double lr_factor) {
    cpu.adam->step(lr_factor);
    gpu.adam->step(lr_factor);
  }

  // Values, moments and counts of both sides: element-wise relative errors within `limit`, counts equal.
  double compare(double limit) {
    gpu.backend->synchronize();
    StateDict<T> cpu_state, gpu_state;
    cpu.adam->save_state(cpu_state);
    gpu.adam->save_state(gpu_state);
    double worst = 0;
    for (std::size_t s = 0; s < names.size(); ++s) {
      const auto a = fetch(*gpu.backend, gpu.values[s]), b = fetch(*cpu.backend, cpu.values[s]);
      const double e = max_rel_error(a.data(), b.data(), a.size());
      INFO(names[s] << " value: max rel error " << e);
      CHECK(e <= limit);
      worst = std::max(worst, e);
      for (const char* what : {".m", ".v"}) {
        const auto& g = gpu_state.tensors().at(names[s] + what);
        const auto& c = cpu_state.tensors().at(names[s] + what);
        const double em = max_rel_error(g.data(), c.data(), std::size_t(c.size()));
        INFO(names[s] << what << ": max rel error " << em);
        CHECK(em <= limit);
        worst = std::max(worst, em);
      }
      CHECK(gpu_state.tensors().at(names[s] + ".step") == cpu_state.tensors().at(names[s] + ".step"));
    }
    return worst;
  }
};

// Every value, moment and count of the GPU side, bit for bit.
template <typename T>
std::vector<std::vector<T>> snapshot(Side<T>& side) {
  std::vector<std::vector<T>> all;
  for (const Tensor<T>& v : side.values) all.push_back(fetch(*side.backend, v));
  StateDict<T> state;
  side.adam->save_state(state);
  for (const auto& entry : state.tensors()) all.emplace_back(entry.second.data(), entry.second.data() + entry.second.size());
  return all;
}

template <typename T>
void set_entry(Backend<T>& backend, Tensor<T>& t, Index i, T value) {
  auto host = fetch(backend, t);
  host[std::size_t(i)] = value;
  backend.upload(host.data(), t);
}

}  // namespace

TEST_CASE_TEMPLATE("cuda adam: many parameters at different counts equal the CPU's after 3 steps", T, float, double) {
  if (!testing::cuda_or_skip("CUDA Adam test")) return;
  const auto seed = testing::test_seed();
  INFO("seed " << seed << " (RELORA_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  double worst = 0;
  for (const bool decoupled : {true, false}) {
    INFO("decoupled weight decay " << decoupled);
    // Sizes around the 1024-element chunk and the one-block path's 4096, an empty parameter, more
    // than one launch's 48 slots, and a tiny step (one block).
    for (const auto& sizes : {std::vector<Index>{1, 7, 1000, 4096, 4097, 70001, 0, 333}, std::vector<Index>(61, 129),
                              std::vector<Index>{1, 3, 40, 1}}) {
      AdamTwin<T> twin(sizes, rng, AdamConfig{.decoupled_weight_decay = decoupled});
      for (int step = 0; step < 3; ++step) {
        twin.new_gradients(rng);
        twin.step(1.0 / (1 + step));
      }
      worst = std::max(worst, twin.compare(0.0));
    }
  }
  MESSAGE("adam " << std::string(sizeof(T) == 4 ? "float" : "double") << ": max element-wise rel error " << worst
                  << " (bound 0: bit for bit)");
}

TEST_CASE("cuda adam: a NaN gradient changes nothing and synchronize names the parameter") {
  if (!testing::cuda_or_skip("CUDA Adam test")) return;
  const auto seed = testing::test_seed();
  INFO("seed " << seed << " (RELORA_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  AdamTwin<float> twin(std::vector<Index>(60, 300), rng, AdamConfig{});
  twin.new_gradients(rng);
  Backend<float>& gpu = *twin.gpu.backend;
  const auto before = snapshot(twin.gpu);

  for (const std::size_t bad : {std::size_t(1), std::size_t(55)}) {  // in the first and the second table
    INFO("bad parameter " << bad);
    const float good = fetch(gpu, twin.gpu.grads[bad])[17];
    set_entry(gpu, twin.gpu.grads[bad], 17,
              bad == 1 ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity());
    twin.gpu.adam->step();
    try {
      gpu.synchronize();
      FAIL("synchronize() did not report the non-finite gradient");
    } catch (const NonFiniteError& e) {
      MESSAGE("NonFiniteError: " << std::string(e.what()));
      CHECK(std::string(e.what()).find("gradient of '" + twin.names[bad] + "' holds NaN or Inf") != std::string::npos);
    }
    CHECK(snapshot(twin.gpu) == before);  // values, moments and counts untouched, bit for bit
    set_entry(gpu, twin.gpu.grads[bad], 17, good);
  }

  // Steps queued after a bad one are skipped too, and download() reports it as well.
  // (Uploads only in between: a download would report the first step at once.)
  const auto good = fetch(gpu, twin.gpu.grads[7]);
  auto bad = good;
  bad[0] = -std::numeric_limits<float>::infinity();
  gpu.upload(bad.data(), twin.gpu.grads[7]);
  twin.gpu.adam->step();
  gpu.upload(good.data(), twin.gpu.grads[7]);
  twin.gpu.adam->step();
  // download() copies the whole tensor before it reports: the buffer holds all of it.
  std::vector<float> host(std::size_t(twin.gpu.values[0].size()));
  try {
    gpu.download(twin.gpu.values[0], host.data());
    FAIL("download() did not report the non-finite gradient");
  } catch (const NonFiniteError& e) {
    MESSAGE("NonFiniteError: " << std::string(e.what()));
    CHECK(std::string(e.what()).find("'" + twin.names[7] + "'") != std::string::npos);
    CHECK(std::string(e.what()).find("nor by the 1 adam step(s) queued after it") != std::string::npos);
  }
  CHECK(snapshot(twin.gpu) == before);
  gpu.synchronize();  // the flag was cleared: nothing more to report

  // The CPU refuses the same step at once, with the same words.
  Backend<float>& cpu = *twin.cpu.backend;
  const float cpu_good = fetch(cpu, twin.cpu.grads[7])[0];
  set_entry(cpu, twin.cpu.grads[7], 0, std::numeric_limits<float>::quiet_NaN());
  const std::string expected = "gradient of '" + twin.names[7] + "' holds NaN or Inf; no parameter was updated";
  CHECK_THROWS_WITH_AS(twin.cpu.adam->step(), doctest::Contains(expected.c_str()), NonFiniteError);
  set_entry(cpu, twin.cpu.grads[7], 0, cpu_good);

  // Training goes on afterwards and still matches the CPU.
  twin.step(1.0);
  twin.compare(0.0);
}

TEST_CASE("cuda adam: a NaN in any of several blocks' chunks of one table stops every block's update") {
  if (!testing::cuda_or_skip("CUDA Adam test")) return;
  const auto seed = testing::test_seed();
  INFO("seed " << seed << " (RELORA_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  // One table of 34K elements, 34 chunks: above the one-block path.
  AdamTwin<float> twin(std::vector<Index>{16384, 1024, 16384}, rng, AdamConfig{});
  twin.new_gradients(rng);
  Backend<float>& gpu = *twin.gpu.backend;
  const auto before = snapshot(twin.gpu);
  // Bad entries in parameters 2 and 1, far apart in memory and in different blocks' chunks: every
  // block must see them, and the flag must name the first bad parameter.
  const auto good2 = fetch(gpu, twin.gpu.grads[2]), good1 = fetch(gpu, twin.gpu.grads[1]);
  set_entry(gpu, twin.gpu.grads[2], 16000, std::numeric_limits<float>::quiet_NaN());
  set_entry(gpu, twin.gpu.grads[1], 3, std::numeric_limits<float>::infinity());
  twin.gpu.adam->step();
  try {
    gpu.synchronize();
    FAIL("synchronize() did not report the non-finite gradient");
  } catch (const NonFiniteError& e) {
    CHECK(std::string(e.what()).find("'" + twin.names[1] + "'") != std::string::npos);
  }
  CHECK(snapshot(twin.gpu) == before);  // no block updated its chunk
  gpu.upload(good2.data(), twin.gpu.grads[2]);
  gpu.upload(good1.data(), twin.gpu.grads[1]);
  twin.step(1.0);
  twin.compare(0.0);
}

TEST_CASE_TEMPLATE("cuda adam: pruning zeroes the same entries of m and v as the CPU", T, float, double) {
  if (!testing::cuda_or_skip("CUDA Adam test")) return;
  const auto seed = testing::test_seed();
  INFO("seed " << seed << " (RELORA_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  const auto all = [](const Parameter<T>&) { return true; };
  for (const Index size : {Index(97 * 41), Index(300001)}) {
    for (const double fraction : {0.0, 0.3, 0.5, 1.0}) {
      for (const PruneMode mode : {PruneMode::magnitude, PruneMode::random}) {
        INFO("size " << size << " fraction " << fraction << " mode " << int(mode));
        AdamTwin<T> twin({size}, rng, AdamConfig{});
        // m on a coarse grid, so that many magnitudes tie (+m and -m too): ties go to the lower index.
        StateDict<T> state;
        twin.cpu.adam->save_state(state);
        auto m = random_values<T>(std::size_t(size), rng);
        for (auto& e : m) e = T(std::round(double(e) * 4) / 4);
        state.set_tensor(twin.names[0] + ".m", Eigen::Map<HostMatrix<T>>(m.data(), 1, size));
        twin.cpu.adam->restore_state(state);
        twin.gpu.adam->restore_state(state);
        const auto v_before = state.tensors().at(twin.names[0] + ".v");
        twin.cpu.adam->prune_state(all, fraction, mode, seed);
        twin.gpu.adam->prune_state(all, fraction, mode, seed);
        StateDict<T> cpu_state, gpu_state;
        twin.cpu.adam->save_state(cpu_state);
        twin.gpu.adam->save_state(gpu_state);
        const auto& gm = gpu_state.tensors().at(twin.names[0] + ".m");
        const auto& gv = gpu_state.tensors().at(twin.names[0] + ".v");
        CHECK(gm == cpu_state.tensors().at(twin.names[0] + ".m"));
        CHECK(gv == cpu_state.tensors().at(twin.names[0] + ".v"));
        // round(fraction * size) entries are zero now (in m and v alike), and no other entry changed.
        const auto count = std::size_t(std::llround(fraction * double(size)));
        std::size_t zeros = 0, changed = 0;
        for (Index i = 0; i < size; ++i) {
          const bool pruned = gv(0, i) == T(0) && v_before(0, i) != T(0);
          zeros += gm(0, i) == T(0);
          changed += gm(0, i) != m[std::size_t(i)];
          if (pruned) CHECK(gm(0, i) == T(0));
        }
        CHECK(zeros >= count);
        CHECK(changed <= count);
      }
    }
  }
  std::mt19937_64 rng2(seed);
  AdamTwin<T> twin({4}, rng2, AdamConfig{});
  CHECK(what_of([&] { twin.gpu.adam->prune_state(all, 1.5, PruneMode::magnitude); }) ==
        what_of([&] { twin.cpu.adam->prune_state(all, 1.5, PruneMode::magnitude); }));
}

TEST_CASE("cuda adam: the state saved on the GPU restores on the CPU and both continue alike") {
  if (!testing::cuda_or_skip("CUDA Adam test")) return;
  const auto seed = testing::test_seed();
  INFO("seed " << seed << " (RELORA_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  AdamTwin<float> twin({5, 3000}, rng, AdamConfig{});
  twin.new_gradients(rng);
  twin.gpu.adam->step();
  StateDict<float> state;
  twin.gpu.adam->save_state(state);
  twin.cpu.adam->restore_state(state);
  for (std::size_t s = 0; s < twin.names.size(); ++s) {  // the values too, so that both sides stand alike
    const auto v = fetch(*twin.gpu.backend, twin.gpu.values[s]);
    twin.cpu.backend->upload(v.data(), twin.cpu.values[s]);
  }
  CHECK(twin.cpu.adam->steps_taken() == twin.gpu.adam->steps_taken());  // the twin starts both at 1000
  twin.new_gradients(rng);
  twin.step(0.5);
  twin.compare(0.0);
}
