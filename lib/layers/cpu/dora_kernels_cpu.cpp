// DoRA's CPU kernels: plain loops over host buffers, row- or column-parallel on every OpenMP
// thread when the pass is large (cpu_parallel.hpp). Sums over a row or a column accumulate in
// double, as the CUDA kernels do.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_parallel.hpp"
#include "layers/dora_kernels.hpp"
#include "layers/dora_recovery.hpp"
#include "relora/core/elementwise_math.hpp"

namespace relora {
namespace {

// f(i) for every row i of a pass of `work` elements in all.
template <typename F>
void for_each_row(Index rows, Index work, F&& f) {
  if (run_parallel(work)) {
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < rows; ++i) f(i);
  } else {
    for (Index i = 0; i < rows; ++i) f(i);
  }
}

template <typename T>
class CpuDoraKernels final : public DoraKernels<T> {
 public:
  void row_squared_norms(const Tensor<T>& W, Tensor<T>& wsq) override {
    const Index k = W.cols();
    const T* w = W.data();
    T* out = wsq.data();
    for_each_row(W.rows(), W.size(), [&](Index i) {
      double sum = 0;
      const T* row = w + i * k;
      for (Index j = 0; j < k; ++j) sum += double(row[j]) * double(row[j]);
      out[i] = T(sum);
    });
  }

  void row_norms(const Tensor<T>& wsq, Tensor<T>& m) override {
    for (Index i = 0; i < wsq.size(); ++i) m.data()[i] = T(std::sqrt(std::max(double(wsq.data()[i]), 0.0)));
  }

  void norms(const Tensor<T>& wsq, const Tensor<T>& P, const Tensor<T>& B, const Tensor<T>& BG, const Tensor<T>& m,
             T s, T eps, Tensor<T>& n, Tensor<T>& g) override {
    const Index r = B.cols();
    const double s1 = 2 * double(s), s2 = double(s) * double(s);
    for_each_row(B.rows(), B.size(), [&](Index i) {
      double sum = double(wsq.data()[i]);
      const T* b = B.data() + i * r;
      const T* p = P.data() + i * r;
      const T* bg = BG.data() + i * r;
      for (Index j = 0; j < r; ++j) sum += double(b[j]) * (s1 * double(p[j]) + s2 * double(bg[j]));
      const T norm = T(std::sqrt(std::max(sum, 0.0)));
      n.data()[i] = norm;
      g.data()[i] = m.data()[i] / std::max(norm, eps);
    });
  }

  void scale_columns_add(const Tensor<T>& Z, const Tensor<T>& g, const Tensor<T>* b, bool accumulate, bool relu,
                         Tensor<T>& Y) override {
    const Index d = Z.cols();
    const T* z = Z.data();
    const T* gv = g.data();
    const T* bv = b ? b->data() : nullptr;
    T* y = Y.data();
    for_each_row(Z.rows(), Z.size(), [&](Index t) {
      const T* zr = z + t * d;
      T* yr = y + t * d;
      if (accumulate) {
        if (bv) {
#pragma omp simd
          for (Index i = 0; i < d; ++i) yr[i] += zr[i] * gv[i] + bv[i];
        } else {
#pragma omp simd
          for (Index i = 0; i < d; ++i) yr[i] += zr[i] * gv[i];
        }
      } else if (bv) {
#pragma omp simd
        for (Index i = 0; i < d; ++i) yr[i] = zr[i] * gv[i] + bv[i];
      } else {
#pragma omp simd
        for (Index i = 0; i < d; ++i) yr[i] = zr[i] * gv[i];
      }
      if (relu) {
#pragma omp simd
        for (Index i = 0; i < d; ++i) yr[i] = activation_value(Activation::relu, yr[i]);
      }
    });
  }

  void scale_columns(const Tensor<T>& X, const Tensor<T>& g, T shift, Tensor<T>& out) override {
    const Index d = X.cols();
    const T* x = X.data();
    const T* gv = g.data();
    T* o = out.data();
    for_each_row(X.rows(), X.size(), [&](Index t) {
#pragma omp simd
      for (Index i = 0; i < d; ++i) o[t * d + i] = x[t * d + i] * (gv[i] + shift);
    });
  }

