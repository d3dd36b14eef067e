// Lifecycle, memory, GEMM and error reporting of the CUDA backend; the factory functions.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>
#include <thread>
#include <type_traits>

#include "cuda/cuda_backend.hpp"
#include "cuda/cuda_backend_impl.cuh"

namespace relora {
namespace cuda_detail {
namespace {

// Tensor<T>'s deleter. Runs in destructors, so it cannot throw; cudaFree waits for the device,
// so no queued kernel still uses the memory when it is released.
template <typename T>
void free_device(T* p) {
  (void)cudaFree(p);
}

template <typename T>
__global__ void scale_kernel(std::int64_t n, T beta, T* __restrict__ c) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x) {
    c[i] = beta == T(0) ? T(0) : beta * c[i];
  }
}

cublasStatus_t gemm_call(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m, std::int64_t n,
                         std::int64_t k, const float* alpha, const float* A, std::int64_t lda, const float* B,
                         std::int64_t ldb, const float* beta, float* C, std::int64_t ldc) {
  return cublasSgemm_64(h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

cublasStatus_t gemm_call(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m, std::int64_t n,
                         std::int64_t k, const double* alpha, const double* A, std::int64_t lda, const double* B,
                         std::int64_t ldb, const double* beta, double* C, std::int64_t ldc) {
  return cublasDgemm_64(h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

std::string gib(std::size_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f GiB", double(bytes) / double(1ull << 30));
  return text;
}

}  // namespace
}  // namespace cuda_detail

using namespace cuda_detail;

template <typename T>
CudaBackend<T>::CudaBackend(const BackendOptions& options)
    : device_id_(options.device_id) {
  int count = 0;
  RELORA_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (device_id_ < 0 || device_id_ >= count) {
    throw DeviceError("cuda backend: device " + std::to_string(device_id_) + " requested, but " +
                      std::to_string(count) + " device(s) are visible");
  }
  activate();
  cudaDeviceProp prop{};
  RELORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_id_));
  device_name_ = prop.name;
  sm_count_ = prop.multiProcessorCount;
  shared_optin_bytes_ = prop.sharedMemPerBlockOptin;
  cc_major_ = prop.major;
  cc_minor_ = prop.minor;
  total_memory_ = prop.totalGlobalMem;

  // Non-blocking: our stream never waits for, nor holds up, work on the legacy default stream.
  RELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_.stream, cudaStreamNonBlocking));
  RELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream_.stream, cudaStreamNonBlocking));
  RELORA_CUDA_CHECK(cudaEventCreateWithFlags(&fork_event_.event, cudaEventDisableTiming));
  RELORA_CUDA_CHECK(cudaEventCreateWithFlags(&join_event_.event, cudaEventDisableTiming));
  RELORA_CUDA_CHECK(cudaEventCreateWithFlags(&wait_event_.event, cudaEventDisableTiming));
  // cuBLAS's recommended workspace: 32 MiB on Hopper and newer, 4 MiB before.
  create_blas_on_stream(stream_.stream, std::size_t(cc_major_ >= 9 ? 32 : 4) << 20, blas_, blas_workspace_);
  if constexpr (std::is_same<T, float>::value) {
    constexpr std::size_t kLtWorkspaceBytes = std::size_t(4) << 20;
    RELORA_CUDA_CHECK(cudaMalloc(&lt_workspace_.ptr, kLtWorkspaceBytes));
    lt_ = std::make_unique<LtMatmul>(stream_.stream, lt_workspace_.ptr, kLtWorkspaceBytes);
  }

  RELORA_CUDA_CHECK(cudaMalloc(&scratch_memory_.ptr, sizeof(Scratch)));
  RELORA_CUDA_CHECK(cudaMemsetAsync(scratch_memory_.ptr, 0, sizeof(Scratch), stream_.stream));
  nonfinite_ = std::make_unique<NonFiniteReport>(stream_.stream);  // synchronizes the stream
  recorder_ = std::make_unique<StepRecorder>(stream_.stream);
  set_math_mode(options.math);
}

template <typename T>
CudaBackend<T>::~CudaBackend() {
  // Let queued work finish before the members release the stream, handle and scratch it uses.
  if (stream_.stream) (void)cudaStreamSynchronize(stream_.stream);
}

