// GaLore's CUDA kernels: AdamW's decoupled decay of a projected weight (guarded by the step's
// NaN/Inf flag, refreshable in a recorded step), the exact SVD through cuSOLVER's gesvd, the Gram
// finder's top eigenvectors through cuSOLVER's syevdx, and the range finder's Householder QR
// through cuSOLVER's geqrf and orgqr (on a column-major copy).
//
// gesvd is column-major and wants rows >= cols. A row-major G (m x n) is the column-major G^T
// (n x m): when n >= m it is handed over as it is (copied, since gesvd overwrites its input), and
// G's left vectors are then gesvd's right ones; when m > n a transposing copy makes it the
// column-major G (m x n), whose right vectors are G's. One-sided GaLore needs only the vectors
// of the short side, which gesvd returns in the small min x min factor: the tall factor (jobu)
// is computed only for the two-sided projection. The workspace is made once, at the first SVD
// (or QR), for the largest weight.
#include <cusolverDn.h>

#include <algorithm>
#include <string>

#include "cuda/cuda_check.cuh"
#include "cuda/cuda_context.cuh"
#include "cuda/cuda_launch.cuh"
#include "cuda/cuda_resources.cuh"
#include "optimizers/galore_kernels.hpp"

namespace relora {
namespace cuda_detail {
namespace {

void check_cusolver(cusolverStatus_t status, const char* call, const char* file, int line) {
  if (status == CUSOLVER_STATUS_SUCCESS) return;
  throw_device_error("cusolver status " + std::to_string(int(status)), call, file, line);
}
#define RELORA_CUSOLVER_CHECK(call) check_cusolver((call), #call, __FILE__, __LINE__)

template <typename T>
__global__ void galore_decay_kernel(T* W, std::int64_t size, T factor, const unsigned long long* nonfinite) {
  wait_for_previous_grid();
  allow_next_grid();
  if (*nonfinite != NonFiniteReport::kNone) return;  // the step was refused: W stays
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < size;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    W[i] = W[i] - factor * W[i];
  }
}

// out (rows x cols, row-major) = the column-major in (rows x cols, leading dimension ld).
template <typename T>
__global__ void galore_gather_kernel(const T* in, std::int64_t ld, std::int64_t rows, std::int64_t cols, T* out,
                                     bool in_row_major) {
  const std::int64_t size = rows * cols;
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < size;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t i = e / cols, j = e % cols;
    out[e] = in_row_major ? in[i * ld + j] : in[i + j * ld];
  }
}

int grid_for(std::int64_t size, int sm_count) {
  const std::int64_t blocks = (size + kThreads - 1) / kThreads;
  return int(std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, std::int64_t(sm_count) * 8)));
}

cusolverStatus_t geqrf_size(cusolverDnHandle_t h, int m, int n, float* A, int* lwork) {
  return cusolverDnSgeqrf_bufferSize(h, m, n, A, m, lwork);
}
cusolverStatus_t geqrf_size(cusolverDnHandle_t h, int m, int n, double* A, int* lwork) {
  return cusolverDnDgeqrf_bufferSize(h, m, n, A, m, lwork);
}
cusolverStatus_t orgqr_size(cusolverDnHandle_t h, int m, int n, const float* A, const float* tau, int* lwork) {
  return cusolverDnSorgqr_bufferSize(h, m, n, n, A, m, tau, lwork);
}
cusolverStatus_t orgqr_size(cusolverDnHandle_t h, int m, int n, const double* A, const double* tau, int* lwork) {
  return cusolverDnDorgqr_bufferSize(h, m, n, n, A, m, tau, lwork);
}
cusolverStatus_t geqrf(cusolverDnHandle_t h, int m, int n, float* A, float* tau, float* work, int lwork, int* info) {
  return cusolverDnSgeqrf(h, m, n, A, m, tau, work, lwork, info);
}
cusolverStatus_t geqrf(cusolverDnHandle_t h, int m, int n, double* A, double* tau, double* work, int lwork,
                       int* info) {
  return cusolverDnDgeqrf(h, m, n, A, m, tau, work, lwork, info);
}
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int n, float* A, const float* tau, float* work, int lwork,
                       int* info) {
  return cusolverDnSorgqr(h, m, n, n, A, m, tau, work, lwork, info);
}
cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int n, double* A, const double* tau, double* work, int lwork,
                       int* info) {
  return cusolverDnDorgqr(h, m, n, n, A, m, tau, work, lwork, info);
}

