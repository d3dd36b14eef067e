#include "relora/distributed/gradient_buckets.hpp"

#include <algorithm>
#include <cmath>

namespace relora {
namespace {

// Each gradient starts at a multiple of 256 bytes in its bucket, the alignment of a fresh
// allocation on either backend, so that a kernel reading a view sees what it would on a tensor.
template <typename T>
constexpr Index kAlignElements = Index(256 / sizeof(T));

template <typename T>
Index aligned(Index offset) {
  return (offset + kAlignElements<T> - 1) / kAlignElements<T> * kAlignElements<T>;
}

// A non-owning rows x cols view of `bucket` from element `offset` on (no allocation).
template <typename T>
Tensor<T> view_of(Tensor<T>& bucket, Index offset, Index rows, Index cols) {
  return Tensor<T>(bucket.data() + offset, rows, cols, bucket.device(), [](T*) {});
}

}  // namespace

template <typename T>
GradientBuckets<T>::GradientBuckets(Model<T>& model, const Loss<T>& loss, std::shared_ptr<Communicator<T>> communicator)
    : model_(&model), loss_(&loss), communicator_(std::move(communicator)) {
  if (!communicator_) throw ConfigError("GradientBuckets: no communicator given");
  if (communicator_->device() != model.backend().device()) {
    throw ConfigError(std::string("GradientBuckets: the communicator ('") + communicator_->kind() + "') works on " +
                      device_name(communicator_->device()) + " buffers but the model's backend is " +
                      device_name(model.backend().device()));
  }
  rows_ = model.backend().allocate(1, communicator_->size());
  counts_.assign(std::size_t(communicator_->size()), T(0));
}

template <typename T>
std::vector<Parameter<T>> GradientBuckets<T>::bind() {
  if (model_->size() == 0) throw ConfigError("GradientBuckets: the model has no layers");
  Backend<T>& backend = model_->backend();
  // The old layout's loss, kept for loss() until the next step (a copy on the backend: no wait).
  Tensor<T> last_loss;
  if (!loss_view_.empty()) {
    last_loss = backend.allocate(1, 1);
    backend.copy(loss_view_, last_loss);
  }
  buckets_.clear();
  loss_view_ = Tensor<T>();
  buckets_.resize(model_->size());
  std::vector<Parameter<T>> bound;
  for (std::size_t i = 0; i < model_->size(); ++i) {
    const std::vector<Parameter<T>> params = model_->layer(i).parameters(model_->name(i));
    std::vector<Index> offsets;
    Index count = 0;
    for (const Parameter<T>& p : params) {
      if (p.value == nullptr || p.grad == nullptr) {
        throw ConfigError("GradientBuckets: parameter '" + p.name + "' has no " + (p.value ? "gradient" : "value"));
      }
      count = aligned<T>(count);
      offsets.push_back(count);
      count += p.value->size();
    }
    const bool last = i + 1 == model_->size();
    const Index loss_offset = count;
    if (last) ++count;
    Bucket& bucket = buckets_[i];
    if (count == 0) continue;
    bucket.data = backend.allocate(count, 1);
    backend.fill(bucket.data, T(0));  // the padding between gradients is summed too: zeros stay zeros
    bucket.views.reserve(params.size());  // the parameters handed out point at the views: they must not move
    for (std::size_t j = 0; j < params.size(); ++j) {
      const Parameter<T>& p = params[j];
      bucket.views.push_back(view_of(bucket.data, offsets[j], p.value->rows(), p.value->cols()));
      bucket.grads.push_back(p.grad);
      Parameter<T> reduced = p;
      reduced.grad = &bucket.views.back();
      bound.push_back(std::move(reduced));
    }
    if (last) loss_view_ = view_of(bucket.data, loss_offset, 1, 1);
  }
  if (!last_loss.empty()) backend.copy(last_loss, loss_view_);
  return bound;
}

template <typename T>
void GradientBuckets<T>::set_local_rows(Index rows) {
  if (rows == local_rows_) return;
  if (rows < 1) {
    throw ShapeError("GradientBuckets: rank " + std::to_string(communicator_->rank()) + "'s shard has " +
                     std::to_string(rows) + " rows; every rank needs at least one");
  }
  // Every rank's count, each at its rank's place (the others add zeros): the sum is the whole
  // batch's rows, and the counts of the ranks before this one give its first row.
  Backend<T>& backend = model_->backend();
  const int rank = communicator_->rank();
  std::fill(counts_.begin(), counts_.end(), T(0));
  counts_[std::size_t(rank)] = T(rows);
  backend.upload(counts_.data(), rows_);
  communicator_->all_reduce_sum(rows_.data(), rows_.size(), T(1));
  communicator_->wait();
  backend.download(rows_, counts_.data());
  // Row counts are whole numbers, exact in T up to 2^24 rows (float).
  double global = 0, before = 0;
  for (std::size_t r = 0; r < counts_.size(); ++r) {
    const double count = double(counts_[r]);
    if (!(count >= 1) || count != std::floor(count) || count > double(Index(1) << 52)) {
      throw CommunicatorError("GradientBuckets: rank " + std::to_string(r) + "'s row count reads " +
                              std::to_string(count) + " at rank " + std::to_string(rank) +
                              " (every rank needs at least one row)");
    }
    global += count;
    if (int(r) < rank) before += count;
  }
  if (double(counts_[std::size_t(rank)]) != double(rows)) {
    throw CommunicatorError("GradientBuckets: rank " + std::to_string(rank) + " has " + std::to_string(rows) +
                            " rows but the summed counts give it " + std::to_string(double(counts_[std::size_t(rank)])));
  }
  local_rows_ = rows;
  global_rows_ = Index(global);
  first_row_ = Index(before);
  weight_ = T(rows) / T(global);
  model_->set_batch_offset(first_row_);
}

template <typename T>
void GradientBuckets<T>::layer_backward_done(std::size_t layer) {
  if (buckets_.size() != model_->size() || layer >= buckets_.size()) {
    throw ConfigError("GradientBuckets: layer " + std::to_string(layer) + " finished its backward but the buckets are "
                      "laid out for " + std::to_string(buckets_.size()) + " layers of the model's " +
                      std::to_string(model_->size()) + "; bind() after changing the model");
  }
  if (local_rows_ == 0) throw ConfigError("GradientBuckets: set_local_rows() was not called before the backward");
  Backend<T>& backend = model_->backend();
  Bucket& bucket = buckets_[layer];
  for (std::size_t j = 0; j < bucket.grads.size(); ++j) backend.copy(*bucket.grads[j], bucket.views[j]);
  if (layer + 1 == buckets_.size()) backend.copy(loss_->value_tensor(), loss_view_);
  if (!bucket.data.empty()) communicator_->all_reduce_sum(bucket.data.data(), bucket.data.size(), weight_);
}

template <typename T>
T GradientBuckets<T>::loss() {
  if (loss_view_.empty()) return T(0);
  T value = T(0);
  model_->backend().download(loss_view_, &value);
  return value;
}

template class GradientBuckets<float>;
template class GradientBuckets<double>;

}  // namespace relora
