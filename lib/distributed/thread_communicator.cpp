#include "relora/distributed/thread_communicator.hpp"

#include <cstring>
#include <exception>
#include <thread>
#include <type_traits>

namespace relora {
namespace {

template <typename T>
const char* type_name() {
  return std::is_same<T, float>::value ? "float" : "double";
}

// Rank `rank`'s share [begin, end) of `count` elements split among `size` ranks.
struct Share {
  Index begin, end;
};
Share share_of(Index count, int rank, int size) {
  return Share{count * rank / size, count * (rank + 1) / size};
}

}  // namespace

ThreadGroup::ThreadGroup(int size) : size_(size) {
  if (size < 1) throw ConfigError("ThreadGroup: size " + std::to_string(size) + " must be >= 1");
  posts_.resize(std::size_t(size));
}

void ThreadGroup::check_rank(int rank, const char* what) const {
  if (rank < 0 || rank >= size_) {
    throw ConfigError(std::string("ThreadGroup ") + what + ": rank " + std::to_string(rank) + " is outside [0, " +
                      std::to_string(size_) + ")");
  }
}

std::string ThreadGroup::mismatch() const {
  const Post& first = posts_[0];
  bool same = true;
  for (const Post& p : posts_) {
    same = same && p.op == first.op && p.type == first.type && p.count == first.count &&
           (p.op != Op::broadcast || p.root == first.root);
  }
  if (same) return "";
  std::string text = "the ranks issued different collectives:";
  for (int r = 0; r < size_; ++r) {
    const Post& p = posts_[std::size_t(r)];
    text += " rank " + std::to_string(r) + " ";
    switch (p.op) {
      case Op::all_reduce_sum: text += "all_reduce_sum of " + std::to_string(p.count) + " " + p.type; break;
      case Op::broadcast:
        text += "broadcast of " + std::to_string(p.count) + " " + p.type + " from rank " + std::to_string(p.root);
        break;
      case Op::barrier: text += "barrier"; break;
    }
    text += r + 1 < size_ ? ";" : "";
  }
  return text;
}

void ThreadGroup::arrive(bool check) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (aborted_) throw CommunicatorError(reason_);
  const std::uint64_t generation = generation_;
  if (++arrived_ < size_) {
    released_.wait(lock, [&] { return generation_ != generation || aborted_; });
    if (generation_ == generation) throw CommunicatorError(reason_);  // aborted while waiting
    return;
  }
  // The last to arrive: every post is written and no rank reads or writes one until released.
  arrived_ = 0;
  if (check) {
    std::string differ = mismatch();
    if (!differ.empty()) {
      aborted_ = true;
      reason_ = std::move(differ);
      released_.notify_all();
      throw CommunicatorError(reason_);
    }
  }
  ++generation_;
  released_.notify_all();
}

template <typename T>
void ThreadGroup::all_reduce_sum(int rank, T* data, Index count, T scale) {
  check_rank(rank, "all_reduce_sum");
  if (count < 0 || (count > 0 && data == nullptr)) {
    throw ConfigError("ThreadCommunicator all_reduce_sum: rank " + std::to_string(rank) + " gave " +
                      (count < 0 ? "count " + std::to_string(count) : std::string("no buffer for ") +
                                                                              std::to_string(count) + " elements"));
  }
  Post& mine = posts_[std::size_t(rank)];
  mine.op = Op::all_reduce_sum;
  mine.type = type_name<T>();
  mine.data = data;
  mine.count = count;
  mine.scale = double(scale);
  arrive(true);
  // Each element is read and written by the one rank whose share holds it, in every buffer: the
  // shares need no lock, and the sum's order (rank 0 first) is the same whoever computes it.
  const Share share = share_of(count, rank, size_);
  const T scale0 = T(posts_[0].scale);
  const T* data0 = static_cast<const T*>(posts_[0].data);
  for (Index i = share.begin; i < share.end; ++i) {
    T sum = scale0 * data0[i];
    for (int r = 1; r < size_; ++r) {
      const Post& p = posts_[std::size_t(r)];
      sum += T(p.scale) * static_cast<const T*>(p.data)[i];
    }
    for (const Post& p : posts_) static_cast<T*>(p.data)[i] = sum;
  }
  arrive(false);  // no rank returns while another may still write into its buffer
}

