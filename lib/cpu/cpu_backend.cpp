#include "cpu/cpu_backend.hpp"
#include "cpu/cpu_parallel.hpp"
#include "cpu/cpu_row_passes.hpp"
#include "cpu/cpu_squared_errors.hpp"
#include "cpu/eigen_maps.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "relora/core/elementwise_math.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace relora {
namespace {

constexpr std::size_t kAlignment = 64;

template <typename T>
void free_host(T* p) {
  ::operator delete[](p, std::align_val_t(kAlignment));
}

template <typename T>
void require_same_shape(const Tensor<T>& a, const Tensor<T>& b, const char* op) {
  if (!a.same_shape(b.rows(), b.cols())) {
    throw ShapeError(std::string(op) + ": operands differ in shape, " + a.shape() + " vs " + b.shape());
  }
}

}  // namespace

template <typename T>
CpuBackend<T>::CpuBackend(const BackendOptions& options)
    : math_(options.math) {}

template <typename T>
std::string CpuBackend<T>::description() const {
#if defined(_OPENMP)
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  return std::string("cpu (Eigen ") + std::to_string(EIGEN_WORLD_VERSION) + "." +
         std::to_string(EIGEN_MAJOR_VERSION) + "." + std::to_string(EIGEN_MINOR_VERSION) + ", " +
         std::to_string(threads) + " threads; a bf16 base in tf32 mode on " +
         (cpu_amx_bf16_available() ? "AMX tiles" : cpu_avx512_bf16_available() ? "AVX-512 BF16" : "fp32 products") + ")";
}

template <typename T>
Tensor<T> CpuBackend<T>::allocate(Index rows, Index cols) {
  if (rows < 0 || cols < 0) throw ShapeError("allocate: negative shape " + shape_string(rows, cols));
  const std::size_t count = static_cast<std::size_t>(std::max<Index>(rows * cols, 1));
  T* data = static_cast<T*>(::operator new[](count * sizeof(T), std::align_val_t(kAlignment)));
  return Tensor<T>(data, rows, cols, Device::cpu, &free_host<T>);
}

template <typename T>
void CpuBackend<T>::upload(const T* host, Tensor<T>& dst) {
  if (dst.size() > 0) std::memcpy(dst.data(), host, sizeof(T) * dst.size());
}

template <typename T>
void CpuBackend<T>::download(const Tensor<T>& src, T* host) {
  if (src.size() > 0) std::memcpy(host, src.data(), sizeof(T) * src.size());
}

template <typename T>
void CpuBackend<T>::copy(const Tensor<T>& src, Tensor<T>& dst) {
  require_same_shape(src, dst, "copy");
  if (src.size() > 0) std::memcpy(dst.data(), src.data(), sizeof(T) * src.size());
}

template <typename T>
void CpuBackend<T>::fill(Tensor<T>& x, T value) {
  std::fill_n(x.data(), x.size(), value);
}

template <typename T>
void CpuBackend<T>::gemm(Trans trans_a, Trans trans_b, T alpha, const Tensor<T>& A, const Tensor<T>& B,
                         T beta, Tensor<T>& C) {
  const Index m = trans_a == Trans::no ? A.rows() : A.cols();
  const Index k = trans_a == Trans::no ? A.cols() : A.rows();
  const Index kb = trans_b == Trans::no ? B.rows() : B.cols();
  const Index n = trans_b == Trans::no ? B.cols() : B.rows();
  if (k != kb || C.rows() != m || C.cols() != n) {
    throw ShapeError("gemm: op(A) " + shape_string(m, k) + " times op(B) " + shape_string(kb, n) +
                     " into C " + C.shape());
  }
  scale_in_place(beta, C);
  gemm_.multiply_add(trans_a, trans_b, alpha, A, B, C);
}

template <typename T>
void CpuBackend<T>::add_row_vector(const Tensor<T>& b, Tensor<T>& Y) {
  if (b.size() != Y.cols()) {
    throw ShapeError("add_row_vector: bias " + b.shape() + " does not match " + Y.shape() + " columns");
  }
  finish_rows(b.data(), false, Y);
}

template <typename T>
void CpuBackend<T>::column_sums(const Tensor<T>& dY, T beta, Tensor<T>& db) {
  if (db.size() != dY.cols()) {
    throw ShapeError("column_sums: output " + db.shape() + " does not match " + dY.shape() + " columns");
  }
  MatrixMap<T> out(db.data(), 1, db.size());
  if (beta == T(0)) {
    out.noalias() = as_matrix(dY).colwise().sum();
  } else {
    out = beta * out + as_matrix(dY).colwise().sum();
  }
}

