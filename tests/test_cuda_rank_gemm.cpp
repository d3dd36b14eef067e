// The CUDA backend's rank-sized fp32 products (lib/cuda/cuda_rank_gemm.cu): C = alpha op(A) op(B)
// + beta C with one side of C at most 64 and the large operand at least 2^20 values, which the
// backend runs as split-TF32 ("3xTF32") tensor-core products in both math modes. Each product is
// compared with the exact one (double, from the same float data) and held to fp32's accuracy: its
// relative error at most kFactor times that of the CPU backend's fp32 product of the same data.
// A plain TF32 product is about a thousand times further off, so the TF32 mode's cases also show
// that these products do not run through cuBLAS's TF32 kernels. Without a GPU every case prints
// why it is skipped and passes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "relora/core/backend.hpp"
#include "test_support.hpp"

using namespace relora;

namespace {

// How much larger than the CPU's fp32 error the split-TF32 error may be: each product term is
// good to about 2^-22 against fp32's 2^-24, and the tensor cores' fp32 sums round as fp32's do.
constexpr double kFactor = 4.0;

struct Shape {
  Index m, k, n;
};

// op(A) op(B) of shape m x n with depth k, one side rank-sized; widths and depths chosen so that
// the kernels' tails (depth not a multiple of 16, width not a multiple of 32, rank not a multiple
// of 8) and every rank tile count (8, 16, 32, 64) occur.
const std::vector<Shape> kShapes = {
    {4096, 1040, 16}, {2052, 1028, 7}, {1500, 1024, 64}, {1100, 1000, 33},  // C's columns rank-sized
    {16, 1024, 4096}, {5, 1032, 1300}, {64, 2048, 520},  {40, 1040, 1100},  // C's rows rank-sized
};

std::vector<float> normal_values(std::size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

template <typename T>
Tensor<T> on(Backend<T>& backend, Index rows, Index cols, const std::vector<float>& values) {
  Tensor<T> t = backend.allocate(rows, cols);
  const std::vector<T> typed(values.begin(), values.end());
  backend.upload(typed.data(), t);
  return t;
}

template <typename T>
std::vector<double> fetched(Backend<T>& backend, const Tensor<T>& t) {
  std::vector<T> host(std::size_t(t.size()));
  backend.download(t, host.data());
  return std::vector<double>(host.begin(), host.end());
}

double relative_error(const std::vector<double>& got, const std::vector<double>& exact) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    diff += (got[i] - exact[i]) * (got[i] - exact[i]);
    norm += exact[i] * exact[i];
  }
  return std::isnan(diff) ? std::numeric_limits<double>::quiet_NaN() : std::sqrt(diff / norm);
}

// C = alpha op(A) op(B) + beta C from the same float data on `backend`, as doubles.
template <typename T>
std::vector<double> product_on(Backend<T>& backend, Trans ta, Trans tb, const Shape& s, const std::vector<float>& a,
                               const std::vector<float>& b, const std::vector<float>& c, float alpha, float beta) {
  const Index ar = ta == Trans::no ? s.m : s.k, ac = ta == Trans::no ? s.k : s.m;
  const Index br = tb == Trans::no ? s.k : s.n, bc = tb == Trans::no ? s.n : s.k;
  Tensor<T> A = on(backend, ar, ac, a), B = on(backend, br, bc, b), C = on(backend, s.m, s.n, c);
  backend.gemm(ta, tb, T(alpha), A, B, T(beta), C);
  return fetched(backend, C);
}

std::string label(const Shape& s, Trans ta, Trans tb, float beta, MathMode math) {
  return "m=" + std::to_string(s.m) + " k=" + std::to_string(s.k) + " n=" + std::to_string(s.n) +
         " ta=" + std::to_string(int(ta)) + " tb=" + std::to_string(int(tb)) + " beta=" + std::to_string(beta) +
         (math == MathMode::tf32 ? " tf32" : " strict");
}

}  // namespace

