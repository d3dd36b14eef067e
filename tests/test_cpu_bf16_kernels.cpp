// A bf16 base's products on the CPU's fast kernels in tf32 mode (AMX tiles where the CPU has
// AMX-BF16, else AVX-512 BF16 dot products where it has those) against the reference kernels.
// Skipped, with the reason, on a CPU with neither. Both siblings round X and dY to bf16 and
// accumulate in fp32, so the same properties hold for either.
//
// What is checked: on inputs that are bf16 values already (so rounding them changes nothing) the
// fast kernels' Y and dX equal the fp32 layer's on the same weights row by row to fp32
// accumulation (1e-5 relative: K up to 4200 products in a different order); on any input they
// differ from the strict mode's by the rounding of X and dY (about u = 2^-8 relative, 2u allowed,
// as on CUDA); the adapter's gradients, fp32 products of unrounded values in both modes, are the
// same bits; strict mode on the same machine is the reference's.
#include <doctest/doctest.h>

#include <random>

#include "bf16_test_util.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"

using namespace relora;
using relora::testing::HalfAndReference;
using relora::testing::normal_matrix;
using relora::testing::rounded;
using relora::testing::worst_row_error;

namespace {

bool fast_kernels_or_skip() {
  if (cpu_amx_bf16_available()) {
    MESSAGE("the CPU's bf16 kernels: AMX tiles");
    return true;
  }
  if (cpu_avx512_bf16_available()) {
    MESSAGE("the CPU's bf16 kernels: AVX-512 BF16");
    return true;
  }
  MESSAGE("CPU bf16 kernels test skipped: this CPU, OS or build has neither AMX-BF16 nor AVX-512 BF16 (or "
          "RELORA_CPU_AMX=0 and RELORA_CPU_AVX512_BF16=0)");
  return false;
}

double relative(const HostMatrix<float>& a, const HostMatrix<float>& b) {
  return double((a - b).norm()) / std::max(double(b.norm()), 1e-30);
}

struct Shape {
  Index n, k, d;
};

// n, k, d off the kernels' multiples (16 and 32 for the tiles; 6 rows, 64 columns and pairs of K
// for AVX-512), products large enough for two threads, and a depth past AVX-512's blocks of 4096
// in the forward (k) and in the backward (d).
constexpr Shape kShapes[] = {{37, 45, 29},  {70, 300, 130},  {300, 1030, 130}, {5, 64, 1100},
                             {7, 4201, 70}, {9, 70, 4201},   {1000, 64, 20}};

}  // namespace

TEST_CASE("cpu bf16 base on the fast kernels (AMX or AVX-512 BF16): on bf16 inputs every row equals the fp32 layer's") {
  if (!fast_kernels_or_skip()) return;
  for (const Shape s : kShapes) {
    CAPTURE(s.n);
    CAPTURE(s.k);
    CAPTURE(s.d);
    auto backend = make_backend<float>(Device::cpu, BackendOptions{.math = MathMode::tf32});
    const LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = 8, .alpha = 16,
                            .bias = BiasMode::frozen, .seed = 3};
    std::mt19937_64 gen(17);
    HalfAndReference layers(*backend, config, BasePrecision::bf16, gen);
    const HostMatrix<float> x = rounded(normal_matrix<float>(s.n, s.k, gen), BasePrecision::bf16);
    const HostMatrix<float> dy = rounded(normal_matrix<float>(s.n, s.d, gen), BasePrecision::bf16);
    Tensor<float> X = to_backend<float>(*backend, x, "X");
    Tensor<float> dY = to_backend<float>(*backend, dy, "dY"), dY_ref = to_backend<float>(*backend, dy, "dY");
    const HostMatrix<float> y = to_host(*backend, layers.half->forward(X));
    const HostMatrix<float> y_ref = to_host(*backend, layers.reference->forward(X));
    layers.half->backward(dY, true);
    layers.reference->backward(dY_ref, true);
    const double e_y = worst_row_error(y, y_ref);
    const double e_dx = worst_row_error(to_host(*backend, layers.half->dX()), to_host(*backend, layers.reference->dX()));
    MESSAGE(s.n << " x " << s.k << " -> " << s.d << ": worst row of Y " << e_y << ", of dX " << e_dx);
    CHECK(e_y <= 1e-5);
    CHECK(e_dx <= 1e-5);
  }
}

