#pragma once
// Element-wise formulas (activations and their derivatives, the Adam update), shared by the CPU
// loops and the CUDA kernels so that both backends compute the same thing.
#include <cmath>

#include "relora/core/backend.hpp"
#include "relora/core/counter_rng.hpp"

namespace relora {

// GELU with the tanh approximation (Hendrycks & Gimpel 2016), as torch's gelu(approximate="tanh").
template <typename T>
RELORA_HOST_DEVICE inline T activation_value(Activation f, T y) {
  switch (f) {
    case Activation::relu: return y > T(0) ? y : T(0);
    case Activation::tanh: return tanh(y);
    case Activation::gelu: {
      const T c = T(0.7978845608028654);  // sqrt(2 / pi)
      return T(0.5) * y * (T(1) + tanh(c * (y + T(0.044715) * y * y * y)));
    }
    case Activation::identity: break;
  }
  return y;
}

// d f(y) / d y, evaluated at the pre-activation y.
template <typename T>
RELORA_HOST_DEVICE inline T activation_derivative(Activation f, T y) {
  switch (f) {
    case Activation::relu: return y > T(0) ? T(1) : T(0);
    case Activation::tanh: {
      const T t = tanh(y);
      return T(1) - t * t;
    }
    case Activation::gelu: {
      const T c = T(0.7978845608028654);
      const T inner = c * (y + T(0.044715) * y * y * y);
      const T t = tanh(inner);
      const T dinner = c * (T(1) + T(3) * T(0.044715) * y * y);
      return T(0.5) * (T(1) + t) + T(0.5) * y * (T(1) - t * t) * dinner;
    }
    case Activation::identity: break;
  }
  return T(1);
}

// One Adam/AdamW update of one element; `c1`, `c2` are the bias corrections 1 - beta^t.
// Shared by both backends so that they round identically.
template <typename T>
RELORA_HOST_DEVICE inline void adam_element(T& p, T g, T& m, T& v, double lr, double weight_decay,
                                            const AdamHyper& h, double c1, double c2) {
  if (!h.decoupled_weight_decay) g += T(weight_decay) * p;
  m = T(h.beta1) * m + T(1 - h.beta1) * g;
  v = T(h.beta2) * v + T(1 - h.beta2) * g * g;
  const T m_hat = m / T(c1);
  const T v_hat = v / T(c2);
  if (h.decoupled_weight_decay) p -= T(lr * weight_decay) * p;
  // std::sqrt's overload for T: an unqualified sqrt of a float finds C's double sqrt on the host
  // (and float on the device), so the two backends would round this step differently, and the
  // double call keeps the CPU loop from vectorising.
  using std::sqrt;
  p -= T(lr) * m_hat / (sqrt(v_hat) + T(h.eps));
}

}  // namespace relora
