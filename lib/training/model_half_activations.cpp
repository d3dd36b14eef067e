// Model with its activations in 16 bits (Model::set_activation_format): the same stack as
// model.cpp, with the tensors between layers in bf16 or fp16. A layer that takes the format
// (Layer::take_half_activations) reads and writes it itself; around any other the model widens
// its input, runs its fp32 forward and backward, and rounds its output and dX to nearest, which
// is the definition the fast layers are tested against:
//
//   H_0 = round(X);  H_l = round(f_l(layer_l(widen(H_{l-1}))));  output = widen(H_L)
//   G_L = round(dLoss/doutput);  dY_l = widen(G_l) .* f_l'(H_l);  G_{l-1} = round(dX_l)
//
// A loss that reads H_L itself (Loss::compute_half) computes G_L from it directly, the same bits;
// output is then widened only when asked for (Model::output).
// (ReLU's derivative is read from H_l, as from relu(Y) in fp32: both are positive where Y is.)
// Buffers are sized on the first step and reused, so a steady step allocates nothing.
#include <type_traits>

#include "relora/training/model.hpp"
#include "training/half_activation_kernels.hpp"

namespace relora {

template <typename T>
void Model<T>::require_half_activation(Activation f, std::size_t layer) const {
  if (!applies_in_place(f)) {
    throw ConfigError("Model: layer " + std::to_string(layer) +
                      " is followed by tanh or GELU; 16-bit activations take identity or ReLU between layers");
  }
}

template <typename T>
void Model<T>::set_activation_format(BasePrecision format) {
  if (format == activation_format_) return;
  if (format != BasePrecision::fp32) {
    if (!std::is_same<T, float>::value) {
      throw ConfigError(std::string("Model: ") + precision_name(format) +
                        " activations need a float model (fp32 adapters); this model computes in double");
    }
    for (std::size_t i = 0; i < layers_.size(); ++i) require_half_activation(layers_[i].activation, i);
    if constexpr (std::is_same<T, float>::value) {
      if (!half_kernels_) half_kernels_ = make_half_activation_kernels(*backend_);
    }
  }
  activation_format_ = format;
  backend_->drop_recording();  // a recorded step ran the other format's work
  for (Stage& stage : layers_) {
    stage.layer_takes_half = stage.layer->take_half_activations(format) && half();
  }
  activations_valid_ = false;
}

template <typename T>
HalfTensor& Model<T>::half_output_of(Stage& stage) {
  return stage.layer_takes_half ? stage.layer->mutable_half_output() : stage.half_output.tensor();
}

namespace {

template <typename T>
void ensure_shape(Backend<T>& backend, Tensor<T>& buffer, Index rows, Index cols) {
  if (!buffer.same_shape(rows, cols)) buffer = backend.allocate(rows, cols);
}

void ensure_shape(Backend<float>& backend, HalfBuffer& buffer, Index rows, Index cols) {
  if (!buffer.same_shape(rows, cols)) buffer = HalfBuffer(backend, rows, cols);
}

}  // namespace

template <typename T>
const HalfTensor& Model<T>::forward_half_layers(const Tensor<T>& X) {
  wide_output_current_ = false;
  if constexpr (std::is_same<T, float>::value) {
    const BasePrecision format = activation_format_;
    HalfActivationKernels& kernels = *half_kernels_;
    const Index n = X.rows();
    require_shape(X, n, in_features(), "Model forward X");
    ensure_shape(*backend_, half_input_, n, X.cols());
    kernels.round(X.data(), X.size(), format, half_input_.tensor().data());
    const HalfTensor* input = &half_input_.tensor();
    for (Stage& stage : layers_) {
      Layer<T>& layer = *stage.layer;
      const bool relu_left = stage.activation == Activation::relu && !stage.layer_applies_activation;
      if (stage.layer_takes_half) {
        layer.forward_half(*input);
        HalfTensor& Y = layer.mutable_half_output();
        if (relu_left) kernels.relu(Y.data(), Y.size(), format);
        input = &Y;
        continue;
      }
      ensure_shape(*backend_, stage.wide_input, n, input->cols());
      kernels.widen(input->data(), input->size(), format, stage.wide_input.data());
      Tensor<T>& Y = const_cast<Tensor<T>&>(layer.forward(stage.wide_input));
      if (relu_left) backend_->activation_forward(Activation::relu, Y, Y);
      ensure_shape(*backend_, stage.half_output, Y.rows(), Y.cols());
      kernels.round(Y.data(), Y.size(), format, stage.half_output.tensor().data());
      input = &stage.half_output.tensor();
    }
  } else {
    (void)X;
  }
  return half_top_output();
}

template <typename T>
const Tensor<T>& Model<T>::widen_half_output() {
  if constexpr (std::is_same<T, float>::value) {
    const HalfTensor& output = half_top_output();
    ensure_shape(*backend_, wide_output_, output.rows(), output.cols());
    half_kernels_->widen(output.data(), output.size(), activation_format_, wide_output_.data());
    wide_output_current_ = true;
  }
  return wide_output_;
}

template <typename T>
void Model<T>::backward_half(const Tensor<T>& dY, BackwardObserver<T>* observer) {
  if constexpr (std::is_same<T, float>::value) {
    ensure_shape(*backend_, half_top_grad_, dY.rows(), dY.cols());
    half_kernels_->round(dY.data(), dY.size(), activation_format_, half_top_grad_.tensor().data());
    backward_half_layers(leading_view(half_top_grad_.tensor(), dY.rows(), dY.cols()), observer);
  } else {
    (void)dY, (void)observer;
  }
}

template <typename T>
void Model<T>::backward_half_layers(HalfTensor grad, BackwardObserver<T>* observer) {
  if constexpr (std::is_same<T, float>::value) {
    const BasePrecision format = activation_format_;
    HalfActivationKernels& kernels = *half_kernels_;
    // Every gradient is scratch from here on (the top one too, as in backward): ReLU's derivative
    // runs in place.
    for (std::size_t i = layers_.size(); i-- > 0;) {
      Stage& stage = layers_[i];
      Layer<T>& layer = *stage.layer;
      HalfTensor& Y = half_output_of(stage);
      if (stage.activation == Activation::relu) kernels.relu_backward(Y.data(), grad.data(), grad.size(), format, grad.data());
      const Index rows = Y.rows(), cols = layer.in_features();
      HalfTensor dX;
      if (i > 0) {
        // dX goes into a buffer nothing reads any more: this layer's output (its activation's
        // backward is done; the top layer's is the model's output and stays), or a scratch buffer.
        const auto free_and_fits = [&](const HalfTensor& buffer) {
          return buffer.size() >= rows * cols && buffer.data() != grad.data();
        };
        HalfTensor* target = nullptr;
        if (i + 1 < layers_.size() && free_and_fits(Y)) target = &Y;
        for (std::size_t b = 0; target == nullptr && b < half_scratch_.size(); ++b) {
          if (free_and_fits(half_scratch_[b].tensor())) target = &half_scratch_[b].tensor();
        }
        if (target == nullptr) {  // the first step only, or a larger batch
          half_scratch_.emplace_back(*backend_, rows, cols);
          target = &half_scratch_.back().tensor();
        }
        dX = leading_view(*target, rows, cols);
      }
      if (stage.layer_takes_half) {
        layer.backward_half(grad, i > 0 ? &dX : nullptr);
      } else {
        ensure_shape(*backend_, stage.wide_grad, grad.rows(), grad.cols());
        kernels.widen(grad.data(), grad.size(), format, stage.wide_grad.data());
        if (i > 0) {
          ensure_shape(*backend_, stage.wide_dX, rows, cols);
          layer.backward(stage.wide_grad, &stage.wide_dX);
          kernels.round(stage.wide_dX.data(), stage.wide_dX.size(), format, dX.data());
        } else {
          layer.backward(stage.wide_grad, nullptr);
        }
      }
      if (observer != nullptr) observer->layer_backward_done(i);
      if (i == 0) break;
      grad = std::move(dX);
    }
  } else {
    (void)grad, (void)observer;
  }
}

// The members defined here (the class itself is instantiated in model.cpp).
#define RELORA_INSTANTIATE(T)                                                                        \
  template void Model<T>::require_half_activation(Activation, std::size_t) const;                    \
  template void Model<T>::set_activation_format(BasePrecision);                                      \
  template HalfTensor& Model<T>::half_output_of(Stage&);                                             \
  template const HalfTensor& Model<T>::forward_half_layers(const Tensor<T>&);                        \
  template const Tensor<T>& Model<T>::widen_half_output();                                           \
  template void Model<T>::backward_half(const Tensor<T>&, BackwardObserver<T>*);                     \
  template void Model<T>::backward_half_layers(HalfTensor, BackwardObserver<T>*);
RELORA_INSTANTIATE(float)
RELORA_INSTANTIATE(double)
#undef RELORA_INSTANTIATE

}  // namespace relora