cusolverStatus_t gesvd_size(cusolverDnHandle_t h, int m, int n, int* lwork, float) {
  return cusolverDnSgesvd_bufferSize(h, m, n, lwork);
}
cusolverStatus_t gesvd_size(cusolverDnHandle_t h, int m, int n, int* lwork, double) {
  return cusolverDnDgesvd_bufferSize(h, m, n, lwork);
}
cusolverStatus_t gesvd(cusolverDnHandle_t h, signed char jobu, signed char jobvt, int m, int n, float* A, int lda,
                       float* S, float* U, int ldu, float* VT, int ldvt, float* work, int lwork, int* info) {
  return cusolverDnSgesvd(h, jobu, jobvt, m, n, A, lda, S, U, ldu, VT, ldvt, work, lwork, nullptr, info);
}
cusolverStatus_t gesvd(cusolverDnHandle_t h, signed char jobu, signed char jobvt, int m, int n, double* A, int lda,
                       double* S, double* U, int ldu, double* VT, int ldvt, double* work, int lwork, int* info) {
  return cusolverDnDgesvd(h, jobu, jobvt, m, n, A, lda, S, U, ldu, VT, ldvt, work, lwork, nullptr, info);
}

// syevdx for the eigenvalues il..iu (1-based, ascending) and their vectors; C in the lower triangle.
cusolverStatus_t syevdx_size(cusolverDnHandle_t h, int n, const float* A, int il, int iu, int* meig,
                             const float* W, int* lwork) {
  return cusolverDnSsyevdx_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, n,
                                      A, n, 0.f, 0.f, il, iu, meig, W, lwork);
}
cusolverStatus_t syevdx_size(cusolverDnHandle_t h, int n, const double* A, int il, int iu, int* meig,
                             const double* W, int* lwork) {
  return cusolverDnDsyevdx_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, n,
                                      A, n, 0.0, 0.0, il, iu, meig, W, lwork);
}
cusolverStatus_t syevdx(cusolverDnHandle_t h, int n, float* A, int il, int iu, int* meig, float* W, float* work,
                        int lwork, int* info) {
  return cusolverDnSsyevdx(h, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, n, A, n, 0.f,
                           0.f, il, iu, meig, W, work, lwork, info);
}
cusolverStatus_t syevdx(cusolverDnHandle_t h, int n, double* A, int il, int iu, int* meig, double* W, double* work,
                        int lwork, int* info) {
  return cusolverDnDsyevdx(h, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, n, A, n, 0.0,
                           0.0, il, iu, meig, W, work, lwork, info);
}

template <typename T>
class CudaGaloreKernels final : public GaloreKernels<T> {
 public:
  CudaGaloreKernels(Backend<T>& backend, Index max_long, Index max_short)
      : backend_(backend), context_(cuda_context(backend)) {
    context_.activate();
    if (max_long < 2 || max_short < 2) return;  // no projected weight (ReLoRA's adapters): no SVD
    RELORA_CUSOLVER_CHECK(cusolverDnCreate(&solver_));
    RELORA_CUSOLVER_CHECK(cusolverDnSetStream(solver_, context_.stream()));
    const Index longer = max_long, shorter = max_short;
    if (longer > Index(1) << 30) throw ConfigError("GaLore: a weight of " + std::to_string(longer) + " rows is too large for gesvd");
    capacity_long_ = longer;
    capacity_short_ = shorter;
    info_ = backend_.allocate(1, 1);  // an int fits in T's bytes
  }
  ~CudaGaloreKernels() override {
    if (solver_) cusolverDnDestroy(solver_);
  }