template <typename T>
void CpuBackend<T>::multiply(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) {
  require_same_shape(a, b, "multiply");
  require_same_shape(a, out, "multiply");
  const T* x = a.data();
  const T* y = b.data();
  T* z = out.data();
  const Index size = out.size();
  for_each_element(size, [&](Index i) { z[i] = x[i] * y[i]; });
}

namespace {

// body(kind) with kind.value == f, a constant: each activation's loop is compiled for it alone,
// so that it vectorises (a switch on f per element keeps GCC's loops scalar).
template <typename Body>
void with_activation(Activation f, Body&& body) {
  switch (f) {
    case Activation::identity: return body(std::integral_constant<Activation, Activation::identity>{});
    case Activation::relu: return body(std::integral_constant<Activation, Activation::relu>{});
    case Activation::tanh: return body(std::integral_constant<Activation, Activation::tanh>{});
    case Activation::gelu: return body(std::integral_constant<Activation, Activation::gelu>{});
  }
}

}  // namespace

template <typename T>
void CpuBackend<T>::activation_forward(Activation f, const Tensor<T>& Y, Tensor<T>& Z) {
  require_same_shape(Y, Z, "activation_forward");
  const T* y = Y.data();
  T* z = Z.data();
  const Index size = Y.size();
  with_activation(f, [&](auto kind) {
    for_each_element(size, [&](Index i) { z[i] = activation_value(kind.value, y[i]); });
  });
}

template <typename T>
void CpuBackend<T>::activation_backward(Activation f, const Tensor<T>& Y, const Tensor<T>& dZ, Tensor<T>& dY) {
  require_same_shape(Y, dZ, "activation_backward");
  require_same_shape(Y, dY, "activation_backward");
  const T* y = Y.data();
  const T* dz = dZ.data();
  T* dy = dY.data();
  const Index size = Y.size();
  with_activation(f, [&](auto kind) {
    for_each_element(size, [&](Index i) { dy[i] = dz[i] * activation_derivative(kind.value, y[i]); });
  });
}

template <typename T>
T CpuBackend<T>::max_abs(const Tensor<T>& x) {
  // The largest |x_i| of [begin, end), +Inf at the first NaN or Inf (NaN fails <=).
  const T* p = x.data();
  const auto block_max = [p](Index begin, Index end) {
    T largest = T(0);
    for (Index i = begin; i < end; ++i) {
      const T a = std::abs(p[i]);
      if (!(a <= largest)) {
        if (!std::isfinite(a)) return std::numeric_limits<T>::infinity();
        largest = a;
      }
    }
    return largest;
  };
  const Index size = x.size();
  if (!run_parallel(size)) return block_max(Index(0), size);
  // A merge checks all of W: in blocks on every thread, as the other passes over large tensors.
  constexpr Index kBlock = 65536;
  const Index blocks = (size + kBlock - 1) / kBlock;
  T largest = T(0);
#pragma omp parallel for reduction(max : largest) schedule(static)
  for (Index block = 0; block < blocks; ++block) {
    largest = std::max(largest, block_max(block * kBlock, std::min(size, (block + 1) * kBlock)));
  }
  return largest;
}

template <typename T>
void CpuBackend<T>::mse(const Tensor<T>& Y, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) {
  require_same_shape(Y, target, "mse (prediction vs target)");
  require_same_shape(Y, dY, "mse (prediction vs gradient)");
  require_shape(loss, 1, 1, "mse loss");
  const T* y = Y.data();
  T* dy = dY.data();
  loss.data()[0] = mean_squared_error(
      Y.size(), [y](Index i) { return y[i]; }, target.data(), [dy](Index i, T grad) { dy[i] = grad; });
}

template <typename T>
void CpuBackend<T>::random_uniform(RngKey key, T low, T high, Tensor<T>& x) {
  T* data = x.data();
  for (Index i = 0; i < x.size(); ++i) data[i] = low + (high - low) * T(uniform01(key, i));
}

template <typename T>
void CpuBackend<T>::random_normal(RngKey key, T mean, T stddev, Tensor<T>& x) {
  T* data = x.data();
  for (Index i = 0; i < x.size(); ++i) data[i] = mean + stddev * T(standard_normal(key, i));
}

template <typename T>
void CpuBackend<T>::dropout_mask(RngKey key, T p, Tensor<T>& mask) {
  T* data = mask.data();
  const T keep_scale = T(1) / (T(1) - p);
  for (Index i = 0; i < mask.size(); ++i) data[i] = uniform01(key, i) < double(p) ? T(0) : keep_scale;
}

template class CpuBackend<float>;
template class CpuBackend<double>;

}  // namespace relora
