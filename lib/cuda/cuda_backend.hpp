#pragma once
// The CUDA backend's entry points, for lib/core/backend_factory.cpp. This header includes no CUDA
// header, so plain C++ translation units may include it; the backend itself lives in
// cuda_backend_impl.cuh and the .cu files beside it.
#include <cstddef>
#include <memory>
#include <string>

#include "relora/core/backend.hpp"

namespace relora {

// Whether a CUDA device is visible and the runtime answers; if not, `why` says why
// (cudaGetDeviceCount's error, or "no CUDA device is visible").
bool cuda_device_available(std::string* why);

// A backend on options.device_id with options.math. Throws DeviceError when the device cannot be
// used (bad ordinal, driver too old, out of memory for the stream, handle or scratch buffers).
template <typename T>
std::shared_ptr<Backend<T>> make_cuda_backend(const BackendOptions& options);

extern template std::shared_ptr<Backend<float>> make_cuda_backend<float>(const BackendOptions&);
extern template std::shared_ptr<Backend<double>> make_cuda_backend<double>(const BackendOptions&);

}  // namespace relora
