// A steady training step allocates nothing on the heap: the layers, model, loss, optimizer,
// schedule and controller size their buffers once, and the CPU backend keeps Eigen's GEMM packing
// buffers (which Eigen itself mallocs on every product above 128 KB) in a workspace of its own.
// Counted twice: operator new, and (on glibc) malloc itself, which Eigen and libgomp call directly.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>
#include <string>
#include <utility>

#include <dlfcn.h>
#include <pthread.h>

#include "relora/relora.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

// AddressSanitizer replaces operator new and malloc itself and flags a malloc'd block freed by its
// delete: under it (or another sanitizer that owns malloc) the count is not taken (the release
// build, which CI runs too, takes it).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define RELORA_COUNT_ALLOCATIONS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define RELORA_COUNT_ALLOCATIONS 0
#endif
#endif
#ifndef RELORA_COUNT_ALLOCATIONS
#define RELORA_COUNT_ALLOCATIONS 1
#endif
// malloc is counted by defining it in this executable, which takes precedence over libc's for every
// caller (libgomp and libstdc++ included), and passing on to glibc's own entry points.
#if RELORA_COUNT_ALLOCATIONS && defined(__GLIBC__)
#define RELORA_COUNT_MALLOC 1
#else
#define RELORA_COUNT_MALLOC 0
#endif

