#pragma once
// The CUDA backend: tensors live in device memory (cudaMalloc, released by cudaFree), all work is
// queued on one stream per backend, products go to cuBLAS (row-major through the column-major
// transpose trick), everything else to the small kernels in the .cu files beside this one:
//   cuda_backend.cu      lifecycle, memory, GEMM, synchronize and the non-finite flag, factory
//   cuda_elementwise.cu  bias, column sums, multiply, activations, MSE, fill, random fills
//   cuda_recording.cu    recorded steps (CUDA graphs), kernels re-parameterised per replay
//   cuda_nonfinite_report.cu  NaN or Inf found by kernels, reported by name at synchronize()
// Components' own kernels (Adam's in lib/optimizers/cuda/, the fast layers' in lib/layers/cuda/) run
// on this backend's streams through
// cuda_context.cuh, which this class implements.
// No operation copies between host and device except upload, download and the 8-byte read-back
// of the non-finite flag; none allocates except allocate and the one-time sizing of scratch.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_lt_matmul.cuh"
#include "cuda/cuda_resources.cuh"
#include "relora/core/backend.hpp"

namespace relora {
namespace cuda_detail {

constexpr int kMaxReduceBlocks = 1024;  // blocks of the MSE reduction (partials kept in scratch)

// Device scratch of fixed size, allocated once with the backend.
struct Scratch {
  unsigned int reduce_blocks_done;  // blocks of the running MSE launch that finished (last one resets)
  double partials[kMaxReduceBlocks];
};

}  // namespace cuda_detail

template <typename T>
class CudaBackend final : public Backend<T>, public cuda_detail::CudaContext {
 public:
  explicit CudaBackend(const BackendOptions& options);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  Device device() const override { return Device::cuda; }
  std::string description() const override;
  void set_math_mode(MathMode mode) override;
  MathMode math_mode() const override { return math_; }

  Tensor<T> allocate(Index rows, Index cols) override;
  void upload(const T* host, Tensor<T>& dst) override;
  void download(const Tensor<T>& src, T* host) override;
  void copy(const Tensor<T>& src, Tensor<T>& dst) override;
  void fill(Tensor<T>& x, T value) override;
  void synchronize() override;

  void gemm(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B, T beta,
            Tensor<T>& C) override;
  void gemm_bias_activation(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B, T beta,
                            const Tensor<T>* b, Activation f, Tensor<T>& C) override;

  void add_row_vector(const Tensor<T>& b, Tensor<T>& Y) override;
  void column_sums(const Tensor<T>& dY, T beta, Tensor<T>& db) override;
  void multiply(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) override;
  void activation_forward(Activation f, const Tensor<T>& Y, Tensor<T>& Z) override;
  void activation_backward(Activation f, const Tensor<T>& Y, const Tensor<T>& dZ, Tensor<T>& dY) override;
  T max_abs(const Tensor<T>& x) override;
  void mse(const Tensor<T>& Y, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) override;

  void random_uniform(RngKey key, T low, T high, Tensor<T>& x) override;
  void random_normal(RngKey key, T mean, T stddev, Tensor<T>& x) override;
  void dropout_mask(RngKey key, T p, Tensor<T>& mask) override;

  // CUDA graphs: stream capture of the queued operations, replayed with one cudaGraphLaunch.
  bool begin_recording() override;
  std::uint64_t end_recording() override;
  bool replay(std::uint64_t id, const std::function<void()>& refresh) override;
  void drop_recording() override;
  void set_host_wait_check(const void* owner, std::function<void()> check) override;

  // What components' kernels use (cuda_context.cuh).
  void activate() const override;
  cudaStream_t stream() const override { return stream_.stream; }
  int sm_count() const override { return sm_count_; }
  cuda_detail::StepRecorder& recorder() override { return *recorder_; }
  cuda_detail::NonFiniteReport& nonfinite_report() override { return *nonfinite_; }
  std::size_t shared_optin_bytes() const override { return shared_optin_bytes_; }
  cuda_detail::Scratch* scratch() const override { return static_cast<cuda_detail::Scratch*>(scratch_memory_.ptr); }
  cudaStream_t side_stream() const override { return side_stream_.stream; }
  void fork_side() override;
  void join_side() override;

