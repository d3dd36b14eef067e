// The fused Adam/AdamW update of the CUDA backend (Kingma & Ba 2015; Loshchilov & Hutter 2019 for
// the decoupled weight decay), in the style of apex's multi_tensor_apply: the slots of a step are
// passed by value, as a table in the kernel's parameters, up to kAdamSlots slots per launch, so a
// step copies nothing from the host. Each slot is cut into chunks of kAdamChunk elements; blocks
// walk the chunks of all slots of the table in a grid-stride loop.
//
// Launches per adam_update with S slots: ceil(S / kAdamSlots) check kernels, then as many update
// kernels, and no copy: the non-finite flag is read back only when the caller synchronizes. With
// up to 48 slots (24 LoRA layers) a step is 2 launches; a step of at most kAdamSmall elements in
// all (a tiny model, where the launches are the cost) is 1 launch of one block that checks, waits
// at a block barrier, then updates.
//
// In a recorded step (CUDA graph) these launches are graph nodes; replay() calls adam_update
// again with the backend refreshing: the same tables are built and set on the recorded nodes
// (cudaGraphExecKernelNodeSetParams) instead of launched.
//
// NaN/Inf guard, entirely on the device: the check kernels look at every gradient and leave the
// smallest (call tag << 32 | slot index) of a bad one in the flag (atomicMin); the update kernels
// read the flag and do nothing at all if it is set, step counts included. The flag stays set until
// synchronize() (or download(), which synchronizes) reports it as NonFiniteError and clears it,
// so every step queued after the bad one is skipped too.
#include <cstring>

#include "cuda/cuda_backend_impl.cuh"
#include "cuda/cuda_launch.cuh"
#include "relora/core/elementwise_math.hpp"

namespace relora {
namespace cuda_detail {
namespace {

constexpr int kAdamSlots = 48;             // slots per launch: the table stays under 4 KB of parameters
// Elements one block takes at a time (4 per thread): layer1k's 33K adapter elements make 32
// blocks (with 4096, 8 blocks took 12 us under ncu, each thread walking 16 elements in turn).
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
  std::uint32_t first_slot;  // index, among the call's slots, of entry 0
  std::uint32_t call;        // tag of the adam_update call
};
static_assert(sizeof(AdamTable<double>) + sizeof(AdamHyper) + sizeof(void*) <= 4096,
              "the slot table must fit the classic 4 KB kernel-parameter limit");

// The slot that owns `chunk` (slots without elements own no chunk and are skipped).
template <typename T>
__device__ int slot_of_chunk(const AdamTable<T>& table, std::int64_t chunk) {
  int s = 0;
  while (s + 1 < table.count && chunk >= table.chunk_begin[s + 1]) ++s;
  return s;
}

template <typename T>
__global__ void adam_check_kernel(const AdamTable<T> table, unsigned long long* flag) {
  wait_for_previous_grid();  // every Adam kernel is launched overlapped (adam_launch)
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
      atomicMin(flag, (static_cast<unsigned long long>(table.call) << 32) | (table.first_slot + unsigned(s)));
    }
  }
}