namespace {
std::atomic<long> g_allocations{0};  // operator new
std::atomic<long> g_mallocs{0};      // malloc, calloc, realloc and the aligned ones

// While a count is armed, only the threads that run the step count: the one that armed it (and
// calls Trainer::step) and OpenMP's workers inside a parallel region. The process's other threads
// are counted apart: the CUDA driver runs threads of its own, which allocate on their own schedule
// once an earlier test in this process has used the GPU. The first few counted calls keep their
// return address and thread, named afterwards through dladdr, so that a failing count says which
// library and function allocated.
constexpr int kCallersKept = 8;
std::atomic<bool> g_armed{false};
std::atomic<long> g_other_thread_mallocs{0};
std::atomic<int> g_callers_seen{0};
void* g_callers[kCallersKept];
bool g_caller_on_main[kCallersKept];
pthread_t g_stepping_thread;
// Set on the threads of data-parallel ranks (run_ranks), which all run steps.
thread_local bool t_rank_thread = false;

bool on_stepping_thread() { return t_rank_thread || pthread_equal(pthread_self(), g_stepping_thread) != 0; }

bool runs_the_step() {
  if (on_stepping_thread()) return true;
#if defined(_OPENMP)
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

[[maybe_unused]] void count_malloc(void* caller) {
  if (!g_armed.load(std::memory_order_relaxed)) {
    g_mallocs.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (!runs_the_step()) {
    g_other_thread_mallocs.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  g_mallocs.fetch_add(1, std::memory_order_relaxed);
  const int slot = g_callers_seen.fetch_add(1, std::memory_order_relaxed);
  if (slot >= kCallersKept) return;
  g_callers[slot] = caller;
  g_caller_on_main[slot] = on_stepping_thread();
}
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

#if RELORA_COUNT_MALLOC
extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* p, std::size_t size);
void* __libc_memalign(std::size_t alignment, std::size_t size);
void __libc_free(void* p);

void* malloc(std::size_t size) noexcept {
  count_malloc(__builtin_return_address(0));
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) noexcept {
  count_malloc(__builtin_return_address(0));
  return __libc_calloc(count, size);
}
void* realloc(void* p, std::size_t size) noexcept {
  count_malloc(__builtin_return_address(0));
  return __libc_realloc(p, size);
}
void free(void* p) noexcept { __libc_free(p); }
void* memalign(std::size_t alignment, std::size_t size) noexcept {
  count_malloc(__builtin_return_address(0));
  return __libc_memalign(alignment, size);
}
void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  count_malloc(__builtin_return_address(0));
  return __libc_memalign(alignment, size);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t size) noexcept {
  count_malloc(__builtin_return_address(0));
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  void* p = __libc_memalign(alignment, size);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
}
#endif

// Threads started, counted by defining pthread_create in this executable (libgomp's calls reach it
// first) and passing on to the C library's: a steady step must start none.
namespace {
std::atomic<long> g_threads_started{0};
}
#if RELORA_COUNT_ALLOCATIONS && defined(__GLIBC__)
#define RELORA_COUNT_THREADS 1
extern "C" int pthread_create(pthread_t* thread, const pthread_attr_t* attr, void* (*start)(void*), void* arg) {
  using Create = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
  static const Create next = reinterpret_cast<Create>(dlsym(RTLD_NEXT, "pthread_create"));
  g_threads_started.fetch_add(1, std::memory_order_relaxed);
  return next(thread, attr, start, arg);
}
#else
#define RELORA_COUNT_THREADS 0
#endif

using namespace relora;

namespace {

// Runs the loop on `threads` OpenMP threads (and as many for Eigen, as relora_bench does), then
// restores the thread counts it found.
template <typename F>
void with_threads(int threads, F&& f) {
#if defined(_OPENMP)
  const int omp_before = omp_get_max_threads();
  omp_set_num_threads(threads);
  Eigen::setNbThreads(threads);
  f();
  omp_set_num_threads(omp_before);
  Eigen::setNbThreads(0);  // back to following OpenMP
#else
  (void)threads;
  f();
#endif
}

// Arms the malloc count on this thread (see count_malloc).
void keep_malloc_callers() {
  g_stepping_thread = pthread_self();
  g_callers_seen.store(0);
  g_other_thread_mallocs.store(0);
  g_armed.store(true);
}

// Disarms it and names each kept caller (its library, and its function where exported), and how
// many calls came from threads that do not run the step.
std::string kept_malloc_callers() {
  g_armed.store(false);
  const int kept = std::min(g_callers_seen.load(), kCallersKept);
  std::ostringstream out;
  for (int i = 0; i < kept; ++i) {
    out << "\n  malloc called from " << (g_caller_on_main[i] ? "the stepping thread" : "an OpenMP worker") << ": ";
    Dl_info info{};
    if (dladdr(g_callers[i], &info) != 0 && info.dli_fname != nullptr) {
      const char* at = static_cast<const char*>(g_callers[i]);
      out << info.dli_fname;
      if (info.dli_sname != nullptr) {
        out << " " << info.dli_sname << "+" << (at - static_cast<const char*>(info.dli_saddr));
      } else {
        out << " +" << (at - static_cast<const char*>(info.dli_fbase));
      }
    } else {
      out << g_callers[i];
    }
  }
  out << "\n  (" << g_other_thread_mallocs.load() << " malloc calls from threads that do not run the step, not counted)";
  return out.str();
}

// What a run of steady steps allocated: operator new calls, malloc calls on the threads that run
// the step, the callers kept for a failure's message, and the malloc calls of other threads (not
// counted against the step).
struct SteadyAllocations {
  long new_calls = 0;
  long malloc_calls = 0;
  long other_thread_mallocs = 0;
  std::string callers;
};

template <typename F>
SteadyAllocations count_allocations(F&& steps) {
  const long news = g_allocations.load(), mallocs = g_mallocs.load();
  keep_malloc_callers();
  steps();
  SteadyAllocations counted;
  counted.new_calls = g_allocations.load() - news;
  counted.malloc_calls = g_mallocs.load() - mallocs;
  counted.callers = kept_malloc_callers();
  counted.other_thread_mallocs = g_other_thread_mallocs.load();
  return counted;
}

}  // namespace

TEST_CASE("a steady training step, ReLoRA restarts included, allocates nothing") {
  if (!RELORA_COUNT_ALLOCATIONS) {
    MESSAGE("allocation count skipped under a sanitizer (it owns operator new and malloc)");
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
  const SteadyAllocations counted = count_allocations([&] {
    for (int i = 0; i < 12; ++i) trainer.step(X, Y);  // two more restarts in here
  });
  MESSAGE("operator new calls in 12 steady steps: " << counted.new_calls << ", malloc calls: " << counted.malloc_calls
          << " (and " << counted.other_thread_mallocs << " on threads outside the step)");
  CHECK(counted.new_calls == 0);
  CHECK_MESSAGE(counted.malloc_calls == 0, counted.callers);
}

TEST_CASE("a steady data-parallel step on two thread ranks, ReLoRA restarts included, allocates nothing") {
  if (!RELORA_COUNT_ALLOCATIONS) {
    MESSAGE("allocation count skipped under a sanitizer (it owns operator new and malloc)");
    return;
  }
  // Counted on both ranks' threads, between barriers; the buckets' sums, the loss's and the
  // (unchanged) row count's included.
  long new_calls = -1, malloc_calls = -1;
  std::string callers;
  run_ranks<float>(2, [&](const std::shared_ptr<Communicator<float>>& comm) {
    t_rank_thread = true;
    auto backend = make_backend<float>(Device::cpu);
    Model<float> model(backend);
    model.add(LoraConfig{.in_features = 10, .out_features = 12, .rank = 4, .bias = BiasMode::trainable},
              Activation::relu);
    model.add(LoraConfig{.in_features = 12, .out_features = 5, .rank = 4}, Activation::identity);
    TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-3}, .lora_plus_ratio = 4,
                         .relora = {.restart_every = 5, .restart_warmup_steps = 2, .warm_start_steps = 2}};
    Trainer<float> trainer(model, config, nullptr, nullptr, comm);
    Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Random(32, 10), "X");
    Tensor<float> Y = to_backend<float>(*backend, HostMatrix<float>::Random(32, 5), "Y");
    for (int i = 0; i < 8; ++i) trainer.step(X, Y);  // sizes every buffer, ends the warm start, passes a restart
    comm->barrier();
    long news = 0, mallocs = 0;
    if (comm->rank() == 0) {
      news = g_allocations.load();
      mallocs = g_mallocs.load();
      keep_malloc_callers();
    }
    comm->barrier();
    for (int i = 0; i < 12; ++i) trainer.step(X, Y);  // two more restarts in here
    comm->barrier();
    if (comm->rank() == 0) {
      new_calls = g_allocations.load() - news;
      malloc_calls = g_mallocs.load() - mallocs;
      callers = kept_malloc_callers();
    }
    t_rank_thread = false;
  });
  MESSAGE("operator new calls in 12 steady steps of 2 ranks: " << new_calls << ", malloc calls: " << malloc_calls);
  CHECK(new_calls == 0);
  CHECK_MESSAGE(malloc_calls == 0, callers);
}