TEST_CASE("cpu bf16 base on the fast kernels (AMX or AVX-512 BF16): tf32 rounds X and dY as CUDA does; strict stays the reference") {
  if (!fast_kernels_or_skip()) return;
  const double u = half_unit_roundoff(BasePrecision::bf16);
  for (const Shape s : kShapes) {
    CAPTURE(s.n);
    auto backend = make_backend<float>(Device::cpu);
    const LoraConfig config{.in_features = s.k, .out_features = s.d, .rank = 8, .alpha = 16,
                            .bias = BiasMode::trainable, .seed = 5};
    std::mt19937_64 gen(29);
    HalfAndReference layers(*backend, config, BasePrecision::bf16, gen);
    const HostMatrix<float> x = normal_matrix<float>(s.n, s.k, gen), dy = normal_matrix<float>(s.n, s.d, gen);
    Tensor<float> X = to_backend<float>(*backend, x, "X");
    struct Pass {
      HostMatrix<float> y, dx, da, db;
    };
    auto run = [&](LoraLinear<float>& layer, MathMode math) {
      backend->set_math_mode(math);
      Tensor<float> dY = to_backend<float>(*backend, dy, "dY");
      Pass p;
      p.y = to_host(*backend, layer.forward(X));
      layer.backward(dY, true);
      p.dx = to_host(*backend, layer.dX());
      p.da = to_host(*backend, layer.dA());
      p.db = to_host(*backend, layer.dB());
      return p;
    };
    const Pass fast = run(*layers.half, MathMode::tf32);
    const Pass strict = run(*layers.half, MathMode::strict);
    const Pass reference = run(*layers.reference, MathMode::strict);
    const double e_y = relative(fast.y, strict.y), e_dx = relative(fast.dx, strict.dx);
    MESSAGE(s.n << " x " << s.k << " -> " << s.d << ": tf32 against strict, Y " << e_y << ", dX " << e_dx
                << " (u = " << u << "); strict against fp32, Y " << relative(strict.y, reference.y));
    CHECK(e_y <= 2 * u);
    CHECK(e_dx <= 2 * u);
    CHECK(e_y > 0);  // X was rounded: the fast kernels ran
    // The adapter's products read X and dY unrounded in both modes.
    CHECK(fast.da == strict.da);
    CHECK(fast.db == strict.db);
    // Strict mode is the reference kernels': fp32 products of the same values.
    CHECK(relative(strict.y, reference.y) <= 1e-5);
    CHECK(relative(strict.dx, reference.dx) <= 1e-5);
  }
}

TEST_CASE("cpu bf16 base on the fast kernels (AMX or AVX-512 BF16): a model trains in tf32 mode as in strict, to bf16's rounding") {
  if (!fast_kernels_or_skip()) return;
  // Two layers on a bf16 base, 30 steps of Adam in each mode: the fast kernels change each product by
  // the rounding of its input, so the losses follow the same curve to about 1%.
  std::mt19937_64 gen(8);
  const HostMatrix<float> x = normal_matrix<float>(256, 10, gen);
  const HostMatrix<float> y = x * normal_matrix<float>(5, 10, gen).transpose();
  auto train = [&](MathMode math) {
    auto backend = make_backend<float>(Device::cpu, BackendOptions{.math = math});
    Model<float> model(backend);
    model.add(LoraConfig{.in_features = 10, .out_features = 64, .rank = 4, .bias = BiasMode::trainable,
                         .seed = 1, .base_precision = BasePrecision::bf16},
              Activation::relu);
    model.add(LoraConfig{.in_features = 64, .out_features = 5, .rank = 4, .seed = 2,
                         .base_precision = BasePrecision::bf16},
              Activation::identity);
    Trainer<float> trainer(model, TrainerConfig{.method = TrainingMethod::lora, .adam = {.lr = 1e-2}});
    Tensor<float> X = to_backend<float>(*backend, x, "X"), Y = to_backend<float>(*backend, y, "Y");
    std::vector<double> losses;
    for (int i = 0; i < 30; ++i) {
      trainer.step(X, Y);
      losses.push_back(trainer.loss());
    }
    return losses;
  };
  const std::vector<double> strict = train(MathMode::strict), fast = train(MathMode::tf32);
  MESSAGE("losses, strict and tf32: first " << strict.front() << " " << fast.front() << ", last " << strict.back()
                                            << " " << fast.back());
  CHECK(fast.back() < fast.front());
  for (std::size_t i = 0; i < strict.size(); ++i) CHECK(std::abs(fast[i] - strict[i]) <= 0.01 * strict[i]);
}
