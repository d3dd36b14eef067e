#include "relora/distributed/tcp_rendezvous.hpp"

#include <algorithm>
#include <set>
#include <thread>
#include <utility>

#include "distributed/rendezvous_arguments.hpp"
#include "distributed/rendezvous_message.hpp"
#include "distributed/socket_io.hpp"
#include "relora/distributed/communicator.hpp"

namespace relora {
namespace {

using rendezvous_detail::Message;
using rendezvous_detail::MessageKind;
using socket_detail::Clock;
using socket_detail::Socket;

// How long rank 0 gives one connection to say hello and confirm: a relora rank does both at once,
// so only a stray peer takes this long, and rank 0 then moves on to the next connection.
constexpr std::chrono::seconds kConnectionPatience(5);

std::string missing_ranks(const std::set<int>& served, int world_size) {
  std::string text;
  int listed = 0;
  for (int rank = 1; rank < world_size; ++rank) {
    if (served.count(rank) != 0) continue;
    if (listed == 16) {
      text += ", ...";
      break;
    }
    text += (listed++ == 0 ? "" : ", ") + std::to_string(rank);
  }
  return text;
}

}  // namespace

TcpRendezvous::TcpRendezvous(std::string address, int port, int rank, int world_size, std::string job_key,
                             std::chrono::milliseconds timeout)
    : address_(std::move(address)),
      port_(port),
      rank_(rank),
      world_size_(world_size),
      job_key_(std::move(job_key)),
      timeout_(timeout) {
  if (address_.empty()) throw ConfigError("tcp rendezvous: the address is empty");
  if (port_ < 1 || port_ > 65535) {
    throw ConfigError("tcp rendezvous " + address_ + ": port " + std::to_string(port_) + " must be in [1, 65535]");
  }
  rendezvous_detail::check_rendezvous_arguments("tcp rendezvous " + description(), rank_, world_size_, job_key_,
                                                timeout_);
}

std::vector<std::uint8_t> TcpRendezvous::share_from_rank0(const std::vector<std::uint8_t>& blob) {
  if (rank_ != 0) return fetch();
  rendezvous_detail::check_blob(description(), blob);
  if (world_size_ == 1) return blob;
  return serve(blob);
}

std::vector<std::uint8_t> TcpRendezvous::serve(const std::vector<std::uint8_t>& blob) {
  const auto start = Clock::now();
  const auto deadline = start + timeout_;
  std::string error;
  const Socket listener = socket_detail::listen_on(port_, std::min(world_size_, 1024), error);
  if (!listener.valid()) {
    throw CommunicatorError("tcp rendezvous: rank 0 cannot listen on port " + std::to_string(port_) + ": " + error);
  }
  Message answer;
  answer.kind = MessageKind::blob;
  answer.world_size = static_cast<std::uint32_t>(world_size_);
  answer.key = job_key_;
  answer.payload = blob;
  std::set<int> served;
  std::string last_rejected;
  while (static_cast<int>(served.size()) < world_size_ - 1) {
    const Socket peer = socket_detail::accept_until(listener, deadline);
    if (!peer.valid()) {
      throw CommunicatorError("tcp rendezvous: rank 0 waited " + rendezvous_detail::seconds_text(Clock::now() - start) +
                              " on port " + std::to_string(port_) + " (" + description() + ") and rank(s) " +
                              missing_ranks(served, world_size_) + " of " + std::to_string(world_size_) +
                              " never came" + (last_rejected.empty() ? "" : "; last connection refused: " + last_rejected));
    }
    const auto patience = std::min(deadline, Clock::now() + kConnectionPatience);
    Message hello;
    if (!socket_detail::receive_message(peer, hello, patience).empty() || hello.kind != MessageKind::hello) {
      last_rejected = "not a relora rank's hello";
      continue;  // a stray connection: dropped, not counted
    }
    std::string refusal;
    if (hello.key != job_key_) {
      refusal = "job key '" + hello.key + "' differs from rank 0's '" + job_key_ + "'";
    } else if (hello.world_size != static_cast<std::uint32_t>(world_size_)) {
      refusal = "world size " + std::to_string(hello.world_size) + " differs from rank 0's " +
                std::to_string(world_size_);
    } else if (hello.rank < 1 || hello.rank >= static_cast<std::uint32_t>(world_size_)) {
      refusal = "rank " + std::to_string(hello.rank) + " is not in [1, " + std::to_string(world_size_) + ")";
    }
    if (!refusal.empty()) {
      Message no;
      no.kind = MessageKind::refusal;
      no.payload.assign(refusal.begin(), refusal.end());
      (void)socket_detail::send_message(peer, no, patience);
      last_rejected = refusal;
      continue;
    }
    Message received;
    if (socket_detail::send_message(peer, answer, patience).empty() &&
        socket_detail::receive_message(peer, received, patience).empty() && received.kind == MessageKind::received) {
      served.insert(static_cast<int>(hello.rank));
    }
  }
  return blob;
}

std::vector<std::uint8_t> TcpRendezvous::fetch() {
  const auto start = Clock::now();
  const auto deadline = start + timeout_;
  Message hello;
  hello.kind = MessageKind::hello;
  hello.rank = static_cast<std::uint32_t>(rank_);
  hello.world_size = static_cast<std::uint32_t>(world_size_);
  hello.key = job_key_;
  // Retries quickly at first (rank 0 may be a moment from listening), then every half second.
  auto pause = std::chrono::milliseconds(5);
  std::string last_error;
  for (;;) {
    bool transient = false;
    const std::vector<sockaddr_in> addresses = socket_detail::resolve_ipv4(address_, port_, last_error, transient);
    if (addresses.empty() && !transient) {
      throw CommunicatorError("tcp rendezvous: rank " + std::to_string(rank_) + " cannot resolve " + description() +
                              ": " + last_error);
    }
    for (const sockaddr_in& address : addresses) {
      const Socket socket = socket_detail::connect_until(address, deadline, last_error);
      if (!socket.valid()) continue;
      Message answer;
      last_error = socket_detail::send_message(socket, hello, deadline);
      if (last_error.empty()) last_error = socket_detail::receive_message(socket, answer, deadline);
      if (!last_error.empty()) continue;  // rank 0 went away mid-exchange, or not a relora server
      if (answer.kind == MessageKind::refusal) {
        throw CommunicatorError("tcp rendezvous: rank 0 at " + description() + " refused rank " +
                                std::to_string(rank_) + ": " + std::string(answer.payload.begin(), answer.payload.end()));
      }
      if (answer.kind != MessageKind::blob || answer.key != job_key_) {
        last_error = "the server's answer is not this job's blob";
        continue;
      }
      Message received;
      received.kind = MessageKind::received;
      received.rank = hello.rank;
      received.world_size = hello.world_size;
      received.key = job_key_;
      last_error = socket_detail::send_message(socket, received, deadline);
      if (!last_error.empty()) continue;  // rank 0 will serve this rank again when it reconnects
      return std::move(answer.payload);
    }
    const auto waited = Clock::now() - start;
    if (waited >= timeout_) {
      throw CommunicatorError("tcp rendezvous: rank " + std::to_string(rank_) + " waited " +
                              rendezvous_detail::seconds_text(waited) + " for rank 0 at " + description() +
                              "; last error: " + last_error);
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(timeout_ - waited);
    std::this_thread::sleep_for(std::min(pause, left + std::chrono::milliseconds(1)));
    pause = std::min(pause * 2, std::chrono::milliseconds(500));
  }
}

}  // namespace relora
