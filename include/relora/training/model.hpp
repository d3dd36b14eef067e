#pragma once
// A stack of layers, each followed by an activation. Forward runs the stack; backward passes dX
// down from layer to layer, and the first layer computes none. The model knows layers only
// through the Layer interface; add() builds LoRA layers through make_lora_linear, which picks
// the implementation.
//
// Memory, as PyTorch frees what backward no longer needs: ReLU runs in place (a hidden layer's
// output() holds relu(Y); ReLU's derivative is the same taken from y or relu(y)), by the layer
// itself where it takes it (Layer::take_output_activation: a LoRA layer's product on CUDA applies
// it in its epilogue) and by the model otherwise; activation
// backward runs in place in the model's own gradient buffers; and each layer's dX is written into
// a buffer that backward no longer needs (the layer's own Y, once its activation's backward has
// read it) or a scratch buffer of the model. So after backward the hidden layers' output() and
// dX() are scratch, and a second backward needs a new forward first.
#include <memory>
#include <string>
#include <vector>

#include "relora/layers/layer_factory.hpp"

namespace relora {

class HalfActivationKernels;  // lib/training/half_activation_kernels.hpp

// Told by Model::backward as each layer's backward ends (from the last layer down to the first),
// when that layer's gradients are written and the layers below have not run yet: data-parallel
// training starts the sum of a layer's gradients over the ranks there, so that it overlaps the
// backward of the layers below (GradientBuckets).
template <typename T>
class BackwardObserver {
 public:
  virtual ~BackwardObserver() = default;
  // Layer `layer` (its index in the model) has written its gradients.
  virtual void layer_backward_done(std::size_t layer) = 0;
};

template <typename T>
class Model {
 public:
  // `choice`: the implementation of the LoRA layers add() builds (LayerChoice::reference: every
  // layer is LoraLinear itself).
  explicit Model(std::shared_ptr<Backend<T>> backend, LayerChoice choice = LayerChoice::fastest);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  // Appends any layer; its in_features must equal the previous layer's out_features.
  Layer<T>& add(std::unique_ptr<Layer<T>> layer, Activation activation, const std::string& name = "");
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
  // forward(X), then loss.compute(output, target). Where the last activation is the identity the
  // last layer computes the loss itself (Layer::forward_with_loss), so that a layer that fuses the
  // two can. With 16-bit activations the loss reads the 16-bit output where it can
  // (Loss::compute_half), and output() widens it only when asked. The loss's gradient is then what
  // backward takes.
  void forward_with_loss(const Tensor<T>& X, Loss<T>& loss, const Tensor<T>& target);
  // The output of the last forward.
  const Tensor<T>& output();
  // dY: gradient of the loss with respect to forward's output. The top layer may use dY as scratch
  // (Layer::backward): its contents are unspecified afterwards. `observer`, when given, is told as
  // each layer's backward ends.
  void backward(const Tensor<T>& dY, BackwardObserver<T>* observer = nullptr);
  // backward(loss.gradient(), observer), except that with 16-bit activations a loss that kept a
  // 16-bit gradient (Loss::compute_half) hands it over as it is, neither widened nor rounded again
  // (the same bits backward(dY) would round dY to). The top layer may use it as scratch too.
  void backward(const Loss<T>& loss, BackwardObserver<T>* observer = nullptr);

  // Convenience for host data: upload, forward, download.
  HostMatrix<T> predict(const HostInput<T>& X);

  // Every parameter that trains now, in layer order.
  std::vector<Parameter<T>> parameters();

  // The format the activations travel in between layers: fp32 (the default), or bf16 / fp16 as
  // under PyTorch's autocast, which halves their memory traffic. forward() rounds its input to the
  // format and widens the last output back to fp32 for the loss; backward() rounds the loss's
  // gradient and passes 16-bit gradients down. A layer reads and writes the format itself where it
  // can (Layer::take_half_activations), and the model converts around it where not (the
  // reference). The adapter's parameters, their gradients and the loss stay fp32. Float models
  // only, and only identity and ReLU between layers (ConfigError otherwise, the model unchanged).
  void set_activation_format(BasePrecision format);
  BasePrecision activation_format() const { return activation_format_; }

