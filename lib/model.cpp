#include "relora/model.hpp"

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

template <typename T>
const Tensor<T>& Model<T>::output_of(Layer& layer) {
  return layer.activation == Activation::identity ? layer.linear->output() : layer.Z;
}

template <typename T>
const Tensor<T>& Model<T>::forward(const Tensor<T>& X) {
  if (layers_.empty()) throw ConfigError("Model forward: no layers");
  const Tensor<T>* input = &X;
  for (Layer& layer : layers_) {
    const Tensor<T>& Y = layer.linear->forward(*input);
    if (layer.activation != Activation::identity) {
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
  const Tensor<T>& output = output_of(layers_.back());
  if (!dY.same_shape(output.rows(), output.cols())) {
    throw ShapeError("Model backward: dY is " + dY.shape() + " but the output is " + output.shape());
  }
  const Tensor<T>* grad = &dY;
  for (std::size_t i = layers_.size(); i-- > 0;) {
    Layer& layer = layers_[i];
    if (layer.activation != Activation::identity) {
      const Tensor<T>& Y = layer.linear->output();
      if (!layer.dY.same_shape(Y.rows(), Y.cols())) layer.dY = backend_->allocate(Y.rows(), Y.cols());
      backend_->activation_backward(layer.activation, Y, *grad, layer.dY);
      grad = &layer.dY;
    }
    layer.linear->backward(*grad, /*need_dX=*/i > 0);
    grad = &layer.linear->dX();
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
