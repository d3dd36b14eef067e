#pragma once
// Element-wise formulas (activations and their derivatives), shared by the CPU loops and the CUDA
// kernels so that both backends compute the same thing.
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

}  // namespace relora