  bool recording() const override { return context_.recorder().recording(); }
  bool refreshing() const override { return context_.recorder().refreshing(); }
  bool checks_on_host() const override { return false; }
  std::size_t workspace_bytes() const override {
    return sizeof(T) * std::size_t(input_.size() + singular_values_.size() + tall_.size() + square_.size() +
                                   info_.size() + work_.size() + qr_matrix_.size() + qr_tau_.size());
  }

  void decay(Tensor<T>& W, double factor) override {
    T* data = W.data();
    std::int64_t size = W.size();
    T f = T(factor);
    const unsigned long long* flag = context_.nonfinite_report().flag();
    void* args[] = {&data, &size, &f, &flag};
    context_.recorder().launch(reinterpret_cast<const void*>(&galore_decay_kernel<T>),
                               dim3(grid_for(size, context_.sm_count())), dim3(kThreads), 0, args,
                               "galore_decay_kernel");
  }

  void orthonormalize(Tensor<T>& X) override {
    context_.activate();
    if (solver_ == nullptr) throw ConfigError("GaLore: orthonormalize on kernels made for no projected weight");
    const Index a = X.rows(), k = X.cols();
    cudaStream_t stream = context_.stream();
    const int sms = context_.sm_count();
    // Workspace for the largest sketch, made at the first range finder's QR (once).
    if (qr_matrix_.size() < a * k || qr_tau_.size() < k) {
      backend_.synchronize();
      qr_matrix_ = Tensor<T>();
      qr_tau_ = Tensor<T>();
      qr_matrix_ = backend_.allocate(capacity_long_, std::max(k, capacity_width_));
      qr_tau_ = backend_.allocate(1, std::max(k, capacity_width_));
      capacity_width_ = std::max(k, capacity_width_);
    }
    int lwork_qr = 0, lwork_q = 0;
    RELORA_CUSOLVER_CHECK(geqrf_size(solver_, int(a), int(k), qr_matrix_.data(), &lwork_qr));
    RELORA_CUSOLVER_CHECK(orgqr_size(solver_, int(a), int(k), qr_matrix_.data(), qr_tau_.data(), &lwork_q));
    const Index lwork = std::max(lwork_qr, lwork_q);
    if (lwork > work_.size()) {
      backend_.synchronize();
      work_ = Tensor<T>();
      work_ = backend_.allocate(1, lwork);
    }
    // Row-major X (a x k) to column-major A (a x k): A(i, j) at i + j a.
    launch_plain(&galore_gather_kernel<T>, dim3(grid_for(a * k, sms)), dim3(kThreads), 0, stream,
                 "galore_gather_kernel", static_cast<const T*>(X.data()), std::int64_t(k), std::int64_t(k),
                 std::int64_t(a), qr_matrix_.data(), false);
    int* info = reinterpret_cast<int*>(info_.data());
    RELORA_CUSOLVER_CHECK(geqrf(solver_, int(a), int(k), qr_matrix_.data(), qr_tau_.data(), work_.data(),
                                int(work_.size()), info));
    RELORA_CUSOLVER_CHECK(orgqr(solver_, int(a), int(k), qr_matrix_.data(), qr_tau_.data(), work_.data(),
                                int(work_.size()), info));
    // And back: X(i, j) = A(i, j).
    launch_plain(&galore_gather_kernel<T>, dim3(grid_for(a * k, sms)), dim3(kThreads), 0, stream,
                 "galore_gather_kernel", static_cast<const T*>(qr_matrix_.data()), std::int64_t(a), std::int64_t(a),
                 std::int64_t(k), X.data(), false);
  }

