#pragma once
// Every NCCL call goes through RELORA_NCCL_CHECK: a failure becomes a CommunicatorError that names
// the call, where it was made, NCCL's name for the result and NCCL's own account of the last error
// (ncclGetLastError, which says which peer or transport failed).
#include <nccl.h>

#include <string>

#include "relora/distributed/communicator.hpp"

namespace relora {
namespace nccl_detail {

inline std::string nccl_error_text(ncclResult_t result, ncclComm_t comm) {
  std::string text = ncclGetErrorString(result);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0') {
    text += ": ";
    text += last;
  }
  return text;
}

inline void check_nccl(ncclResult_t result, ncclComm_t comm, const char* call, const char* file, int line) {
  if (result == ncclSuccess) return;
  throw CommunicatorError(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                          nccl_error_text(result, comm));
}

}  // namespace nccl_detail
}  // namespace relora

// `comm` may be null (before a communicator exists): ncclGetLastError then reports the thread's last error.
#define RELORA_NCCL_CHECK(call, comm) ::relora::nccl_detail::check_nccl((call), (comm), #call, __FILE__, __LINE__)
