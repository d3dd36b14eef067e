#pragma once
// The CUDA backend: tensors live in device memory (cudaMalloc, released by cudaFree), all work is
// queued on one stream per backend, products go to cuBLAS (row-major through the column-major
// transpose trick), everything else to the small kernels in the .cu files beside this one:
//   cuda_backend.cu      lifecycle, memory, GEMM, synchronize and the non-finite flag, factory
//   cuda_elementwise.cu  bias, column sums, multiply, activations, MSE, fill, random fills
//   cuda_adam.cu         the fused Adam/AdamW update and its device-side NaN/Inf guard
//   cuda_prune.cu        magnitude and random pruning (a radix sort on scratch memory)
// No operation copies between host and device except upload, download and the 8-byte read-back
// of the non-finite flag; none allocates except allocate and the one-time sizing of scratch.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_check.cuh"
#include "relora/core/backend.hpp"

namespace relora {
namespace cuda_detail {

constexpr int kThreads = 256;              // threads per block of the element-wise kernels
constexpr int kMaxReduceBlocks = 1024;     // blocks of the MSE reduction (partials kept in scratch)
constexpr unsigned long long kNoNonFinite = ~0ull;  // the non-finite flag's "nothing found"

// Device scratch of fixed size, allocated once with the backend.
struct Scratch {
  // Smallest (call tag << 32 | slot index) of a gradient found holding NaN or Inf since the last
  // synchronize(), or kNoNonFinite. Sticky: while set, every adam_update is a no-op.
  unsigned long long nonfinite;
  unsigned int adam_blocks_done;    // blocks of the running Adam launch that finished (last one resets)
  unsigned int reduce_blocks_done;  // blocks of the running MSE launch that finished (last one resets)
  double partials[kMaxReduceBlocks];
};

// Owners of the raw CUDA resources, so that a constructor that throws half-way leaks nothing.
struct DeviceMemory {
  void* ptr = nullptr;
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    if (ptr) (void)cudaFree(ptr);
  }
};

struct PinnedMemory {
  void* ptr = nullptr;
  PinnedMemory() = default;
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;
  ~PinnedMemory() {
    if (ptr) (void)cudaFreeHost(ptr);
  }
};

struct Stream {
  cudaStream_t stream = nullptr;
  Stream() = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (stream) {
      (void)cudaStreamSynchronize(stream);
      (void)cudaStreamDestroy(stream);
    }
  }
};

struct Event {
  cudaEvent_t event = nullptr;
  Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (event) (void)cudaEventDestroy(event);
  }
};

struct Graph {
  cudaGraph_t graph = nullptr;
  Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() { reset(); }
  void reset(cudaGraph_t g = nullptr) {
    if (graph) (void)cudaGraphDestroy(graph);
    graph = g;
  }
};

// An instantiated graph. Destroying one still in flight is allowed: CUDA frees it on completion.
struct GraphExec {
  cudaGraphExec_t exec = nullptr;
  GraphExec() = default;
  GraphExec(const GraphExec&) = delete;
  GraphExec& operator=(const GraphExec&) = delete;
  ~GraphExec() { reset(); }
  void reset(cudaGraphExec_t e = nullptr) {
    if (exec) (void)cudaGraphExecDestroy(exec);
    exec = e;
  }
};

struct BlasHandle {
  cublasHandle_t handle = nullptr;
  BlasHandle() = default;
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
  ~BlasHandle() {
    if (handle) (void)cublasDestroy(handle);
  }
};

