// The CUDA backend against the CPU backend, operation by operation, on fresh random data (never
// zeros: they hide unwritten outputs). Outputs are poisoned with NaN first, so an element the GPU
// fails to write shows as an error. Each comparison prints its relative error ||gpu - cpu|| / ||cpu||.
// Without a GPU (CI, development machines) every case prints why it is skipped and passes. Adam's
// kernels are compared in test_cuda_adam.cpp.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <regex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "relora/core/backend.hpp"
#include "relora/core/errors.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::what_of;

namespace {

bool cuda_skipped() {
  std::string why;
  if (cuda_available(&why)) return false;
  MESSAGE("CUDA tests skipped: " << why);
  return true;
}

#define SKIP_WITHOUT_CUDA() \
  if (cuda_skipped()) return

template <typename T>
const char* type_name() {
  return sizeof(T) == 4 ? "float" : "double";
}

// Strict fp32 single operations must agree to 1e-5 (the bound); double far closer.
template <typename T>
double tolerance() {
  return sizeof(T) == 4 ? 1e-5 : 1e-12;
}

// Printed with every failure (INFO) and replayable: RELORA_TEST_SEED=<seed> runs the case again on it.
std::uint64_t fresh_seed() { return relora::testing::test_seed(); }

template <typename T>
std::vector<T> random_values(std::size_t n, std::mt19937_64& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<T> values(n);
  for (auto& v : values) v = T(normal(rng));
  return values;
}

template <typename T>
struct Backends {
  std::shared_ptr<Backend<T>> cpu;
  std::shared_ptr<Backend<T>> gpu;
};

template <typename T>
Backends<T> make_backends(MathMode math = MathMode::strict) {
  BackendOptions options;
  options.math = math;
  return {make_backend<T>(Device::cpu, options), make_backend<T>(Device::cuda, options)};
}

// One host matrix held by both backends.
template <typename T>
struct Twin {
  Tensor<T> cpu;
  Tensor<T> gpu;
};

template <typename T>
Twin<T> twin(Backends<T>& b, Index rows, Index cols, const std::vector<T>& values) {
  REQUIRE(values.size() == std::size_t(rows * cols));
  Twin<T> t{b.cpu->allocate(rows, cols), b.gpu->allocate(rows, cols)};
  b.cpu->upload(values.data(), t.cpu);
  b.gpu->upload(values.data(), t.gpu);
  return t;
}

// Filled with NaN on both sides: an output element nobody writes fails the comparison.
template <typename T>
Twin<T> poisoned(Backends<T>& b, Index rows, Index cols) {
  return twin(b, rows, cols, std::vector<T>(std::size_t(rows * cols), std::numeric_limits<T>::quiet_NaN()));
}

template <typename T>
std::vector<T> fetch(Backend<T>& backend, const Tensor<T>& t) {
  std::vector<T> host(std::size_t(t.size()));
  backend.download(t, host.data());
  return host;
}

// ||a - b|| / ||b|| (||a - b|| when b is zero); NaN anywhere gives NaN, which fails every bound.
template <typename T>
double rel_error(const std::vector<T>& a, const std::vector<T>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = double(a[i]) - double(b[i]);
    diff += d * d;
    norm += double(b[i]) * double(b[i]);
  }
  if (std::isnan(diff) || std::isnan(norm)) return std::numeric_limits<double>::quiet_NaN();
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

template <typename T>
double compare(Backends<T>& b, const Twin<T>& t) {
  return rel_error(fetch(*b.gpu, t.gpu), fetch(*b.cpu, t.cpu));
}

// Records the largest error of a test case and prints it at the end, llm.c style.
struct MaxError {
  std::string what;
  double max = 0;
  void add(double err, const std::string& label) {
    INFO(what << ": " << label << " rel error " << err);
    CHECK(err <= bound);
    if (!(err <= max)) max = err;
  }
  double bound;
  ~MaxError() { MESSAGE(what << ": max rel error " << max << " (bound " << bound << ")"); }
};

}  // namespace

