#pragma once
// The abort flag a group of ranks shares: ranks made together in one process (one thread per GPU)
// hold the same flag, so that one rank's abort makes every other rank's next call throw, naming
// the rank that aborted and why. A rank of its own (one process per GPU) has a flag of its own.
#include <atomic>
#include <mutex>
#include <string>

namespace relora {
namespace nccl_detail {

class AbortFlag {
 public:
  bool raised() const { return raised_.load(std::memory_order_acquire); }
  // The first abort's account is kept; later ones change nothing.
  void raise(const std::string& account) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (raised_.load(std::memory_order_relaxed)) return;
    account_ = account;
    raised_.store(true, std::memory_order_release);
  }
  // "rank 1 aborted: out of memory" once raised.
  std::string account() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return account_;
  }

 private:
  std::atomic<bool> raised_{false};
  mutable std::mutex mutex_;
  std::string account_;
};

}  // namespace nccl_detail
}  // namespace relora
