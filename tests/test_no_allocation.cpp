// A steady training step allocates nothing on the heap through operator new: the layers, model,
// loss, optimizer, schedule and controller size their buffers once. (Eigen's packing buffers for
// large products come from malloc and are not seen here; this test keeps the products small.)
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "relora/relora.hpp"

// AddressSanitizer replaces operator new itself and flags a malloc'd block freed by its delete:
// under it the count is not taken (the release build, which CI runs too, takes it).
#if defined(__SANITIZE_ADDRESS__)
#define RELORA_COUNT_ALLOCATIONS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RELORA_COUNT_ALLOCATIONS 0
#endif
#endif
#ifndef RELORA_COUNT_ALLOCATIONS
#define RELORA_COUNT_ALLOCATIONS 1
#endif

namespace {
std::atomic<long> g_allocations{0};
}  // namespace

#if RELORA_COUNT_ALLOCATIONS
void* operator new(std::size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size ? size : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#endif

using namespace relora;

TEST_CASE("a steady training step, ReLoRA restarts included, allocates nothing") {
  if (!RELORA_COUNT_ALLOCATIONS) {
    MESSAGE("allocation count skipped under AddressSanitizer (it owns operator new)");
    return;
  }
  auto backend = make_backend<float>(Device::cpu);
  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 10, .out_features = 12, .rank = 4, .bias = BiasMode::trainable},
            Activation::relu);
  model.add(LoraConfig{.in_features = 12, .out_features = 5, .rank = 4}, Activation::identity);
  TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-3}, .lora_plus_ratio = 4,
                       .relora = {.restart_every = 5, .restart_warmup_steps = 2}};
  // No schedule here: the jagged schedule keeps every restart step in a growing list (for its
  // checkpointed state), an amortised allocation once per restart, not per step.
  Trainer<float> trainer(model, config);
  Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Random(64, 10), "X");
  Tensor<float> Y = to_backend<float>(*backend, HostMatrix<float>::Random(64, 5), "Y");
  for (int i = 0; i < 6; ++i) trainer.step(X, Y);  // sizes every buffer, passes one restart
  const long before = g_allocations.load();
  for (int i = 0; i < 12; ++i) trainer.step(X, Y);  // two more restarts in here
  const long during = g_allocations.load() - before;
  MESSAGE("operator new calls in 12 steady steps: " << during);
  CHECK(during == 0);
}
