#pragma once
// Tells compute-sanitizer's initcheck that a device range has been written, for writes it cannot
// see. On sm_90 the tool does not observe the stores of cuBLAS's 16-bit tensor-core products
// (scripts/cublas_16bit_store_probe.cu shows it: memory written only by such a product is
// reported as unwritten when read), so every later reader of their fp32 output would be reported.
// NVTX's memory extension is header-only: with no tool attached the call returns at once, and
// under compute-sanitizer (--nvtx yes) it marks the range. A host call, not a stream operation:
// the mark made when a step runs eagerly stays valid for the replays of its recording.
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExtMemCudaRt.h>

#include <cstddef>

namespace relora {
namespace cuda_detail {

inline void mark_written_for_sanitizer(const void* ptr, std::size_t bytes, cudaStream_t stream) {
  static const nvtxDomainHandle_t domain = nvtxDomainCreateA("relora");
  nvtxMemVirtualRangeDesc_t range{};
  range.size = bytes;
  range.ptr = ptr;
  nvtxMemMarkInitializedBatch_t batch{};
  batch.extCompatID = NVTX_EXT_COMPATID_MEM;
  batch.structSize = sizeof(batch);
  batch.regionType = NVTX_MEM_TYPE_VIRTUAL_ADDRESS;
  batch.regionDescCount = 1;
  batch.regionDescElementSize = sizeof(range);
  batch.regionDescElements = &range;
  nvtxMemCudaMarkInitialized(domain, stream, 0, &batch);
}

}  // namespace cuda_detail
}  // namespace relora
