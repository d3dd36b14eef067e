#include "cuda/cuda_nonfinite_report.cuh"

#include "cuda/cuda_check.cuh"
#include "relora/core/errors.hpp"

namespace relora {
namespace cuda_detail {

NonFiniteReport::NonFiniteReport(cudaStream_t stream) {
  RELORA_CUDA_CHECK(cudaMalloc(&flag_.ptr, sizeof(unsigned long long)));
  RELORA_CUDA_CHECK(cudaMemsetAsync(flag_.ptr, 0xff, sizeof(unsigned long long), stream));
  RELORA_CUDA_CHECK(cudaMallocHost(&flag_host_.ptr, sizeof(unsigned long long)));
  *static_cast<unsigned long long*>(flag_host_.ptr) = kNone;
  RELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
}

std::uint32_t NonFiniteReport::note(const NonFiniteSource& source) {
  const std::uint32_t tag = tags_++;
  if (sources_.empty() || !(*sources_.back().second == source)) {
    sources_.emplace_back(tag, std::make_shared<const NonFiniteSource>(source));
  }
  return tag;
}

void NonFiniteReport::restart_tags() {
  if (sources_.size() > 1) sources_.erase(sources_.begin(), sources_.end() - 1);
  if (!sources_.empty()) sources_.front().first = 0;
  tags_ = sources_.empty() ? 0 : 1;
}

void NonFiniteReport::rollback(const Mark& mark) {
  tags_ = mark.tags;
  if (sources_.size() > mark.sources) sources_.resize(mark.sources);
}

void NonFiniteReport::raise(cudaStream_t stream) {
  auto* host = static_cast<unsigned long long*>(flag_host_.ptr);
  RELORA_CUDA_CHECK(cudaMemcpy(host, flag(), sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  const unsigned long long found = *host;
  if (found == kNone) {
    restart_tags();
    return;
  }
  const std::uint32_t tag = std::uint32_t(found >> 32);
  const std::uint32_t index = std::uint32_t(found & 0xffffffffu);
  const NonFiniteSource* source = nullptr;
  for (auto it = sources_.rbegin(); it != sources_.rend(); ++it) {
    if (it->first <= tag) {
      source = it->second.get();
      break;
    }
  }
  const std::uint32_t later = tags_ - 1 - tag;  // launches tagged after the one that failed
  std::string message = "a kernel found NaN or Inf in tensor " + std::to_string(index);
  if (source != nullptr) {
    const std::string name = index < source->names.size() ? source->names[index] : "?";
    message = source->operation + " refused: " + source->subject + " '" + name + "' holds NaN or Inf; " +
              source->consequence +
              (later > 0 ? " (nor by the " + std::to_string(later) + " " + source->operation + "(s) queued after it)"
                         : "");
  }
  // Clear the flag on the device and here, so that work may go on after the caller's decision.
  RELORA_CUDA_CHECK(cudaMemsetAsync(flag(), 0xff, sizeof(unsigned long long), stream));
  RELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
  *host = kNone;
  restart_tags();
  throw NonFiniteError(message);
}

}  // namespace cuda_detail
}  // namespace relora
