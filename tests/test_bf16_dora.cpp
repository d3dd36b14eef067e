// DoRA on a bf16 or fp16 base: DoraLinear reads W through FrozenBase (X W^T, dY W, and W's rows
// in fp32 blocks for its norms, W A^T and the exact gradient's Bq^T W), so on the CPU it must
// agree with an fp32 DoraLinear holding the same rounded weights to fp32 rounding (1e-5), in
// both gradient modes, with W in one block of rows and in several. Merges land as LoRA's do.
#include <doctest/doctest.h>

#include <random>

#include "bf16_test_util.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::normal_matrix;
using relora::testing::rounded;

namespace {

double rel(const HostMatrix<float>& a, const HostMatrix<float>& b) {
  return double((a - b).norm()) / std::max(double(b.norm()), 1e-30);
}

struct DoraPair {
  std::unique_ptr<DoraLinear<float>> half, reference;
  DoraPair(Backend<float>& backend, DoraConfig config, BasePrecision format, BaseMerge merge, std::mt19937_64& gen) {
    const Index d = config.lora.out_features, k = config.lora.in_features, r = config.lora.rank;
    const HostMatrix<float> W = normal_matrix<float>(d, k, gen, 0.3);
    DoraConfig half_config = config;
    half_config.lora.base_precision = format;
    half_config.lora.base_merge = merge;
    half = std::make_unique<DoraLinear<float>>(backend, half_config, W);
    reference = std::make_unique<DoraLinear<float>>(backend, config, rounded(W, format));
    const HostMatrix<float> B = normal_matrix<float>(d, r, gen, 0.2);
    half->set_B(B);
    reference->set_B(B);
    reference->set_A(to_host(backend, half->A()));
    HostMatrix<float> m = to_host(backend, half->m());
    m.array() *= 1.1f;
    half->set_m(m);
    reference->set_m(m);
  }
};

}  // namespace

TEST_CASE("bf16 and fp16 DoRA: forward and gradients match an fp32 DoraLinear on the same rounded weights") {
  // Where the CPU has AMX or AVX-512 BF16 the test runs again in tf32 mode (a bf16 base's products on them,
  // X and dY rounded to bf16), and where a GPU is visible on CUDA (tensor cores, the operands
  // rounded to W's format; W A^T from A's three bf16 terms), on inputs that are bf16 values
  // already, so the bounds stay 1e-5 but for dX (below).
  struct Run {
    Device device;
    MathMode math;
  };
  std::vector<Run> runs{{Device::cpu, MathMode::strict}};
  if (cpu_amx_bf16_available() || cpu_avx512_bf16_available()) runs.push_back({Device::cpu, MathMode::tf32});
  if (relora::testing::cuda_or_skip("CUDA DoRA on a 16-bit base")) runs.push_back({Device::cuda, MathMode::strict});
  for (const Run run : runs) {
    const bool rounds_operands = run.device == Device::cuda || run.math == MathMode::tf32;
    CAPTURE(int(run.device));
    CAPTURE(int(run.math));
    auto backend = make_backend<float>(run.device, BackendOptions{.math = run.math});
    std::mt19937_64 gen(31);
    for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
      for (const DoraGradient gradient : {DoraGradient::detached, DoraGradient::exact}) {
        // 7 x 13: one block of W's rows; 2100 x 2048: FrozenBase's row blocks of 2^22 elements, two of them.
        for (const Index d : {Index(7), Index(2100)}) {
          const Index k = d == 7 ? 13 : 2048, n = 5;
          const DoraConfig config{.lora = {.in_features = k, .out_features = d, .rank = 3, .alpha = 6,
                                           .bias = BiasMode::frozen, .seed = 4},
                                  .gradient = gradient};
          DoraPair pair(*backend, config, format, BaseMerge::stochastic, gen);
          HostMatrix<float> x = normal_matrix<float>(n, k, gen), dy = normal_matrix<float>(n, d, gen);
          if (rounds_operands) {
            x = rounded(x, BasePrecision::bf16);
            dy = rounded(dy, BasePrecision::bf16);
          }
          // A backward may use its dY as scratch (Layer::backward): one copy each.
          Tensor<float> X = to_backend<float>(*backend, x, "X"), dY = to_backend<float>(*backend, dy, "dY");
          Tensor<float> dY_ref = to_backend<float>(*backend, dy, "dY");
          const HostMatrix<float> y = to_host(*backend, pair.half->forward(X));
          const HostMatrix<float> y_ref = to_host(*backend, pair.reference->forward(X));
          Tensor<float> dX_half = backend->allocate(n, k), dX_ref = backend->allocate(n, k);
          pair.half->backward(dY, &dX_half);
          pair.reference->backward(dY_ref, &dX_ref);
          const auto e = [&](const Tensor<float>& a, const Tensor<float>& b) {
            return rel(to_host(*backend, a), to_host(*backend, b));
          };
          const double e_y = rel(y, y_ref), e_dx = e(pair.half->dX(), pair.reference->dX());
          const double e_da = e(pair.half->dA(), pair.reference->dA()), e_db = e(pair.half->dB(), pair.reference->dB());
          const double e_dm = e(pair.half->dm(), pair.reference->dm());
          const std::string mode = gradient == DoraGradient::exact ? "exact" : "detached";
          // (const char* values as std::string: doctest prints a const char* as a pointer.)
          MESSAGE(backend->description() << ", " << std::string(precision_name(format))
                                          << std::string(run.math == MathMode::tf32 ? " tf32 " : " ") << mode << " " << k
                                          << " -> " << d << ": Y " << e_y
                                                      << ", dX " << e_dx << ", dA " << e_da << ", dB " << e_db
                                                      << ", dm " << e_dm);
          CHECK(e_y <= 1e-5);
          // Where the operands are rounded, the backward's is dY scaled by g (DoRA's row factors),
          // no longer a bf16 value: it moves by up to u = 2^-8 of itself (2^-11 for fp16).
          CHECK(e_dx <= (rounds_operands ? 2 * half_unit_roundoff(BasePrecision::bf16) : 1e-5));
          CHECK(e_da <= 1e-5);
          CHECK(e_db <= 1e-5);
          CHECK(e_dm <= 1e-5);
        }
      }
    }
  }
}

