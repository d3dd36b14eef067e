// The fused Adam/AdamW update of the CUDA backend (Kingma & Ba 2015; Loshchilov & Hutter 2019 for
// the decoupled weight decay), in the style of apex's multi_tensor_apply: the slots of a step are
// passed by value, as a table in the kernel's parameters, up to kAdamSlots slots per launch, so a
// step copies nothing from the host. Each slot is cut into chunks of kAdamChunk elements; blocks
// walk the chunks of all slots of the table in a grid-stride loop.
//
// Launches per adam_update with S slots: ceil(S / kAdamSlots) check kernels, then as many update
// kernels, and no copy: the non-finite flag is read back only when the caller synchronizes. With
// up to 48 slots (24 LoRA layers) a step is 2 launches.
//
// NaN/Inf guard, entirely on the device: the check kernels look at every gradient and leave the
// smallest (call tag << 32 | slot index) of a bad one in the flag (atomicMin); the update kernels
// read the flag and do nothing at all if it is set, step counts included. The flag stays set until
// synchronize() (or download(), which synchronizes) reports it as NonFiniteError and clears it,
// so every step queued after the bad one is skipped too.
#include <cstring>

#include "cuda/cuda_backend_impl.cuh"
#include "relora/elementwise_math.hpp"

namespace relora {
namespace cuda_detail {
namespace {

constexpr int kAdamSlots = 48;             // slots per launch: the table stays under 4 KB of parameters
constexpr std::int64_t kAdamChunk = 4096;  // elements one block takes at a time (16 per thread)
constexpr int kAdamBlocksPerSm = 4;

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
  const std::int64_t chunks = table.chunk_begin[table.count];
  for (std::int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {  // uniform over the block
    const int s = slot_of_chunk(table, chunk);
    const std::int64_t begin = (chunk - table.chunk_begin[s]) * kAdamChunk;
    const std::int64_t end = begin + kAdamChunk < table.size[s] ? begin + kAdamChunk : table.size[s];
    const T* g = table.grad[s];
    int bad = 0;
    for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) bad |= !isfinite(g[i]);
    if (__syncthreads_or(bad) && threadIdx.x == 0) {
      atomicMin(flag, (static_cast<unsigned long long>(table.call) << 32) | (table.first_slot + unsigned(s)));
    }
  }
}

template <typename T>
__global__ void adam_update_kernel(const AdamTable<T> table, const AdamHyper hyper, Scratch* scratch) {
  // Only the check kernels (queued before) and synchronize() write the flag: every thread sees the same value.
  if (scratch->nonfinite != kNoNonFinite) return;
  const std::int64_t chunks = table.chunk_begin[table.count];
  for (std::int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int s = slot_of_chunk(table, chunk);
    // Bias corrections from the slot's own count, in double, as the CPU computes them.
    const double t = double(*table.step[s]) + 1;
    const double c1 = 1 - pow(hyper.beta1, t);
    const double c2 = 1 - pow(hyper.beta2, t);
    const std::int64_t begin = (chunk - table.chunk_begin[s]) * kAdamChunk;
    const std::int64_t end = begin + kAdamChunk < table.size[s] ? begin + kAdamChunk : table.size[s];
    T* param = table.param[s];
    const T* grad = table.grad[s];
    T* m = table.m[s];
    T* v = table.v[s];
    const double lr = table.lr[s];
    const double weight_decay = table.weight_decay[s];
    for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      T p = param[i], mi = m[i], vi = v[i];
      adam_element(p, grad[i], mi, vi, lr, weight_decay, hyper, c1, c2);
      param[i] = p;
      m[i] = mi;
      v[i] = vi;
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

template <typename T>
void CudaBackend<T>::adam_update(const AdamSlot<T>* slots, std::size_t count, const AdamHyper& hyper) {
  if (count == 0) return;
  if (count > 0xffffffffu) throw ConfigError("adam_update: " + std::to_string(count) + " slots are too many");
  activate();
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

  const unsigned max_grid = unsigned(sm_count_) * kAdamBlocksPerSm;
  AdamTable<T> table;
  // Every gradient is checked before any parameter changes.
  for (std::size_t first = 0; first < count; first += kAdamSlots) {
    const std::int64_t chunks = make_table(slots, count, first, hyper.lr_factor, call, table);
    if (chunks == 0) continue;
    const unsigned grid = chunks < max_grid ? unsigned(chunks) : max_grid;
    adam_check_kernel<T><<<grid, kThreads, 0, stream_.stream>>>(table, &scratch()->nonfinite);
    RELORA_CHECK_LAUNCH("adam_check_kernel");
  }
  for (std::size_t first = 0; first < count; first += kAdamSlots) {
    const std::int64_t chunks = make_table(slots, count, first, hyper.lr_factor, call, table);
    // At least one block, even when every slot is empty: the last block advances the step counts.
    const unsigned grid = chunks < 1 ? 1u : (chunks < max_grid ? unsigned(chunks) : max_grid);
    adam_update_kernel<T><<<grid, kThreads, 0, stream_.stream>>>(table, hyper, scratch());
    RELORA_CHECK_LAUNCH("adam_update_kernel");
  }
  // The flag stays on the device: synchronize() reads it, so a step copies nothing to the host.
}

template void CudaBackend<float>::adam_update(const AdamSlot<float>*, std::size_t, const AdamHyper&);
template void CudaBackend<double>::adam_update(const AdamSlot<double>*, std::size_t, const AdamHyper&);

}  // namespace relora