// Blocks for a grid-stride loop over n elements: enough to fill the device, never more than needed.
inline int grid_for(std::int64_t n, int sm_count, int blocks_per_sm = 8) {
  const std::int64_t needed = (n + kThreads - 1) / kThreads;
  const std::int64_t cap = std::int64_t(sm_count) * blocks_per_sm;
  return int(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

}  // namespace cuda_detail

template <typename T>
class CudaBackend final : public Backend<T> {
 public:
  explicit CudaBackend(const BackendOptions& options);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  Device device() const override { return Device::cuda; }
  std::string description() const override;
  void set_math_mode(MathMode mode) override;
  MathMode math_mode() const override { return math_; }

  Tensor<T> allocate(Index rows, Index cols) override;
  void upload(const T* host, Tensor<T>& dst) override;
  void download(const Tensor<T>& src, T* host) override;
  void copy(const Tensor<T>& src, Tensor<T>& dst) override;
  void fill(Tensor<T>& x, T value) override;
  void synchronize() override;

  void gemm(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B, T beta,
            Tensor<T>& C) override;

  void add_row_vector(const Tensor<T>& b, Tensor<T>& Y) override;
  void column_sums(const Tensor<T>& dY, T beta, Tensor<T>& db) override;
  void multiply(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) override;
  void activation_forward(Activation f, const Tensor<T>& Y, Tensor<T>& Z) override;
  void activation_backward(Activation f, const Tensor<T>& Y, const Tensor<T>& dZ, Tensor<T>& dY) override;
  T max_abs(const Tensor<T>& x) override;
  void mse(const Tensor<T>& Y, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) override;

  void random_uniform(RngKey key, T low, T high, Tensor<T>& x) override;
  void random_normal(RngKey key, T mean, T stddev, Tensor<T>& x) override;
  void dropout_mask(RngKey key, T p, Tensor<T>& mask) override;

  void adam_update(const AdamSlot<T>* slots, std::size_t count, const AdamHyper& hyper) override;
  void prune(PruneMode mode, double fraction, RngKey key, Tensor<T>& x, Tensor<T>* same_entries) override;

  // CUDA graphs: stream capture of the queued operations, replayed with one cudaGraphLaunch.
  bool begin_recording() override;
  std::uint64_t end_recording() override;
  bool replay(std::uint64_t id, const std::function<void()>& refresh) override;
  void drop_recording() override;

 // ---- for the kernels of components (a fused layer's, an optimizer's) on this backend
  // Makes this backend's device current (a user may drive several devices from one thread).
  void activate() const;
  cudaStream_t stream() const { return stream_.stream; }
  int sm_count() const { return sm_count_; }
  // Dynamic shared memory a block may have, opted in.
  std::size_t shared_optin_bytes() const { return shared_optin_bytes_; }
  // The scratch of the loss reductions (partial sums, the last-block counter).
  cuda_detail::Scratch* scratch() const { return static_cast<cuda_detail::Scratch*>(scratch_memory_.ptr); }
  // Work beside the main stream: fork_side() makes the side stream wait for what the main stream
  // has queued, join_side() makes the main stream wait for what the side stream has queued since.
  // The main stream alone then orders the step, and a capture of it takes the side stream's work
  // into the graph as a parallel branch.
  cudaStream_t side_stream() const { return side_stream_.stream; }
  void fork_side();
  void join_side();
  // Between begin_recording() and end_recording(): a component must not allocate then.
  bool recording() const { return recording_; }

 private:
  // After the stream has drained: throws NonFiniteError if an adam_update met NaN or Inf, and
  // clears the flag so that training can go on once the caller has dealt with it.
  void raise_device_errors();
  // Scales C by beta (zero when beta == 0, ignoring NaN in C, as BLAS does): a product with k == 0.
  void scale(T beta, Tensor<T>& C);

  int device_id_ = 0;
  int sm_count_ = 0;
  std::size_t shared_optin_bytes_ = 0;  // dynamic shared memory a block may have, opted in
  int cc_major_ = 0;
  int cc_minor_ = 0;
  std::size_t total_memory_ = 0;
  std::string device_name_;
  MathMode math_ = MathMode::strict;

  cuda_detail::Stream stream_;
  // The side stream, forked from stream_ and joined back to it by the two events.
  cuda_detail::Stream side_stream_;
  cuda_detail::Event fork_event_;
  cuda_detail::Event join_event_;
  cuda_detail::BlasHandle blas_;
  cuda_detail::DeviceMemory blas_workspace_;  // cuBLAS's workspace, ours so that a capture allocates none
  cuda_detail::DeviceMemory scratch_memory_;  // one cuda_detail::Scratch
  cuda_detail::PinnedMemory flag_host_;       // the non-finite flag, read back at synchronize()
  cuda_detail::DeviceMemory prune_memory_;    // keys, indices and the sort's temporary storage
  std::size_t prune_capacity_ = 0;            // bytes in prune_memory_

  unsigned long long* flag_host() const { return static_cast<unsigned long long*>(flag_host_.ptr); }

  // Names of the slots of adam_update calls since the last synchronize(), each list tagged with the
  // call that first used it (a new list only when the names change), so the flag's call tag finds
  // the right name even when the slots changed between calls.
  std::uint32_t adam_calls_ = 0;
  std::vector<std::pair<std::uint32_t, std::vector<std::string>>> slot_names_;

  // ---- recording (CUDA graph). A replay reruns the recorded kernels on the recorded pointers,
  // so it is refused once any tensor was allocated after the recording began (a buffer of the
  // step may have been re-sized and moved) or the math mode changed (cuBLAS chose its kernels
  // at capture). The Adam launches are the only recorded work whose parameters change between
  // replays (the schedule's factor, the call tag of the NaN guard): their graph nodes are kept
  // and re-parameterised per replay with cudaGraphExecKernelNodeSetParams, which copies the
  // new parameters into the executable graph on the host; the next launch sees them and
  // launches already queued keep theirs. This costs no copy to the device and no device memory,
  // where reading the factor from device or pinned memory would need a copy per step or a ring
  // of slots that outlives the queued steps.
  struct RecordedAdam {
    std::vector<AdamSlot<T>> slots;                 // the call's slots, to check that refresh repeats them
    std::vector<cudaGraphNode_t> check_nodes;       // per table of kAdamSlots slots; null: no launch
    std::vector<cudaGraphNode_t> update_nodes;      // per table
  };
  // The node the stream's capture added last (its only dependency now), or null: the recording
  // is then spoiled and end_recording() discards it.
  cudaGraphNode_t last_captured_node();
  // Undoes the Adam bookkeeping of a recording that is discarded.
  void forget_capture();
  // One Adam kernel: launched (its node noted in *node while recording), or, while refreshing a
  // replay, set as the parameters of the recorded node *node.
  template <typename Kernel>
  void adam_launch(Kernel kernel, unsigned grid, unsigned threads, void** args, const char* name,
                   cudaGraphNode_t* node);

  std::uint64_t allocations_ = 0;           // allocate() calls so far
  bool recording_ = false;                  // between begin_recording() and end_recording()
  bool recording_spoiled_ = false;          // a node could not be identified while recording
  std::uint64_t allocations_at_begin_ = 0;  // allocations_ when the recording began
  std::uint32_t adam_calls_at_begin_ = 0;   // to forget a discarded recording's Adam calls
  std::size_t slot_names_at_begin_ = 0;
  std::vector<RecordedAdam> capturing_adam_;  // Adam calls of the recording in progress
  std::vector<RecordedAdam> recorded_adam_;   // Adam calls of the ready recording
  std::uint64_t recording_id_ = 0;  // of the ready recording (0: none); ids count up from 1
  std::uint64_t recordings_ = 0;    // recordings made so far
  std::uint64_t recorded_allocations_ = 0;
  MathMode recorded_math_ = MathMode::strict;
  bool refreshing_ = false;         // inside replay()'s refresh: adam_update re-parameterises
  std::size_t refresh_next_ = 0;    // the recorded Adam call the next adam_update refreshes
  cuda_detail::Graph graph_;        // kept alive: its node handles address exec_'s nodes
  cuda_detail::GraphExec exec_;
};

}  // namespace relora