  void top_eigenvectors(Tensor<T>& C, Tensor<T>& U) override {
    context_.activate();
    const Index a = C.rows(), r = U.cols();
    if (C.cols() != a || U.rows() != a || r < 1 || r > a) {
      throw ShapeError("GaLore eigenvectors: C " + C.shape() + " and U " + U.shape() + " do not match");
    }
    if (solver_ == nullptr || a > capacity_short_) {
      throw ShapeError("GaLore eigenvectors: C " + C.shape() + " exceeds the workspace's " +
                       shape_string(capacity_short_, capacity_short_));
    }
    cudaStream_t stream = context_.stream();
    if (singular_values_.size() < a) {
      // The eigenvalues' buffer, made at the first solve (the SVD's singular values share it).
      backend_.synchronize();
      singular_values_ = Tensor<T>();
      singular_values_ = backend_.allocate(1, capacity_short_);
    }
    // The r largest of a ascending eigenvalues: il = a - r + 1 .. iu = a. C is symmetric, so the
    // row-major buffer is the column-major C.
    const int il = int(a - r + 1), iu = int(a);
    int found = 0, lwork = 0;
    RELORA_CUSOLVER_CHECK(syevdx_size(solver_, int(a), C.data(), il, iu, &found, singular_values_.data(), &lwork));
    if (Index(lwork) > work_.size()) {
      backend_.synchronize();
      work_ = Tensor<T>();
      work_ = backend_.allocate(1, lwork);
    }
    int* info = reinterpret_cast<int*>(info_.data());
    RELORA_CUSOLVER_CHECK(syevdx(solver_, int(a), C.data(), il, iu, &found, singular_values_.data(), work_.data(),
                                 int(work_.size()), info));
    int host_info = 0;
    RELORA_CUDA_CHECK(cudaMemcpyAsync(&host_info, info, sizeof(int), cudaMemcpyDeviceToHost, stream));
    RELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (host_info != 0 || found != int(r)) {
      throw DeviceError("GaLore eigenvectors: cuSOLVER syevdx of the Gram matrix " + C.shape() + " returned info " +
                        std::to_string(host_info) + " and " + std::to_string(found) + " of " + std::to_string(r) +
                        " eigenpairs" + (host_info > 0 ? " (did not converge)" : ""));
    }
    // The vectors are C's first r columns (column-major, ascending eigenvalues): U(i, j) is
    // C(i, r - 1 - j), read from the last of them with a negative column stride.
    const std::int64_t last_column = std::int64_t(r - 1) * a;
    launch_plain(&galore_gather_kernel<T>, dim3(grid_for(a * r, context_.sm_count())), dim3(kThreads), 0, stream,
                 "galore_gather_kernel", static_cast<const T*>(C.data() + last_column), -std::int64_t(a),
                 std::int64_t(a), std::int64_t(r), U.data(), false);
  }

