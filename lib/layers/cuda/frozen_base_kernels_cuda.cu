// A bf16 or fp16 base on CUDA: X W^T and dY W on tensor cores, 16-bit inputs, fp32 accumulation
// and output. The forward goes through cuBLASLt, whose epilogue adds the bias and what Y already
// holds (the adapter's term); the backward through cublasGemmEx. cuBLAS takes both inputs in one
// format, so the fp32 operand (X, dY) is first rounded to nearest into a 16-bit buffer shared by
// the backend's layers (allocated through the backend, grown only when a larger batch appears: a
// steady step allocates nothing; capped at 32 MiB, larger operands going in blocks of rows). That
// cast reads 4 and writes 2 bytes per element, beside the product's 2 d flops per element.
// Rounding and widening run the functions the CPU uses (half_precision.hpp), so both devices give
// the same bits.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_lt_matmul.cuh"
#include "cuda/cuda_resources.cuh"
#include "cuda/cuda_sanitizer_marks.cuh"
#include "cuda/half_convert.cuh"
#include "layers/frozen_base_kernels.hpp"

namespace relora {
namespace cuda_detail {
namespace {

// Stochastic rounding (nearest goes through half_convert.cuh).
__global__ void stochastic_round_kernel(std::int64_t count, std::int64_t first_index, const float* __restrict__ src,
                                        BasePrecision format, RngKey key, std::uint16_t* __restrict__ dst) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float u = half_bits::rounding_uniform(key, std::uint64_t(first_index + i));
    dst[i] = half_bits::round_float(src[i], format, HalfRounding::stochastic, u);
  }
}

// A (count fp32 values) as its three bf16 terms (half_convert::split_bf16), term by term.
__global__ void split_bf16_kernel(std::int64_t count, const float* __restrict__ src, std::uint16_t* __restrict__ hi,
                                  std::uint16_t* __restrict__ mid, std::uint16_t* __restrict__ lo) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    std::uint16_t terms[3];
    half_convert::split_bf16(src[i], terms);
    hi[i] = terms[0], mid[i] = terms[1], lo[i] = terms[2];
  }
}

// *largest = max(*largest, |src[i]|) as ordered bits (non-negative floats order as integers);
// NaN counts as Inf.
__global__ void max_abs_kernel(std::int64_t count, const std::uint16_t* __restrict__ src, BasePrecision format,
                               unsigned int* largest) {
  __shared__ unsigned int block_max;
  if (threadIdx.x == 0) block_max = 0;
  __syncthreads();
  unsigned int mine = 0;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float a = fabsf(half_bits::half_to_float(src[i], format));
    const unsigned int bits = isnan(a) ? 0x7F800000u : __float_as_uint(a);
    mine = bits > mine ? bits : mine;
  }
  atomicMax(&block_max, mine);
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(largest, block_max);
}

cudaDataType_t cuda_type(BasePrecision format) { return format == BasePrecision::bf16 ? CUDA_R_16BF : CUDA_R_16F; }

// The 16-bit copy of a product's fp32 operand, one per backend: the layers of a model run their
// products one after the other on the backend's stream, so they can share it (a model of L
// layers then holds one buffer of the largest n x max(k, d), not L). Grown through the backend
// (so its allocation count, which a recorded step checks, sees the change); released with the
// last layer that uses it.
struct SharedCast {
  Tensor<float> storage;
  Index capacity = 0;  // 16-bit values

  static std::shared_ptr<SharedCast> of(const CudaContext* context) {
    static std::mutex mutex;
    static std::map<const CudaContext*, std::weak_ptr<SharedCast>> by_context;
    const std::lock_guard<std::mutex> lock(mutex);
    for (auto it = by_context.begin(); it != by_context.end();) {  // forget those of gone backends
      it = it->second.expired() ? by_context.erase(it) : std::next(it);
    }
    std::shared_ptr<SharedCast> cast = by_context[context].lock();
    if (!cast) {
      cast = std::make_shared<SharedCast>();
      by_context[context] = cast;
    }
    return cast;
  }
};

class CudaFrozenBaseKernels final : public FrozenBaseKernels {
 public:
  explicit CudaFrozenBaseKernels(Backend<float>& backend)
      : backend_(&backend), context_(&cuda_context(backend)), cast_(SharedCast::of(context_)) {
    context_->activate();
    create_blas_on_stream(context_->stream(), kWorkspaceBytes, blas_, workspace_);  // shared with the Lt products
    RELORA_CUDA_CHECK(cudaMalloc(&largest_.ptr, sizeof(unsigned int)));
    lt_ = std::make_unique<LtMatmul>(context_->stream(), workspace_.ptr, kWorkspaceBytes);
  }

