#pragma once
// A stack of LoraLinear layers, each followed by an activation. Forward runs the stack; backward
// passes dX down from layer to layer, and the first layer computes none.
//
// Memory, as PyTorch frees what backward no longer needs: ReLU runs in place (a hidden layer's
// output() holds relu(Y); ReLU's derivative is the same taken from y or relu(y)); activation
// backward runs in place in the model's own gradient buffers; and each layer's dX is written into
// a buffer that backward no longer needs (the layer's own Y, once its activation's backward has
// read it) or a scratch buffer of the model. So after backward the hidden layers' output() and
// dX() are scratch, and a second backward needs a new forward first.
#include <memory>
#include <string>
#include <vector>

#include "relora/layers/lora_linear.hpp"

namespace relora {

template <typename T>
class Model {
 public:
  explicit Model(std::shared_ptr<Backend<T>> backend);

  // Appends a layer; `name` is its module name (PEFT keys, checkpoints), "layers.<i>" if empty.
  // Its in_features must equal the previous layer's out_features.
  LoraLinear<T>& add(const LoraConfig& config, Activation activation, const HostInput<T>& W,
                     const std::string& name = "");
  LoraLinear<T>& add(const LoraConfig& config, Activation activation, const HostInput<T>& W,
                     const Eigen::Ref<const HostVector<T>>& b, const std::string& name = "");
  // Base weight (and bias) drawn as nn.Linear does, from config.seed.
  LoraLinear<T>& add(const LoraConfig& config, Activation activation, const std::string& name = "");

  // The output of the last activation (n x out_features of the last layer).
  const Tensor<T>& forward(const Tensor<T>& X);
  // forward(X), and the MSE against target (see MseLoss) in the same pass where the last layer
  // can fuse it (LoraLinear::forward_with_mse; its activation must be the identity): true, with
  // the loss and its gradient dY written. False: forward alone ran, dY and loss untouched.
  bool forward_with_mse(const Tensor<T>& X, const Tensor<T>& target, Tensor<T>& dY, Tensor<T>& loss);
  // The output of the last forward.
  const Tensor<T>& output();
  // dY: gradient of the loss with respect to forward's output.
  void backward(const Tensor<T>& dY);

  // Convenience for host data: upload, forward, download.
  HostMatrix<T> predict(const HostInput<T>& X);

  // Every parameter that trains now, in layer order.
  std::vector<Parameter<T>> parameters();

  void set_training(bool training);
  void set_train_target(TrainTarget target);
  void merge();
  void unmerge();

  std::size_t size() const { return layers_.size(); }
  LoraLinear<T>& layer(std::size_t i) { return *layers_.at(i).linear; }
  const LoraLinear<T>& layer(std::size_t i) const { return *layers_.at(i).linear; }
  const std::string& name(std::size_t i) const { return layers_.at(i).name; }
  Activation activation(std::size_t i) const { return layers_.at(i).activation; }
  Index in_features() const;
  Index out_features() const;
  Backend<T>& backend() { return *backend_; }
  const std::shared_ptr<Backend<T>>& backend_ptr() const { return backend_; }

 private:
  struct Layer {
    std::unique_ptr<LoraLinear<T>> linear;
    Activation activation;
    std::string name;
    Tensor<T> Z;   // activation output for tanh and GELU; identity and ReLU leave it in Y
    Tensor<T> dY;  // gradient at the pre-activation output, when the incoming one is not ours
  };
  LoraLinear<T>& append(std::unique_ptr<LoraLinear<T>> linear, Activation activation, const std::string& name);
  const Tensor<T>& output_of(Layer& layer);
  // Runs the first `count` layers and their activations; returns the last one's output (X if none).
  const Tensor<T>& forward_layers(const Tensor<T>& X, std::size_t count);

  std::shared_ptr<Backend<T>> backend_;
  std::vector<Layer> layers_;
  std::vector<Tensor<T>> scratch_;  // dX buffers where no dead output fits, sized on the first backward
  bool activations_valid_ = false;  // forward ran since the last backward
  Tensor<T> host_input_;  // predict()'s upload buffer
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace relora