TEST_CASE("a steady DoRA training step (dropout, exact gradient), ReLoRA restarts included, allocates nothing") {
  if (!RELORA_COUNT_ALLOCATIONS) {
    MESSAGE("allocation count skipped under a sanitizer (it owns operator new and malloc)");
    return;
  }
  // Without dropout the first layer's backward (no dX) reads Z back from Y and leaves dY unscaled.
  // On a bf16 base in tf32 mode the CPU's bf16 kernels run too (AMX or AVX-512 BF16 where the CPU
  // has them).
  using Run = std::pair<BasePrecision, double>;  // the base's format, the dropout
  for (const auto& [base, dropout] : {Run{BasePrecision::fp32, 0.1}, Run{BasePrecision::fp32, 0.0},
                                      Run{BasePrecision::bf16, 0.1}, Run{BasePrecision::bf16, 0.0}}) {
    CAPTURE(dropout);
    CAPTURE(int(base));
    auto backend = make_backend<float>(
        Device::cpu, BackendOptions{.math = base == BasePrecision::bf16 ? MathMode::tf32 : MathMode::strict});
    Model<float> model(backend);
    model.add(std::make_unique<DoraLinear<float>>(
                  *backend, DoraConfig{.lora = {.in_features = 10, .out_features = 12, .rank = 4, .dropout = dropout,
                                                .bias = BiasMode::trainable, .base_precision = base}}),
              Activation::relu);
    model.add(std::make_unique<DoraLinear<float>>(
                  *backend, DoraConfig{.lora = {.in_features = 12, .out_features = 5, .rank = 4, .base_precision = base},
                                       .gradient = DoraGradient::exact}),
              Activation::identity);
    TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-3},
                         .relora = {.restart_every = 5, .restart_warmup_steps = 2}};
    Trainer<float> trainer(model, config);
    Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Random(64, 10), "X");
    Tensor<float> Y = to_backend<float>(*backend, HostMatrix<float>::Random(64, 5), "Y");
    for (int i = 0; i < 6; ++i) trainer.step(X, Y);  // sizes every buffer, passes one restart
    const SteadyAllocations counted = count_allocations([&] {
      for (int i = 0; i < 12; ++i) trainer.step(X, Y);  // two more restarts in here
    });
    MESSAGE("operator new calls in 12 steady DoRA steps: " << counted.new_calls << ", malloc calls: "
            << counted.malloc_calls << " (and " << counted.other_thread_mallocs << " on threads outside the step)");
    CHECK(counted.new_calls == 0);
    CHECK_MESSAGE(counted.malloc_calls == 0, counted.callers);
  }
}

