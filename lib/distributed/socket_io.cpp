#include "distributed/socket_io.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace relora {
namespace socket_detail {
namespace {

std::string errno_text(const char* call, int error) { return std::string(call) + ": " + std::strerror(error); }

// Milliseconds to the deadline for poll(), at least 0.
int poll_timeout(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<long long>(left, 0, 1000 * 1000));
}

// Waits until `fd` is ready for `events` or the deadline passes; "" when ready, else why not.
std::string wait_ready(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd entry{fd, events, 0};
    const int ready = ::poll(&entry, 1, poll_timeout(deadline));
    if (ready > 0) return "";
    if (ready == 0) return "timed out";
    if (errno != EINTR) return errno_text("poll", errno);
  }
}

bool set_nonblocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL, 0);
  return flags >= 0 && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

std::string send_all(int fd, const std::uint8_t* data, std::size_t size, Clock::time_point deadline) {
  while (size > 0) {
    const ssize_t sent = ::send(fd, data, size, MSG_NOSIGNAL);
    if (sent > 0) {
      data += sent;
      size -= static_cast<std::size_t>(sent);
      continue;
    }
    if (sent < 0 && errno == EINTR) continue;
    if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      const std::string why = wait_ready(fd, POLLOUT, deadline);
      if (!why.empty()) return "send " + why;
      continue;
    }
    return errno_text("send", errno);
  }
  return "";
}

std::string receive_all(int fd, std::uint8_t* data, std::size_t size, Clock::time_point deadline) {
  while (size > 0) {
    const ssize_t got = ::recv(fd, data, size, 0);
    if (got > 0) {
      data += got;
      size -= static_cast<std::size_t>(got);
      continue;
    }
    if (got == 0) return "the peer closed the connection";
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      const std::string why = wait_ready(fd, POLLIN, deadline);
      if (!why.empty()) return "receive " + why;
      continue;
    }
    return errno_text("recv", errno);
  }
  return "";
}

}  // namespace

Socket& Socket::operator=(Socket&& other) noexcept {
  if (this != &other) {
    reset();
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

void Socket::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Socket listen_on(int port, int backlog, std::string& error) {
  Socket socket(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!socket.valid()) {
    error = errno_text("socket", errno);
    return Socket();
  }
  const int on = 1;
  (void)::setsockopt(socket.fd(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_ANY);
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  if (::bind(socket.fd(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
    error = errno_text("bind", errno);
    return Socket();
  }
  if (::listen(socket.fd(), backlog) != 0 || !set_nonblocking(socket.fd())) {
    error = errno_text("listen", errno);
    return Socket();
  }
  error.clear();
  return socket;
}

Socket accept_until(const Socket& listener, Clock::time_point deadline) {
  for (;;) {
    if (!wait_ready(listener.fd(), POLLIN, deadline).empty()) return Socket();
    Socket accepted(::accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (accepted.valid()) return accepted;
    // The peer gave up between poll and accept, or a transient shortage: poll again.
    if (Clock::now() >= deadline) return Socket();
  }
}

std::vector<sockaddr_in> resolve_ipv4(const std::string& host, int port, std::string& error, bool& transient) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  const int status = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found);
  std::vector<sockaddr_in> addresses;
  if (status != 0) {
    error = std::string("getaddrinfo: ") + ::gai_strerror(status);
    transient = status == EAI_AGAIN;
    return addresses;
  }
  for (const addrinfo* entry = found; entry != nullptr; entry = entry->ai_next) {
    if (entry->ai_family == AF_INET && entry->ai_addrlen == sizeof(sockaddr_in)) {
      addresses.push_back(*reinterpret_cast<const sockaddr_in*>(entry->ai_addr));
    }
  }
  ::freeaddrinfo(found);
  if (addresses.empty()) error = "no IPv4 address";
  transient = false;
  return addresses;
}

Socket connect_until(const sockaddr_in& address, Clock::time_point deadline, std::string& error) {
  Socket socket(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!socket.valid()) {
    error = errno_text("socket", errno);
    return Socket();
  }
  if (::connect(socket.fd(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0) return socket;
  if (errno != EINPROGRESS && errno != EINTR) {
    error = errno_text("connect", errno);
    return Socket();
  }
  const std::string why = wait_ready(socket.fd(), POLLOUT, deadline);
  if (!why.empty()) {
    error = "connect " + why;
    return Socket();
  }
  int status = 0;
  socklen_t length = sizeof status;
  if (::getsockopt(socket.fd(), SOL_SOCKET, SO_ERROR, &status, &length) != 0) status = errno;
  if (status != 0) {
    error = errno_text("connect", status);
    return Socket();
  }
  return socket;
}

std::string send_message(const Socket& socket, const rendezvous_detail::Message& message, Clock::time_point deadline) {
  const std::vector<std::uint8_t> bytes = rendezvous_detail::encode_message(message);
  return send_all(socket.fd(), bytes.data(), bytes.size(), deadline);
}

std::string receive_message(const Socket& socket, rendezvous_detail::Message& message, Clock::time_point deadline) {
  std::uint8_t header[rendezvous_detail::kHeaderBytes];
  std::string why = receive_all(socket.fd(), header, sizeof header, deadline);
  if (!why.empty()) return why;
  std::uint32_t body_bytes = 0;
  why = rendezvous_detail::check_header(header, body_bytes);
  if (!why.empty()) return why;
  std::vector<std::uint8_t> body(body_bytes);
  why = receive_all(socket.fd(), body.data(), body.size(), deadline);
  if (!why.empty()) return why;
  return rendezvous_detail::decode_body(header, body, message);
}

}  // namespace socket_detail
}  // namespace relora
