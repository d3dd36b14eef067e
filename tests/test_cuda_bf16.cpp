// A bf16 or fp16 base on CUDA (tensor-core products, fp32 accumulation) against the CPU and
// against an fp32 layer on the same rounded weights. Skipped, with the reason, where no GPU is
// visible.
//
// Tolerances. CUDA rounds the fp32 operand of each product (X, dY) to W's format before the
// tensor cores multiply, as autocast does; each entry moves by at most u = 2^-8 (bf16), 2^-11
// (fp16) of itself, so Y and dX may differ from the fp32 products by about u in norm: the checks
// allow 2u. dA and dB are fp32 products of fp32 values (U, dY, X, dU = s dY B), as on the CPU:
// they agree with it to 1e-5.
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "bf16_test_util.hpp"
#include "relora/relora.hpp"
#include "test_data.hpp"
#include "test_support.hpp"

using namespace relora;
using relora::testing::cuda_or_skip;
using relora::testing::HalfAndReference;
using relora::testing::normal_matrix;

namespace {

double rel(const HostMatrix<float>& a, const HostMatrix<float>& b) {
  return double((a - b).norm()) / std::max(double(b.norm()), 1e-30);
}

}  // namespace

TEST_CASE("cuda bf16 and fp16 base: forward and gradients against fp32 on the same rounded weights, and the CPU") {
  if (!cuda_or_skip("CUDA bf16 test")) return;
  auto gpu = make_backend<float>(Device::cuda);
  auto cpu = make_backend<float>(Device::cpu);
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    const double u = half_unit_roundoff(format);
    for (const Index d : {Index(24), Index(1000)}) {
      const Index k = d == 24 ? 40 : 1536, n = 77;
      const LoraConfig config{.in_features = k, .out_features = d, .rank = 8, .alpha = 16,
                              .bias = BiasMode::frozen, .seed = 4};
      std::mt19937_64 gen_gpu(9), gen_cpu(9);
      HalfAndReference on_gpu(*gpu, config, format, gen_gpu), on_cpu(*cpu, config, format, gen_cpu);
      const HostMatrix<float> x = normal_matrix<float>(n, k, gen_gpu), dy = normal_matrix<float>(n, d, gen_gpu);
      // A backward may use its dY as scratch (Layer::backward): one copy each.
      Tensor<float> gX = to_backend<float>(*gpu, x, "X"), gdY = to_backend<float>(*gpu, dy, "dY");
      Tensor<float> gdY_ref = to_backend<float>(*gpu, dy, "dY");
      Tensor<float> cX = to_backend<float>(*cpu, x, "X"), cdY = to_backend<float>(*cpu, dy, "dY");
      const HostMatrix<float> y = to_host(*gpu, on_gpu.half->forward(gX));
      const HostMatrix<float> y_ref = to_host(*gpu, on_gpu.reference->forward(gX));
      const HostMatrix<float> y_cpu = to_host(*cpu, on_cpu.half->forward(cX));
      on_gpu.half->backward(gdY, true);
      on_gpu.reference->backward(gdY_ref, true);
      on_cpu.half->backward(cdY, true);
      const double e_y = rel(y, y_ref), e_y_cpu = rel(y, y_cpu);
      const double e_dx = rel(to_host(*gpu, on_gpu.half->dX()), to_host(*gpu, on_gpu.reference->dX()));
      const double e_dx_cpu = rel(to_host(*gpu, on_gpu.half->dX()), to_host(*cpu, on_cpu.half->dX()));
      const double e_da = rel(to_host(*gpu, on_gpu.half->dA()), to_host(*cpu, on_cpu.half->dA()));
      const double e_db = rel(to_host(*gpu, on_gpu.half->dB()), to_host(*cpu, on_cpu.half->dB()));
      MESSAGE(std::string(precision_name(format)) << " " << k << " -> " << d << " ("
                                                  << on_gpu.half->implementation() << "): Y vs fp32 " << e_y
                                                  << ", vs CPU "
                                                  << e_y_cpu << "; dX vs fp32 " << e_dx << ", vs CPU " << e_dx_cpu
                                                  << "; dA vs CPU " << e_da << ", dB vs CPU " << e_db
                                                  << " (u = " << u << ")");
      CHECK(e_y <= 2 * u);
      CHECK(e_y_cpu <= 2 * u);
      CHECK(e_dx <= 2 * u);
      CHECK(e_dx_cpu <= 2 * u);
      CHECK(e_da <= 1e-5);
      CHECK(e_db <= 1e-5);
    }
  }
}

