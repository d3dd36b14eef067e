// Adam's CUDA update (Kingma & Ba 2015; Loshchilov & Hutter 2019 for the decoupled weight decay),
// in the style of apex's multi_tensor_apply: the slots of a step are passed by value, as a table
// in the kernel's parameters, up to kAdamSlots slots per launch, so a step copies nothing from the
// host. Each slot is cut into chunks of kAdamChunk elements; blocks walk the chunks of all slots
// of the table in a grid-stride loop.
//
// Launches per step with S slots: ceil(S / kAdamSlots) check kernels, then as many update
// kernels, and no copy. With up to 48 slots (24 LoRA layers) a step is 2 launches; a step of at
// most kAdamSmall elements in all (a tiny model, where the launches are the cost) is 1 launch of
// one block that checks, waits at a block barrier, then updates. Every launch goes through the
// backend's StepRecorder, so that a recorded step's replay gives them this step's learning rate.
//
// NaN/Inf guard, entirely on the device (NonFiniteReport): the check kernels look at every
// gradient and leave the smallest code (tag, slot index) of a bad one in the flag; the update
// kernels read the flag and do nothing at all if it is set, step counts included. The flag stays
// set until the backend's synchronize() reports it, so every step queued after the bad one is
// skipped too.
#include <cstring>
#include <string>
#include <vector>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_launch.cuh"
#include "optimizers/adam_rule.hpp"
#include "optimizers/cuda/adam_cuda.cuh"