TEST_CASE("bf16 DoRA merges: the master keeps the merged output to fp32 rounding, stochastic to bf16's") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937_64 gen(32);
  const Index n = 6, k = 40, d = 24;
  const DoraConfig config{.lora = {.in_features = k, .out_features = d, .rank = 4, .alpha = 8, .seed = 5}};
  const HostMatrix<float> x = normal_matrix<float>(n, k, gen);
  for (const BaseMerge merge : {BaseMerge::fp32_master, BaseMerge::stochastic}) {
    DoraPair pair(*backend, config, BasePrecision::bf16, merge, gen);
    Tensor<float> X = to_backend<float>(*backend, x, "X");
    const HostMatrix<float> before = to_host(*backend, pair.half->forward(X));
    pair.half->merge();
    const HostMatrix<float> merged = to_host(*backend, pair.half->forward(X));
    const double e_merged = rel(merged, before);
    pair.half->unmerge();
    const double e_unmerged = rel(to_host(*backend, pair.half->forward(X)), before);
    MESSAGE(std::string(base_merge_name(merge)) << ": merged vs unmerged output " << e_merged
                                                << ", after unmerge " << e_unmerged);
    // fp32 master: W is rounded to nearest from an exact merge, so the output moves by about
    // u = 2^-8 in norm at most; stochastic rounding by at most twice that.
    const double bound = merge == BaseMerge::fp32_master ? 0x1.0p-8 : 0x1.0p-7;
    CHECK(e_merged <= bound);
    CHECK(e_unmerged <= 2 * bound);
  }
}

TEST_CASE("a bf16 DoRA layer's state restores bit for bit") {
  auto backend = make_backend<float>(Device::cpu);
  std::mt19937_64 gen(33);
  const DoraConfig config{.lora = {.in_features = 16, .out_features = 8, .rank = 2, .bias = BiasMode::frozen,
                                   .seed = 6, .base_precision = BasePrecision::bf16}};
  DoraLinear<float> layer(*backend, config, normal_matrix<float>(8, 16, gen));
  layer.set_B(normal_matrix<float>(8, 2, gen, 0.1));
  layer.merge();
  layer.reinit();
  StateDict<float> state;
  layer.save_state(state);
  CHECK(state.has_half_tensor("weight"));
  DoraLinear<float> fresh(*backend, config);
  fresh.restore_state(state);
  CHECK(fresh.base().weight_bits().bits == layer.base().weight_bits().bits);
  CHECK(to_host(*backend, fresh.m()) == to_host(*backend, layer.m()));
  const HostMatrix<float> x = normal_matrix<float>(3, 16, gen);
  Tensor<float> X = to_backend<float>(*backend, x, "X");
  CHECK(to_host(*backend, fresh.forward(X)) == to_host(*backend, layer.forward(X)));
}