 private:
  // Waits on the host for the work queued on the stream so far: in the driver, or polling with
  // the host-wait check between polls when one is installed (Backend::set_host_wait_check).
  void wait_for_stream();
  // Before a copy between the device and pageable host memory, which waits for the stream inside
  // the driver's call: with a host-wait check installed, the stream's work is waited for first,
  // where the check can end the wait. Nothing without one (the copy's own wait does).
  void wait_before_pageable_copy() {
    if (host_wait_check_) wait_for_stream();
  }
  // A polled wait yields for its first kPolledWaitSpin, so that it ends as soon as the work does
  // (the end of a timed step included), then sleeps kPolledWaitPause between polls.
  static constexpr std::chrono::milliseconds kPolledWaitSpin{50};
  static constexpr std::chrono::microseconds kPolledWaitPause{100};
  // After the stream has drained: throws NonFiniteError if a kernel reported NaN or Inf, and
  // clears the flag so that training can go on once the caller has dealt with it.
  void raise_device_errors();
  // Scales C by beta (zero when beta == 0, ignoring NaN in C, as BLAS does): a product with k == 0.
  void scale(T beta, Tensor<T>& C);
  // The inner dimension of op(A) op(B) into C; throws ShapeError naming the three shapes.
  static Index gemm_depth(Trans trans_a, Trans trans_b, const Tensor<T>& A, const Tensor<T>& B, const Tensor<T>& C);

  int device_id_ = 0;
  int sm_count_ = 0;
  std::size_t shared_optin_bytes_ = 0;  // dynamic shared memory a block may have, opted in
  int cc_major_ = 0;
  int cc_minor_ = 0;
  std::size_t total_memory_ = 0;
  std::string device_name_;
  MathMode math_ = MathMode::strict;

  cuda_detail::Stream stream_;
  // The side stream, forked from stream_ and joined back to it by the two events.
  cuda_detail::Stream side_stream_;
  cuda_detail::Event fork_event_;
  cuda_detail::Event join_event_;
  cuda_detail::Event wait_event_;  // recorded on stream_ for a polled wait
  std::function<void()> host_wait_check_;
  const void* host_wait_check_owner_ = nullptr;
  cuda_detail::BlasHandle blas_;
  cuda_detail::DeviceMemory blas_workspace_;  // cuBLAS's workspace, ours so that a capture allocates none
  cuda_detail::DeviceMemory lt_workspace_;     // cuBLASLt's, apart from cuBLAS's own
  std::unique_ptr<cuda_detail::LtMatmul> lt_;  // gemm_bias_activation's products (float)
  cuda_detail::DeviceMemory scratch_memory_;  // one cuda_detail::Scratch
  std::unique_ptr<cuda_detail::NonFiniteReport> nonfinite_;  // made once the stream exists
  std::unique_ptr<cuda_detail::StepRecorder> recorder_;

  // ---- recording (cuda_recording.cuh). A replay reruns the recorded kernels on the recorded
  // pointers, so it is refused once any tensor was allocated after the recording began (a buffer
  // of the step may have been re-sized and moved) or the math mode changed (cuBLAS chose its
  // kernels at capture).
  std::uint64_t allocations_ = 0;           // allocate() calls so far
  std::uint64_t allocations_at_begin_ = 0;  // allocations_ when the recording began
  cuda_detail::NonFiniteReport::Mark report_at_begin_;  // to forget a discarded recording's guarded launches
  std::uint64_t recording_id_ = 0;          // of the ready recording (0: none)
  std::uint64_t recorded_allocations_ = 0;
  MathMode recorded_math_ = MathMode::strict;
};

}  // namespace relora