namespace relora {
namespace cuda_detail {
namespace {

constexpr int kAdamSlots = 48;  // slots per launch: the table stays under 4 KB of parameters
// Elements one block takes at a time (4 per thread), so that a layer of a few tens of thousands
// of adapter elements spreads over tens of blocks.
constexpr std::int64_t kAdamChunk = 1024;
constexpr int kAdamBlocksPerSm = 4;
constexpr int kAdamPerThread = int(kAdamChunk / kThreads);  // the check and update kernels have kThreads threads
static_assert(kAdamChunk % kThreads == 0, "a chunk is whole elements per thread");
constexpr std::int64_t kAdamSmall = 4096;  // elements in all up to which one block does check and update
constexpr int kAdamSmallThreads = 1024;
constexpr int kAdamSmallPerThread = int(kAdamSmall / kAdamSmallThreads);

template <typename T>
struct AdamTable {
  T* param[kAdamSlots];
  const T* grad[kAdamSlots];
  T* m[kAdamSlots];
  T* v[kAdamSlots];
  T* step[kAdamSlots];
  std::int64_t size[kAdamSlots];
  std::int64_t chunk_begin[kAdamSlots + 1];  // chunks of the slots before each slot; [count] = all chunks
  double lr[kAdamSlots];                     // group lr times the schedule's factor
  double weight_decay[kAdamSlots];
  int count;
  std::uint32_t first_slot;  // index, among the step's slots, of entry 0
  std::uint32_t tag;         // the step's NonFiniteReport tag
};

// The flag and the update kernels' block counter.
struct AdamGuard {
  unsigned long long* nonfinite;  // NonFiniteReport::flag()
  unsigned int* blocks_done;      // blocks of the running update launch that finished (the last one resets it)
};
static_assert(sizeof(AdamTable<double>) + sizeof(AdamHyper) + sizeof(AdamGuard) <= 4096,
              "the slot table must fit the classic 4 KB kernel-parameter limit");

// The slot that owns `chunk` (slots without elements own no chunk and are skipped).
template <typename T>
__device__ int slot_of_chunk(const AdamTable<T>& table, std::int64_t chunk) {
  int s = 0;
  while (s + 1 < table.count && chunk >= table.chunk_begin[s + 1]) ++s;
  return s;
}

template <typename T>
__global__ void adam_check_kernel(const AdamTable<T> table, const AdamGuard guard) {
  wait_for_previous_grid();  // every Adam kernel is launched overlapped
  allow_next_grid();
  const std::int64_t chunks = table.chunk_begin[table.count];
  for (std::int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {  // uniform over the block
    const int s = slot_of_chunk(table, chunk);
    const std::int64_t begin = (chunk - table.chunk_begin[s]) * kAdamChunk;
    const std::int64_t end = begin + kAdamChunk < table.size[s] ? begin + kAdamChunk : table.size[s];
    const T* g = table.grad[s];
    int bad = 0;
    // A chunk is kAdamPerThread elements a thread: loaded together, then looked at.
    T values[kAdamPerThread];
#pragma unroll
    for (int u = 0; u < kAdamPerThread; ++u) {
      const std::int64_t i = begin + threadIdx.x + std::int64_t(u) * blockDim.x;
      values[u] = i < end ? g[i] : T(0);
    }
#pragma unroll
    for (int u = 0; u < kAdamPerThread; ++u) bad |= !isfinite(values[u]);
    if (__syncthreads_or(bad) && threadIdx.x == 0) {
      atomicMin(guard.nonfinite, NonFiniteReport::code(table.tag, table.first_slot + unsigned(s)));
    }
  }
}

template <typename T>
__global__ void adam_update_kernel(const AdamTable<T> table, const AdamHyper hyper, const AdamGuard guard) {
  wait_for_previous_grid();
  allow_next_grid();
  // Only the check kernels (queued before) and synchronize() write the flag: every thread sees the same value.
  if (*guard.nonfinite != NonFiniteReport::kNone) return;
  const std::int64_t chunks = table.chunk_begin[table.count];
  __shared__ double corrections[2];
  for (std::int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int s = slot_of_chunk(table, chunk);
    // Bias corrections from the slot's own count, in double, as the CPU computes them: once per
    // block (two bias corrections per thread cost more than a thread's few elements).
    __syncthreads();  // the previous chunk's corrections have been read
    if (threadIdx.x == 0) {
      const double t = double(*table.step[s]) + 1;
      corrections[0] = adam_rule::bias_correction(hyper.beta1, t);
      corrections[1] = adam_rule::bias_correction(hyper.beta2, t);
    }
    __syncthreads();
    const double c1 = corrections[0];
    const double c2 = corrections[1];
    const std::int64_t begin = (chunk - table.chunk_begin[s]) * kAdamChunk;
    const std::int64_t end = begin + kAdamChunk < table.size[s] ? begin + kAdamChunk : table.size[s];
    T* param = table.param[s];
    const T* grad = table.grad[s];
    T* m = table.m[s];
    T* v = table.v[s];
    const double lr = table.lr[s];
    const double weight_decay = table.weight_decay[s];
    // Every load of the thread's elements before the first update: one memory round trip, not
    // kAdamPerThread of them in turn.
    T p[kAdamPerThread], g[kAdamPerThread], mi[kAdamPerThread], vi[kAdamPerThread];
#pragma unroll
    for (int u = 0; u < kAdamPerThread; ++u) {
      const std::int64_t i = begin + threadIdx.x + std::int64_t(u) * blockDim.x;
      if (i < end) {
        p[u] = param[i];
        g[u] = grad[i];
        mi[u] = m[i];
        vi[u] = v[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kAdamPerThread; ++u) {
      const std::int64_t i = begin + threadIdx.x + std::int64_t(u) * blockDim.x;
      if (i >= end) continue;
      adam_element(p[u], g[u], mi[u], vi[u], lr, weight_decay, hyper, c1, c2);
      param[i] = p[u];
      m[i] = mi[u];
      v[i] = vi[u];
    }
  }
  // The step counts advance once every block has read them: the last block to finish does it.
  __shared__ bool last_block;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last_block = atomicAdd(guard.blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int s = threadIdx.x; s < table.count; s += blockDim.x) {
    volatile T* step = table.step[s];
    *step = T(double(*step) + 1);
  }
  if (threadIdx.x == 0) *guard.blocks_done = 0;  // ready for the next launch
}

// Check and update in one block, for steps of at most kAdamSmall elements in one table: the block
// barrier between the two passes stands for the launch boundary of the two-kernel path. A tiny
// step's kernel is a chain of memory round trips, so each thread loads everything its (at most
// kAdamSmallPerThread) elements need at once, the flag and the step counts included, keeps it
// in registers across the check, and writes once.
template <typename T>
__global__ void __launch_bounds__(kAdamSmallThreads)
    adam_small_kernel(const AdamTable<T> table, const AdamHyper hyper, const AdamGuard guard) {
  wait_for_previous_grid();
  allow_next_grid();
  __shared__ int first_bad;
  if (threadIdx.x == 0) first_bad = table.count;
  const unsigned long long nonfinite = *guard.nonfinite;
  int slot[kAdamSmallPerThread];
  std::int64_t index[kAdamSmallPerThread];
  T p[kAdamSmallPerThread], g[kAdamSmallPerThread], m[kAdamSmallPerThread], v[kAdamSmallPerThread];
  T steps[kAdamSmallPerThread];
  int bad_slot = table.count;
  for (int j = 0; j < kAdamSmallPerThread; ++j) {
    // Element e of the step, in slot order: find its slot (a handful of slots) and its index.
    std::int64_t e = threadIdx.x + std::int64_t(j) * blockDim.x;
    int s = 0;
    while (s < table.count && e >= table.size[s]) e -= table.size[s++];
    slot[j] = s;
    index[j] = e;
    if (s == table.count) continue;
    g[j] = table.grad[s][e];
    p[j] = table.param[s][e];
    m[j] = table.m[s][e];
    v[j] = table.v[s][e];
    steps[j] = *table.step[s];
    if (!isfinite(g[j]) && s < bad_slot) bad_slot = s;
  }
  __syncthreads();  // first_bad initialised
  if (bad_slot < table.count) atomicMin(&first_bad, bad_slot);
  __syncthreads();
  // The flag is sticky: once set, no update until synchronize() has reported it.
  if (nonfinite != NonFiniteReport::kNone) return;
  if (first_bad < table.count) {
    if (threadIdx.x == 0) {
      atomicMin(guard.nonfinite, NonFiniteReport::code(table.tag, table.first_slot + unsigned(first_bad)));
    }
    return;
  }
  for (int j = 0; j < kAdamSmallPerThread; ++j) {
    const int s = slot[j];
    if (s == table.count) continue;
    // Bias corrections from the slot's own count, in double, as the CPU computes them.
    const double t = double(steps[j]) + 1;
    const double c1 = adam_rule::bias_correction(hyper.beta1, t);
    const double c2 = adam_rule::bias_correction(hyper.beta2, t);
    adam_element(p[j], g[j], m[j], v[j], table.lr[s], table.weight_decay[s], hyper, c1, c2);
    table.param[s][index[j]] = p[j];
    table.m[s][index[j]] = m[j];
    table.v[s][index[j]] = v[j];
  }
  __syncthreads();  // every thread has read the counts
  for (int s = threadIdx.x; s < table.count; s += blockDim.x) *table.step[s] = T(double(*table.step[s]) + 1);
}

template <typename T>
class CudaAdamKernels final : public AdamKernels<T> {
 public:
  CudaAdamKernels(Backend<T>& backend, std::vector<AdamSlot<T>> slots)
      : context_(cuda_context(backend)), slots_(std::move(slots)) {
    if (slots_.size() > 0xffffffffu) {
      throw ConfigError("adam: " + std::to_string(slots_.size()) + " parameters are too many for the CUDA kernels");
    }
    source_.operation = "adam step";
    source_.subject = "gradient of";
    source_.consequence = "no parameter was updated";
    for (const AdamSlot<T>& slot : slots_) {
      source_.names.emplace_back(slot.name ? slot.name : "");
      total_ += slot.size;
    }
    for (std::size_t first = 0; first < slots_.size(); first += kAdamSlots) {
      tables_.emplace_back();
      chunks_.push_back(make_table(first, tables_.back()));
    }
    context_.activate();
    RELORA_CUDA_CHECK(cudaMalloc(&blocks_done_.ptr, sizeof(unsigned int)));
    RELORA_CUDA_CHECK(cudaMemsetAsync(blocks_done_.ptr, 0, sizeof(unsigned int), context_.stream()));
  }

  void update(const AdamHyper& hyper) override {
    if (slots_.empty()) return;
    StepRecorder& recorder = context_.recorder();
    if (!recorder.refreshing()) context_.activate();
    const std::uint32_t tag = context_.nonfinite_report().note(source_);
    AdamGuard guard{context_.nonfinite_report().flag(), static_cast<unsigned int*>(blocks_done_.ptr)};
    AdamHyper hyper_arg = hyper;
    AdamTable<T> table;
    if (tables_.size() == 1 && total_ <= kAdamSmall) {
      // One launch, one block: check, barrier, update.
      this_step(0, hyper.lr_factor, tag, table);
      void* args[] = {&table, &hyper_arg, &guard};
      recorder.launch(reinterpret_cast<const void*>(&adam_small_kernel<T>), dim3(1), dim3(kAdamSmallThreads), 0, args,
                      "adam_small_kernel");
      return;
    }
    const std::int64_t max_grid = std::int64_t(context_.sm_count()) * kAdamBlocksPerSm;
    // Every gradient is checked before any parameter changes.
    for (std::size_t t = 0; t < tables_.size(); ++t) {
      if (chunks_[t] == 0) continue;
      this_step(t, hyper.lr_factor, tag, table);
      const unsigned grid = unsigned(chunks_[t] < max_grid ? chunks_[t] : max_grid);
      void* args[] = {&table, &guard};
      recorder.launch(reinterpret_cast<const void*>(&adam_check_kernel<T>), dim3(grid), dim3(kThreads), 0, args,
                      "adam_check_kernel");
    }
    for (std::size_t t = 0; t < tables_.size(); ++t) {
      this_step(t, hyper.lr_factor, tag, table);
      // At least one block, even when every slot is empty: the last block advances the step counts.
      const unsigned grid = unsigned(chunks_[t] < 1 ? 1 : (chunks_[t] < max_grid ? chunks_[t] : max_grid));
      void* args[] = {&table, &hyper_arg, &guard};
      recorder.launch(reinterpret_cast<const void*>(&adam_update_kernel<T>), dim3(grid), dim3(kThreads), 0, args,
                      "adam_update_kernel");
    }
    // The flag stays on the device: synchronize() reads it, so a step copies nothing to the host.
  }

  void prune(PruneMode mode, double fraction, RngKey key, Tensor<T>& m, Tensor<T>& v) override {
    prune_moments(context_, prune_scratch_, mode, fraction, key, m, v);
  }

 private:
  // Table `first / kAdamSlots` of the slots from `first`, with the groups' learning rates;
  // returns its number of chunks.
  std::int64_t make_table(std::size_t first, AdamTable<T>& table) const {
    std::memset(&table, 0, sizeof table);
    const std::size_t count = slots_.size();
    table.count = int(count - first < std::size_t(kAdamSlots) ? count - first : kAdamSlots);
    table.first_slot = std::uint32_t(first);
    std::int64_t chunks = 0;
    for (int s = 0; s < table.count; ++s) {
      const AdamSlot<T>& slot = slots_[first + std::size_t(s)];
      table.param[s] = slot.param;
      table.grad[s] = slot.grad;
      table.m[s] = slot.m;
      table.v[s] = slot.v;
      table.step[s] = slot.step;
      table.size[s] = slot.size;
      table.lr[s] = slot.lr;
      table.weight_decay[s] = slot.weight_decay;
      table.chunk_begin[s] = chunks;
      chunks += (slot.size + kAdamChunk - 1) / kAdamChunk;
    }
    table.chunk_begin[table.count] = chunks;
    return chunks;
  }

  // Table t as this step launches it: each lr times the schedule's factor, this step's tag.
  void this_step(std::size_t t, double lr_factor, std::uint32_t tag, AdamTable<T>& table) const {
    table = tables_[t];
    for (int s = 0; s < table.count; ++s) table.lr[s] = slots_[t * kAdamSlots + std::size_t(s)].lr * lr_factor;
    table.tag = tag;
  }

  CudaContext& context_;
  std::vector<AdamSlot<T>> slots_;
  std::int64_t total_ = 0;           // elements in all slots
  std::vector<AdamTable<T>> tables_;  // built once: only the learning rates and the tag change per step
  std::vector<std::int64_t> chunks_;  // per table
  NonFiniteSource source_;            // the slots' names, for the guard's message
  DeviceMemory blocks_done_;          // AdamGuard::blocks_done
  PruneScratch prune_scratch_;
};

}  // namespace
}  // namespace cuda_detail

template <typename T>
std::unique_ptr<AdamKernels<T>> make_cuda_adam_kernels(Backend<T>& backend, std::vector<AdamSlot<T>> slots) {
  return std::make_unique<cuda_detail::CudaAdamKernels<T>>(backend, std::move(slots));
}

template std::unique_ptr<AdamKernels<float>> make_cuda_adam_kernels(Backend<float>&, std::vector<AdamSlot<float>>);
template std::unique_ptr<AdamKernels<double>> make_cuda_adam_kernels(Backend<double>&, std::vector<AdamSlot<double>>);

}  // namespace relora
