#pragma once
// A rendezvous over TCP (IPv4), as torchrun's MASTER_ADDR and MASTER_PORT describe it: rank 0
// listens on the port (all interfaces) and answers each other rank's hello with the blob; the
// others resolve the address (a dotted quad or a host name, through getaddrinfo) and connect,
// retrying while rank 0 is not listening yet, until the timeout.
//
// Each side speaks first with a framed message (a magic, a version, a length and a checksum:
// rendezvous_message.hpp), so rank 0 drops a connection that is not a relora rank of this job (a
// port scanner, a health check) without counting it, and a rank that reaches a server of another
// job (another key or world size) is told so and fails at once, instead of taking its blob.
// Rank 0 returns once every rank 1 .. world_size - 1 has had the blob; a rank that reconnects
// (its first connection broke) is served again.
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "relora/distributed/rendezvous.hpp"

namespace relora {

class TcpRendezvous final : public Rendezvous {
 public:
  // Throws ConfigError naming the value: an empty address, a port outside [1, 65535], a rank
  // outside [0, world_size), a key longer than 4096 bytes, a timeout that is not positive.
  TcpRendezvous(std::string address, int port, int rank, int world_size, std::string job_key,
                std::chrono::milliseconds timeout);

  // Rank 0 throws CommunicatorError when it cannot listen on the port (naming it and the errno
  // text), or when the timeout passes first (naming the ranks that never came); the others when
  // the address does not resolve, rank 0 refuses them, or the timeout passes first.
  std::vector<std::uint8_t> share_from_rank0(const std::vector<std::uint8_t>& blob) override;
  std::string description() const override { return "tcp " + address_ + ":" + std::to_string(port_); }

 private:
  std::vector<std::uint8_t> serve(const std::vector<std::uint8_t>& blob);
  std::vector<std::uint8_t> fetch();

  std::string address_;
  int port_;
  int rank_;
  int world_size_;
  std::string job_key_;
  std::chrono::milliseconds timeout_;
};

}  // namespace relora