TEST_CASE("a steady step with products above Eigen's stack limit allocates nothing, on 1 and 2 threads") {
  if (!RELORA_COUNT_ALLOCATIONS) {
    MESSAGE("allocation count skipped under a sanitizer (it owns operator new and malloc)");
    return;
  }
  if (!RELORA_COUNT_MALLOC) MESSAGE("malloc not counted here (not glibc): operator new only");
  // 512 wide at n = 256: every base product's packing blocks pass Eigen's 128 KB stack limit.
  for (int threads : {1, 2}) {
    CAPTURE(threads);
    with_threads(threads, [&] {
      auto backend = make_backend<float>(Device::cpu);
      Model<float> model(backend);
      model.add(LoraConfig{.in_features = 512, .out_features = 512, .rank = 8, .bias = BiasMode::trainable},
                Activation::relu);
      model.add(LoraConfig{.in_features = 512, .out_features = 512, .rank = 8}, Activation::identity);
      TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-3},
                           .relora = {.restart_every = 4, .restart_warmup_steps = 1}};
      Trainer<float> trainer(model, config);
      Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Random(256, 512), "X");
      Tensor<float> Y = to_backend<float>(*backend, HostMatrix<float>::Random(256, 512), "Y");
      for (int i = 0; i < 5; ++i) trainer.step(X, Y);  // sizes every buffer and workspace, passes a restart
      const SteadyAllocations counted = count_allocations([&] {
        for (int i = 0; i < 8; ++i) trainer.step(X, Y);  // two more restarts in here
      });
      MESSAGE(threads << " thread(s): operator new calls in 8 steady steps: " << counted.new_calls
                      << ", malloc calls: " << counted.malloc_calls << " (and " << counted.other_thread_mallocs
                      << " on threads outside the step)");
      CHECK(counted.new_calls == 0);
      CHECK_MESSAGE(counted.malloc_calls == 0, counted.callers);
    });
  }
}

TEST_CASE("a steady CPU step starts no thread: every parallel region opens the same team") {
  if (!RELORA_COUNT_THREADS) {
    MESSAGE("thread count skipped (a sanitizer owns pthread_create, or not glibc)");
    return;
  }
  // Three layers of width w at batch n on 8 threads, sizes whose products want different numbers
  // of threads (at n 256, w 64: about 1M and 262k multiply-adds). libgomp ends the threads a
  // smaller team leaves out and starts them again for the next larger team, so regions sized by
  // their work would start threads in every step.
  struct Size {
    Index n, w;
  };
  for (const Size size : {Size{256, 64}, Size{4096, 16}, Size{1024, 128}, Size{64, 512}}) {
    CAPTURE(size.n);
    CAPTURE(size.w);
    with_threads(8, [&] {
      auto backend = make_backend<float>(Device::cpu);
      Model<float> model(backend);
      const LoraConfig layer{.in_features = size.w, .out_features = size.w, .rank = std::min<Index>(16, size.w / 4)};
      model.add(layer, Activation::relu);
      model.add(layer, Activation::relu);
      model.add(layer, Activation::identity);
      Trainer<float> trainer(model, TrainerConfig{.method = TrainingMethod::lora, .adam = {.lr = 1e-3}});
      Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Random(size.n, size.w), "X");
      Tensor<float> Y = to_backend<float>(*backend, HostMatrix<float>::Random(size.n, size.w), "Y");
      for (int i = 0; i < 3; ++i) trainer.step(X, Y);
      const long before = g_threads_started.load();
      for (int i = 0; i < 5; ++i) trainer.step(X, Y);
      const long started = g_threads_started.load() - before;
      MESSAGE("n " << size.n << ", width " << size.w << ": threads started in 5 steady steps on 8 threads: " << started);
      CHECK(started == 0);
    });
  }
}

