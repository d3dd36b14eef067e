#pragma once
// The few POSIX socket operations the TCP rendezvous needs, each bounded by a deadline so that no
// call can block past it: listening on a port, connecting to a resolved IPv4 address, and sending
// and receiving whole rendezvous messages. Failures come back as text (for the rendezvous's own
// messages), never as a signal: sends use MSG_NOSIGNAL.
#include <netinet/in.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "distributed/rendezvous_message.hpp"

namespace relora {
namespace socket_detail {

using Clock = std::chrono::steady_clock;

// Owns a file descriptor; closes it once.
class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() { reset(); }
  Socket(Socket&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  Socket& operator=(Socket&& other) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset();

 private:
  int fd_ = -1;
};

// A socket listening on `port` of every IPv4 interface (SO_REUSEADDR, so a job restarted at once
// can take the port its predecessor's closed connections still hold). "" or why not in `error`.
Socket listen_on(int port, int backlog, std::string& error);

// A socket accepted from `listener` within the deadline, or an invalid one.
Socket accept_until(const Socket& listener, Clock::time_point deadline);

// The IPv4 addresses of `host` (a dotted quad or a name). Empty, and `error` set, when it does not
// resolve; `transient` then says whether a retry may succeed (the resolver was unavailable).
std::vector<sockaddr_in> resolve_ipv4(const std::string& host, int port, std::string& error, bool& transient);

// A socket connected to `address` within the deadline, or an invalid one and `error` set.
Socket connect_until(const sockaddr_in& address, Clock::time_point deadline, std::string& error);

// Whole messages, within the deadline; "" on success or why not.
std::string send_message(const Socket& socket, const rendezvous_detail::Message& message, Clock::time_point deadline);
std::string receive_message(const Socket& socket, rendezvous_detail::Message& message, Clock::time_point deadline);

}  // namespace socket_detail
}  // namespace relora
