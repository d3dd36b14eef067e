#pragma once
// The explicit instances of the NCCL factories (include/relora/distributed/nccl_communicator.hpp),
// one list for the two files that define them: nccl/nccl_factory.cu (built with NCCL) and
// nccl_unavailable.cpp (built without, the factories then explaining why they cannot).
#include "relora/distributed/nccl_communicator.hpp"

#define RELORA_INSTANTIATE_NCCL_FACTORIES(T)                                                                    \
  template std::unique_ptr<Communicator<T>> make_nccl_communicator<T>(const LaunchEnvironment&,                  \
                                                                      std::shared_ptr<Backend<T>>,               \
                                                                      const NcclOptions&);                       \
  template std::unique_ptr<Communicator<T>> make_nccl_communicator<T>(Rendezvous&, int, int,                     \
                                                                      std::shared_ptr<Backend<T>>,               \
                                                                      const NcclOptions&);                       \
  template std::vector<std::unique_ptr<Communicator<T>>> make_nccl_communicators<T>(                             \
      const std::vector<std::shared_ptr<Backend<T>>>&, const NcclOptions&);