TEST_CASE("cuda: make_backend explains why CUDA cannot be used") {
  std::string why;
  if (cuda_available(&why)) {
    auto gpu = make_backend<float>(Device::cuda);
    CHECK(gpu->device() == Device::cuda);
    MESSAGE("CUDA backend: " << gpu->description());
    return;
  }
  CHECK(!why.empty());
  try {
    make_backend<float>(Device::cuda);
    FAIL("make_backend(cuda) succeeded although cuda_available() is false");
  } catch (const DeviceError& e) {
    CHECK(std::string(e.what()).find(why) != std::string::npos);
  }
  MESSAGE("CUDA tests skipped: " << why);
}

TEST_CASE_TEMPLATE("cuda: description, math mode and upload/download round trip", T, float, double) {
  SKIP_WITHOUT_CUDA();
  auto b = make_backends<T>();
  const std::string text = b.gpu->description();
  MESSAGE(text);
  CHECK(text.find("SMs") != std::string::npos);
  CHECK(b.gpu->math_mode() == MathMode::strict);
  b.gpu->set_math_mode(MathMode::tf32);
  CHECK(b.gpu->math_mode() == MathMode::tf32);
  if (sizeof(T) == 4) CHECK(b.gpu->description().find("tf32") != std::string::npos);
  b.gpu->set_math_mode(MathMode::strict);

  std::mt19937_64 rng(fresh_seed());
  const auto values = random_values<T>(37 * 11, rng);
  auto t = b.gpu->allocate(37, 11);
  CHECK(t.device() == Device::cuda);
  b.gpu->upload(values.data(), t);
  CHECK(fetch(*b.gpu, t) == values);  // bit for bit
  auto copy = b.gpu->allocate(37, 11);
  b.gpu->copy(t, copy);
  CHECK(fetch(*b.gpu, copy) == values);
  b.gpu->fill(copy, T(-2.5));
  CHECK(fetch(*b.gpu, copy) == std::vector<T>(values.size(), T(-2.5)));
  auto wrong = b.gpu->allocate(11, 37);
  auto cpu_t = b.cpu->allocate(37, 11);
  auto cpu_wrong = b.cpu->allocate(11, 37);
  CHECK(what_of([&] { b.gpu->copy(t, wrong); }) == what_of([&] { b.cpu->copy(cpu_t, cpu_wrong); }));
  auto empty = b.gpu->allocate(0, 5);
  CHECK(empty.size() == 0);
  b.gpu->fill(empty, T(1));
  b.gpu->synchronize();
}