TEST_CASE("cuda bf16 base: operands larger than the cast buffer go in row blocks, every row as whole") {
  // The 16-bit cast buffer holds 2^24 values: X (n x k) of the forward and dY (n x d) of the
  // backward above that are cast and multiplied a block of rows at a time (1920 rows at width
  // 8200, so n = 2085 is a full block and a partial one). X and dY are bf16 values already, so the
  // cast is exact and each row of Y and dX must equal the fp32 layer's on the same weights to
  // fp32 accumulation, 1e-5 relative row by row: a row of a block multiplied wrongly or not at all
  // cannot hide in a norm over the whole matrix.
  if (!cuda_or_skip("CUDA bf16 test")) return;
  auto gpu = make_backend<float>(Device::cuda);
  const Index n = 2085, wide = 8200, narrow = 64;
  for (const bool wide_input : {true, false}) {
    const Index k = wide_input ? wide : narrow, d = wide_input ? narrow : wide;
    // A frozen bias: the forward's epilogue adds it to each block of rows once.
    const LoraConfig config{.in_features = k, .out_features = d, .rank = 8, .alpha = 16,
                            .bias = BiasMode::frozen, .seed = 6};
    std::mt19937_64 gen(12);
    HalfAndReference layers(*gpu, config, BasePrecision::bf16, gen);
    const HostMatrix<float> x = relora::testing::rounded(normal_matrix<float>(n, k, gen), BasePrecision::bf16);
    const HostMatrix<float> dy = relora::testing::rounded(normal_matrix<float>(n, d, gen), BasePrecision::bf16);
    Tensor<float> gX = to_backend<float>(*gpu, x, "X");
    Tensor<float> gdY = to_backend<float>(*gpu, dy, "dY"), gdY_ref = to_backend<float>(*gpu, dy, "dY");
    const HostMatrix<float> y = to_host(*gpu, layers.half->forward(gX));
    const HostMatrix<float> y_ref = to_host(*gpu, layers.reference->forward(gX));
    layers.half->backward(gdY, true);
    layers.reference->backward(gdY_ref, true);
    const HostMatrix<float> dx = to_host(*gpu, layers.half->dX()), dx_ref = to_host(*gpu, layers.reference->dX());
    const double e_y = relora::testing::worst_row_error(y, y_ref);
    const double e_dx = relora::testing::worst_row_error(dx, dx_ref);
    MESSAGE(n << " x " << k << " -> " << d << ": worst row of Y " << e_y << ", of dX " << e_dx);
    CHECK(e_y <= 1e-5);
    CHECK(e_dx <= 1e-5);
  }
}

TEST_CASE("cuda bf16 and fp16 base: W rounded to nearest on the GPU has the CPU's bits") {
  // The GPU rounds four values a thread at a time and the rest one by one; every value must land
  // where round_float puts it on the CPU: ties both ways, values beside a tie, subnormals of both
  // formats, fp16's overflow, signed zeros, and normal values of every scale. 37 x 41 values (not
  // a multiple of 4, so the last ones take the scalar loop).
  if (!cuda_or_skip("CUDA bf16 test")) return;
  auto gpu = make_backend<float>(Device::cuda);
  auto cpu = make_backend<float>(Device::cpu);
  const Index d = 37, k = 41;
  std::mt19937_64 gen(21);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> exponent(-140, 20);
  HostMatrix<float> W(d, k);
  const auto from_bits = [](std::uint32_t b) { return half_bits::bits_float(b); };
  const std::vector<float> edges = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.0f, 65520.0f, -70000.0f,
                                    6.0e-8f, 3.0e-8f, 1.0e-40f, -1.0e-45f, 1.17549435e-38f,
                                    from_bits(0x3F808000u), from_bits(0x3F818000u), from_bits(0x3F808001u),
                                    from_bits(0x3F807FFFu), from_bits(0x3F801000u), from_bits(0x3F803000u),
                                    from_bits(0x7F7F8000u), from_bits(0x7F7FFFFFu), from_bits(0x00008000u)};
  for (Index i = 0; i < W.size(); ++i) {
    W.data()[i] = i < Index(edges.size()) ? edges[std::size_t(i)] : std::ldexp(normal(gen), exponent(gen));
  }
  for (const BasePrecision format : {BasePrecision::bf16, BasePrecision::fp16}) {
    const LoraConfig config{.in_features = k, .out_features = d, .rank = 1, .alpha = 1, .seed = 3,
                            .base_precision = format};
    // With an fp32 master (full fine-tuning) set_W rounds on the device; without one, on the host.
    const auto rounded_on = [&](Backend<float>& backend) {
      auto layer = make_lora_linear<float>(backend, config, HostMatrix<float>::Zero(d, k));
      layer->set_train_target(TrainTarget::base);
      layer->set_W(W);
      return layer->base().weight_bits().bits;
    };
    const auto gpu_bits = rounded_on(*gpu), cpu_bits = rounded_on(*cpu);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < gpu_bits.size(); ++i) {
      if (gpu_bits[i] != cpu_bits[i] && differ++ < 5) {
        MESSAGE(std::string(precision_name(format)) << ": value " << i << " (" << W.data()[i] << ") is " << gpu_bits[i]
                                       << " on the GPU and " << cpu_bits[i] << " on the CPU");
      }
    }
    MESSAGE(std::string(precision_name(format)) << ": " << differ << " of " << gpu_bits.size() << " values differ");
    CHECK(differ == 0);
  }
}