TEST_CASE("cuda: rank-sized fp32 products are as accurate as fp32's, every orientation, transpose and beta") {
  if (!testing::cuda_or_skip("rank-sized products")) return;
  const auto seed = testing::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto exact_backend = make_backend<double>(Device::cpu);
  auto cpu = make_backend<float>(Device::cpu);
  double worst_ratio = 0;
  for (const MathMode math : {MathMode::strict, MathMode::tf32}) {
    BackendOptions options;
    options.math = math;
    auto gpu = make_backend<float>(Device::cuda, options);
    for (const Shape& s : kShapes) {
      const std::vector<float> a = normal_values(std::size_t(s.m * s.k), rng);
      const std::vector<float> b = normal_values(std::size_t(s.k * s.n), rng);
      for (const Trans ta : {Trans::no, Trans::yes}) {
        for (const Trans tb : {Trans::no, Trans::yes}) {
          for (const float beta : {0.0f, 1.0f, -0.5f}) {
            // beta = 0 must ignore C, NaN included; otherwise C is random.
            const std::vector<float> c = beta == 0.0f ? std::vector<float>(std::size_t(s.m * s.n), NAN)
                                                      : normal_values(std::size_t(s.m * s.n), rng);
            const float alpha = 0.75f;
            const auto exact = product_on(*exact_backend, ta, tb, s, a, b, c, alpha, beta);
            const double cpu_error = relative_error(product_on(*cpu, ta, tb, s, a, b, c, alpha, beta), exact);
            const double gpu_error = relative_error(product_on(*gpu, ta, tb, s, a, b, c, alpha, beta), exact);
            INFO(label(s, ta, tb, beta, math) << ": relative error " << gpu_error << ", the CPU's fp32 " << cpu_error);
            CHECK(gpu_error <= kFactor * cpu_error + 1e-9);
            CHECK(gpu_error <= 1e-6);
            if (gpu_error / cpu_error > worst_ratio) worst_ratio = gpu_error / cpu_error;
          }
        }
      }
    }
  }
  MESSAGE("rank-sized products: worst error / the CPU's fp32 error " << worst_ratio << " (bound " << kFactor << ")");
}

TEST_CASE("cuda: a rank-sized product is the same bits every time, and NaN or Inf reach the entries they touch") {
  if (!testing::cuda_or_skip("rank-sized products")) return;
  const auto seed = testing::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto cpu = make_backend<float>(Device::cpu);
  auto gpu = make_backend<float>(Device::cuda);
  const Shape s{2048, 1024, 16};
  std::vector<float> a = normal_values(std::size_t(s.m * s.k), rng);
  std::vector<float> b = normal_values(std::size_t(s.k * s.n), rng);
  const std::vector<float> c(std::size_t(s.m * s.n), 0.0f);
  const auto first = product_on(*gpu, Trans::no, Trans::no, s, a, b, c, 1.0f, 0.0f);
  const auto second = product_on(*gpu, Trans::no, Trans::no, s, a, b, c, 1.0f, 0.0f);
  CHECK(std::memcmp(first.data(), second.data(), first.size() * sizeof(double)) == 0);

  // NaN and Inf in the large operand (rows 3 and 700) and NaN in the small one (column 5).
  a[std::size_t(3 * s.k + 10)] = std::numeric_limits<float>::quiet_NaN();
  a[std::size_t(700 * s.k + 1000)] = std::numeric_limits<float>::infinity();
  b[std::size_t(77 * s.n + 5)] = std::numeric_limits<float>::quiet_NaN();
  const auto expected = product_on(*cpu, Trans::no, Trans::no, s, a, b, c, 1.0f, 0.0f);
  const auto got = product_on(*gpu, Trans::no, Trans::no, s, a, b, c, 1.0f, 0.0f);
  std::size_t nonfinite = 0, differ = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    nonfinite += !std::isfinite(expected[i]);
    differ += std::isfinite(got[i]) != std::isfinite(expected[i]);
  }
  CHECK(nonfinite == std::size_t(2 * s.n + s.m - 2));  // rows 3 and 700, column 5
  CHECK(differ == 0);
}

TEST_CASE("cuda: a rank-sized product of a view that is not 16-byte aligned equals the CPU's") {
  if (!testing::cuda_or_skip("rank-sized products")) return;
  const auto seed = testing::test_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  auto cpu = make_backend<float>(Device::cpu);
  auto gpu = make_backend<float>(Device::cuda);
  const Index m = 2048, k = 1024, r = 16;
  const std::vector<float> x = normal_values(std::size_t(m * k + 1), rng);
  const std::vector<float> w = normal_values(std::size_t(r * k), rng);
  std::vector<double> results[2];
  for (int side = 0; side < 2; ++side) {
    Backend<float>& backend = side == 0 ? *cpu : *gpu;
    Tensor<float> storage = on(backend, 1, m * k + 1, x);
    const Tensor<float> X(storage.data() + 1, m, k, storage.device(), [](float*) {});  // one value in
    const Tensor<float> A = on(backend, r, k, w);
    Tensor<float> U = backend.allocate(m, r);
    backend.gemm(Trans::no, Trans::yes, 1.0f, X, A, 0.0f, U);
    results[side] = fetched(backend, U);
  }
  const double difference = relative_error(results[1], results[0]);
  INFO("relative difference " << difference);
  CHECK(difference <= 1e-6);
}
