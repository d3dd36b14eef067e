#pragma once
// What data-parallel training needs of a group of ranks: a sum of one contiguous buffer over every
// rank, a broadcast, a barrier, and the rank and size. Each rank holds its own Backend; the buffers
// a communicator takes live in that backend's memory (host memory for the CPU backend, device
// memory for CUDA). Implementations: ThreadCommunicator (ranks are threads of one process, CPU
// backend: the data-parallel logic tested without GPUs) and NcclCommunicator (one GPU per rank, one
// process per GPU or one thread per GPU).
//
// Ordering. A collective is issued after the work already issued on the rank's backend and sees
// its results. Its own result is ready for the work issued on the backend after the next wait():
// on a GPU the collectives run on a stream of their own, so a caller overlaps them with work it
// issues before wait() (the backward of the layers below). Every rank must issue the same
// collectives, of the same counts, in the same order.
//
// Failure. A rank that cannot go on calls abort(reason); every rank's pending and later collectives
// then throw CommunicatorError naming the rank that aborted and its reason, so that no rank waits
// for one that will never come.
#include <string>

#include "relora/core/errors.hpp"
#include "relora/core/tensor.hpp"

namespace relora {

// A collective that cannot complete: a rank aborted (the message names it and its reason), a peer
// is gone, or the transport failed.
class CommunicatorError : public Error {
 public:
  using Error::Error;
};

template <typename T>
class Communicator {
 public:
  virtual ~Communicator() = default;

  // "threads", "nccl", ...
  virtual const char* kind() const = 0;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Where the buffers given to the collectives live.
  virtual Device device() const = 0;

  // data[i] <- sum over ranks r of scale_r * data_r[i], scale_r being the scale rank r passes.
  // Every rank gets the same bits (the sum is taken in one order for all).
  virtual void all_reduce_sum(T* data, Index count, T scale = T(1)) = 0;
  // data <- root's data on every rank.
  virtual void broadcast(T* data, Index count, int root) = 0;
  // Work issued on the backend after this call sees the results of every collective issued before it.
  virtual void wait() = 0;
  // Returns once every rank has called it, every collective issued before it complete.
  virtual void barrier() = 0;
  // Makes every rank's pending and later collectives throw CommunicatorError naming this rank
  // and `reason`. Safe to call more than once and from any thread.
  virtual void abort(const std::string& reason) = 0;
};

}  // namespace relora
