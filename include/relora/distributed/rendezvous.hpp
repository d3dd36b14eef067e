#pragma once
// How the ranks of a job meet before they can talk over the fast transport: rank 0 hands one small
// blob (NCCL's 128-byte unique id) to every other rank. Two ways, chosen by the launch
// environment: a shared file (FileRendezvous) or a small TCP server on rank 0 (TcpRendezvous).
// A rendezvous is used once, by every rank of the job, at start-up.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "relora/distributed/launch_environment.hpp"

namespace relora {

// The largest blob a rendezvous carries: a guard against a corrupt file or a stray peer's length,
// far above what a communicator needs.
constexpr std::size_t kMaxRendezvousBlobBytes = 1 << 16;

class Rendezvous {
 public:
  virtual ~Rendezvous() = default;

  // On rank 0: publishes `blob` (at most kMaxRendezvousBlobBytes) and returns it once every other
  // rank has it (TCP) or once it is published (file). On the other ranks: `blob` is ignored;
  // waits for rank 0's blob and returns it. Throws CommunicatorError naming the address (file path
  // or host:port) and how long it waited when the peers do not come in time.
  virtual std::vector<std::uint8_t> share_from_rank0(const std::vector<std::uint8_t>& blob) = 0;
  // "file /shared/job.id" or "tcp node0:29500", for messages.
  virtual std::string description() const = 0;
};

// The rendezvous `env` names: a FileRendezvous, a TcpRendezvous, or (one rank, none named) one that
// hands rank 0's blob back to it.
std::unique_ptr<Rendezvous> make_rendezvous(const LaunchEnvironment& env);

}  // namespace relora
