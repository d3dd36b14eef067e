#pragma once
// NcclCommunicator: the Communicator of one GPU rank over an NCCL communicator. The contract is in
// relora/distributed/communicator.hpp, how it runs in relora/distributed/nccl_communicator.hpp;
// the factories that make it are in nccl_factory.cu.
//
// Streams: every collective is queued on comm_stream_, a stream of this rank's own on the
// backend's device, after an event that comm_stream_ waits for, recorded on the backend's stream
// when the collective is issued; wait() records an event on comm_stream_ that the backend's
// stream waits for. Event records and waits are legal inside a stream capture, so both may be
// recorded in a CUDA graph; nothing here allocates or synchronises after construction, except
// barrier() and the destructor.
#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <mutex>
#include <string>

#include "cuda/cuda_context.cuh"
#include "distributed/nccl/nccl_abort_flag.hpp"
#include "distributed/nccl/nccl_scale_ops.cuh"
#include "relora/distributed/nccl_communicator.hpp"

namespace relora {
namespace nccl_detail {

template <typename T>
class NcclCommunicator final : public Communicator<T> {
 public:
  // Makes the streams, events and scratch on the backend's device; the NCCL communicator comes
  // later, through adopt(), once every rank has them (a failed NCCL initialisation then has
  // nothing else to undo). Throws ConfigError when the backend is not relora's CUDA backend.
  NcclCommunicator(std::shared_ptr<Backend<T>> backend, int rank, int size, std::shared_ptr<AbortFlag> abort_flag,
                   const NcclOptions& options);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  // Takes ownership of an initialised NCCL communicator of this rank; with more than one rank,
  // installs check_while_device_waits as the backend's host-wait check.
  void adopt(ncclComm_t comm);
  // The CUDA device ordinal of the backend.
  int cuda_device() const { return cuda_device_; }

  const char* kind() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return Device::cuda; }

  void all_reduce_sum(T* data, Index count, T scale = T(1)) override;
  void broadcast(T* data, Index count, int root) override;
  void wait() override;
  void barrier() override;
  void abort(const std::string& reason) override;

 private:
  // Throws CommunicatorError when this rank's group was aborted (aborting this rank's NCCL
  // communicator first, if it is not yet) or NCCL reports an asynchronous error. Holds mutex_.
  void throw_if_unusable(const char* what);
  // The backend's host-wait check (Backend::set_host_wait_check): a wait on this rank's device
  // (a download, synchronize()) may sit behind a collective whose peer has failed and will never
  // come. When the group was aborted or NCCL reports an asynchronous error, this aborts the rank's
  // own NCCL communicator (its kernels then end, and the wait with them) and throws
  // CommunicatorError, once: after that the device's work drains as usual.
  void check_while_device_waits();
  // Aborts this rank's NCCL communicator if it is not yet, the backend's recorded step dropped
  // first (release_recording). Holds mutex_.
  void abort_comm() noexcept;
  // Drops the backend's recorded step when it holds a collective of this communicator: NCCL
  // finishes a communicator (destroy or abort; in one process, the group's last one finishes them
  // all) only once every CUDA graph holding its collectives is gone, and the recording would keep
  // one for as long as the backend lives. The trainer records the step again if it goes on.
  void release_recording() noexcept;
  // After a collective was queued: into a recording of the backend's stream (recorded_), or
  // eagerly (unwaited_eager_). Holds mutex_.
  void note_issued(bool recording);
  // comm_stream_ waits for the work queued on the backend's stream so far. Holds mutex_.
  void follow_backend();
  // Whether `stream` is being captured into a CUDA graph.
  static bool capturing(cudaStream_t stream);
  // Before the first collective or wait() of a recording: a recorded collective cannot wait for
  // one queued eagerly before the recording (the graph runs after the backend's stream, not after
  // comm_stream_), so such a collective must have been waited for. Throws ConfigError if not.
  void check_recording_start(const char* what) const;
  void check_buffer(const char* what, const T* data, Index count) const;

  std::shared_ptr<Backend<T>> backend_;  // kept alive: its stream waits on ours, ours on its
  cuda_detail::CudaContext* context_ = nullptr;
  int rank_;
  int size_;
  int cuda_device_ = 0;
  NcclOptions options_;
  std::shared_ptr<AbortFlag> abort_flag_;

  std::mutex mutex_;  // between the owning thread's calls and abort() from another thread
  ncclComm_t comm_ = nullptr;
  bool comm_aborted_ = false;
  bool unwaited_eager_ = false;  // a collective was queued outside a recording since the last wait()
  bool recorded_ = false;        // a collective was queued into a recording of the backend's stream
  ScaleOps<T> scale_ops_;
  cudaStream_t comm_stream_ = nullptr;
  cudaEvent_t backend_ready_ = nullptr;  // recorded on the backend's stream, waited for by comm_stream_
  cudaEvent_t comm_done_ = nullptr;      // recorded on comm_stream_, waited for by the backend's stream
  cudaEvent_t barrier_done_ = nullptr;   // recorded on comm_stream_ after a barrier's all-reduce
  T* barrier_scratch_ = nullptr;         // one element on the device, summed by barrier()
};

}  // namespace nccl_detail
}  // namespace relora