  void round(const float* src, Index count, Index first_index, BasePrecision format, HalfRounding mode, RngKey key,
             std::uint16_t* dst) override {
    if (count == 0) return;
    context_->activate();
    if (mode == HalfRounding::nearest) {
      half_convert::round_to_nearest(src, count, format, dst, context_->stream(), context_->sm_count());
      return;
    }
    stochastic_round_kernel<<<grid_for(count, context_->sm_count()), kThreads, 0, context_->stream()>>>(
        count, first_index, src, format, key, dst);
    RELORA_CHECK_LAUNCH("stochastic_round_kernel");
  }

  void widen(const std::uint16_t* src, Index count, BasePrecision format, float* dst) override {
    context_->activate();
    half_convert::widen(src, count, format, dst, context_->stream(), context_->sm_count());
  }

  double max_abs(const std::uint16_t* src, Index count, BasePrecision format) override {
    context_->activate();
    RELORA_CUDA_CHECK(cudaMemsetAsync(largest_.ptr, 0, sizeof(unsigned int), context_->stream()));
    if (count > 0) {
      max_abs_kernel<<<grid_for(count, context_->sm_count()), kThreads, 0, context_->stream()>>>(
          count, src, format, static_cast<unsigned int*>(largest_.ptr));
      RELORA_CHECK_LAUNCH("max_abs_kernel");
    }
    unsigned int bits = 0;
    RELORA_CUDA_CHECK(cudaMemcpyAsync(&bits, largest_.ptr, sizeof bits, cudaMemcpyDeviceToHost, context_->stream()));
    RELORA_CUDA_CHECK(cudaStreamSynchronize(context_->stream()));
    return double(half_bits::bits_float(bits));
  }

  // In blocks of rows that fit the cast buffer.
  void forward_product(const Tensor<float>& X, const std::uint16_t* W, BasePrecision format, const float* bias,
                       float beta, bool relu, Tensor<float>& Y) override {
    const Index n = X.rows(), k = X.cols(), d = Y.cols();
    const Index block = rows_per_block(n, k);
    std::uint16_t* Xh = cast_buffer(block * k);
    for (Index first = 0; first < n; first += block) {
      const Index rows = std::min(block, n - first);
      round(X.data() + first * k, rows * k, 0, format, HalfRounding::nearest, RngKey{}, Xh);
      // Row-major Y = Xh W^T + b is column-major Y^T (d x rows) = W (W^T stored: k x d, op T) times
      // Xh^T (k x rows), plus b down every column, then the ReLU: cuBLASLt's epilogue.
      float* Yb = Y.data() + first * d;
      LtMatmul::Product p;
      p.transpose_a = true;
      p.m = d, p.n = rows, p.k = k;
      p.A = W, p.lda = k, p.B = Xh, p.ldb = k, p.type = cuda_type(format);
      p.bias = bias, p.relu = relu, p.beta = beta, p.D = Yb, p.ldd = d;
      lt_->multiply(p);
      mark_written_for_sanitizer(Yb, std::size_t(rows) * std::size_t(d) * sizeof(float), context_->stream());
    }
  }