namespace {

// f(ta, tb, A, B, label) for each of the four transposes: A and B random, shaped so that
// op(A) op(B) is m x n; label names the case.
struct ProductShape {
  Index m, k, n;
};
template <typename T, typename F>
void for_each_transpose(Backends<T>& b, const ProductShape& s, std::mt19937_64& rng, F&& f) {
  for (const Trans ta : {Trans::no, Trans::yes}) {
    for (const Trans tb : {Trans::no, Trans::yes}) {
      const Index ar = ta == Trans::no ? s.m : s.k, ac = ta == Trans::no ? s.k : s.m;
      const Index br = tb == Trans::no ? s.k : s.n, bc = tb == Trans::no ? s.n : s.k;
      auto A = twin(b, ar, ac, random_values<T>(std::size_t(ar * ac), rng));
      auto B = twin(b, br, bc, random_values<T>(std::size_t(br * bc), rng));
      f(ta, tb, A, B,
        "m=" + std::to_string(s.m) + " k=" + std::to_string(s.k) + " n=" + std::to_string(s.n) +
            " ta=" + std::to_string(int(ta)) + " tb=" + std::to_string(int(tb)));
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda: gemm matches the CPU for all transposes, alpha and beta", T, float, double) {
  SKIP_WITHOUT_CUDA();
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto b = make_backends<T>();
  MaxError err{std::string("gemm strict ") + type_name<T>(), 0, tolerance<T>()};
  // The last four are products with a rank-sized side and a long depth, as LoRA's are.
  for (const ProductShape s : {ProductShape{37, 53, 29}, ProductShape{129, 257, 65}, ProductShape{1, 7, 3},
                               ProductShape{1024, 1024, 16}, ProductShape{16, 1024, 1024}, ProductShape{300, 999, 7},
                               ProductShape{70, 513, 1}}) {
    for_each_transpose(b, s, rng, [&](Trans ta, Trans tb, const Twin<T>& A, const Twin<T>& B, const std::string& label) {
      for (const T beta : {T(0), T(1), T(-0.5)}) {
        // beta = 0 must ignore C entirely, NaN included.
        auto C = beta == T(0) ? poisoned(b, s.m, s.n) : twin(b, s.m, s.n, random_values<T>(std::size_t(s.m * s.n), rng));
        const T alpha = T(0.75);
        b.cpu->gemm(ta, tb, alpha, A.cpu, B.cpu, beta, C.cpu);
        b.gpu->gemm(ta, tb, alpha, A.gpu, B.gpu, beta, C.gpu);
        err.add(compare(b, C), label + " beta=" + std::to_string(double(beta)));
      }
    });
  }
  // k = 0: C = beta C (and zero for beta = 0, whatever C held).
  auto A0 = twin(b, 5, 0, std::vector<T>());
  auto B0 = twin(b, 0, 4, std::vector<T>());
  auto C0 = twin(b, 5, 4, random_values<T>(20, rng));
  b.cpu->gemm(Trans::no, Trans::no, T(1), A0.cpu, B0.cpu, T(0.5), C0.cpu);
  b.gpu->gemm(Trans::no, Trans::no, T(1), A0.gpu, B0.gpu, T(0.5), C0.gpu);
  err.add(compare(b, C0), "k=0 beta=0.5");
  auto Cz = poisoned(b, 5, 4);
  b.cpu->gemm(Trans::no, Trans::no, T(1), A0.cpu, B0.cpu, T(0), Cz.cpu);
  b.gpu->gemm(Trans::no, Trans::no, T(1), A0.gpu, B0.gpu, T(0), Cz.gpu);
  err.add(compare(b, Cz), "k=0 beta=0");

  // The same ShapeError, word for word.
  auto A = twin(b, 3, 4, random_values<T>(12, rng));
  auto B = twin(b, 5, 6, random_values<T>(30, rng));
  auto C = twin(b, 3, 6, random_values<T>(18, rng));
  const std::string cpu_msg = what_of([&] { b.cpu->gemm(Trans::no, Trans::no, T(1), A.cpu, B.cpu, T(0), C.cpu); });
  const std::string gpu_msg = what_of([&] { b.gpu->gemm(Trans::no, Trans::no, T(1), A.gpu, B.gpu, T(0), C.gpu); });
  CHECK(gpu_msg == cpu_msg);
  CHECK(gpu_msg.find("gemm: op(A) [3 x 4] times op(B) [5 x 6]") != std::string::npos);
  CHECK_THROWS_AS(b.gpu->gemm(Trans::no, Trans::yes, T(1), A.gpu, B.gpu, T(0), C.gpu), ShapeError);
}

TEST_CASE("cuda: tf32 gemm stays near 1e-3 relative error, and strict comes back") {
  SKIP_WITHOUT_CUDA();
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto b = make_backends<float>(MathMode::tf32);
  const Index m = 512, k = 1024, n = 384;
  auto A = twin(b, m, k, random_values<float>(std::size_t(m * k), rng));
  auto B = twin(b, n, k, random_values<float>(std::size_t(n * k), rng));
  auto C = poisoned(b, m, n);
  b.cpu->gemm(Trans::no, Trans::yes, 1.0f, A.cpu, B.cpu, 0.0f, C.cpu);
  b.gpu->gemm(Trans::no, Trans::yes, 1.0f, A.gpu, B.gpu, 0.0f, C.gpu);
  const double tf32 = compare(b, C);
  MESSAGE("gemm tf32 float [512 x 1024] x [1024 x 384]: rel error " << tf32 << " (bound 2e-3)");
  CHECK(tf32 <= 2e-3);
  b.gpu->set_math_mode(MathMode::strict);
  b.gpu->gemm(Trans::no, Trans::yes, 1.0f, A.gpu, B.gpu, 0.0f, C.gpu);
  const double strict = compare(b, C);
  MESSAGE("gemm strict float, same data: rel error " << strict << " (bound 1e-5)");
  CHECK(strict <= 1e-5);
  CHECK(strict < tf32);
}

TEST_CASE_TEMPLATE("cuda: gemm_bias_activation (bias and ReLU in the product's epilogue) matches the CPU's passes",
                   T, float, double) {
  // CUDA adds the bias and applies the ReLU in cuBLASLt's epilogue (float; double takes the
  // default, gemm then add_row_vector then activation_forward); the CPU runs the default. All
  // transposes, with and without a bias, identity and ReLU, beta 0 (C poisoned with NaN) and 1,
  // strict and TF32 (float's bound there is TF32's, as in the tf32 gemm test).
  SKIP_WITHOUT_CUDA();
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (const MathMode math : {MathMode::strict, MathMode::tf32}) {
    auto b = make_backends<T>(math);
    const bool rounds = math == MathMode::tf32 && std::is_same<T, float>::value;
    MaxError err{std::string("gemm_bias_activation ") + (rounds ? "tf32 " : "strict ") + type_name<T>(), 0,
                 rounds ? 2e-3 : tolerance<T>()};
    for (const ProductShape s :
         {ProductShape{37, 53, 29}, ProductShape{129, 257, 65}, ProductShape{1024, 1024, 16}, ProductShape{300, 999, 7}}) {
      for_each_transpose(b, s, rng, [&](Trans ta, Trans tb, const Twin<T>& A, const Twin<T>& B, const std::string& label) {
        auto bias = twin(b, 1, s.n, random_values<T>(std::size_t(s.n), rng));
        for (const bool with_bias : {true, false}) {
          for (const Activation f : {Activation::identity, Activation::relu}) {
            for (const T beta : {T(0), T(1)}) {
              auto C = beta == T(0) ? poisoned(b, s.m, s.n)
                                    : twin(b, s.m, s.n, random_values<T>(std::size_t(s.m * s.n), rng));
              b.cpu->gemm_bias_activation(ta, tb, T(0.75), A.cpu, B.cpu, beta, with_bias ? &bias.cpu : nullptr, f,
                                          C.cpu);
              b.gpu->gemm_bias_activation(ta, tb, T(0.75), A.gpu, B.gpu, beta, with_bias ? &bias.gpu : nullptr, f,
                                          C.gpu);
              err.add(compare(b, C), label + (with_bias ? " bias" : "") + (f == Activation::relu ? " relu" : "") +
                                         " beta=" + std::to_string(double(beta)));
            }
          }
        }
      });
    }
    // A bias that is not one row of C's width is refused, naming both shapes; so is an activation
    // that cannot be applied in place.
    auto A = twin(b, 3, 4, random_values<T>(12, rng));
    auto B = twin(b, 4, 6, random_values<T>(24, rng));
    auto C = twin(b, 3, 6, random_values<T>(18, rng));
    auto wrong = twin(b, 1, 5, random_values<T>(5, rng));
    const std::string message = what_of([&] {
      b.gpu->gemm_bias_activation(Trans::no, Trans::no, T(1), A.gpu, B.gpu, T(0), &wrong.gpu, Activation::identity,
                                  C.gpu);
    });
    CHECK(message.find("[1 x 5]") != std::string::npos);
    CHECK(message.find("[3 x 6]") != std::string::npos);
    for (Backend<T>* backend : {b.cpu.get(), b.gpu.get()}) {
      Tensor<T>& target = backend == b.cpu.get() ? C.cpu : C.gpu;
      const Tensor<T>& left = backend == b.cpu.get() ? A.cpu : A.gpu;
      const Tensor<T>& right = backend == b.cpu.get() ? B.cpu : B.gpu;
      const std::string refused = what_of(
          [&] { backend->gemm_bias_activation(Trans::no, Trans::no, T(1), left, right, T(0), nullptr, Activation::tanh, target); });
      CHECK(refused.find("only identity or ReLU") != std::string::npos);
    }
  }
}

TEST_CASE_TEMPLATE("cuda: bias, column sums, multiply, activations and MSE match the CPU", T, float, double) {
  SKIP_WITHOUT_CUDA();
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto b = make_backends<T>();
  MaxError err{std::string("element-wise ") + type_name<T>(), 0, tolerance<T>()};

  for (const Index n : {Index(67), Index(1031)}) {
    const Index d = 45;
    const std::string size = " [" + std::to_string(n) + " x " + std::to_string(d) + "]";
    const std::size_t count = std::size_t(n * d);
    auto Y = twin(b, n, d, random_values<T>(count, rng, 2.0));
    auto bias = twin(b, 1, d, random_values<T>(std::size_t(d), rng));
    b.cpu->add_row_vector(bias.cpu, Y.cpu);
    b.gpu->add_row_vector(bias.gpu, Y.gpu);
    err.add(compare(b, Y), "add_row_vector" + size);

    auto db = poisoned(b, 1, d);
    b.cpu->column_sums(Y.cpu, T(0), db.cpu);
    b.gpu->column_sums(Y.gpu, T(0), db.gpu);
    err.add(compare(b, db), "column_sums beta=0" + size);
    b.cpu->column_sums(Y.cpu, T(0.5), db.cpu);
    b.gpu->column_sums(Y.gpu, T(0.5), db.gpu);
    err.add(compare(b, db), "column_sums beta=0.5" + size);

    auto other = twin(b, n, d, random_values<T>(count, rng));
    auto product = poisoned(b, n, d);
    b.cpu->multiply(Y.cpu, other.cpu, product.cpu);
    b.gpu->multiply(Y.gpu, other.gpu, product.gpu);
    err.add(compare(b, product), "multiply" + size);

    for (const Activation f : {Activation::identity, Activation::relu, Activation::tanh, Activation::gelu}) {
      const std::string name = " activation " + std::to_string(int(f)) + size;
      auto Z = poisoned(b, n, d);
      b.cpu->activation_forward(f, Y.cpu, Z.cpu);
      b.gpu->activation_forward(f, Y.gpu, Z.gpu);
      err.add(compare(b, Z), "forward" + name);
      auto dZ = twin(b, n, d, random_values<T>(count, rng));
      auto dY = poisoned(b, n, d);
      b.cpu->activation_backward(f, Y.cpu, dZ.cpu, dY.cpu);
      b.gpu->activation_backward(f, Y.gpu, dZ.gpu, dY.gpu);
      err.add(compare(b, dY), "backward" + name);
      b.cpu->activation_backward(f, Y.cpu, dZ.cpu, dZ.cpu);  // dY aliasing dZ
      b.gpu->activation_backward(f, Y.gpu, dZ.gpu, dZ.gpu);
      err.add(compare(b, dZ), "backward in place" + name);
    }

    auto target = twin(b, n, d, random_values<T>(count, rng));
    auto dY = poisoned(b, n, d);
    auto loss = poisoned(b, 1, 1);
    b.cpu->mse(Y.cpu, target.cpu, dY.cpu, loss.cpu);
    b.gpu->mse(Y.gpu, target.gpu, dY.gpu, loss.gpu);
    err.add(compare(b, dY), "mse gradient" + size);
    err.add(compare(b, loss), "mse value" + size);
    const T first = fetch(*b.gpu, loss.gpu)[0];
    b.gpu->mse(Y.gpu, target.gpu, dY.gpu, loss.gpu);
    CHECK(fetch(*b.gpu, loss.gpu)[0] == first);  // the reduction order is fixed
  }
  // A loss over many blocks (more than the reduction's 1024 partials would hold at one per block).
  {
    const Index n = 2048, d = 1000;
    auto Y = twin(b, n, d, random_values<T>(std::size_t(n * d), rng));
    auto target = twin(b, n, d, random_values<T>(std::size_t(n * d), rng));
    auto dY = poisoned(b, n, d);
    auto loss = poisoned(b, 1, 1);
    b.cpu->mse(Y.cpu, target.cpu, dY.cpu, loss.cpu);
    b.gpu->mse(Y.gpu, target.gpu, dY.gpu, loss.gpu);
    err.add(compare(b, dY), "mse gradient [2048 x 1000]");
    err.add(compare(b, loss), "mse value [2048 x 1000]");
  }

  // Shape errors, word for word.
  auto Y = twin(b, 4, 3, random_values<T>(12, rng));
  auto bad = twin(b, 1, 4, random_values<T>(4, rng));
  auto bad2 = twin(b, 3, 4, random_values<T>(12, rng));
  auto loss = twin(b, 1, 2, random_values<T>(2, rng));
  CHECK(what_of([&] { b.gpu->add_row_vector(bad.gpu, Y.gpu); }) ==
        what_of([&] { b.cpu->add_row_vector(bad.cpu, Y.cpu); }));
  CHECK(what_of([&] { b.gpu->column_sums(Y.gpu, T(0), bad.gpu); }) ==
        what_of([&] { b.cpu->column_sums(Y.cpu, T(0), bad.cpu); }));
  CHECK(what_of([&] { b.gpu->multiply(Y.gpu, bad2.gpu, Y.gpu); }) ==
        what_of([&] { b.cpu->multiply(Y.cpu, bad2.cpu, Y.cpu); }));
  CHECK(what_of([&] { b.gpu->mse(Y.gpu, Y.gpu, Y.gpu, loss.gpu); }) ==
        what_of([&] { b.cpu->mse(Y.cpu, Y.cpu, Y.cpu, loss.cpu); }));
  CHECK(what_of([&] { b.gpu->activation_forward(Activation::relu, Y.gpu, bad2.gpu); }) ==
        what_of([&] { b.cpu->activation_forward(Activation::relu, Y.cpu, bad2.cpu); }));
}

TEST_CASE_TEMPLATE("cuda: random fills and dropout masks equal the CPU's", T, float, double) {
  SKIP_WITHOUT_CUDA();
  const auto seed = fresh_seed();
  INFO("seed " << seed);
  auto b = make_backends<T>();
  const double bound = sizeof(T) == 4 ? 1e-6 : 1e-13;
  MaxError err{std::string("random fills ") + type_name<T>(), 0, bound};
  const RngKey key{seed, 7};
  const Index rows = 1001, cols = 37;
  auto x = poisoned(b, rows, cols);
  b.cpu->random_uniform(key, T(-0.3), T(0.7), x.cpu);
  b.gpu->random_uniform(key, T(-0.3), T(0.7), x.gpu);
  err.add(compare(b, x), "uniform");
  {
    // The draws are integer arithmetic, hence equal; the scaling may round differently where one
    // compiler contracts it into an FMA and the other does not.
    const auto gpu = fetch(*b.gpu, x.gpu), cpu = fetch(*b.cpu, x.cpu);
    std::size_t equal = 0;
    for (std::size_t i = 0; i < gpu.size(); ++i) equal += gpu[i] == cpu[i];
    MESSAGE("random_uniform " << std::string(type_name<T>()) << ": " << equal << " of " << gpu.size() << " bit for bit equal");
  }

  b.cpu->random_normal(RngKey{seed, 8}, T(0.1), T(2.0), x.cpu);
  b.gpu->random_normal(RngKey{seed, 8}, T(0.1), T(2.0), x.gpu);
  err.add(compare(b, x), "normal");

  auto mask = poisoned(b, rows, cols);
  b.cpu->dropout_mask(RngKey{seed, 9}, T(0.3), mask.cpu);
  b.gpu->dropout_mask(RngKey{seed, 9}, T(0.3), mask.gpu);
  const auto gpu_mask = fetch(*b.gpu, mask.gpu);
  CHECK(gpu_mask == fetch(*b.cpu, mask.cpu));
  const auto dropped = std::count(gpu_mask.begin(), gpu_mask.end(), T(0));
  MESSAGE("dropout p=0.3: " << dropped << " of " << gpu_mask.size() << " dropped");
  CHECK(dropped > 0);

  // A mask drawn from a counter offset (a data-parallel rank's rows of the whole batch's mask).
  RngKey offset_key{seed, 9};
  offset_key.first = 17 * cols;
  b.cpu->dropout_mask(offset_key, T(0.3), mask.cpu);
  b.gpu->dropout_mask(offset_key, T(0.3), mask.gpu);
  CHECK(fetch(*b.gpu, mask.gpu) == fetch(*b.cpu, mask.cpu));
}

TEST_CASE("cuda: an absurd allocation throws DeviceError naming the size") {
  SKIP_WITHOUT_CUDA();
  auto gpu = make_backend<float>(Device::cuda);
  try {
    gpu->allocate(1000000, 1000000);  // 1e12 floats, 4 TB
    FAIL("allocating 4 TB succeeded");
  } catch (const DeviceError& e) {
    const std::string what = e.what();
    MESSAGE("DeviceError: " << what);
    CHECK(what.find("4000000000000 bytes") != std::string::npos);
    CHECK(what.find("[1000000 x 1000000]") != std::string::npos);
  }
  CHECK_THROWS_AS(gpu->allocate(-1, 3), ShapeError);
  // The failure left nothing behind: the next launches work.
  auto t = gpu->allocate(3, 3);
  gpu->fill(t, 1.5f);
  CHECK(fetch(*gpu, t) == std::vector<float>(9, 1.5f));
}

TEST_CASE("cuda: no leak over 1000 allocate/free cycles") {
  SKIP_WITHOUT_CUDA();
  auto gpu = make_backend<float>(Device::cuda);
  // Free device memory as description() reports it, in MiB.
  auto free_mib = [&] {
    gpu->synchronize();
    std::smatch match;
    const std::string text = gpu->description();
    REQUIRE(std::regex_search(text, match, std::regex("([0-9]+) MiB free")));
    return std::stoll(match[1]);
  };
  {  // warm up: cuBLAS allocates its workspace at the first product
    auto a = gpu->allocate(64, 64);
    auto c = gpu->allocate(64, 64);
    gpu->fill(a, 1.0f);
    gpu->gemm(Trans::no, Trans::no, 1.0f, a, a, 0.0f, c);
  }
  const long long before = free_mib();
  const Index big = Index(before) * (1 << 20) / 4 / 3;  // a third of the free memory, in floats
  for (int cycle = 0; cycle < 1000; ++cycle) {
    // Every 100th tensor takes a third of the free memory: had one of those leaked, the fourth would fail.
    const Index n = cycle % 100 == 99 ? big : Index(1) << (cycle % 23);
    auto t = gpu->allocate(1, n);
    if (n < (Index(1) << 24)) gpu->fill(t, float(cycle));
  }
  const long long after = free_mib();
  MESSAGE("free device memory before " << before << " MiB, after 1000 allocate/free cycles " << after << " MiB");
  // compute-sanitizer keeps device memory of its own per allocation: the figure moves under it,
  // which only checks the cycles for memory errors.
  if (!relora::testing::under_sanitizer()) CHECK(before - after <= 2);
}

TEST_CASE("cuda: the host-wait check runs while the host waits, and what it throws ends the wait") {
  SKIP_WITHOUT_CUDA();
  // The check a communicator of several GPU ranks installs (Backend::set_host_wait_check): called
  // once before a wait's first poll and then between polls; what it throws comes out of the wait
  // only once the queued work has drained (a download waits for the stream before its copy, which
  // from pageable memory would wait inside the driver). Products of a few ms each keep the stream
  // busy.
  auto gpu = make_backend<float>(Device::cuda);
  const Index n = 4096;
  Tensor<float> A = gpu->allocate(n, n), B = gpu->allocate(n, n), C = gpu->allocate(n, n);
  Tensor<float> corner = gpu->allocate(1, 1);
  const Tensor<float> C_corner(C.data(), 1, 1, Device::cuda, [](float*) {});  // a view of C's first value
  gpu->fill(A, 1.0f);
  gpu->fill(B, 0.5f);
  gpu->synchronize();
  const int owner = 0, other = 0;  // their addresses tell the owners apart

  // A check that lets the waits go on: called many times while several products run.
  int calls = 0;
  gpu->set_host_wait_check(&owner, [&calls] { ++calls; });
  for (int i = 0; i < 8; ++i) gpu->gemm(Trans::no, Trans::no, 1.0f, A, B, 0.0f, C);
  gpu->synchronize();
  CHECK(calls > 1);
  // On an idle stream: the one call before the first poll.
  calls = 0;
  gpu->synchronize();
  CHECK(calls == 1);

  // A throwing check ends the wait, but only once the queued work has drained: a counting check
  // installed right after finds the stream idle (one call).
  struct Stop {};
  const auto stop = [&calls] {
    ++calls;
    throw Stop{};
  };
  const auto count = [&calls] { ++calls; };
  gpu->fill(B, 0.25f);
  for (int pass = 0; pass < 2; ++pass) {
    gpu->set_host_wait_check(&owner, stop);
    for (int i = 0; i < 8; ++i) gpu->gemm(Trans::no, Trans::no, 1.0f, A, B, 0.0f, C);
    gpu->copy(C_corner, corner);
    float value = 0.0f;
    if (pass == 0) {
      CHECK_THROWS_AS(gpu->synchronize(), Stop);
    } else {
      CHECK_THROWS_AS(gpu->download(corner, &value), Stop);
    }
    gpu->set_host_wait_check(&owner, count);
    calls = 0;
    gpu->synchronize();
    CHECK(calls == 1);
  }
  gpu->set_host_wait_check(&owner, stop);
  float value = 0.0f;
  // Only the owner's empty check removes it; then the waits block in the driver again.
  gpu->set_host_wait_check(&other, {});
  CHECK_THROWS_AS(gpu->synchronize(), Stop);
  gpu->set_host_wait_check(&owner, {});
  calls = 0;
  gpu->synchronize();
  gpu->download(corner, &value);
  CHECK(calls == 0);
  CHECK(value == 0.25f * float(n));  // each entry of A B: n times 1 x 0.25, exact
}

TEST_CASE("cpu: a host-wait check is ignored (nothing waits on a device)") {
  auto cpu = make_backend<float>(Device::cpu);
  bool called = false;
  cpu->set_host_wait_check(&called, [&called] {
    called = true;
    throw std::runtime_error("a CPU backend has no device to wait for");
  });
  Tensor<float> x = cpu->allocate(2, 2);
  cpu->fill(x, 3.0f);
  std::vector<float> host(4);
  cpu->download(x, host.data());
  cpu->synchronize();
  CHECK_FALSE(called);
  CHECK(host[3] == 3.0f);
}