template <typename T>
void CudaBackend<T>::activate() const {
  // Every operation comes here: cudaGetDevice only reads the thread's runtime state, where
  // cudaSetDevice on every call cost measurable host time in launch-bound steps.
  int current = -1;
  RELORA_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device_id_) RELORA_CUDA_CHECK(cudaSetDevice(device_id_));
}

template <typename T>
std::string CudaBackend<T>::description() const {
  activate();
  std::size_t free_bytes = 0, total_bytes = 0;
  RELORA_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const char* math = math_ == MathMode::tf32 && sizeof(T) == 4 ? "tf32 tensor-core products"
                                                                 : (sizeof(T) == 4 ? "strict fp32 products"
                                                                                   : "fp64 products");
  return "cuda:" + std::to_string(device_id_) + " " + device_name_ + " (sm_" + std::to_string(cc_major_) +
         std::to_string(cc_minor_) + ", " + std::to_string(sm_count_) + " SMs, " + gib(total_bytes) + ", " +
         std::to_string(free_bytes >> 20) + " MiB free), " + math;
}

template <typename T>
void CudaBackend<T>::set_math_mode(MathMode mode) {
  activate();
  // Strict: CUBLAS_DEFAULT_MATH keeps single precision in IEEE fp32 (TF32 and the BF16x9
  // emulation each need their own math mode). TF32 only changes single-precision routines; the
  // double backend always computes in fp64.
  const cublasMath_t blas_mode =
      mode == MathMode::tf32 && sizeof(T) == 4 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH;
  RELORA_CUBLAS_CHECK(cublasSetMathMode(blas_.handle, blas_mode));
  math_ = mode;
}

template <typename T>
Tensor<T> CudaBackend<T>::allocate(Index rows, Index cols) {
  if (rows < 0 || cols < 0) throw ShapeError("allocate: negative shape " + shape_string(rows, cols));
  activate();
  if (cols > 0 && rows > std::numeric_limits<Index>::max() / Index(sizeof(T)) / cols) {
    throw DeviceError("allocate: tensor " + shape_string(rows, cols) + " is too large to address");
  }
  // One element at least, so that an empty tensor still has a unique, valid pointer.
  ++allocations_;  // a recorded step may name a buffer this replaces: replay() checks the count
  const Index elements = rows * cols > 0 ? rows * cols : 1;
  const std::size_t bytes = std::size_t(elements) * sizeof(T);
  T* data = nullptr;
  const cudaError_t status = cudaMalloc(&data, bytes);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();  // out of memory is not sticky: clear it so later launches are not blamed
    std::size_t free_bytes = 0, total_bytes = 0;
    (void)cudaMemGetInfo(&free_bytes, &total_bytes);
    (void)cudaGetLastError();
    throw DeviceError("allocate: cudaMalloc of " + std::to_string(bytes) + " bytes for tensor " +
                      shape_string(rows, cols) + " on cuda:" + std::to_string(device_id_) + " failed: " +
                      cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + "); " +
                      std::to_string(free_bytes) + " of " + std::to_string(total_bytes) + " bytes free (" +
                      __FILE__ + ":" + std::to_string(__LINE__) + ")");
  }
  return Tensor<T>(data, rows, cols, Device::cuda, &free_device<T>);
}

template <typename T>
void CudaBackend<T>::upload(const T* host, Tensor<T>& dst) {
  if (dst.size() == 0) return;
  activate();
  wait_before_pageable_copy();
  RELORA_CUDA_CHECK(cudaMemcpyAsync(dst.data(), host, sizeof(T) * dst.size(), cudaMemcpyHostToDevice, stream_.stream));
  // The caller may reuse `host` at once (it may be pinned, where the copy is truly asynchronous).
  wait_for_stream();
}

template <typename T>
void CudaBackend<T>::download(const Tensor<T>& src, T* host) {
  activate();
  wait_before_pageable_copy();
  if (src.size() > 0) {
    RELORA_CUDA_CHECK(
        cudaMemcpyAsync(host, src.data(), sizeof(T) * src.size(), cudaMemcpyDeviceToHost, stream_.stream));
  }
  wait_for_stream();
  raise_device_errors();
}

template <typename T>
void CudaBackend<T>::copy(const Tensor<T>& src, Tensor<T>& dst) {
  if (!src.same_shape(dst.rows(), dst.cols())) {
    throw ShapeError("copy: operands differ in shape, " + src.shape() + " vs " + dst.shape());
  }
  if (src.size() == 0 || src.data() == dst.data()) return;
  activate();
  RELORA_CUDA_CHECK(
      cudaMemcpyAsync(dst.data(), src.data(), sizeof(T) * src.size(), cudaMemcpyDeviceToDevice, stream_.stream));
}

