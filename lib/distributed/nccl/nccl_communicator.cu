#include "distributed/nccl/nccl_communicator.cuh"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <thread>
#include <utility>

#include "cuda/cuda_check.cuh"

namespace relora {
namespace nccl_detail {
namespace {

std::string seconds_text(std::chrono::steady_clock::duration waited) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f s", std::chrono::duration<double>(waited).count());
  return text;
}

}  // namespace

template <typename T>
NcclCommunicator<T>::NcclCommunicator(std::shared_ptr<Backend<T>> backend, int rank, int size,
                                      std::shared_ptr<AbortFlag> abort_flag, const NcclOptions& options)
    : backend_(std::move(backend)), rank_(rank), size_(size), options_(options), abort_flag_(std::move(abort_flag)) {
  if (!backend_) throw ConfigError("nccl communicator of rank " + std::to_string(rank) + ": no backend given");
  if (backend_->device() != Device::cuda) {
    throw ConfigError("nccl communicator of rank " + std::to_string(rank) + " needs a CUDA backend, got " +
                      backend_->description());
  }
  if (options_.barrier_timeout.count() < 0) {
    throw ConfigError("nccl communicator: barrier timeout " + std::to_string(options_.barrier_timeout.count()) +
                      " ms must not be negative (0 waits for ever)");
  }
  context_ = &cuda_detail::cuda_context(*backend_);
  context_->activate();
  RELORA_CUDA_CHECK(cudaGetDevice(&cuda_device_));
  try {
    // The highest priority the device offers, so that a collective overlapped with the backward of
    // the layers below is not starved by their kernels (the peers wait for it).
    int least = 0, greatest = 0;
    RELORA_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    RELORA_CUDA_CHECK(cudaStreamCreateWithPriority(&comm_stream_, cudaStreamNonBlocking, greatest));
    RELORA_CUDA_CHECK(cudaEventCreateWithFlags(&backend_ready_, cudaEventDisableTiming));
    RELORA_CUDA_CHECK(cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming));
    RELORA_CUDA_CHECK(cudaEventCreateWithFlags(&barrier_done_, cudaEventDisableTiming));
    RELORA_CUDA_CHECK(cudaMalloc(&barrier_scratch_, sizeof(T)));
    // On the stream that uses it: a non-blocking stream is not ordered after the default one.
    RELORA_CUDA_CHECK(cudaMemsetAsync(barrier_scratch_, 0, sizeof(T), comm_stream_));
  } catch (...) {
    if (barrier_scratch_) (void)cudaFree(barrier_scratch_);
    if (barrier_done_) (void)cudaEventDestroy(barrier_done_);
    if (comm_done_) (void)cudaEventDestroy(comm_done_);
    if (backend_ready_) (void)cudaEventDestroy(backend_ready_);
    if (comm_stream_) (void)cudaStreamDestroy(comm_stream_);
    throw;
  }
}

template <typename T>
void NcclCommunicator<T>::adopt(ncclComm_t comm) {
  comm_ = comm;
  if (size_ > 1) backend_->underlying().set_host_wait_check(this, [this] { check_while_device_waits(); });
}

template <typename T>
void NcclCommunicator<T>::check_while_device_waits() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (comm_ == nullptr || comm_aborted_) return;
  throw_if_unusable("wait on the device");
}

template <typename T>
NcclCommunicator<T>::~NcclCommunicator() {
  if (comm_ != nullptr && size_ > 1) backend_->underlying().set_host_wait_check(this, {});
  std::lock_guard<std::mutex> lock(mutex_);
  (void)cudaSetDevice(cuda_device_);
  if (comm_ != nullptr && !comm_aborted_) {
    // A clean end (every collective done, nobody aborted) destroys the communicator; otherwise a
    // peer may be gone, and destroying would wait for collectives that never complete. The ranks
    // of one group end alike: in one process NCCL finishes a group's communicators at the last
    // destroy or abort, waiting there for the work of every one of them, which an aborted peer's
    // may never complete. So a rank that must abort here raises the group's flag, and the ranks
    // destroyed after it abort too. Idle: nothing queued on the communication stream, nor on the
    // backend's, where a replayed step's collectives run (barrier() leaves both idle).
    const bool idle = cudaStreamQuery(comm_stream_) == cudaSuccess && cudaStreamQuery(context_->stream()) == cudaSuccess;
    release_recording();
    if (idle && !abort_flag_->raised()) {
      scale_ops_.release(comm_);
      (void)ncclCommDestroy(comm_);
    } else {
      abort_flag_->raise("rank " + std::to_string(rank_) + " was destroyed with collectives still queued");
      (void)ncclCommAbort(comm_);
    }
  }
  comm_ = nullptr;
  (void)cudaFree(barrier_scratch_);
  (void)cudaEventDestroy(barrier_done_);
  (void)cudaEventDestroy(comm_done_);
  (void)cudaEventDestroy(backend_ready_);
  (void)cudaStreamDestroy(comm_stream_);
  (void)cudaGetLastError();
}

