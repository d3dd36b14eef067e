#pragma once
// One layer of a Model: a forward, a backward that writes its own gradients, the parameters it
// trains, and its own saved state. LoraLinear is the reference implementation; fast paths are
// sibling implementations of this interface (tested against the reference) that make_lora_linear
// picks from the shapes, so Model, Trainer and the loss hold no special case for any of them.
//
// Every layer here is an adapter on a frozen base: merge() folds the adapter into the base,
// reinit() starts a fresh adapter that leaves the output unchanged. The ReLoRA controller needs
// nothing more of a layer.
#include <cstdint>
#include <string>
#include <vector>

#include "relora/core/backend.hpp"
#include "relora/core/half_tensor.hpp"
#include "relora/core/parameter.hpp"
#include "relora/core/state_dict.hpp"
#include "relora/losses/loss.hpp"

namespace relora {

// What backward computes gradients for: the adapter, or the base weight itself (full fine-tuning,
// and ReLoRA's full-rank warm start). A trainable bias trains in both.
enum class TrainTarget { adapter, base };

template <typename T>
class Layer {
 public:
  virtual ~Layer() = default;

  // The layer's kind as checkpoints name it ("lora"): siblings of one kind share it.
  virtual const char* kind() const = 0;
  // Which implementation of the kind this is ("reference", or a fast path's name).
  virtual const char* implementation() const = 0;
  virtual Index in_features() const = 0;
  virtual Index out_features() const = 0;

  // Y (n x out_features). X must stay alive and unchanged until backward.
  virtual const Tensor<T>& forward(const Tensor<T>& X) = 0;
  // forward(X), then loss.compute(Y, target). A layer that fuses its forward with a loss it knows
  // overrides this; the loss's value and gradient must be what compute() would have written.
  virtual void forward_with_loss(const Tensor<T>& X, Loss<T>& loss, const Tensor<T>& target) {
    loss.compute(forward(X), target);
  }
  // From dY (n x out_features): the gradients of what trains now (overwritten, not accumulated),
  // and dX (n x in_features) when dX is not null; dX may be a view of a buffer the caller reuses.
  // dY is the layer's scratch: a layer may overwrite it (DoraLinear scales it in place instead of
  // keeping an n x d buffer of its own), so its contents are unspecified after backward, and a
  // caller that needs them again keeps a copy. dY and dX must not overlap.
  virtual void backward(const Tensor<T>& dY, Tensor<T>* dX) = 0;

  // Asks the layer to apply `f` to its own output from now on, so that forward leaves f(Y) in
  // output(): true where the layer takes it (it can fold f into the work that writes Y, such as a
  // product's epilogue, instead of a pass of its own over Y), false where the caller applies it.
  // Only an activation the model applies in place (ReLU) can be taken: backward still receives the
  // gradient at f(Y) and the caller applies f's derivative from output(), as it does otherwise.
  virtual bool take_output_activation(Activation) { return false; }

  // The output of the last forward, and its buffer: a Model applies ReLU to it in place (unless
  // the layer took it) and reuses it for a dX once backward no longer needs Y (the next forward
  // rewrites it).
  virtual const Tensor<T>& output() const = 0;
  virtual Tensor<T>& mutable_output() = 0;

  // ---- Activations in 16 bits (Model::set_activation_format). The model hands a layer its input
  // rounded to bf16 or fp16 and keeps the layer's output in that format. For a layer that does not
  // take the format, the model widens the input exactly, runs forward and backward in fp32 and
  // rounds Y (after the activation) and dX to nearest: that is the reference, and a layer that
  // takes the format computes the same within a few of the format's roundings (its fast path may
  // round the adapter's term, and the base's product, before adding them). A, B, their gradients
  // and the loss stay fp32.
  //
  // Asks the layer to read its input and write its output (and dX) in `format` from now on: true
  // where it does, false where the model converts for it. fp32 asks it to go back (the answer is
  // then ignored). A layer that took its output activation applies it in forward_half too.
  virtual bool take_half_activations(BasePrecision format) {
    (void)format;
    return false;
  }
  // Y (n x out_features) from X (n x in_features), both 16-bit in the format taken; X must stay
  // alive and unchanged until backward_half. Called only after take_half_activations said true.
  virtual const HalfTensor& forward_half(const HalfTensor& X) {
    (void)X;
    throw ConfigError(std::string(kind()) + " layer: forward_half without take_half_activations");
  }
  // As backward, from dY in the format taken (the layer's scratch): dX (rounded to the format)
  // when dX is not null.
  virtual void backward_half(const HalfTensor& dY, HalfTensor* dX) {
    (void)dY, (void)dX;
    throw ConfigError(std::string(kind()) + " layer: backward_half without take_half_activations");
  }
  // The output of the last forward_half, and its buffer (the model may apply ReLU to it in place).
  virtual HalfTensor& mutable_half_output() {
    throw ConfigError(std::string(kind()) + " layer: no 16-bit output without take_half_activations");
  }

  // The parameters that train now, named prefix + "." + their own name.
  virtual std::vector<Parameter<T>> parameters(const std::string& prefix) = 0;

  virtual void set_training(bool training) = 0;  // dropout and the like only while training
  // The row of the whole batch that the batches this layer sees start at (0 unless the batch is a
  // data-parallel rank's shard): random draws per row (dropout masks) are those of these rows of
  // the whole batch, so that the ranks together draw what one process on the whole batch would.
  virtual void set_batch_offset(Index first_row) = 0;
  virtual bool training() const = 0;
  virtual void set_train_target(TrainTarget target) = 0;
  virtual TrainTarget train_target() const = 0;

  // Folds the adapter into the base. Refuses (ConfigError naming the layer, the base unchanged)
  // when the folded-in update holds NaN or Inf.
  virtual void merge() = 0;
  // Throws what merge() would refuse with, changing nothing: a caller merging several layers
  // checks them all first, so that a refusal leaves every layer as it was.
  virtual void check_merge() = 0;
  virtual void unmerge() = 0;
  virtual bool merged() const = 0;
  // A fresh adapter that leaves the output unchanged (after a merge the old one lives in the base).
  virtual void reinit() = 0;

  // A recorded step (CUDA graph) replays the same kernels on the same buffers: false when this
  // layer's step would differ from one step to the next in a way a replay cannot follow (a
  // dropout mask drawn per step).
  virtual bool replayable() const = 0;
  // Bits of the layer's state that change what a step runs (train target, training, merged...):
  // a recorded step is replayed only while every layer's signature is the one it was recorded with.
  virtual std::uint32_t step_signature() const = 0;

  // The whole state the layer needs to resume bit for bit (base, adapter, flags, random streams)
  // and the config it was built with (waits for the backend).
  virtual void save_state(StateDict<T>& state) const = 0;
  // Throws IoError naming the entry if `state` cannot be restored into this layer (a config that
  // differs, an entry missing or of another shape, a non-finite value); changes nothing.
  virtual void check_state(const StateDict<T>& state) const = 0;
  // check_state(), then takes the state over.
  virtual void restore_state(const StateDict<T>& state) = 0;
};

}  // namespace relora
