#pragma once
// A Communicator whose ranks are threads of one process, on the CPU backend: data-parallel
// training run and tested without GPUs. The ranks share a ThreadGroup; each rank holds its own
// CPU backend, model and trainer, and the buffers it hands to the collectives are host memory.
//
// The collectives complete within the call, so wait() has nothing to wait for. all_reduce_sum splits the elements among the ranks: each rank takes its share of the
// elements, sums them over every rank's buffer in rank order 0..N-1 (each rank's scale applied
// before the sum) and writes the sum into every rank's buffer. Every rank gets the same bits, and
// they do not depend on which thread ran first. The group keeps no buffer of its own: a
// collective allocates nothing. Ranks that issue different collectives (another kind, count,
// element type or root) are told so: every rank's collective throws CommunicatorError naming what
// each rank issued, where NCCL would hang or mix the buffers.
//
// Usage: run_ranks starts one thread per rank, each calling fn with its communicator, and returns
// when every rank is done. An exception in a rank aborts the group, so that the other ranks'
// collectives throw instead of waiting for it, and the first failing rank's exception (of its own
// type) is rethrown on the caller's thread.
//
//   run_ranks<float>(4, [&](const std::shared_ptr<Communicator<float>>& comm) {
//     auto backend = make_backend<float>(Device::cpu);
//     Model<float> model(backend);  // built alike on every rank: the same configs and seeds
//     model.add(LoraConfig{.in_features = 8, .out_features = 4, .rank = 2}, Activation::identity);
//     Trainer<float> trainer(model, TrainerConfig{}, nullptr, nullptr, comm);
//     trainer.step(X_shard, Y_shard);  // this rank's rows of the batch; loss() is the batch's
//   });
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "relora/distributed/communicator.hpp"

namespace relora {

// What the ranks of one group share: each rank's pending collective, a barrier that an abort
// breaks, and the abort's reason. One group serves communicators of both element types (a
// collective's element type is checked against the other ranks').
class ThreadGroup {
 public:
  explicit ThreadGroup(int size);
  ThreadGroup(const ThreadGroup&) = delete;
  ThreadGroup& operator=(const ThreadGroup&) = delete;

  int size() const { return size_; }

  // The collectives of Communicator, called by rank `rank` on its own buffer.
  template <typename T>
  void all_reduce_sum(int rank, T* data, Index count, T scale);
  template <typename T>
  void broadcast(int rank, T* data, Index count, int root);
  void barrier(int rank);

  // Makes every pending and later collective of every rank throw CommunicatorError
  // "rank <rank> aborted: <reason>". The first abort's reason is kept; later ones change nothing.
  void abort(int rank, const std::string& reason);
  bool aborted() const;
  // Throws CommunicatorError with the abort's message if the group was aborted.
  void throw_if_aborted() const;

 private:
  enum class Op { all_reduce_sum, broadcast, barrier };
  // What a rank asked of the current collective.
  struct Post {
    Op op = Op::barrier;
    const char* type = "";  // the element type's name; compared by address, named in messages
    void* data = nullptr;
    Index count = 0;
    double scale = 1;  // exact for both element types
    int root = 0;
  };

  // The rank's part of the barrier: returns once every rank has arrived. With `check`, the last
  // to arrive first compares every rank's post, and aborts the group if they differ.
  void arrive(bool check);
  // The message naming every rank's post, or "" when all posts describe one collective.
  std::string mismatch() const;
  void check_rank(int rank, const char* what) const;

  int size_;
  std::vector<Post> posts_;  // one per rank, written by that rank before it arrives
  mutable std::mutex mutex_;
  std::condition_variable released_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;  // barriers passed
  bool aborted_ = false;
  std::string reason_;  // the CommunicatorError message once aborted
};

template <typename T>
class ThreadCommunicator final : public Communicator<T> {
 public:
  // Rank `rank` (in [0, group->size())) of `group`.
  ThreadCommunicator(std::shared_ptr<ThreadGroup> group, int rank);

  const char* kind() const override { return "threads"; }
  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  Device device() const override { return Device::cpu; }

  void all_reduce_sum(T* data, Index count, T scale = T(1)) override;
  void broadcast(T* data, Index count, int root) override;
  // Nothing: the collectives are complete when they return.
  void wait() override;
  void barrier() override;
  void abort(const std::string& reason) override;

  ThreadGroup& group() { return *group_; }

 private:
  std::shared_ptr<ThreadGroup> group_;
  int rank_;
};

// The communicators of a new group of `size` ranks, rank r at index r.
template <typename T>
std::vector<std::shared_ptr<Communicator<T>>> make_thread_communicators(int size);

// What each rank runs in run_ranks: its communicator, whose rank() says which rank it is.
template <typename T>
using RankFunction = std::function<void(const std::shared_ptr<Communicator<T>>& communicator)>;

// Runs fn on `size` threads, one per rank of a new group, and joins them all. A rank whose fn
// throws aborts the group with the exception's message, so that no rank waits for it; once all
// have ended, the first exception thrown (the cause; the others' CommunicatorErrors follow from
// it) is rethrown here, of its own type.
template <typename T>
void run_ranks(int size, const RankFunction<T>& fn);

extern template class ThreadCommunicator<float>;
extern template class ThreadCommunicator<double>;
extern template std::vector<std::shared_ptr<Communicator<float>>> make_thread_communicators(int);
extern template std::vector<std::shared_ptr<Communicator<double>>> make_thread_communicators(int);
extern template void run_ranks(int, const RankFunction<float>&);
extern template void run_ranks(int, const RankFunction<double>&);

}  // namespace relora