template <typename T>
void ThreadGroup::broadcast(int rank, T* data, Index count, int root) {
  check_rank(rank, "broadcast");
  check_rank(root, "broadcast root");
  if (count < 0 || (count > 0 && data == nullptr)) {
    throw ConfigError("ThreadCommunicator broadcast: rank " + std::to_string(rank) + " gave " +
                      (count < 0 ? "count " + std::to_string(count) : std::string("no buffer for ") +
                                                                              std::to_string(count) + " elements"));
  }
  Post& mine = posts_[std::size_t(rank)];
  mine.op = Op::broadcast;
  mine.type = type_name<T>();
  mine.data = data;
  mine.count = count;
  mine.root = root;
  arrive(true);
  if (rank != root && count > 0) std::memcpy(data, posts_[std::size_t(root)].data, sizeof(T) * std::size_t(count));
  arrive(false);  // the root's buffer is read until every rank has copied it
}

void ThreadGroup::barrier(int rank) {
  check_rank(rank, "barrier");
  posts_[std::size_t(rank)].op = Op::barrier;
  posts_[std::size_t(rank)].type = "";
  posts_[std::size_t(rank)].count = 0;
  arrive(true);
}

void ThreadGroup::abort(int rank, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!aborted_) {
    aborted_ = true;
    reason_ = "rank " + std::to_string(rank) + " aborted: " + reason;
  }
  released_.notify_all();
}

bool ThreadGroup::aborted() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return aborted_;
}

void ThreadGroup::throw_if_aborted() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (aborted_) throw CommunicatorError(reason_);
}

template <typename T>
ThreadCommunicator<T>::ThreadCommunicator(std::shared_ptr<ThreadGroup> group, int rank)
    : group_(std::move(group)), rank_(rank) {
  if (!group_) throw ConfigError("ThreadCommunicator: no group given");
  if (rank < 0 || rank >= group_->size()) {
    throw ConfigError("ThreadCommunicator: rank " + std::to_string(rank) + " is outside [0, " +
                      std::to_string(group_->size()) + ")");
  }
}

template <typename T>
void ThreadCommunicator<T>::all_reduce_sum(T* data, Index count, T scale) {
  group_->all_reduce_sum(rank_, data, count, scale);
}

template <typename T>
void ThreadCommunicator<T>::broadcast(T* data, Index count, int root) {
  group_->broadcast(rank_, data, count, root);
}

template <typename T>
void ThreadCommunicator<T>::wait() {}

template <typename T>
void ThreadCommunicator<T>::barrier() {
  group_->barrier(rank_);
}

template <typename T>
void ThreadCommunicator<T>::abort(const std::string& reason) {
  group_->abort(rank_, reason);
}

template <typename T>
std::vector<std::shared_ptr<Communicator<T>>> make_thread_communicators(int size) {
  auto group = std::make_shared<ThreadGroup>(size);
  std::vector<std::shared_ptr<Communicator<T>>> ranks;
  for (int r = 0; r < size; ++r) ranks.push_back(std::make_shared<ThreadCommunicator<T>>(group, r));
  return ranks;
}

template <typename T>
void run_ranks(int size, const RankFunction<T>& fn) {
  if (!fn) throw ConfigError("run_ranks: no function given");
  const std::vector<std::shared_ptr<Communicator<T>>> ranks = make_thread_communicators<T>(size);
  std::mutex mutex;
  std::exception_ptr first;  // the first exception a rank threw
  // Records the exception in flight (before the abort, so that the cause comes before the
  // CommunicatorErrors it leads to) and aborts the group with its message.
  const auto fail = [&](int rank) {
    std::string what = "an exception that is not a std::exception";
    try {
      throw;
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (!first) first = std::current_exception();
    }
    ranks[std::size_t(rank)]->abort(what);
  };
  std::vector<std::thread> threads;
  threads.reserve(std::size_t(size));
  try {
    for (int r = 0; r < size; ++r) {
      threads.emplace_back([&fn, &ranks, &fail, r] {
        try {
          fn(ranks[std::size_t(r)]);
        } catch (...) {
          fail(r);
        }
      });
    }
  } catch (...) {
    // A thread could not start: the ranks that did would wait for it forever.
    fail(int(threads.size()));
  }
  for (std::thread& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

template void ThreadGroup::all_reduce_sum(int, float*, Index, float);
template void ThreadGroup::all_reduce_sum(int, double*, Index, double);
template void ThreadGroup::broadcast(int, float*, Index, int);
template void ThreadGroup::broadcast(int, double*, Index, int);
template class ThreadCommunicator<float>;
template class ThreadCommunicator<double>;
template std::vector<std::shared_ptr<Communicator<float>>> make_thread_communicators(int);
template std::vector<std::shared_ptr<Communicator<double>>> make_thread_communicators(int);
template void run_ranks(int, const RankFunction<float>&);
template void run_ranks(int, const RankFunction<double>&);

}  // namespace relora