template <typename T>
void CudaBackend<T>::fork_side() {
  activate();  // the events and streams belong to this backend's device
  RELORA_CUDA_CHECK(cudaEventRecord(fork_event_.event, stream_.stream));
  RELORA_CUDA_CHECK(cudaStreamWaitEvent(side_stream_.stream, fork_event_.event, 0));
}

template <typename T>
void CudaBackend<T>::join_side() {
  RELORA_CUDA_CHECK(cudaEventRecord(join_event_.event, side_stream_.stream));
  RELORA_CUDA_CHECK(cudaStreamWaitEvent(stream_.stream, join_event_.event, 0));
}

template <typename T>
void CudaBackend<T>::synchronize() {
  activate();
  wait_for_stream();
  raise_device_errors();
}

template <typename T>
void CudaBackend<T>::set_host_wait_check(const void* owner, std::function<void()> check) {
  if (!check) {
    if (owner != host_wait_check_owner_) return;  // another's check stays
    host_wait_check_ = nullptr;
    host_wait_check_owner_ = nullptr;
    return;
  }
  host_wait_check_ = std::move(check);
  host_wait_check_owner_ = owner;
}

template <typename T>
void CudaBackend<T>::wait_for_stream() {
  if (!host_wait_check_) {
    RELORA_CUDA_CHECK(cudaStreamSynchronize(stream_.stream));
    return;
  }
  RELORA_CUDA_CHECK(cudaEventRecord(wait_event_.event, stream_.stream));
  try {
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      host_wait_check_();
      const cudaError_t status = cudaEventQuery(wait_event_.event);
      if (status == cudaSuccess) return;
      if (status != cudaErrorNotReady) RELORA_CUDA_CHECK(status);
      if (std::chrono::steady_clock::now() - start < kPolledWaitSpin) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(kPolledWaitPause);
      }
    }
  } catch (...) {
    // The check ended the wait (having ended what blocked it, say an aborted collective): the
    // queued work drains before the exception goes on, so that no copy lands in host memory the
    // caller has let go.
    (void)cudaStreamSynchronize(stream_.stream);
    (void)cudaGetLastError();
    throw;
  }
}

template <typename T>
void CudaBackend<T>::raise_device_errors() {
  // Called with the stream idle: the flag's read-back is the only copy the NaN guards cost.
  nonfinite_->raise(stream_.stream);
}

template <typename T>
void CudaBackend<T>::scale(T beta, Tensor<T>& C) {
  if (beta == T(1) || C.size() == 0) return;
  scale_kernel<T><<<grid_for(C.size(), sm_count_), kThreads, 0, stream_.stream>>>(C.size(), beta, C.data());
  RELORA_CHECK_LAUNCH("scale_kernel");
}

template <typename T>
Index CudaBackend<T>::gemm_depth(Trans trans_a, Trans trans_b, const Tensor<T>& A, const Tensor<T>& B,
                                 const Tensor<T>& C) {
  const Index m = trans_a == Trans::no ? A.rows() : A.cols();
  const Index k = trans_a == Trans::no ? A.cols() : A.rows();
  const Index kb = trans_b == Trans::no ? B.rows() : B.cols();
  const Index n = trans_b == Trans::no ? B.cols() : B.rows();
  if (k != kb || C.rows() != m || C.cols() != n) {
    throw ShapeError("gemm: op(A) " + shape_string(m, k) + " times op(B) " + shape_string(kb, n) + " into C " +
                     C.shape());
  }
  return k;
}

