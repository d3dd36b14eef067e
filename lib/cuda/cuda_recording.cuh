#pragma once
// Recorded steps (CUDA graphs), in one place. A launch-bound step (tiny layers) costs mostly host
// time per operation; recording it once by stream capture and replaying it with one
// cudaGraphLaunch saves that. A replay reruns the recorded kernels on the recorded pointers with
// the recorded parameters, except for kernels launched through launch(): their parameters may
// change from one replay to the next (the learning rate's schedule factor, a guard's tag).
//
// launch() is the one place where the three paths part:
//   eager      the kernel is launched;
//   recording  it is launched into the capture, and its graph node is noted in launch order;
//   refreshing (inside replay(), before the graph is launched) the caller makes the same
//              launch() calls in the same order, and each sets its parameters on the node noted
//              at the same place, with cudaGraphExecKernelNodeSetParams: this copies them into
//              the executable graph on the host, so the next launch sees them while launches
//              already queued keep theirs. No copy to the device, no device memory.
// Nothing else may be queued while refreshing.
//
// Whether a recording is still valid (no buffer it names was re-allocated, the math mode it was
// captured with) is the backend's to judge: it passes that to end() and checks it before replay().
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "cuda/cuda_resources.cuh"

namespace relora {
namespace cuda_detail {

class StepRecorder {
 public:
  explicit StepRecorder(cudaStream_t stream) : stream_(stream) {}
  StepRecorder(const StepRecorder&) = delete;
  StepRecorder& operator=(const StepRecorder&) = delete;

  bool recording() const { return recording_; }
  bool refreshing() const { return refreshing_; }

  // Starts capturing the stream's work: what is queued on it from now on is recorded, not run.
  void begin();
  // Ends the capture. When `keep` (the backend found nothing that spoils it) and the capture is
  // whole, the graph is instantiated, launched once (so the recorded work runs as if queued
  // eagerly) and replaces the ready recording; returns its id (> 0). Else 0, and none of it ran.
  std::uint64_t end(bool keep);
  // Runs `refresh`, whose launch() calls re-parameterise the recorded nodes, then launches the
  // recording once more. False (refresh not called, nothing queued) when `id` is not the ready
  // recording. Throws ConfigError when the refresh's launches differ from the recorded ones.
  bool replay(std::uint64_t id, const std::function<void()>& refresh);
  // Ends a capture in progress, discarding it, and forgets the ready recording.
  void drop();

  // kernel<<<grid, block, shared, stream>>>(args) where its parameters may change between replays.
  // `overlapped`: with the programmatic edge of cuda_launch.cuh's launch_overlapped.
  void launch(const void* kernel, dim3 grid, dim3 block, std::size_t shared, void** args, const char* name,
              bool overlapped = true);

 private:
  struct Node {
    cudaGraphNode_t node = nullptr;  // null: it could not be identified (the capture is spoiled)
    const void* kernel = nullptr;
    dim3 block;
    std::size_t shared = 0;
  };

  // The node the stream's capture added last (its only dependency now), or null.
  cudaGraphNode_t last_captured_node();

  cudaStream_t stream_;
  bool recording_ = false;
  bool refreshing_ = false;
  bool spoiled_ = false;         // a launch's node could not be identified while recording
  std::vector<Node> capturing_;  // launch() nodes of the capture in progress
  std::vector<Node> recorded_;   // of the ready recording
  std::size_t refresh_next_ = 0;
  std::uint64_t recording_id_ = 0;  // of the ready recording (0: none); ids count up from 1
  std::uint64_t recordings_ = 0;
  Graph graph_;  // kept alive: the noted nodes address exec_'s nodes through it
  GraphExec exec_;
};

}  // namespace cuda_detail
}  // namespace relora
