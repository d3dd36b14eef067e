#pragma once
// The shape checks of Backend::fused_lora_forward/backward, shared by every backend: a caller
// other than LoraLinear gets a ShapeError naming the tensor and both shapes, not a read out of
// bounds.
#include "relora/core/backend.hpp"

namespace relora {

// X n x k, W d x k, A r x k, B d x r, b 1 x d; U n x r and Y n x d, with d and r taken from Y and U.
template <typename T>
void check_fused_forward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& Y);

// As check_fused_forward, with target and dY n x d, dU n x r and loss 1 x 1.
template <typename T>
void check_fused_forward_mse(const LoraLayerTensors<T>& layer, const Tensor<T>& target, const Tensor<T>& U,
                             const Tensor<T>& Y, const Tensor<T>& dY, const Tensor<T>& loss, const Tensor<T>& dU);

// As check_fused_forward, with dY n x d, dU n x r, dA r x k, dB d x r, db 1 x d and dX n x k where given.
template <typename T>
void check_fused_backward(const LoraLayerTensors<T>& layer, const Tensor<T>& U, const Tensor<T>& dY,
                          const LoraLayerGradients<T>& grads);

}  // namespace relora