TEST_CASE("cuda bf16 base: stochastic and nearest merges give the CPU's bits") {
  if (!cuda_or_skip("CUDA bf16 test")) return;
  auto gpu = make_backend<float>(Device::cuda);
  auto cpu = make_backend<float>(Device::cpu);
  // W + s B A formed exactly in fp32 on both devices (W bf16 values, B and A small powers of two
  // times small integers), so the rounding sees the same input and must give the same bits.
  const Index d = 300, k = 500;
  std::mt19937_64 gen(2);
  const HostMatrix<float> W = relora::testing::rounded(normal_matrix<float>(d, k, gen), BasePrecision::bf16);
  std::uniform_int_distribution<int> small(-8, 8);
  HostMatrix<float> A(1, k), B(d, 1);
  for (Index j = 0; j < k; ++j) A(0, j) = std::ldexp(float(small(gen)), -6);
  for (Index i = 0; i < d; ++i) B(i, 0) = std::ldexp(float(small(gen)), -6);
  for (const BaseMerge merge : {BaseMerge::stochastic, BaseMerge::nearest}) {
    const LoraConfig config{.in_features = k, .out_features = d, .rank = 1, .alpha = 1, .seed = 77,
                            .base_precision = BasePrecision::bf16, .base_merge = merge};
    auto on_gpu = make_lora_linear<float>(*gpu, config, W);
    auto on_cpu = make_lora_linear<float>(*cpu, config, W);
    for (auto* layer : {on_gpu.get(), on_cpu.get()}) {
      layer->set_A(A);
      layer->set_B(B);
      layer->merge();
      layer->reinit();
      layer->set_A(A);
      layer->set_B(B);
      layer->merge();  // a second draw of the rounding stream
    }
    const auto gpu_bits = on_gpu->base().weight_bits().bits, cpu_bits = on_cpu->base().weight_bits().bits;
    std::size_t differ = 0;
    for (std::size_t i = 0; i < gpu_bits.size(); ++i) differ += gpu_bits[i] != cpu_bits[i];
    MESSAGE(std::string(base_merge_name(merge)) << ": " << differ << " of " << gpu_bits.size() << " entries differ");
    CHECK(differ == 0);
  }
}

TEST_CASE("cuda bf16 base: a steady training step allocates nothing, so it records once and replays") {
  if (!cuda_or_skip("CUDA bf16 test")) return;
  // A replay is refused once any tensor was allocated after the recording (the backend counts
  // them, the cast buffers included): every steady step replaying shows that none is.
  auto gpu = make_backend<float>(Device::cuda);
  Model<float> model(gpu);
  model.add(LoraConfig{.in_features = 256, .out_features = 512, .rank = 8, .base_precision = BasePrecision::bf16},
            Activation::relu);
  model.add(LoraConfig{.in_features = 512, .out_features = 64, .rank = 8, .base_precision = BasePrecision::bf16},
            Activation::identity);
  TrainerConfig config{.method = TrainingMethod::lora, .adam = {.lr = 1e-3}};
  Trainer<float> trainer(model, config);
  std::mt19937_64 gen(1);
  Tensor<float> X = to_backend<float>(*gpu, normal_matrix<float>(128, 256, gen), "X");
  Tensor<float> Y = to_backend<float>(*gpu, normal_matrix<float>(128, 64, gen), "Y");
  for (int i = 0; i < 3; ++i) trainer.step(X, Y);
  const std::int64_t replayed = trainer.replayed_steps();
  for (int i = 0; i < 10; ++i) trainer.step(X, Y);
  MESSAGE("recorded " << trainer.recorded_steps() << ", replayed " << trainer.replayed_steps());
  CHECK(trainer.replayed_steps() - replayed == 10);
  CHECK(std::isfinite(double(trainer.loss())));
}