TEST_CASE("a steady step of a bf16 or fp16 base, ReLoRA restarts included, allocates nothing, on 1 and 2 threads") {
  if (!RELORA_COUNT_ALLOCATIONS) {
    MESSAGE("allocation count skipped under a sanitizer (it owns operator new and malloc)");
    return;
  }
  // 600 x 2000: W spans two of the CPU kernels' widened panels, so the column blocks are used too.
  // In tf32 mode a bf16 base multiplies on AMX tiles or AVX-512 BF16 where the CPU has them.
  for (const BaseMerge merge : {BaseMerge::stochastic, BaseMerge::fp32_master}) {
    for (const MathMode math : {MathMode::strict, MathMode::tf32}) {
      for (int threads : {1, 2}) {
        CAPTURE(threads);
        with_threads(threads, [&] {
          auto backend = make_backend<float>(Device::cpu, BackendOptions{.math = math});
          Model<float> model(backend);
          const BasePrecision precision = merge == BaseMerge::stochastic ? BasePrecision::bf16 : BasePrecision::fp16;
          model.add(LoraConfig{.in_features = 2000, .out_features = 600, .rank = 8, .bias = BiasMode::frozen,
                               .base_precision = precision, .base_merge = merge},
                    Activation::relu);
          model.add(LoraConfig{.in_features = 600, .out_features = 64, .rank = 8, .base_precision = precision,
                               .base_merge = merge},
                    Activation::identity);
          TrainerConfig config{.method = TrainingMethod::relora, .adam = {.lr = 1e-3},
                               .relora = {.restart_every = 3, .restart_warmup_steps = 1}};
          Trainer<float> trainer(model, config);
          Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Random(64, 2000), "X");
          Tensor<float> Y = to_backend<float>(*backend, HostMatrix<float>::Random(64, 64), "Y");
          for (int i = 0; i < 4; ++i) trainer.step(X, Y);  // sizes every buffer and workspace, passes a restart
          const SteadyAllocations counted = count_allocations([&] {
            for (int i = 0; i < 6; ++i) trainer.step(X, Y);  // two more restarts in here
          });
          const std::string what = std::string(precision_name(precision)) + " " + base_merge_name(merge) +
                                   (math == MathMode::tf32 ? ", tf32" : ", strict");
          MESSAGE(what << ", " << threads << " thread(s): operator new calls in 6 steady steps: " << counted.new_calls
                       << ", malloc calls: " << counted.malloc_calls << " (and " << counted.other_thread_mallocs
                       << " on threads outside the step)");
          CHECK(counted.new_calls == 0);
          CHECK_MESSAGE(counted.malloc_calls == 0, counted.callers);
        });
      }
    }
  }
}

