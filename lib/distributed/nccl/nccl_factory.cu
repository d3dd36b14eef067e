// The NCCL communicator's entry points (relora/distributed/nccl_communicator.hpp): one process per
// GPU through a rendezvous, or one thread per GPU in one process.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <set>

#include "cuda/cuda_check.cuh"
#include "distributed/nccl/nccl_check.cuh"
#include "distributed/nccl/nccl_communicator.cuh"
#include "distributed/nccl_factory_instances.hpp"

namespace relora {
namespace {

using nccl_detail::AbortFlag;
using nccl_detail::NcclCommunicator;

// An NCCL communicator not yet handed to its NcclCommunicator: aborted if an exception comes first.
struct PendingComm {
  ncclComm_t comm = nullptr;
  ~PendingComm() {
    if (comm != nullptr) (void)ncclCommAbort(comm);
  }
  ncclComm_t release() {
    ncclComm_t taken = comm;
    comm = nullptr;
    return taken;
  }
};

}  // namespace

bool nccl_available(std::string* why) { return cuda_available(why); }

template <typename T>
std::unique_ptr<Communicator<T>> make_nccl_communicator(Rendezvous& rendezvous, int rank, int world_size,
                                                        std::shared_ptr<Backend<T>> backend,
                                                        const NcclOptions& options) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw ConfigError("make_nccl_communicator: rank " + std::to_string(rank) + " must be in [0, world size " +
                      std::to_string(world_size) + ")");
  }
  auto communicator = std::make_unique<NcclCommunicator<T>>(std::move(backend), rank, world_size,
                                                            std::make_shared<AbortFlag>(), options);
  std::vector<std::uint8_t> blob;
  if (rank == 0) {
    ncclUniqueId id;
    RELORA_NCCL_CHECK(ncclGetUniqueId(&id), nullptr);
    blob.assign(reinterpret_cast<const std::uint8_t*>(id.internal),
                reinterpret_cast<const std::uint8_t*>(id.internal) + sizeof id.internal);
  }
  blob = rendezvous.share_from_rank0(blob);
  ncclUniqueId id;
  if (blob.size() != sizeof id.internal) {
    throw CommunicatorError("make_nccl_communicator: rank " + std::to_string(rank) + " got a blob of " +
                            std::to_string(blob.size()) + " bytes from " + rendezvous.description() +
                            ", not an NCCL unique id of " + std::to_string(sizeof id.internal));
  }
  std::memcpy(id.internal, blob.data(), sizeof id.internal);
  RELORA_CUDA_CHECK(cudaSetDevice(communicator->cuda_device()));
  PendingComm pending;
  // Blocks until every rank has joined.
  RELORA_NCCL_CHECK(ncclCommInitRank(&pending.comm, world_size, id, rank), nullptr);
  communicator->adopt(pending.release());
  return communicator;
}

template <typename T>
std::unique_ptr<Communicator<T>> make_nccl_communicator(const LaunchEnvironment& env,
                                                        std::shared_ptr<Backend<T>> backend,
                                                        const NcclOptions& options) {
  const std::unique_ptr<Rendezvous> rendezvous = make_rendezvous(env);
  return make_nccl_communicator<T>(*rendezvous, env.rank, env.world_size, std::move(backend), options);
}

template <typename T>
std::vector<std::unique_ptr<Communicator<T>>> make_nccl_communicators(
    const std::vector<std::shared_ptr<Backend<T>>>& backends, const NcclOptions& options) {
  if (backends.empty()) throw ConfigError("make_nccl_communicators: no backends given");
  const int size = static_cast<int>(backends.size());
  const auto abort_flag = std::make_shared<AbortFlag>();
  std::vector<std::unique_ptr<NcclCommunicator<T>>> ranks;
  std::vector<int> devices;
  std::set<int> seen;
  for (int rank = 0; rank < size; ++rank) {
    ranks.push_back(std::make_unique<NcclCommunicator<T>>(backends[rank], rank, size, abort_flag, options));
    const int device = ranks.back()->cuda_device();
    if (!seen.insert(device).second) {
      throw ConfigError("make_nccl_communicators: backends " + std::to_string(rank) + " and an earlier one share CUDA device " +
                        std::to_string(device) + "; each rank needs a device of its own");
    }
    devices.push_back(device);
  }
  std::vector<ncclComm_t> comms(size, nullptr);
  RELORA_NCCL_CHECK(ncclCommInitAll(comms.data(), size, devices.data()), nullptr);
  std::vector<std::unique_ptr<Communicator<T>>> communicators;
  for (int rank = 0; rank < size; ++rank) {
    ranks[rank]->adopt(comms[rank]);
    communicators.push_back(std::move(ranks[rank]));
  }
  return communicators;
}

RELORA_INSTANTIATE_NCCL_FACTORIES(float)
RELORA_INSTANTIATE_NCCL_FACTORIES(double)

}  // namespace relora