template <typename T>
void CudaBackend<T>::gemm_bias_activation(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A,
                                          const Tensor<T>& B, T beta, const Tensor<T>* b, Activation f,
                                          Tensor<T>& C) {
  require_in_place_activation(f, "gemm_bias_activation");
  const Index k = gemm_depth(trans_a, trans_b, A, B, C);
  if (b != nullptr && (b->rows() != 1 || b->cols() != C.cols())) {
    throw ShapeError("gemm_bias_activation: b is " + b->shape() + " but C is " + C.shape() + " (b must be [1 x " +
                     std::to_string(C.cols()) + "])");
  }
  const bool epilogue = b != nullptr || f == Activation::relu;
  if constexpr (std::is_same<T, float>::value) {
    if (epilogue && C.rows() > 0 && C.cols() > 0 && k > 0) {
      activate();
      // As gemm: the row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T, whose rows
      // are C's columns, so b is the epilogue's bias down C^T's columns; the ReLU comes last.
      LtMatmul::Product p;
      p.transpose_a = trans_b == Trans::yes, p.transpose_b = trans_a == Trans::yes;
      p.m = C.cols(), p.n = C.rows(), p.k = k;
      p.alpha = alpha, p.A = B.data(), p.lda = B.cols(), p.B = A.data(), p.ldb = A.cols();
      p.type = CUDA_R_32F;
      p.compute = math_ == MathMode::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
      p.bias = b != nullptr ? b->data() : nullptr, p.relu = f == Activation::relu;
      p.beta = beta, p.D = C.data(), p.ldd = C.cols();
      lt_->multiply(p);
      return;
    }
  }
  Backend<T>::gemm_bias_activation(trans_a, trans_b, alpha, A, B, beta, b, f, C);
}

template <typename T>
void CudaBackend<T>::gemm(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B, T beta,
                          Tensor<T>& C) {
  const Index k = gemm_depth(trans_a, trans_b, A, B, C);
  const Index m = C.rows(), n = C.cols();
  if (m == 0 || n == 0) return;
  activate();
  if (k == 0) {
    scale(beta, C);
    return;
  }
  // cuBLAS is column-major; a row-major X (r x c) is the column-major X^T with leading dimension c.
  // So the row-major C = op(A) op(B) is computed as the column-major C^T = op(B)^T op(A)^T, which
  // needs no transposed copy: B and A are passed in swapped order with their own transpose flags.
  const cublasOperation_t op_b = trans_b == Trans::no ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasOperation_t op_a = trans_a == Trans::no ? CUBLAS_OP_N : CUBLAS_OP_T;
  RELORA_CUBLAS_CHECK(gemm_call(blas_.handle, op_b, op_a, n, m, k, &alpha, B.data(), B.cols(), A.data(), A.cols(),
                                &beta, C.data(), C.cols()));
}

template <typename T>
bool CudaBackend<T>::begin_recording() {
  activate();
  recorder_->begin();
  allocations_at_begin_ = allocations_;
  report_at_begin_ = nonfinite_->mark();
  return true;
}

template <typename T>
std::uint64_t CudaBackend<T>::end_recording() {
  activate();
  // A tensor allocated while recording may have replaced a buffer the recording names.
  const std::uint64_t id = recorder_->end(allocations_ == allocations_at_begin_);
  if (id == 0) {
    // Nothing of it ran: forget its guarded launches, so that the report's tags stay those of
    // work that runs (the caller runs the operations eagerly, or gives up on them).
    nonfinite_->rollback(report_at_begin_);
    return 0;
  }
  recording_id_ = id;
  recorded_allocations_ = allocations_;
  recorded_math_ = math_;
  return id;
}

template <typename T>
bool CudaBackend<T>::replay(std::uint64_t id, const std::function<void()>& refresh) {
  if (id == 0 || id != recording_id_ || allocations_ != recorded_allocations_ || math_ != recorded_math_) {
    if (recorder_->recording()) throw ConfigError("cuda backend: replay while recording");
    return false;
  }
  activate();
  return recorder_->replay(id, refresh);
}

template <typename T>
void CudaBackend<T>::drop_recording() {
  if (recorder_->recording()) nonfinite_->rollback(report_at_begin_);
  recorder_->drop();
  recording_id_ = 0;
}

template class CudaBackend<float>;
template class CudaBackend<double>;

bool cuda_device_available(std::string* why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    if (why) {
      *why = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(status) + " (" +
             cudaGetErrorString(status) + ")";
    }
    return false;
  }
  if (count == 0) {
    if (why) *why = "no CUDA device is visible (cudaGetDeviceCount returned 0)";
    return false;
  }
  return true;
}

template <typename T>
std::shared_ptr<Backend<T>> make_cuda_backend(const BackendOptions& options) {
  return std::make_shared<CudaBackend<T>>(options);
}

template std::shared_ptr<Backend<float>> make_cuda_backend<float>(const BackendOptions&);
template std::shared_ptr<Backend<double>> make_cuda_backend<double>(const BackendOptions&);

}  // namespace relora
