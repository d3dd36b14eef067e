#pragma once
// Every CUDA runtime and cuBLAS call goes through one of these checks; a failure becomes a
// relora::DeviceError that names the call, where it was made and the runtime's own words.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "relora/core/errors.hpp"

namespace relora {
namespace cuda_detail {

[[noreturn]] inline void throw_device_error(const std::string& what, const char* call, const char* file, int line) {
  throw DeviceError(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " + what);
}

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  // Clear the runtime's last error, so that a recoverable failure (out of memory, say) is not
  // reported again by the next launch check.
  (void)cudaGetLastError();
  throw_device_error(std::string(cudaGetErrorName(status)) + " (" + cudaGetErrorString(status) + ")", call, file, line);
}

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw_device_error(std::string(cublasGetStatusName(status)) + " (" + cublasGetStatusString(status) + ")", call, file,
                     line);
}

}  // namespace cuda_detail
}  // namespace relora

#define RELORA_CUDA_CHECK(call) ::relora::cuda_detail::check_cuda((call), #call, __FILE__, __LINE__)
#define RELORA_CUBLAS_CHECK(call) ::relora::cuda_detail::check_cublas((call), #call, __FILE__, __LINE__)
// After every kernel launch: a bad configuration shows at once, not at the next synchronize.
#define RELORA_CHECK_LAUNCH(kernel) \
  ::relora::cuda_detail::check_cuda(cudaGetLastError(), "launch of " kernel, __FILE__, __LINE__)
