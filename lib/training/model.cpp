#include "relora/training/model.hpp"

namespace relora {

template <typename T>
Model<T>::Model(std::shared_ptr<Backend<T>> backend) : backend_(std::move(backend)) {
  if (!backend_) throw ConfigError("Model: no backend given");
}

template <typename T>
LoraLinear<T>& Model<T>::append(std::unique_ptr<LoraLinear<T>> linear, Activation activation,
                                const std::string& name) {
  if (!layers_.empty() && linear->in_features() != out_features()) {
    throw ShapeError("Model: layer " + std::to_string(layers_.size()) + " takes " +
                     std::to_string(linear->in_features()) + " inputs but the previous layer gives " +
                     std::to_string(out_features()));
  }
  Layer layer;
  layer.linear = std::move(linear);
  layer.activation = activation;
  layer.name = name.empty() ? "layers." + std::to_string(layers_.size()) : name;
  for (const Layer& other : layers_) {
    if (other.name == layer.name) throw ConfigError("Model: two layers named '" + layer.name + "'");
  }
  layers_.push_back(std::move(layer));
  return *layers_.back().linear;
}

template <typename T>
LoraLinear<T>& Model<T>::add(const LoraConfig& config, Activation activation, const HostInput<T>& W,
                             const std::string& name) {
  return append(std::make_unique<LoraLinear<T>>(*backend_, config, W), activation, name);
}

template <typename T>
LoraLinear<T>& Model<T>::add(const LoraConfig& config, Activation activation, const HostInput<T>& W,
                             const Eigen::Ref<const HostVector<T>>& b, const std::string& name) {
  return append(std::make_unique<LoraLinear<T>>(*backend_, config, W, b), activation, name);
}

template <typename T>
LoraLinear<T>& Model<T>::add(const LoraConfig& config, Activation activation, const std::string& name) {
  return append(std::make_unique<LoraLinear<T>>(*backend_, config), activation, name);
}

template <typename T>
Index Model<T>::in_features() const {
  if (layers_.empty()) throw ConfigError("Model: no layers");
  return layers_.front().linear->in_features();
}

template <typename T>
Index Model<T>::out_features() const {
  if (layers_.empty()) throw ConfigError("Model: no layers");
  return layers_.back().linear->out_features();
}

namespace {

bool in_place(Activation f) { return f == Activation::identity || f == Activation::relu; }

// A non-owning rows x cols view of the start of `buffer` (no allocation).
template <typename T>
Tensor<T> view_of(Tensor<T>& buffer, Index rows, Index cols) {
  return Tensor<T>(buffer.data(), rows, cols, buffer.device(), [](T*) {});
}

}  // namespace

template <typename T>
const Tensor<T>& Model<T>::output_of(Layer& layer) {
  return in_place(layer.activation) ? layer.linear->output() : layer.Z;
}

template <typename T>
const Tensor<T>& Model<T>::forward(const Tensor<T>& X) {
  if (layers_.empty()) throw ConfigError("Model forward: no layers");
  const Tensor<T>& output = forward_layers(X, layers_.size());
  activations_valid_ = true;
  return output;
}

template <typename T>
bool Model<T>::forward_with_mse(const Tensor<T>& X, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss) {
  if (layers_.empty()) throw ConfigError("Model forward: no layers");
  Layer& last = layers_.back();
  if (last.activation != Activation::identity) {
    forward(X);
    return false;
  }
  const Tensor<T>& input = forward_layers(X, layers_.size() - 1);
  const bool fused = last.linear->forward_with_mse(input, target, dY, loss);
  activations_valid_ = true;
  return fused;
}

template <typename T>
const Tensor<T>& Model<T>::output() {
  if (layers_.empty()) throw ConfigError("Model output: no layers");
  return output_of(layers_.back());
}

template <typename T>
const Tensor<T>& Model<T>::forward_layers(const Tensor<T>& X, std::size_t count) {
  const Tensor<T>* input = &X;
  for (std::size_t i = 0; i < count; ++i) {
    Layer& layer = layers_[i];
    layer.linear->forward(*input);
    Tensor<T>& Y = layer.linear->mutable_output();
    if (layer.activation == Activation::relu) {
      backend_->activation_forward(layer.activation, Y, Y);  // element-wise, same index read and written
    } else if (layer.activation != Activation::identity) {
      if (!layer.Z.same_shape(Y.rows(), Y.cols())) layer.Z = backend_->allocate(Y.rows(), Y.cols());
      backend_->activation_forward(layer.activation, Y, layer.Z);
    }
    input = &output_of(layer);
  }
  return *input;
}

template <typename T>
void Model<T>::backward(const Tensor<T>& dY) {
  if (layers_.empty()) throw ConfigError("Model backward: no layers");
  if (!activations_valid_) {
    throw ConfigError("Model backward: no forward since the last backward (backward reuses the activations' buffers)");
  }
  const Tensor<T>& output = output_of(layers_.back());
  if (!dY.same_shape(output.rows(), output.cols())) {
    throw ShapeError("Model backward: dY is " + dY.shape() + " but the output is " + output.shape());
  }
  activations_valid_ = false;
  const Tensor<T>* grad = &dY;
  Tensor<T> grad_view;            // the model's own buffer that grad points into, when it does
  const T* grad_storage = nullptr;  // its start, so that dX never lands on it
  for (std::size_t i = layers_.size(); i-- > 0;) {
    Layer& layer = layers_[i];
    LoraLinear<T>& linear = *layer.linear;
    const Tensor<T>& Y = linear.output();  // after in-place ReLU it holds relu(Y): the same derivative
    if (layer.activation != Activation::identity) {
      if (grad_storage != nullptr) {
        backend_->activation_backward(layer.activation, Y, grad_view, grad_view);  // in place
      } else {
        if (!layer.dY.same_shape(Y.rows(), Y.cols())) layer.dY = backend_->allocate(Y.rows(), Y.cols());
        backend_->activation_backward(layer.activation, Y, *grad, layer.dY);
        grad_view = view_of(layer.dY, Y.rows(), Y.cols());
        grad_storage = layer.dY.data();
        grad = &grad_view;
      }
    }
    if (i == 0) {
      linear.backward(*grad, /*need_dX=*/false);
      break;
    }
    // dX goes into a buffer nothing reads any more: this layer's Y (its activation's backward is
    // done; the top layer's is the model's output and stays), or else a scratch buffer.
    const Index rows = Y.rows(), cols = linear.in_features();
    auto free_and_fits = [&](const Tensor<T>& buffer) {
      return buffer.size() >= rows * cols && buffer.data() != grad_storage;
    };
    const bool top = i + 1 == layers_.size();
    Tensor<T>* target = nullptr;
    if (!top && free_and_fits(linear.output())) {
      target = &linear.mutable_output();
    } else if (!top && free_and_fits(layer.Z)) {
      target = &layer.Z;
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
    Tensor<T> dX = view_of(*target, rows, cols);
    linear.backward(*grad, dX);
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
  for (Layer& layer : layers_) {
    for (Parameter<T>& p : layer.linear->trainable_parameters(layer.name)) all.push_back(std::move(p));
  }
  return all;
}

template <typename T>
void Model<T>::set_training(bool training) {
  for (Layer& layer : layers_) layer.linear->set_training(training);
}

template <typename T>
void Model<T>::set_train_target(TrainTarget target) {
  for (Layer& layer : layers_) layer.linear->set_train_target(target);
}

template <typename T>
void Model<T>::merge() {
  for (Layer& layer : layers_) layer.linear->merge();
}

template <typename T>
void Model<T>::unmerge() {
  for (Layer& layer : layers_) layer.linear->unmerge();
}

template class Model<float>;
template class Model<double>;

}  // namespace relora
