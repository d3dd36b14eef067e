#pragma once
// How the ranks of a group agree that an operation each ran on its own (a checkpoint's write or
// load, a check of a model) worked everywhere: every rank learns which ranks failed and the first
// one's message, so that all of them throw together and none goes on alone. And the host-side
// broadcasts that needs (of values, of text). Collectives over buffers on the backend (the
// communicator's memory), so they work on every device; they allocate, and are meant for setup
// and checkpoints, not for steps.
#include <string>

#include "relora/core/host_matrix.hpp"
#include "relora/distributed/communicator.hpp"

namespace relora {

// values <- root's values (every rank passes the same shape), through a buffer on the backend.
template <typename T>
void broadcast_host(Communicator<T>& communicator, Backend<T>& backend, HostMatrix<T>& values, int root) {
  if (values.size() == 0) return;
  Tensor<T> buffer = backend.allocate(values.rows(), values.cols());
  backend.upload(values.data(), buffer);
  communicator.broadcast(buffer.data(), buffer.size(), root);
  communicator.wait();
  backend.download(buffer, values.data());
}

// Root's `text` on every rank (the others' `text` is not read): its length, then one character
// per element (exact in either type).
template <typename T>
std::string broadcast_text(Communicator<T>& communicator, Backend<T>& backend, const std::string& text, int root) {
  const bool sending = communicator.rank() == root;
  HostMatrix<T> length(1, 1);
  length(0, 0) = sending ? T(text.size()) : T(0);
  broadcast_host(communicator, backend, length, root);
  const Index size = Index(length(0, 0));
  HostMatrix<T> chars = HostMatrix<T>::Zero(size, 1);
  if (sending) {
    for (Index i = 0; i < size; ++i) chars(i, 0) = T(static_cast<unsigned char>(text[std::size_t(i)]));
  }
  broadcast_host(communicator, backend, chars, root);
  std::string received(std::size_t(size), '\0');
  for (Index i = 0; i < size; ++i) received[std::size_t(i)] = char(static_cast<unsigned char>(chars(i, 0)));
  return received;
}

// The lowest rank that failed (-1: none) and its message.
struct RankFailure {
  int rank = -1;
  std::string message;
  explicit operator bool() const { return rank >= 0; }
};

// Collective: `failure` is this rank's message, empty when it did not fail. Messages are cut at
// 64 KiB (and float counts characters exactly only up to 2^24).
template <typename T>
RankFailure agree_on_failure(Communicator<T>& communicator, Backend<T>& backend, const std::string& failure) {
  const int ranks = communicator.size();
  HostMatrix<T> flags = HostMatrix<T>::Zero(ranks, 1);
  if (!failure.empty()) flags(communicator.rank(), 0) = T(1);
  Tensor<T> buffer = backend.allocate(ranks, 1);
  backend.upload(flags.data(), buffer);
  communicator.all_reduce_sum(buffer.data(), ranks);
  communicator.wait();
  backend.download(buffer, flags.data());
  RankFailure first;
  for (int r = 0; r < ranks && first.rank < 0; ++r) {
    if (flags(r, 0) != T(0)) first.rank = r;
  }
  if (first.rank >= 0) {
    constexpr std::size_t kMaxMessage = 65536;
    first.message = broadcast_text(communicator, backend, failure.substr(0, kMaxMessage), first.rank);
  }
  return first;
}

}  // namespace relora