template <typename T>
__global__ void adam_update_kernel(const AdamTable<T> table, const AdamHyper hyper, Scratch* scratch) {
  wait_for_previous_grid();
  allow_next_grid();
  // Only the check kernels (queued before) and synchronize() write the flag: every thread sees the same value.
  if (scratch->nonfinite != kNoNonFinite) return;
  const std::int64_t chunks = table.chunk_begin[table.count];
  __shared__ double corrections[2];
  for (std::int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int s = slot_of_chunk(table, chunk);
    // Bias corrections from the slot's own count, in double, as the CPU computes them: once per
    // block (two double pow per thread cost more than a thread's few elements).
    __syncthreads();  // the previous chunk's corrections have been read
    if (threadIdx.x == 0) {
      const double t = double(*table.step[s]) + 1;
      corrections[0] = 1 - pow(hyper.beta1, t);
      corrections[1] = 1 - pow(hyper.beta2, t);
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
    // kAdamPerThread of them in turn (the loop that walked them took twice as long under ncu).
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
    last_block = atomicAdd(&scratch->adam_blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  for (int s = threadIdx.x; s < table.count; s += blockDim.x) {
    volatile T* step = table.step[s];
    *step = T(double(*step) + 1);
  }
  if (threadIdx.x == 0) scratch->adam_blocks_done = 0;  // ready for the next launch
}

// Check and update in one block, for steps of at most kAdamSmall elements in one table: the block
// barrier between the two passes stands for the launch boundary of the two-kernel path. A tiny
// step's kernel is a chain of memory round trips, so each thread loads everything its (at most
// kAdamSmallPerThread) elements need at once, the flag and the step counts included, keeps it
// in registers across the check, and writes once.
template <typename T>
__global__ void __launch_bounds__(kAdamSmallThreads) adam_small_kernel(const AdamTable<T> table, const AdamHyper hyper, Scratch* scratch) {
  wait_for_previous_grid();
  allow_next_grid();
  __shared__ int first_bad;
  if (threadIdx.x == 0) first_bad = table.count;
  const unsigned long long nonfinite = scratch->nonfinite;
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
  if (nonfinite != kNoNonFinite) return;
  if (first_bad < table.count) {
    if (threadIdx.x == 0) {
      atomicMin(&scratch->nonfinite, (static_cast<unsigned long long>(table.call) << 32) |
                                         (table.first_slot + unsigned(first_bad)));
    }
    return;
  }
  for (int j = 0; j < kAdamSmallPerThread; ++j) {
    const int s = slot[j];
    if (s == table.count) continue;
    // Bias corrections from the slot's own count, in double, as the CPU computes them.
    const double t = double(steps[j]) + 1;
    const double c1 = 1 - pow(hyper.beta1, t);
    const double c2 = 1 - pow(hyper.beta2, t);
    adam_element(p[j], g[j], m[j], v[j], table.lr[s], table.weight_decay[s], hyper, c1, c2);
    table.param[s][index[j]] = p[j];
    table.m[s][index[j]] = m[j];
    table.v[s][index[j]] = v[j];
  }
  __syncthreads();  // every thread has read the counts
  for (int s = threadIdx.x; s < table.count; s += blockDim.x) *table.step[s] = T(double(*table.step[s]) + 1);
}

// Fills `table` with slots [first, first + kAdamSlots) of the call; returns the number of chunks.
template <typename T>
std::int64_t make_table(const AdamSlot<T>* slots, std::size_t count, std::size_t first, double lr_factor,
                        std::uint32_t call, AdamTable<T>& table) {
  std::memset(&table, 0, sizeof table);
  table.count = int(count - first < std::size_t(kAdamSlots) ? count - first : kAdamSlots);
  table.first_slot = std::uint32_t(first);
  table.call = call;
  std::int64_t chunks = 0;
  for (int s = 0; s < table.count; ++s) {
    const AdamSlot<T>& slot = slots[first + s];
    table.param[s] = slot.param;
    table.grad[s] = slot.grad;
    table.m[s] = slot.m;
    table.v[s] = slot.v;
    table.step[s] = slot.step;
    table.size[s] = slot.size;
    table.lr[s] = slot.lr * lr_factor;
    table.weight_decay[s] = slot.weight_decay;
    table.chunk_begin[s] = chunks;
    chunks += (slot.size + kAdamChunk - 1) / kAdamChunk;
  }
  table.chunk_begin[table.count] = chunks;
  return chunks;
}

}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

// Queues a kernel, or while recording queues it and notes its graph node, or while refreshing
// sets the recorded node's parameters: the one place where the three paths part.
template <typename T>
template <typename Kernel>
void CudaBackend<T>::adam_launch(Kernel kernel, unsigned grid, unsigned threads, void** args, const char* name,
                                 cudaGraphNode_t* node) {
  if (refreshing_) {
    if (node == nullptr || *node == nullptr) throw ConfigError(std::string("cuda backend replay: no recorded node for ") + name);
    cudaKernelNodeParams params{};
    params.func = reinterpret_cast<void*>(kernel);
    params.gridDim = dim3(grid);
    params.blockDim = dim3(threads);
    params.sharedMemBytes = 0;
    params.kernelParams = args;
    params.extra = nullptr;
    check_cuda(cudaGraphExecKernelNodeSetParams(exec_.exec, *node, &params), name, __FILE__, __LINE__);
    return;
  }
  launch_overlapped(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(threads), 0, stream_.stream, args, name);
  if (node) *node = recording_ ? last_captured_node() : nullptr;
}

template <typename T>
void CudaBackend<T>::adam_update(const AdamSlot<T>* slots, std::size_t count, const AdamHyper& hyper) {
  if (count == 0) return;
  if (count > 0xffffffffu) throw ConfigError("adam_update: " + std::to_string(count) + " slots are too many");
  // While refreshing a replay: the recorded call this one stands for, which must have the same slots.
  RecordedAdam* recorded = nullptr;
  if (refreshing_) {
    if (refresh_next_ >= recorded_adam_.size()) {
      throw ConfigError("cuda backend replay: more adam_update calls than the recording holds (" +
                        std::to_string(recorded_adam_.size()) + ")");
    }
    recorded = &recorded_adam_[refresh_next_++];
    bool same = recorded->slots.size() == count;
    for (std::size_t s = 0; same && s < count; ++s) {
      const AdamSlot<T>& a = recorded->slots[s];
      same = a.param == slots[s].param && a.grad == slots[s].grad && a.m == slots[s].m && a.v == slots[s].v &&
             a.step == slots[s].step && a.size == slots[s].size;
    }
    if (!same) throw ConfigError("cuda backend replay: adam_update on other slots than the recorded call's");
  } else {
    activate();
  }
  RecordedAdam* capturing = nullptr;
  if (recording_) {
    capturing_adam_.emplace_back();
    capturing = &capturing_adam_.back();
    capturing->slots.assign(slots, slots + count);
  }
  // Keep the names for the error message; a new list only when they change (never on the steady path).
  const std::uint32_t call = adam_calls_++;
  bool same_names = !slot_names_.empty() && slot_names_.back().second.size() == count;
  const auto name_of = [&](std::size_t s) { return slots[s].name ? slots[s].name : ""; };
  for (std::size_t s = 0; same_names && s < count; ++s) same_names = slot_names_.back().second[s] == name_of(s);
  if (!same_names) {
    std::vector<std::string> names;
    names.reserve(count);
    for (std::size_t s = 0; s < count; ++s) names.emplace_back(name_of(s));
    slot_names_.emplace_back(call, std::move(names));
  }

  // Graph nodes of this call's launches, per table: to note (recording), to refresh, or none (eager).
  const std::size_t tables = (count + kAdamSlots - 1) / kAdamSlots;
  RecordedAdam* nodes = recorded ? recorded : capturing;
  if (capturing) {
    capturing->check_nodes.assign(tables, nullptr);
    capturing->update_nodes.assign(tables, nullptr);
  }
  if (recorded && (recorded->check_nodes.size() != tables || recorded->update_nodes.size() != tables)) {
    throw ConfigError("cuda backend replay: the recorded adam_update had other tables");
  }
  const auto check_node = [&](std::size_t t) { return nodes ? &nodes->check_nodes[t] : nullptr; };
  const auto update_node = [&](std::size_t t) { return nodes ? &nodes->update_nodes[t] : nullptr; };

  unsigned long long* flag = &scratch()->nonfinite;
  Scratch* scratch_ptr = scratch();
  AdamTable<T> table;
  AdamHyper hyper_arg = hyper;
  std::int64_t total = 0;
  for (std::size_t s = 0; s < count; ++s) total += slots[s].size;
  if (count <= std::size_t(kAdamSlots) && total <= kAdamSmall) {
    // One launch, one block: check, barrier, update.
    make_table(slots, count, 0, hyper.lr_factor, call, table);
    void* args[] = {&table, &hyper_arg, &scratch_ptr};
    adam_launch(&adam_small_kernel<T>, 1u, unsigned(kAdamSmallThreads), args, "adam_small_kernel",
                update_node(0));
    return;
  }
  const unsigned max_grid = unsigned(sm_count_) * kAdamBlocksPerSm;
  // Every gradient is checked before any parameter changes.
  for (std::size_t first = 0, t = 0; first < count; first += kAdamSlots, ++t) {
    const std::int64_t chunks = make_table(slots, count, first, hyper.lr_factor, call, table);
    if (chunks == 0) continue;
    const unsigned grid = chunks < max_grid ? unsigned(chunks) : max_grid;
    void* args[] = {&table, &flag};
    adam_launch(&adam_check_kernel<T>, grid, unsigned(kThreads), args, "adam_check_kernel", check_node(t));
  }
  for (std::size_t first = 0, t = 0; first < count; first += kAdamSlots, ++t) {
    const std::int64_t chunks = make_table(slots, count, first, hyper.lr_factor, call, table);
    // At least one block, even when every slot is empty: the last block advances the step counts.
    const unsigned grid = chunks < 1 ? 1u : (chunks < max_grid ? unsigned(chunks) : max_grid);
    void* args[] = {&table, &hyper_arg, &scratch_ptr};
    adam_launch(&adam_update_kernel<T>, grid, unsigned(kThreads), args, "adam_update_kernel", update_node(t));
  }
  // The flag stays on the device: synchronize() reads it, so a step copies nothing to the host.
}

template void CudaBackend<float>::adam_update(const AdamSlot<float>*, std::size_t, const AdamHyper&);
template void CudaBackend<double>::adam_update(const AdamSlot<double>*, std::size_t, const AdamHyper&);

}  // namespace relora