template <typename T>
void NcclCommunicator<T>::check_buffer(const char* what, const T* data, Index count) const {
  if (count < 0) {
    throw ConfigError(std::string("nccl ") + what + " of rank " + std::to_string(rank_) + ": count " +
                      std::to_string(count) + " must not be negative");
  }
  if (count > 0 && data == nullptr) {
    throw ConfigError(std::string("nccl ") + what + " of rank " + std::to_string(rank_) + ": null buffer of " +
                      std::to_string(count) + " elements");
  }
}

template <typename T>
void NcclCommunicator<T>::release_recording() noexcept {
  if (!recorded_) return;
  try {
    backend_->underlying().drop_recording();
  } catch (...) {
  }
  recorded_ = false;
}

template <typename T>
void NcclCommunicator<T>::abort_comm() noexcept {
  if (comm_ == nullptr || comm_aborted_) return;
  (void)cudaSetDevice(cuda_device_);
  release_recording();
  (void)ncclCommAbort(comm_);  // frees the operators too
  scale_ops_.forget();
  comm_aborted_ = true;
}

template <typename T>
void NcclCommunicator<T>::throw_if_unusable(const char* what) {
  if (abort_flag_->raised()) {
    abort_comm();
    throw CommunicatorError(std::string("nccl ") + what + " on rank " + std::to_string(rank_) + " of " +
                            std::to_string(size_) + ": " + abort_flag_->account());
  }
  if (comm_ == nullptr) throw CommunicatorError(std::string("nccl ") + what + ": the communicator was not initialised");
  ncclResult_t async = ncclSuccess;
  RELORA_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async), comm_);
  if (async != ncclSuccess && async != ncclInProgress) {
    const std::string account = "rank " + std::to_string(rank_) + " failed: NCCL reported an asynchronous error: " +
                                nccl_error_text(async, comm_);
    abort_flag_->raise(account);
    abort_comm();
    throw CommunicatorError(std::string("nccl ") + what + ": " + account);
  }
}

template <typename T>
bool NcclCommunicator<T>::capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  RELORA_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

template <typename T>
void NcclCommunicator<T>::check_recording_start(const char* what) const {
  if (!unwaited_eager_) return;
  throw ConfigError(std::string("nccl ") + what + " of rank " + std::to_string(rank_) +
                    " in a CUDA graph recording after collectives queued before it and not waited for: call "
                    "wait() before begin_recording()");
}

template <typename T>
void NcclCommunicator<T>::follow_backend() {
  RELORA_CUDA_CHECK(cudaEventRecord(backend_ready_, context_->stream()));
  RELORA_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, backend_ready_, 0));
}