TEST_CASE("gemm on the backend's packing workspace is Eigen's product to the bit") {
  // The same blocking, thread split and kernels as C.noalias() += alpha * op(A) * op(B). Shapes
  // outside the backend's slab split (a LoRA-rank side with much work), where that holds for any
  // thread count; on 1 thread the slab split is off and every shape compares.
  auto backend = make_backend<float>(Device::cpu);
  struct Shape {
    Index m, n, k;
  };
  for (int threads : {1, 2}) {
    with_threads(threads, [&] {
      for (const Shape s : {Shape{300, 520, 264}, Shape{512, 300, 700}, Shape{5, 7, 3}, Shape{1, 300, 400}}) {
        for (const Trans ta : {Trans::no, Trans::yes}) {
          for (const Trans tb : {Trans::no, Trans::yes}) {
            CAPTURE(threads);
            CAPTURE(s.m);
            CAPTURE(s.n);
            CAPTURE(s.k);
            CAPTURE(int(ta));
            CAPTURE(int(tb));
            const HostMatrix<float> A = ta == Trans::no ? HostMatrix<float>::Random(s.m, s.k)
                                                        : HostMatrix<float>::Random(s.k, s.m);
            const HostMatrix<float> B = tb == Trans::no ? HostMatrix<float>::Random(s.k, s.n)
                                                        : HostMatrix<float>::Random(s.n, s.k);
            HostMatrix<float> expected = HostMatrix<float>::Random(s.m, s.n);
            Tensor<float> tA = to_backend<float>(*backend, A, "A"), tB = to_backend<float>(*backend, B, "B");
            Tensor<float> tC = to_backend<float>(*backend, expected, "C");
            const float alpha = 0.37f;
            if (ta == Trans::no && tb == Trans::no) expected.noalias() += alpha * A * B;
            if (ta == Trans::no && tb == Trans::yes) expected.noalias() += alpha * A * B.transpose();
            if (ta == Trans::yes && tb == Trans::no) expected.noalias() += alpha * A.transpose() * B;
            if (ta == Trans::yes && tb == Trans::yes) expected.noalias() += alpha * A.transpose() * B.transpose();
            backend->gemm(ta, tb, alpha, tA, tB, 1.0f, tC);
            const HostMatrix<float> got = to_host(*backend, tC);
            const float max_diff = (got - expected).cwiseAbs().maxCoeff();
            CHECK_MESSAGE(std::memcmp(got.data(), expected.data(), sizeof(float) * got.size()) == 0,
                          "max |difference| " << max_diff);
          }
        }
      }
    });
  }
}

TEST_CASE("a steady GaLore step (full fine-tuning, between two SVDs) allocates nothing") {
  if (!RELORA_COUNT_ALLOCATIONS) {
    MESSAGE("allocation count skipped under a sanitizer (it owns operator new and malloc)");
    return;
  }
  auto backend = make_backend<float>(Device::cpu);
  Model<float> model(backend);
  model.add(LoraConfig{.in_features = 10, .out_features = 12, .rank = 2, .bias = BiasMode::trainable},
            Activation::relu);
  model.add(LoraConfig{.in_features = 12, .out_features = 5, .rank = 2}, Activation::identity);
  for (GaloreProjection projection : {GaloreProjection::one_sided, GaloreProjection::two_sided}) {
    const GaloreConfig galore{.lr = 1e-3, .weight_decay = 0.01, .rank = 3, .update_gap = 8,
                              .projection = projection, .moments = MomentsAtRefresh::reproject};
    Trainer<float> trainer(model, TrainerConfig{.method = TrainingMethod::full_finetune,
                                                .optimizer = optimizer_factory<Galore>(galore)});
    Tensor<float> X = to_backend<float>(*backend, HostMatrix<float>::Random(64, 10), "X");
    Tensor<float> Y = to_backend<float>(*backend, HostMatrix<float>::Random(64, 5), "Y");
    for (int i = 0; i < 9; ++i) trainer.step(X, Y);  // SVDs at steps 0 and 8 (they may allocate)
    const SteadyAllocations counted = count_allocations([&] {
      for (int i = 9; i < 16; ++i) trainer.step(X, Y);  // the next SVD is at step 16
    });
    MESSAGE(std::string(projection_name(projection)) << ": operator new calls in 7 GaLore steps: " << counted.new_calls
                                        << ", malloc calls: " << counted.malloc_calls << " (and "
                                        << counted.other_thread_mallocs << " on threads outside the step)");
    CHECK(counted.new_calls == 0);
    CHECK_MESSAGE(counted.malloc_calls == 0, counted.callers);
  }
}
