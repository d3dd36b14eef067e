#include "relora/training/model.hpp"

#include "training/half_activation_kernels.hpp"

namespace relora {

template <typename T>
Model<T>::Model(std::shared_ptr<Backend<T>> backend, LayerChoice choice) : backend_(std::move(backend)), choice_(choice) {
  if (!backend_) throw ConfigError("Model: no backend given");
}

template <typename T>
Model<T>::~Model() = default;
template <typename T>
Model<T>::Model(Model&&) noexcept = default;
template <typename T>
Model<T>& Model<T>::operator=(Model&&) noexcept = default;

template <typename T>
Layer<T>& Model<T>::add(std::unique_ptr<Layer<T>> layer, Activation activation, const std::string& name) {
  if (!layer) throw ConfigError("Model: add() was given no layer");
  if (!layers_.empty() && layer->in_features() != out_features()) {
    throw ShapeError("Model: layer " + std::to_string(layers_.size()) + " takes " +
                     std::to_string(layer->in_features()) + " inputs but the previous layer gives " +
                     std::to_string(out_features()));
  }
  Stage stage;
  stage.layer = std::move(layer);
  stage.activation = activation;
  stage.layer_applies_activation = activation == Activation::relu && stage.layer->take_output_activation(activation);
  stage.name = name.empty() ? "layers." + std::to_string(layers_.size()) : name;
  for (const Stage& other : layers_) {
    if (other.name == stage.name) throw ConfigError("Model: two layers named '" + stage.name + "'");
  }
  if (half()) {
    require_half_activation(activation, layers_.size());
    stage.layer_takes_half = stage.layer->take_half_activations(activation_format_);
  }
  layers_.push_back(std::move(stage));
  return *layers_.back().layer;
}

template <typename T>
LoraLinear<T>& Model<T>::add(const LoraConfig& config, Activation activation, const HostInput<T>& W,
                             const std::string& name) {
  return static_cast<LoraLinear<T>&>(add(make_lora_linear<T>(*backend_, config, W, choice_), activation, name));
}

template <typename T>
LoraLinear<T>& Model<T>::add(const LoraConfig& config, Activation activation, const HostInput<T>& W,
                             const Eigen::Ref<const HostVector<T>>& b, const std::string& name) {
  return static_cast<LoraLinear<T>&>(add(make_lora_linear<T>(*backend_, config, W, b, choice_), activation, name));
}

template <typename T>
LoraLinear<T>& Model<T>::add(const LoraConfig& config, Activation activation, const std::string& name) {
  return static_cast<LoraLinear<T>&>(add(make_lora_linear<T>(*backend_, config, choice_), activation, name));
}

template <typename T>
LoraLinear<T>& Model<T>::lora(std::size_t i) {
  return const_cast<LoraLinear<T>&>(static_cast<const Model<T>&>(*this).lora(i));
}

template <typename T>
const LoraLinear<T>& Model<T>::lora(std::size_t i) const {
  const Stage& stage = layers_.at(i);
  const auto* lora = dynamic_cast<const LoraLinear<T>*>(stage.layer.get());
  if (lora == nullptr) {
    throw ConfigError("Model: layer " + std::to_string(i) + " ('" + stage.name + "') is a '" + stage.layer->kind() +
                      "' layer, not a LoRA layer");
  }
  return *lora;
}

template <typename T>
Index Model<T>::in_features() const {
  if (layers_.empty()) throw ConfigError("Model: no layers");
  return layers_.front().layer->in_features();
}

template <typename T>
Index Model<T>::out_features() const {
  if (layers_.empty()) throw ConfigError("Model: no layers");
  return layers_.back().layer->out_features();
}

template <typename T>
const Tensor<T>& Model<T>::output_of(Stage& stage) {
  return applies_in_place(stage.activation) ? stage.layer->output() : stage.Z;
}

template <typename T>
const Tensor<T>& Model<T>::forward(const Tensor<T>& X) {
  if (layers_.empty()) throw ConfigError("Model forward: no layers");
  if (half()) {
    forward_half_layers(X);
    activations_valid_ = true;
    return widen_half_output();
  }
  const Tensor<T>& output = forward_layers(X, layers_.size());
  activations_valid_ = true;
  return output;
}

template <typename T>
void Model<T>::forward_with_loss(const Tensor<T>& X, Loss<T>& loss, const Tensor<T>& target) {
  if (layers_.empty()) throw ConfigError("Model forward: no layers");
  Stage& last = layers_.back();
  if (half()) {
    const HalfTensor& output = forward_half_layers(X);
    activations_valid_ = true;
    if (!loss.compute_half(output, activation_format_, target)) loss.compute(widen_half_output(), target);
    return;
  }
  if (last.activation != Activation::identity) {
    loss.compute(forward(X), target);
    return;
  }
  last.layer->forward_with_loss(forward_layers(X, layers_.size() - 1), loss, target);
  activations_valid_ = true;
}

template <typename T>
const Tensor<T>& Model<T>::output() {
  if (layers_.empty()) throw ConfigError("Model output: no layers");
  if (!half()) return output_of(layers_.back());
  return wide_output_current_ ? wide_output_ : widen_half_output();
}

template <typename T>
const Tensor<T>& Model<T>::forward_layers(const Tensor<T>& X, std::size_t count) {
  const Tensor<T>* input = &X;
  for (std::size_t i = 0; i < count; ++i) {
    Stage& stage = layers_[i];
    stage.layer->forward(*input);
    Tensor<T>& Y = stage.layer->mutable_output();
    if (stage.activation == Activation::relu) {
      // Element-wise, the same index read and written; unless the layer applied it already.
      if (!stage.layer_applies_activation) backend_->activation_forward(stage.activation, Y, Y);
    } else if (stage.activation != Activation::identity) {
      if (!stage.Z.same_shape(Y.rows(), Y.cols())) stage.Z = backend_->allocate(Y.rows(), Y.cols());
      backend_->activation_forward(stage.activation, Y, stage.Z);
    }
    input = &output_of(stage);
  }
  return *input;
}

template <typename T>
void Model<T>::begin_backward(Index rows, Index cols) {
  if (layers_.empty()) throw ConfigError("Model backward: no layers");
  if (!activations_valid_) {
    throw ConfigError("Model backward: no forward since the last backward (backward reuses the activations' buffers)");
  }
  Index out_rows = 0, out_cols = 0;
  if (half()) {
    const HalfTensor& output = half_top_output();
    out_rows = output.rows(), out_cols = output.cols();
  } else {
    const Tensor<T>& output = output_of(layers_.back());
    out_rows = output.rows(), out_cols = output.cols();
  }
  if (rows != out_rows || cols != out_cols) {
    throw ShapeError("Model backward: dY is " + shape_string(rows, cols) + " but the output is " +
                     shape_string(out_rows, out_cols));
  }
  activations_valid_ = false;
}

template <typename T>
void Model<T>::backward(const Loss<T>& loss, BackwardObserver<T>* observer) {
  const HalfTensor* half_gradient = half() ? loss.half_gradient(activation_format_) : nullptr;
  if (half_gradient == nullptr) {
    backward(loss.gradient(), observer);
    return;
  }
  begin_backward(half_gradient->rows(), half_gradient->cols());
  backward_half_layers(leading_view(*half_gradient, half_gradient->rows(), half_gradient->cols()), observer);
}

template <typename T>
void Model<T>::backward(const Tensor<T>& dY, BackwardObserver<T>* observer) {
  begin_backward(dY.rows(), dY.cols());
  if (half()) {
    backward_half(dY, observer);
    return;
  }
  const Tensor<T>* grad = &dY;
  Tensor<T> grad_view;            // the model's own buffer that grad points into, when it does
  const T* grad_storage = nullptr;  // its start, so that dX never lands on it
  for (std::size_t i = layers_.size(); i-- > 0;) {
    Stage& stage = layers_[i];
    Layer<T>& layer = *stage.layer;
    const Tensor<T>& Y = layer.output();  // after in-place ReLU it holds relu(Y): the same derivative
    if (stage.activation != Activation::identity) {
      if (grad_storage != nullptr) {
        backend_->activation_backward(stage.activation, Y, grad_view, grad_view);  // in place
      } else {
        if (!stage.dY.same_shape(Y.rows(), Y.cols())) stage.dY = backend_->allocate(Y.rows(), Y.cols());
        backend_->activation_backward(stage.activation, Y, *grad, stage.dY);
        grad_view = leading_view(stage.dY, Y.rows(), Y.cols());
        grad_storage = stage.dY.data();
        grad = &grad_view;
      }
    }
    if (i == 0) {
      layer.backward(*grad, nullptr);
      if (observer != nullptr) observer->layer_backward_done(i);
      break;
    }
    // dX goes into a buffer nothing reads any more: this layer's Y (its activation's backward is
    // done; the top layer's is the model's output and stays), or else a scratch buffer.
    const Index rows = Y.rows(), cols = layer.in_features();
    auto free_and_fits = [&](const Tensor<T>& buffer) {
      return buffer.size() >= rows * cols && buffer.data() != grad_storage;
    };
    const bool top = i + 1 == layers_.size();
    Tensor<T>* target = nullptr;
    if (!top && free_and_fits(layer.output())) {
      target = &layer.mutable_output();
    } else if (!top && free_and_fits(stage.Z)) {
      target = &stage.Z;
    } else {
      for (Tensor<T>& buffer : scratch_) {
        if (free_and_fits(buffer)) {
          target = &buffer;
          break;
        }
      }
      if (target == nullptr) {  // the first step only, or a larger batch
        scratch_.push_back(backend_->allocate(rows, cols));
        target = &scratch_.back();
      }
    }
    Tensor<T> dX = leading_view(*target, rows, cols);
    layer.backward(*grad, &dX);
    if (observer != nullptr) observer->layer_backward_done(i);
    grad_view = std::move(dX);
    grad_storage = grad_view.data();
    grad = &grad_view;
  }
}

template <typename T>
HostMatrix<T> Model<T>::predict(const HostInput<T>& X) {
  if (!host_input_.same_shape(X.rows(), X.cols())) host_input_ = backend_->allocate(X.rows(), X.cols());
  upload(*backend_, X, host_input_, "Model predict input X");
  return to_host(*backend_, forward(host_input_));
}

template <typename T>
std::vector<Parameter<T>> Model<T>::parameters() {
  std::vector<Parameter<T>> all;
  for (Stage& stage : layers_) {
    for (Parameter<T>& p : stage.layer->parameters(stage.name)) all.push_back(std::move(p));
  }
  return all;
}

template <typename T>
void Model<T>::set_training(bool training) {
  for (Stage& stage : layers_) stage.layer->set_training(training);
}

template <typename T>
void Model<T>::set_batch_offset(Index first_row) {
  for (Stage& stage : layers_) stage.layer->set_batch_offset(first_row);
}

template <typename T>
void Model<T>::set_train_target(TrainTarget target) {
  for (Stage& stage : layers_) stage.layer->set_train_target(target);
}

template <typename T>
void Model<T>::merge() {
  for (Stage& stage : layers_) stage.layer->merge();
}

template <typename T>
void Model<T>::unmerge() {
  for (Stage& stage : layers_) stage.layer->unmerge();
}

template class Model<float>;
template class Model<double>;

}  // namespace relora