  void magnitude_gradient(Tensor<T>& dY, const Tensor<T>& Z, const Tensor<T>& g, const Tensor<T>& n, T eps,
                          bool scale_dY, Tensor<T>& dm, Tensor<T>* db) override {
    // Columns in blocks, each block's sums in double over all rows: the rows are read in order.
    const Index rows = dY.rows(), d = dY.cols();
    constexpr Index kBlock = 256;
    const Index blocks = (d + kBlock - 1) / kBlock;
    for_each_row(blocks, dY.size(), [&](Index block) {
      const Index first = block * kBlock, width = std::min(d, first + kBlock) - first;
      double sums[kBlock] = {}, column_sum[kBlock] = {};
      const T* factor = g.data() + first;
      for (Index t = 0; t < rows; ++t) {
        T* a = dY.data() + t * d + first;
        const T* z = Z.data() + t * d + first;
#pragma omp simd
        for (Index i = 0; i < width; ++i) {
          sums[i] += double(a[i]) * double(z[i]);
          column_sum[i] += double(a[i]);
          if (scale_dY) a[i] = a[i] * factor[i];  // loop-invariant: the compiler splits the loop
        }
      }
      for (Index i = 0; i < width; ++i) {
        const Index c = first + i;
        dm.data()[c] = T(sums[i] / double(std::max(n.data()[c], eps)));
        if (db) db->data()[c] = T(column_sum[i]);
      }
    });
  }

  void magnitude_gradient_from_output(Tensor<T>& dY, const Tensor<T>& Y, const Tensor<T>* b, const Tensor<T>& g,
                                      const Tensor<T>& n, T eps, bool scale_dY, Tensor<T>& dm, Tensor<T>* db,
                                      Tensor<T>& recompute) override {
    // Columns in blocks, as magnitude_gradient: one read of dY and Y, one write of dY.
    const Index rows = dY.rows(), d = dY.cols();
    constexpr Index kBlock = 256;
    const Index blocks = (d + kBlock - 1) / kBlock;
    T* a_all = dY.data();
    const T* y_all = Y.data();
    for_each_row(blocks, dY.size(), [&](Index block) {
      const Index first = block * kBlock, width = std::min(d, first + kBlock) - first;
      double sum[kBlock] = {}, abs_dY[kBlock] = {}, abs_product[kBlock] = {}, column_sum[kBlock] = {};
      double bias[kBlock], divisor[kBlock];
      T factor[kBlock];
      for (Index i = 0; i < width; ++i) {
        const T gi = g.data()[first + i];
        const bool inv = dora_recovery::invertible(gi);
        bias[i] = b ? double(b->data()[first + i]) : 0.0;
        divisor[i] = inv ? double(gi) : 1.0;  // a column not invertible is recomputed: any finite value
        factor[i] = scale_dY && inv ? gi : T(1);
      }
      for (Index t = 0; t < rows; ++t) {
        T* a = a_all + t * d + first;
        const T* y = y_all + t * d + first;
#pragma omp simd
        for (Index i = 0; i < width; ++i) {
          const double ai = double(a[i]);
          const double product = ai * (double(y[i]) - bias[i]);  // dY (Z g), divided by g below
          sum[i] += product;
          abs_product[i] += std::abs(product);
          abs_dY[i] += std::abs(ai);
          column_sum[i] += ai;
          if (scale_dY) a[i] = a[i] * factor[i];  // loop-invariant: the compiler splits the loop
        }
      }
      for (Index i = 0; i < width; ++i) {  // sum_t dY (Y - b) / g: the division once per column
        sum[i] /= divisor[i];
        abs_product[i] /= std::abs(divisor[i]);
      }
      for (Index i = 0; i < width; ++i) {
        const Index c = first + i;
        const T gi = g.data()[c];
        const bool accepted = dora_recovery::invertible(gi) &&
                              dora_recovery::recovery_accepted(sum[i], abs_dY[i], abs_product[i], T(bias[i]), gi);
        recompute.data()[c] = accepted ? T(0) : T(1);
        if (accepted) dm.data()[c] = T(sum[i] / double(std::max(n.data()[c], eps)));
        if (db) db->data()[c] = T(column_sum[i]);
      }
    });
  }

