#include "layers/fused_lora_checks.hpp"

#include <string>

#include "relora/core/errors.hpp"

namespace relora {
namespace {

template <typename T>
void check_layer(const LoraLayerTensors<T>& layer, Index d, Index r, const char* op) {
  if (!layer.X || !layer.W || !layer.A || !layer.B) {
    throw ConfigError(std::string(op) + ": X, W, A and B must all be given");
  }
  const Index k = layer.X->cols();
  require_shape(*layer.W, d, k, "fused LoRA layer W");
  require_shape(*layer.A, r, k, "fused LoRA layer A");
  require_shape(*layer.B, d, r, "fused LoRA layer B");
  if (layer.b) require_shape(*layer.b, 1, d, "fused LoRA layer b");
}

}  // namespace

template <typename T>
void check_fused_forward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& Y) {
  const Index d = Y.cols(), r = U.cols();
  check_layer(layer, d, r, "fused_lora_forward");
  const Index n = layer.X->rows();
  require_shape(U, n, r, "fused_lora_forward U");
  require_shape(Y, n, d, "fused_lora_forward Y");
}

template <typename T>
void check_fused_forward_mse(const LoraLayerTensors<T>& layer, const Tensor<T>& target, const Tensor<T>& U,
                             const Tensor<T>& Y, const Tensor<T>& dY, const Tensor<T>& loss, const Tensor<T>& dU) {
  check_fused_forward(layer, U, Y);
  require_shape(target, Y.rows(), Y.cols(), "fused_lora_forward_mse target");
  require_shape(dY, Y.rows(), Y.cols(), "fused_lora_forward_mse dY");
  require_shape(dU, U.rows(), U.cols(), "fused_lora_forward_mse dU");
  require_shape(loss, 1, 1, "fused_lora_forward_mse loss");
}

template <typename T>
void check_fused_backward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& dY,
                          const LoraLayerGradients<T>& grads) {
  const Index d = dY.cols(), r = U.cols();
  check_layer(layer, d, r, "fused_lora_backward");
  if (!grads.dU || !grads.dA || !grads.dB) throw ConfigError("fused_lora_backward: dU, dA and dB must all be given");
  const Index n = layer.X->rows(), k = layer.X->cols();
  require_shape(U, n, r, "fused_lora_backward U");
  require_shape(dY, n, d, "fused_lora_backward dY");
  require_shape(*grads.dU, n, r, "fused_lora_backward dU");
  require_shape(*grads.dA, r, k, "fused_lora_backward dA");
  require_shape(*grads.dB, d, r, "fused_lora_backward dB");
  if (grads.db) require_shape(*grads.db, 1, d, "fused_lora_backward db");
  if (grads.dX) require_shape(*grads.dX, n, k, "fused_lora_backward dX");
}

template void check_fused_forward<float>(const LoraLayerTensors<float>&, const Tensor<float>&, const Tensor<float>&);
template void check_fused_forward<double>(const LoraLayerTensors<double>&, const Tensor<double>&,
                                          const Tensor<double>&);
template void check_fused_forward_mse<float>(const LoraLayerTensors<float>&, const Tensor<float>&,
                                             const Tensor<float>&, const Tensor<float>&, const Tensor<float>&,
                                             const Tensor<float>&, const Tensor<float>&);
template void check_fused_forward_mse<double>(const LoraLayerTensors<double>&, const Tensor<double>&,
                                              const Tensor<double>&, const Tensor<double>&, const Tensor<double>&,
                                              const Tensor<double>&, const Tensor<double>&);
template void check_fused_backward<float>(const LoraLayerTensors<float>&, const Tensor<float>&, const Tensor<float>&,
                                          const LoraLayerGradients<float>&);
template void check_fused_backward<double>(const LoraLayerTensors<double>&, const Tensor<double>&,
                                           const Tensor<double>&, const LoraLayerGradients<double>&);

}  // namespace relora
