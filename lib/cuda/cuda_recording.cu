#include "cuda/cuda_recording.cuh"

#include <string>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_launch.cuh"
#include "relora/core/errors.hpp"

namespace relora {
namespace cuda_detail {

void StepRecorder::begin() {
  if (recording_) throw ConfigError("cuda backend: begin_recording while a recording is in progress");
  if (refreshing_) throw ConfigError("cuda backend: begin_recording inside a replay's refresh");
  // Relaxed: an allocation by this thread while recording is allowed (the backend then discards
  // the recording) instead of failing the call that made it.
  RELORA_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
  recording_ = true;
  spoiled_ = false;
  capturing_.clear();
}

std::uint64_t StepRecorder::end(bool keep) {
  if (!recording_) throw ConfigError("cuda backend: end_recording without begin_recording");
  recording_ = false;
  cudaGraph_t captured = nullptr;
  const cudaError_t end_status = cudaStreamEndCapture(stream_, &captured);
  Graph graph;
  graph.reset(captured);
  bool ok = keep && end_status == cudaSuccess && captured != nullptr && !spoiled_;
  cudaGraphExec_t instantiated = nullptr;
  if (ok) ok = cudaGraphInstantiate(&instantiated, captured, 0) == cudaSuccess;
  GraphExec exec;
  exec.reset(instantiated);
  if (ok) ok = cudaGraphLaunch(exec.exec, stream_) == cudaSuccess;
  if (!ok) {
    (void)cudaGetLastError();
    capturing_.clear();
    return 0;
  }
  // The previous graph may still be queued: CUDA defers destroying it until it is done.
  exec_.reset(exec.exec);
  exec.exec = nullptr;
  graph_.reset(graph.graph);
  graph.graph = nullptr;
  recorded_ = std::move(capturing_);
  capturing_.clear();
  recording_id_ = ++recordings_;
  return recording_id_;
}

bool StepRecorder::replay(std::uint64_t id, const std::function<void()>& refresh) {
  if (recording_) throw ConfigError("cuda backend: replay while recording");
  if (id == 0 || id != recording_id_) return false;
  refreshing_ = true;
  refresh_next_ = 0;
  try {
    if (refresh) refresh();
  } catch (...) {
    refreshing_ = false;
    throw;
  }
  refreshing_ = false;
  if (refresh_next_ != recorded_.size()) {
    throw ConfigError("cuda backend replay: the refresh made " + std::to_string(refresh_next_) +
                      " refreshable launch(es) but the recording holds " + std::to_string(recorded_.size()));
  }
  RELORA_CUDA_CHECK(cudaGraphLaunch(exec_.exec, stream_));
  return true;
}

void StepRecorder::drop() {
  if (recording_) {
    recording_ = false;
    cudaGraph_t captured = nullptr;
    (void)cudaStreamEndCapture(stream_, &captured);
    if (captured) (void)cudaGraphDestroy(captured);
    (void)cudaGetLastError();
    capturing_.clear();
  }
  exec_.reset();
  graph_.reset();
  recorded_.clear();
  recording_id_ = 0;
}

cudaGraphNode_t StepRecorder::last_captured_node() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaGraphNode_t* deps = nullptr;
  std::size_t count = 0;
#if CUDART_VERSION >= 13000
  const cudaError_t error = cudaStreamGetCaptureInfo(stream_, &status, nullptr, nullptr, &deps, nullptr, &count);
#else
  const cudaError_t error = cudaStreamGetCaptureInfo(stream_, &status, nullptr, nullptr, &deps, &count);
#endif
  if (error != cudaSuccess || status != cudaStreamCaptureStatusActive || count != 1 || deps == nullptr) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return deps[0];
}

void StepRecorder::launch(const void* kernel, dim3 grid, dim3 block, std::size_t shared, void** args,
                          const char* name, bool overlapped) {
  if (refreshing_) {
    if (refresh_next_ >= recorded_.size()) {
      throw ConfigError(std::string("cuda backend replay: more refreshable launches than the recording holds (") +
                        std::to_string(recorded_.size()) + "), at " + name);
    }
    const Node& recorded = recorded_[refresh_next_++];
    if (recorded.kernel != kernel || recorded.block.x != block.x || recorded.block.y != block.y ||
        recorded.block.z != block.z || recorded.shared != shared) {
      throw ConfigError(std::string("cuda backend replay: ") + name + " differs from the recorded launch");
    }
    cudaKernelNodeParams params{};
    params.func = const_cast<void*>(kernel);
    params.gridDim = grid;
    params.blockDim = block;
    params.sharedMemBytes = static_cast<unsigned int>(shared);
    params.kernelParams = args;
    params.extra = nullptr;
    check_cuda(cudaGraphExecKernelNodeSetParams(exec_.exec, recorded.node, &params), name, __FILE__, __LINE__);
    return;
  }
  if (overlapped) {
    launch_overlapped(kernel, grid, block, shared, stream_, args, name);
  } else {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared;
    config.stream = stream_;
    check_cuda(cudaLaunchKernelExC(&config, kernel, args), name, __FILE__, __LINE__);
  }
  if (recording_) {
    const cudaGraphNode_t node = last_captured_node();
    spoiled_ = spoiled_ || node == nullptr;
    capturing_.push_back(Node{node, kernel, block, shared});
  }
}

}  // namespace cuda_detail
}  // namespace relora