  bool weight_times_transposed(const std::uint16_t* W, Index d, Index k, BasePrecision format, const Tensor<float>& A,
                               Tensor<float>& P) override {
    if (format != BasePrecision::bf16) return false;  // fp16's range would lose the small terms
    const Index r = A.rows(), count = r * k;
    if (count == 0 || d == 0) return false;
    std::uint16_t* terms = cast_buffer(3 * count);
    context_->activate();
    split_bf16_kernel<<<grid_for(count, context_->sm_count()), kThreads, 0, context_->stream()>>>(
        count, A.data(), terms, terms + count, terms + 2 * count);
    RELORA_CHECK_LAUNCH("split_bf16_kernel");
    // Row-major P = W A^T is column-major P^T (r x d) = A (A^T stored: k x r, op T) times W^T (W
    // stored: k x d, op N); the terms' products added in fp32, the largest first.
    for (int t = 0; t < 3; ++t) {
      const float alpha = 1, beta = t == 0 ? 0.0f : 1.0f;
      RELORA_CUBLAS_CHECK(cublasGemmEx_64(blas_.handle, CUBLAS_OP_T, CUBLAS_OP_N, r, d, k, &alpha, terms + t * count,
                                          CUDA_R_16BF, k, W, CUDA_R_16BF, k, &beta, P.data(), CUDA_R_32F, r,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    mark_written_for_sanitizer(P.data(), std::size_t(d) * std::size_t(r) * sizeof(float), context_->stream());
    return true;
  }

  bool has_half_activation_products() const override { return true; }

  void forward_product_half(const HalfTensor& X, const std::uint16_t* W, BasePrecision format, float beta, bool relu,
                            HalfTensor& Y) override {
    // As forward_product, with X read as it is and Y (C and D) in W's format.
    LtMatmul::Product p;
    p.transpose_a = true;
    p.m = Y.cols(), p.n = X.rows(), p.k = X.cols();
    p.A = W, p.lda = X.cols(), p.B = X.data(), p.ldb = X.cols(), p.type = cuda_type(format);
    p.relu = relu, p.beta = beta, p.D = Y.data(), p.d_type = cuda_type(format), p.ldd = Y.cols();
    lt_->multiply(p);
    mark_written_for_sanitizer(Y.data(), std::size_t(Y.size()) * sizeof(std::uint16_t), context_->stream());
  }

  void input_gradient_product_half(const HalfTensor& dY, const std::uint16_t* W, BasePrecision format, float beta,
                                   HalfTensor& dX) override {
    const Index n = dY.rows(), d = dY.cols(), k = dX.cols();
    const float alpha = 1;
    context_->activate();
    // Column-major dX^T (k x n) = W^T (W stored: k x d, op N) times dY^T (d x n).
    RELORA_CUBLAS_CHECK(cublasGemmEx_64(blas_.handle, CUBLAS_OP_N, CUBLAS_OP_N, k, n, d, &alpha, W, cuda_type(format), k,
                                        dY.data(), cuda_type(format), d, &beta, dX.data(), cuda_type(format), k,
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    mark_written_for_sanitizer(dX.data(), std::size_t(dX.size()) * sizeof(std::uint16_t), context_->stream());
  }

  void input_gradient_product(const Tensor<float>& dY, const std::uint16_t* W, BasePrecision format, float beta,
                              Tensor<float>& dX) override {
    const Index n = dY.rows(), d = dY.cols(), k = dX.cols();
    const Index block = rows_per_block(n, d);
    std::uint16_t* dYh = cast_buffer(block * d);
    const float alpha = 1;
    for (Index first = 0; first < n; first += block) {
      const Index rows = std::min(block, n - first);
      round(dY.data() + first * d, rows * d, 0, format, HalfRounding::nearest, RngKey{}, dYh);
      // Row-major dX = dYh W is column-major dX^T (k x rows) = W^T (W stored: k x d, op N) times dYh^T (d x rows).
      float* dXb = dX.data() + first * k;
      RELORA_CUBLAS_CHECK(cublasGemmEx_64(blas_.handle, CUBLAS_OP_N, CUBLAS_OP_N, k, rows, d, &alpha, W,
                                          cuda_type(format), k, dYh, cuda_type(format), d, &beta, dXb, CUDA_R_32F, k,
                                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      mark_written_for_sanitizer(dXb, std::size_t(rows) * std::size_t(k) * sizeof(float), context_->stream());
    }
  }

 private:
  static constexpr std::size_t kWorkspaceBytes = std::size_t(4) << 20;
  // The cast buffer's cap: 2^24 16-bit values (32 MiB). A product whose fp32 operand is larger is
  // cast and multiplied in blocks of rows (whole 128-row tiles where the cap allows), so the
  // buffer does not grow with the batch and the widest layer; an operand within the cap goes whole.
  static constexpr Index kCastBufferElements = Index(1) << 24;

  static Index rows_per_block(Index n, Index width) {
    Index rows = std::max<Index>(1, kCastBufferElements / std::max<Index>(1, width));
    if (rows >= 128) rows -= rows % 128;
    return std::min(n, rows);
  }

  // At least `count` 16-bit values of the backend's shared cast buffer.
  std::uint16_t* cast_buffer(Index count) {
    if (count > cast_->capacity) {
      cast_->storage = Tensor<float>();  // the old one first: the peak stays one buffer
      cast_->storage = backend_->allocate(1, (count + 1) / 2);
      cast_->capacity = count;
    }
    return reinterpret_cast<std::uint16_t*>(cast_->storage.data());
  }

  Backend<float>* backend_;
  CudaContext* context_;
  BlasHandle blas_;
  DeviceMemory workspace_;
  DeviceMemory largest_;  // max_abs's result
  std::shared_ptr<SharedCast> cast_;  // X or dY rounded to W's format
  std::unique_ptr<LtMatmul> lt_;      // the forward's product with its bias (shares the workspace)
};

}  // namespace
}  // namespace cuda_detail

std::unique_ptr<FrozenBaseKernels> make_cuda_frozen_base_kernels(Backend<float>& backend) {
  return std::make_unique<cuda_detail::CudaFrozenBaseKernels>(backend);
}

}  // namespace relora