  void set_training(bool training);
  // Every layer's Layer::set_batch_offset (data-parallel training: this rank's first row).
  void set_batch_offset(Index first_row);
  void set_train_target(TrainTarget target);
  void merge();
  void unmerge();

  std::size_t size() const { return layers_.size(); }
  Layer<T>& layer(std::size_t i) { return *layers_.at(i).layer; }
  const Layer<T>& layer(std::size_t i) const { return *layers_.at(i).layer; }
  // Layer i as a LoRA layer (PEFT adapters, the demo); ConfigError naming it if it is of another kind.
  LoraLinear<T>& lora(std::size_t i);
  const LoraLinear<T>& lora(std::size_t i) const;
  const std::string& name(std::size_t i) const { return layers_.at(i).name; }
  Activation activation(std::size_t i) const { return layers_.at(i).activation; }
  Index in_features() const;
  Index out_features() const;
  Backend<T>& backend() { return *backend_; }
  const std::shared_ptr<Backend<T>>& backend_ptr() const { return backend_; }

 private:
  struct Stage {
    std::unique_ptr<Layer<T>> layer;
    Activation activation;
    bool layer_applies_activation = false;  // the layer took it (Layer::take_output_activation)
    std::string name;
    Tensor<T> Z;   // activation output for tanh and GELU; identity and ReLU leave it in Y
    Tensor<T> dY;  // gradient at the pre-activation output, when the incoming one is not ours
    // 16-bit activations (model_half_activations.cpp): whether the layer takes them itself, and for one
    // that does not, the model's conversions around it.
    bool layer_takes_half = false;
    Tensor<T> wide_input, wide_grad, wide_dX;  // X, dY and dX widened to fp32
    HalfBuffer half_output;                    // the layer's Y rounded
  };
  const Tensor<T>& output_of(Stage& stage);
  // The checks that open a backward from a gradient of rows x cols.
  void begin_backward(Index rows, Index cols);
  // Runs the first `count` layers and their activations; returns the last one's output (X if none).
  const Tensor<T>& forward_layers(const Tensor<T>& X, std::size_t count);

  // The same with 16-bit activations (model_half_activations.cpp).
  bool half() const { return activation_format_ != BasePrecision::fp32; }
  void require_half_activation(Activation f, std::size_t layer) const;
  HalfTensor& half_output_of(Stage& stage);
  // The stack in 16 bits; returns the last layer's 16-bit output, which widen_half_output() widens.
  const HalfTensor& forward_half_layers(const Tensor<T>& X);
  const Tensor<T>& widen_half_output();
  HalfTensor& half_top_output() { return half_output_of(layers_.back()); }
  void backward_half(const Tensor<T>& dY, BackwardObserver<T>* observer);
  // From the 16-bit gradient of the top output (scratch for the layers from here on).
  void backward_half_layers(HalfTensor grad, BackwardObserver<T>* observer);

  std::shared_ptr<Backend<T>> backend_;
  LayerChoice choice_;
  BasePrecision activation_format_ = BasePrecision::fp32;
  std::unique_ptr<HalfActivationKernels> half_kernels_;
  HalfBuffer half_input_;      // forward's X rounded
  Tensor<T> wide_output_;      // the last layer's 16-bit output widened: forward's result
  bool wide_output_current_ = false;  // wide_output_ holds the last forward's output
  HalfBuffer half_top_grad_;   // backward's dY rounded
  std::vector<HalfBuffer> half_scratch_;  // 16-bit dX buffers where no dead output fits
  std::vector<Stage> layers_;
  std::vector<Tensor<T>> scratch_;  // dX buffers where no dead output fits, sized on the first backward
  bool activations_valid_ = false;  // forward ran since the last backward
  Tensor<T> host_input_;  // predict()'s upload buffer
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace relora
