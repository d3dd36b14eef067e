#pragma once
// Data-parallel training's part of a step: every rank holds the same model and takes its own rows
// (its shard) of the batch; after the backward, each trainable gradient is replaced by the sum
// over the ranks of the ranks' gradients, each weighted by local_rows / global_rows. For a loss
// that is a mean over the batch's rows (MSE is), that is the gradient of the whole batch's loss,
// so every rank takes the same optimizer step as one process would on the whole batch, and the
// ranks stay identical to the bit (the sum gives every rank the same bits).
//
// One bucket per layer: a buffer on the backend holding all that layer's trainable gradients one
// after another (each at an aligned offset), plus, in the last layer's bucket, one element for the
// loss, so that loss() is the whole batch's on every rank. As Model::backward finishes a layer
// (layer_backward_done), the layer's gradients are copied into its bucket (Backend::copy into
// views of the bucket) and the bucket's all-reduce is issued; on a GPU it then runs while the
// layers below compute their backward. wait() joins the reductions before the optimizer step,
// and the optimizer reads the summed gradients: bind() hands it the parameters with their
// gradients pointing at the views.
//
// Trainer drives this (Trainer's `communicator` argument); nothing here runs without a
// communicator. The buckets are laid out by bind(), whenever what trains changes (Trainer's
// build_optimizer: ReLoRA's warm start ending, a checkpoint resuming); a ReLoRA restart changes
// values only, not what trains, and needs no new layout nor any communication (A is redrawn from
// the same counter-based stream on every rank). A step allocates nothing.
//
// The whole batch's row count is found with an all-reduce when this rank's row count changes
// (set_local_rows), not every step. So every rank's shard must change its row count at the same
// steps (its count may differ from the other ranks'): a split of each batch that gives every rank
// the same share of the rows, or a fixed split, does. Where one rank's count changed and
// another's did not, the ranks issue different collectives: ThreadCommunicator reports it (every
// rank throws CommunicatorError); NCCL would hang.
#include <cstddef>
#include <memory>
#include <vector>

#include "relora/distributed/communicator.hpp"
#include "relora/losses/loss.hpp"
#include "relora/training/model.hpp"

namespace relora {

template <typename T>
class GradientBuckets final : public BackwardObserver<T> {
 public:
  // The communicator's device must be the model's backend's. `loss` is the loss the trainer
  // computes (its value is summed with the last layer's gradients). Both must outlive this.
  GradientBuckets(Model<T>& model, const Loss<T>& loss, std::shared_ptr<Communicator<T>> communicator);

  // Lays the buckets out for the parameters that train now (in layer order, as
  // Model::parameters()) and returns those parameters with `grad` pointing into the buckets,
  // valid until the next bind(). The loss of the last step is kept.
  std::vector<Parameter<T>> bind();

  // This rank's rows of the next step's batch. When it differs from the last step's, an
  // all-reduce (waited for) finds every rank's rows: the whole batch's count, and with it this
  // rank's weight, and this rank's first row in the whole batch (ranks in order), which the
  // model's layers take as their batch offset (their dropout masks are then the whole batch's).
  void set_local_rows(Index rows);

  // Copies layer `layer`'s gradients into its bucket (and, for the last layer, the loss) and
  // issues the bucket's all-reduce. Called by Model::backward.
  void layer_backward_done(std::size_t layer) override;
  // Work issued after this sees the summed gradients (Communicator::wait).
  void wait() { communicator_->wait(); }

  // The whole batch's loss of the last step (waits for the backend).
  T loss();
  Index local_rows() const { return local_rows_; }
  Index global_rows() const { return global_rows_; }
  // This rank's first row in the whole batch: the rows of the ranks before it.
  Index first_row() const { return first_row_; }
  // local_rows / global_rows: the scale this rank's gradients are summed with.
  T weight() const { return weight_; }
  Communicator<T>& communicator() { return *communicator_; }

 private:
  // A layer's trainable gradients, packed.
  struct Bucket {
    Tensor<T> data;                       // count x 1 on the backend (empty: nothing trains)
    std::vector<const Tensor<T>*> grads;  // the layer's gradients, copied in
    std::vector<Tensor<T>> views;         // where each lands in data, shaped as it is
  };

  Model<T>* model_;
  const Loss<T>* loss_;
  std::shared_ptr<Communicator<T>> communicator_;
  std::vector<Bucket> buckets_;  // one per layer
  Tensor<T> loss_view_;          // 1 x 1, the last element of the last layer's bucket
  Tensor<T> rows_;               // 1 x size: every rank's row count, all-reduced
  std::vector<T> counts_;        // its host copy
  Index local_rows_ = 0;
  Index global_rows_ = 0;
  Index first_row_ = 0;
  T weight_ = T(1);
};

extern template class GradientBuckets<float>;
extern template class GradientBuckets<double>;

}  // namespace relora