template <typename T>
void NcclCommunicator<T>::all_reduce_sum(T* data, Index count, T scale) {
  check_buffer("all_reduce_sum", data, count);
  if (!std::isfinite(scale)) {
    throw ConfigError("nccl all_reduce_sum of rank " + std::to_string(rank_) + ": scale " + std::to_string(scale) +
                      " is not finite");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  throw_if_unusable("all_reduce_sum");
  if (count == 0) return;
  context_->activate();
  const bool recording = capturing(context_->stream());
  if (recording && !capturing(comm_stream_)) check_recording_start("all_reduce_sum");
  follow_backend();
  // One operator kind on every rank: the ranks' scales differ when their shards do, and NCCL may
  // choose another algorithm for a plain sum than for a pre-multiplied one (NVLink SHARP takes
  // plain sums only), which ranks of one collective must not. A group of one sums alone.
  const ncclRedOp_t op = size_ == 1 && scale == T(1) ? ncclSum : scale_ops_.op_for(scale, comm_);
  RELORA_NCCL_CHECK(ncclAllReduce(data, data, static_cast<std::size_t>(count), nccl_type<T>(), op, comm_, comm_stream_),
                    comm_);
  note_issued(recording);
}

template <typename T>
void NcclCommunicator<T>::broadcast(T* data, Index count, int root) {
  check_buffer("broadcast", data, count);
  if (root < 0 || root >= size_) {
    throw ConfigError("nccl broadcast of rank " + std::to_string(rank_) + ": root " + std::to_string(root) +
                      " must be in [0, " + std::to_string(size_) + ")");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  throw_if_unusable("broadcast");
  if (count == 0) return;
  context_->activate();
  const bool recording = capturing(context_->stream());
  if (recording && !capturing(comm_stream_)) check_recording_start("broadcast");
  follow_backend();
  RELORA_NCCL_CHECK(ncclBroadcast(data, data, static_cast<std::size_t>(count), nccl_type<T>(), root, comm_, comm_stream_),
                    comm_);
  note_issued(recording);
}

template <typename T>
void NcclCommunicator<T>::note_issued(bool recording) {
  if (recording) {
    recorded_ = true;
  } else {
    unwaited_eager_ = true;
  }
}

template <typename T>
void NcclCommunicator<T>::wait() {
  std::lock_guard<std::mutex> lock(mutex_);
  throw_if_unusable("wait");
  context_->activate();
  const bool recording = capturing(context_->stream());
  if (recording && !capturing(comm_stream_)) {
    // No collective of this recording to wait for; an event recorded outside the capture cannot
    // be waited for inside it.
    check_recording_start("wait");
    return;
  }
  RELORA_CUDA_CHECK(cudaEventRecord(comm_done_, comm_stream_));
  RELORA_CUDA_CHECK(cudaStreamWaitEvent(context_->stream(), comm_done_, 0));
  if (!recording) unwaited_eager_ = false;
}

template <typename T>
void NcclCommunicator<T>::barrier() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_unusable("barrier");
    context_->activate();
    if (capturing(context_->stream()) || capturing(comm_stream_)) {
      throw ConfigError("nccl barrier of rank " + std::to_string(rank_) +
                        " inside a CUDA graph recording: a barrier waits on the host, which a recording cannot hold");
    }
    // After the backend's queued work, replayed steps and their collectives included: the barrier
    // then also says that every rank's earlier collectives are done, and it keeps the order of the
    // collectives the same on every rank.
    follow_backend();
    RELORA_NCCL_CHECK(ncclAllReduce(barrier_scratch_, barrier_scratch_, 1, nccl_type<T>(), ncclSum, comm_, comm_stream_),
                      comm_);
    RELORA_CUDA_CHECK(cudaEventRecord(barrier_done_, comm_stream_));
  }
  // Polled rather than synchronised, so that an abort by another rank of this process, an error
  // NCCL reports, or the timeout ends the wait instead of a peer that never comes.
  const auto start = std::chrono::steady_clock::now();
  auto pause = std::chrono::microseconds(20);
  for (;;) {
    const cudaError_t status = cudaEventQuery(barrier_done_);
    if (status == cudaSuccess) {
      // Every collective queued before has completed: nothing is left for a recording to wait for.
      std::lock_guard<std::mutex> lock(mutex_);
      unwaited_eager_ = false;
      return;
    }
    if (status != cudaErrorNotReady) RELORA_CUDA_CHECK(status);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      throw_if_unusable("barrier");
      const auto waited = std::chrono::steady_clock::now() - start;
      if (options_.barrier_timeout.count() > 0 && waited >= options_.barrier_timeout) {
        const std::string account = "rank " + std::to_string(rank_) + " aborted: its barrier waited " +
                                    seconds_text(waited) + " for the other ranks";
        abort_flag_->raise(account);
        abort_comm();
        throw CommunicatorError("nccl barrier: " + account);
      }
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

template <typename T>
void NcclCommunicator<T>::abort(const std::string& reason) {
  abort_flag_->raise("rank " + std::to_string(rank_) + " aborted: " + reason);
  std::lock_guard<std::mutex> lock(mutex_);
  abort_comm();
}

template class NcclCommunicator<float>;
template class NcclCommunicator<double>;

}  // namespace nccl_detail
}  // namespace relora
