#pragma once
// The communicator of GPU ranks: NCCL collectives between CUDA backends, one GPU per rank. Two
// ways to make one:
//   one process per GPU   make_nccl_communicator(env, backend): rank 0 creates NCCL's unique id,
//                         the rendezvous the launch environment names carries it to every rank,
//                         and every rank joins (ncclCommInitRank). Blocks until all ranks joined.
//   one thread per GPU    make_nccl_communicators(backends): one process drives every GPU, a
//                         communicator per backend (ncclCommInitAll), each then used by its own
//                         thread.
// This header includes no CUDA or NCCL header; the communicator lives in lib/distributed/nccl/.
//
// How it runs (see communicator.hpp for the contract):
//   - Collectives run on a communication stream of the rank's own, which first waits (through an
//     event) for the work already queued on the backend's stream; wait() makes the backend's stream
//     wait for the communication stream. Neither blocks the host, allocates, or synchronises, so
//     both may be recorded in a CUDA graph (Backend::begin_recording): the recorded all-reduce
//     joins the graph as a branch, and wait() must come before end_recording() to join it back.
//     Collectives queued before the recording must have been waited for (wait() or barrier())
//     before it starts, and before each replay: the graph runs after the backend's stream, not
//     after the communication stream. A recorded collective that follows unwaited ones throws
//     ConfigError.
//   - all_reduce_sum is NCCL's pre-multiplied sum with the scale as a host immediate, on every rank
//     whatever its scale (ranks with other shards have other scales, and the ranks of one
//     collective must use one kind of operator: NCCL may choose another algorithm for a plain sum);
//     a group of one with scale 1 is ncclSum. The operators are made once per distinct scale and
//     kept (a few); a recorded all-reduce replays with the scale it was recorded with.
//   - barrier() is an all-reduce of one element, after the work queued on the backend's stream
//     (replayed steps and their collectives too), that the host waits for, polling NCCL's
//     asynchronous error and the abort flag, for at most NcclOptions::barrier_timeout.
//   - abort(reason) aborts the rank's NCCL communicator (ncclCommAbort): its queued collectives
//     end, and every later call throws CommunicatorError naming the rank and the reason. It is the
//     rank's own call, from the thread that drives its backend: NCCL finishes a communicator only
//     once every CUDA graph holding its collectives is gone, so aborting (and destroying) first
//     drops the backend's recorded step when it holds one (the trainer records it again). Ranks
//     made together by make_nccl_communicators share the flag: each of them throws at its next
//     call and aborts its own NCCL communicator then. Ranks in other processes learn of it only
//     through NCCL (a remote error, where the transport reports one) or their barrier's timeout.
//   - Destroying a communicator whose collectives are still queued aborts them (a peer may be gone,
//     and waiting for them could hang): call barrier() on every rank first to end a job cleanly.
// Element types: float and double.
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "relora/core/backend.hpp"
#include "relora/distributed/communicator.hpp"
#include "relora/distributed/launch_environment.hpp"
#include "relora/distributed/rendezvous.hpp"

namespace relora {

struct NcclOptions {
  // How long barrier() waits for every rank before it aborts the communicator and throws
  // CommunicatorError; zero waits for ever.
  std::chrono::milliseconds barrier_timeout = std::chrono::minutes(10);
};

// Whether make_nccl_communicator can succeed: relora was built with NCCL and a GPU is visible; if
// not, `why` says why.
bool nccl_available(std::string* why = nullptr);

// One process per GPU: this process is rank env.rank of env.world_size, on `backend` (a CUDA
// backend, usually on device env.local_rank). Throws ConfigError when relora was built without
// NCCL or the backend is not a CUDA backend; CommunicatorError when the rendezvous or NCCL fails.
template <typename T>
std::unique_ptr<Communicator<T>> make_nccl_communicator(const LaunchEnvironment& env,
                                                        std::shared_ptr<Backend<T>> backend,
                                                        const NcclOptions& options = {});

// The same, with the rendezvous given (env's rank and world size are `rank` and `world_size`).
template <typename T>
std::unique_ptr<Communicator<T>> make_nccl_communicator(Rendezvous& rendezvous, int rank, int world_size,
                                                        std::shared_ptr<Backend<T>> backend,
                                                        const NcclOptions& options = {});

// One thread per GPU: a communicator for each backend (rank i on backends[i]), each on a device of
// its own. Throws ConfigError when relora was built without NCCL, the list is empty, a backend is
// not a CUDA backend or two share a device; CommunicatorError when NCCL fails.
template <typename T>
std::vector<std::unique_ptr<Communicator<T>>> make_nccl_communicators(
    const std::vector<std::shared_ptr<Backend<T>>>& backends, const NcclOptions& options = {});

}  // namespace relora
