#include "relora/distributed/rendezvous.hpp"

#include <chrono>
#include <cmath>

#include "distributed/rendezvous_arguments.hpp"
#include "relora/core/errors.hpp"
#include "relora/distributed/file_rendezvous.hpp"
#include "relora/distributed/tcp_rendezvous.hpp"

namespace relora {
namespace {

// The rendezvous of a job of one rank: there is nobody to hand the blob to.
class SoloRendezvous final : public Rendezvous {
 public:
  std::vector<std::uint8_t> share_from_rank0(const std::vector<std::uint8_t>& blob) override {
    rendezvous_detail::check_blob(description(), blob);
    return blob;
  }
  std::string description() const override { return "none (one rank)"; }
};

}  // namespace

std::unique_ptr<Rendezvous> make_rendezvous(const LaunchEnvironment& env) {
  const auto timeout = std::chrono::milliseconds(
      static_cast<long long>(std::ceil(env.rendezvous_timeout_seconds * 1000.0)));
  switch (env.rendezvous) {
    case RendezvousKind::file:
      return std::make_unique<FileRendezvous>(env.rendezvous_file, env.rank, env.world_size, env.job_key, timeout);
    case RendezvousKind::tcp:
      return std::make_unique<TcpRendezvous>(env.master_addr, env.master_port, env.rank, env.world_size, env.job_key,
                                             timeout);
    case RendezvousKind::none:
      break;
  }
  if (env.world_size != 1) {
    throw ConfigError("make_rendezvous: " + env.description() + " names no rendezvous for more than one rank");
  }
  return std::make_unique<SoloRendezvous>();
}

}  // namespace relora
