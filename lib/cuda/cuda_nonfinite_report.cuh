#pragma once
// Non-finite values found by kernels on the device, reported by name on the host at the next
// synchronize(), so that a guard costs no copy per step.
//
// A launch whose kernels look for NaN or Inf first calls note() with the names of the tensors they
// look at; note() returns a tag, and a kernel that finds a bad value in tensor i writes
// atomicMin(flag(), code(tag, i)). raise() (the backend's synchronize(), with the stream idle)
// reads the flag back and, when it is set, throws NonFiniteError naming the first tensor found in
// the earliest launch, then clears it. The flag is sticky until then: kernels whose work must not
// follow a refused one (Adam's updates) read it and do nothing while it is set.
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cuda/cuda_resources.cuh"

namespace relora {
namespace cuda_detail {

// What a launch guards: its words for the message and the names of its tensors, by index.
//   "<operation> refused: <subject> '<name>' holds NaN or Inf; <consequence>"
struct NonFiniteSource {
  std::string operation;    // "adam step"
  std::string subject;      // "gradient of"
  std::string consequence;  // "no parameter was updated"
  std::vector<std::string> names;
  bool operator==(const NonFiniteSource& o) const {
    return operation == o.operation && subject == o.subject && consequence == o.consequence && names == o.names;
  }
};

class NonFiniteReport {
 public:
  static constexpr unsigned long long kNone = ~0ull;  // the flag's "nothing found"

  // Allocates the flag (device) and its read-back copy (pinned), cleared on `stream`.
  explicit NonFiniteReport(cudaStream_t stream);

  // The device flag kernels write with atomicMin.
  unsigned long long* flag() const { return static_cast<unsigned long long*>(flag_.ptr); }
  __host__ __device__ static unsigned long long code(std::uint32_t tag, std::uint32_t index) {
    return (static_cast<unsigned long long>(tag) << 32) | index;
  }

  // Tags a launch whose kernels report against `source`. Copies the source only when it differs
  // from the previous launch's, so that a steady step allocates nothing.
  std::uint32_t note(const NonFiniteSource& source);

  // Throws NonFiniteError if a kernel reported since the last call, clearing the flag; forgets
  // the sources of finished launches either way. The stream must be idle.
  void raise(cudaStream_t stream);

  // Where the tags stand, to forget the launches of a recording that was discarded unrun.
  struct Mark {
    std::uint32_t tags = 0;
    std::size_t sources = 0;
  };
  Mark mark() const { return {tags_, sources_.size()}; }
  void rollback(const Mark& mark);

 private:
  DeviceMemory flag_;
  PinnedMemory flag_host_;
  std::uint32_t tags_ = 0;  // tags handed out since the flag was last read clear
  // Sources, each with the first tag that used it.
  std::vector<std::pair<std::uint32_t, std::shared_ptr<const NonFiniteSource>>> sources_;

  // Keeps only the newest source, as tag 0.
  void restart_tags();
};

}  // namespace cuda_detail
}  // namespace relora
