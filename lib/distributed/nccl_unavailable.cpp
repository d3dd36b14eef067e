// The NCCL communicator's entry points in a build without NCCL: each says why it cannot be made.
// With NCCL, lib/distributed/nccl/ defines them instead.
#if !defined(RELORA_WITH_NCCL)

#include "relora/core/errors.hpp"
#include "distributed/nccl_factory_instances.hpp"
#include "relora/distributed/nccl_communicator.hpp"

namespace relora {
namespace {

const char* why_unavailable() {
#if defined(RELORA_WITH_CUDA)
  return "relora was built without NCCL (nccl.h or libnccl 2.13+ was not found, or RELORA_NCCL=OFF)";
#else
  return "relora was built without NCCL (the CUDA backend is not built: no CUDA toolkit, or RELORA_CUDA=OFF)";
#endif
}

[[noreturn]] void throw_unavailable(const char* what) {
  throw ConfigError(std::string(what) + ": " + why_unavailable());
}

}  // namespace

bool nccl_available(std::string* why) {
  if (why) *why = why_unavailable();
  return false;
}

template <typename T>
std::unique_ptr<Communicator<T>> make_nccl_communicator(const LaunchEnvironment&, std::shared_ptr<Backend<T>>,
                                                        const NcclOptions&) {
  throw_unavailable("make_nccl_communicator");
}

template <typename T>
std::unique_ptr<Communicator<T>> make_nccl_communicator(Rendezvous&, int, int, std::shared_ptr<Backend<T>>,
                                                        const NcclOptions&) {
  throw_unavailable("make_nccl_communicator");
}

template <typename T>
std::vector<std::unique_ptr<Communicator<T>>> make_nccl_communicators(const std::vector<std::shared_ptr<Backend<T>>>&,
                                                                      const NcclOptions&) {
  throw_unavailable("make_nccl_communicators");
}

RELORA_INSTANTIATE_NCCL_FACTORIES(float)
RELORA_INSTANTIATE_NCCL_FACTORIES(double)

}  // namespace relora

#endif  // !RELORA_WITH_NCCL