  void recompute_magnitude_gradient(Tensor<T>& dY, bool dY_scaled, const Tensor<T>& X, const Tensor<T>& W,
                                    const Tensor<T>& U, const Tensor<T>& B, T s, const Tensor<T>& g,
                                    const Tensor<T>& n, T eps, const Tensor<T>& recompute, Tensor<T>& dm) override {
    const Index rows = dY.rows(), d = dY.cols(), k = X.cols(), r = U.cols();
    for (Index c = 0; c < d; ++c) {
      if (recompute.data()[c] == T(0)) continue;
      const T gc = g.data()[c];
      const bool inv = dora_recovery::invertible(gc);
      const T* w = W.data() + c * k;
      const T* bc = B.data() + c * r;
      double total = 0;
      // Rows in parallel: each reads its own row of X and U and its own element of dY's column.
#pragma omp parallel for schedule(static) reduction(+ : total) if (run_parallel(rows * (k + r)))
      for (Index t = 0; t < rows; ++t) {
        const T* x = X.data() + t * k;
        const T* u = U.data() + t * r;
        double base = 0, adapter = 0;
        for (Index j = 0; j < k; ++j) base += double(x[j]) * double(w[j]);
        for (Index j = 0; j < r; ++j) adapter += double(u[j]) * double(bc[j]);
        T& a = dY.data()[t * d + c];
        double raw = double(a);
        if (dY_scaled && inv) raw /= double(gc);
        if (dY_scaled && !inv) a = a * gc;
        total += raw * (base + double(s) * adapter);
      }
      dm.data()[c] = T(total / double(std::max(n.data()[c], eps)));
    }
  }

  void add_masked(const Tensor<T>& mask, const Tensor<T>& M, Tensor<T>& out) override {
    const T* p = mask.data();
    const T* x = M.data();
    T* o = out.data();
    for_each_element(out.size(), [&](Index i) { o[i] += p[i] * x[i]; });
  }

  void norm_factors(const Tensor<T>& dm, const Tensor<T>& m, const Tensor<T>& n, T eps, Tensor<T>& q) override {
    for (Index i = 0; i < n.size(); ++i) {
      const T norm = n.data()[i];
      q.data()[i] = norm > eps ? -dm.data()[i] * m.data()[i] / (norm * norm) : T(0);
    }
  }

  void scale_rows(const Tensor<T>& q, const Tensor<T>& M, bool accumulate, Tensor<T>& out) override {
    const Index cols = M.cols();
    for_each_row(M.rows(), M.size(), [&](Index i) {
      const T f = q.data()[i];
      const T* mr = M.data() + i * cols;
      T* o = out.data() + i * cols;
      if (accumulate) {
#pragma omp simd
        for (Index j = 0; j < cols; ++j) o[j] += f * mr[j];
      } else {
#pragma omp simd
        for (Index j = 0; j < cols; ++j) o[j] = f * mr[j];
      }
    });
  }

  void add_norm_gradient_B(const Tensor<T>& q, const Tensor<T>& P, const Tensor<T>& BG, T s, Tensor<T>& dB) override {
    const Index r = dB.cols();
    const T s2 = s * s;
    for_each_row(dB.rows(), dB.size(), [&](Index i) {
      const T f = q.data()[i];
      for (Index j = 0; j < r; ++j) dB.data()[i * r + j] += f * (s * P.data()[i * r + j] + s2 * BG.data()[i * r + j]);
    });
  }

  void difference(const Tensor<T>& a, const Tensor<T>& b, Tensor<T>& out) override {
    const T* x = a.data();
    const T* y = b.data();
    T* o = out.data();
    for_each_element(a.size(), [&](Index i) { o[i] = x[i] - y[i]; });
  }
};

}  // namespace

template <typename T>
std::unique_ptr<DoraKernels<T>> make_cpu_dora_kernels() {
  return std::make_unique<CpuDoraKernels<T>>();
}

template std::unique_ptr<DoraKernels<float>> make_cpu_dora_kernels();
template std::unique_ptr<DoraKernels<double>> make_cpu_dora_kernels();

}  // namespace relora