  void top_singular_vectors(const Tensor<T>& G, Tensor<T>* U, Tensor<T>* V) override {
    context_.activate();
    const Index m = G.rows(), n = G.cols();
    const Index longer = std::max(m, n), shorter = std::min(m, n);
    if (solver_ == nullptr || longer > capacity_long_ || shorter > capacity_short_) {
      throw ShapeError("GaLore SVD: gradient " + G.shape() + " exceeds the workspace's " +
                       shape_string(capacity_long_, capacity_short_));
    }
    cudaStream_t stream = context_.stream();
    const int sms = context_.sm_count();
    if (input_.empty()) {
      // The exact SVD's workspace, for the largest weight, made at the first SVD (a run with the
      // randomized finder never makes it).
      backend_.synchronize();
      input_ = backend_.allocate(capacity_long_, capacity_short_);
      singular_values_ = backend_.allocate(1, capacity_short_);
      square_ = backend_.allocate(capacity_short_, capacity_short_);
    }
    // A: the column-major longer x shorter matrix gesvd factors.
    const bool wide = n >= m;  // G^T (n x m) column-major is G's own buffer
    if (wide) {
      RELORA_CUDA_CHECK(cudaMemcpyAsync(input_.data(), G.data(), sizeof(T) * std::size_t(G.size()),
                                        cudaMemcpyDeviceToDevice, stream));
    } else {
      // Column-major m x n from row-major G: element (i, j) to i + j m, i.e. row-major n x m of G^T.
      launch_plain(&galore_gather_kernel<T>, dim3(grid_for(G.size(), sms)), dim3(kThreads), 0, stream,
                   "galore_gather_kernel", static_cast<const T*>(G.data()), std::int64_t(n), std::int64_t(n),
                   std::int64_t(m), input_.data(), false);
    }
    // A = X S Y^T (X longer x shorter, Y shorter x shorter). wide: A = G^T, so G's left vectors
    // are Y and its right ones X; else A = G, left X, right Y.
    Tensor<T>* short_side = wide ? U : V;
    Tensor<T>* long_side = wide ? V : U;
    const signed char jobu = long_side ? 'S' : 'N';
    const signed char jobvt = short_side ? 'S' : 'N';
    int lwork = 0;
    RELORA_CUSOLVER_CHECK(gesvd_size(solver_, int(longer), int(shorter), &lwork, T(0)));
    if (Index(lwork) > work_.size()) {
      backend_.synchronize();
      work_ = Tensor<T>();
      work_ = backend_.allocate(1, lwork);
    }
    if (long_side && tall_.size() < longer * shorter) {
      // Only the two-sided projection wants the tall factor: its buffer is made at its first SVD.
      backend_.synchronize();
      tall_ = Tensor<T>();
      tall_ = backend_.allocate(capacity_long_, capacity_short_);
    }
    int* info = reinterpret_cast<int*>(info_.data());
    RELORA_CUSOLVER_CHECK(gesvd(solver_, jobu, jobvt, int(longer), int(shorter), input_.data(), int(longer),
                                singular_values_.data(), long_side ? tall_.data() : nullptr, int(longer),
                                square_.data(), int(shorter), work_.data(), int(work_.size()), info));
    int host_info = 0;
    RELORA_CUDA_CHECK(cudaMemcpyAsync(&host_info, info, sizeof(int), cudaMemcpyDeviceToHost, stream));
    RELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (host_info != 0) {
      throw DeviceError("GaLore SVD: cuSOLVER gesvd of gradient " + G.shape() + " returned info " +
                        std::to_string(host_info) + (host_info > 0 ? " (did not converge)" : " (a bad argument)"));
    }
    const std::int64_t r_short = short_side ? short_side->cols() : 0;
    if (short_side) {
      // Y^T is column-major shorter x shorter: Y(i, j) = VT(j, i) at j + i * shorter, row-major Y.
      launch_plain(&galore_gather_kernel<T>, dim3(grid_for(shorter * r_short, sms)), dim3(kThreads), 0, stream,
                   "galore_gather_kernel", static_cast<const T*>(square_.data()), std::int64_t(shorter),
                   std::int64_t(shorter), r_short, short_side->data(), true);
    }
    if (long_side) {
      // X is column-major longer x shorter: X(i, j) at i + j * longer.
      launch_plain(&galore_gather_kernel<T>, dim3(grid_for(longer * long_side->cols(), sms)), dim3(kThreads), 0,
                   stream, "galore_gather_kernel", static_cast<const T*>(tall_.data()), std::int64_t(longer),
                   std::int64_t(longer), std::int64_t(long_side->cols()), long_side->data(), false);
    }
  }

 private:
  Backend<T>& backend_;
  CudaContext& context_;
  cusolverDnHandle_t solver_ = nullptr;
  Index capacity_long_ = 0, capacity_short_ = 0, capacity_width_ = 0;
  Tensor<T> input_, singular_values_, tall_, square_, info_, work_;
  Tensor<T> qr_matrix_, qr_tau_;  // the range finder's QR (column-major sketch, Householder scalars)
};

}  // namespace
}  // namespace cuda_detail

template <typename T>
std::unique_ptr<GaloreKernels<T>> make_cuda_galore_kernels(Backend<T>& backend, Index max_long, Index max_short) {
  return std::make_unique<cuda_detail::CudaGaloreKernels<T>>(backend, max_long, max_short);
}

template std::unique_ptr<GaloreKernels<float>> make_cuda_galore_kernels(Backend<float>&, Index, Index);
template std::unique_ptr<GaloreKernels<double>> make_cuda_galore_kernels(Backend<double>&, Index, Index);

}  // namespace relora
