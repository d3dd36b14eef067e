#include "relora/distributed/distributed_checkpoint.hpp"

#include <exception>

#include "distributed/rank_agreement.hpp"
#include "relora/io/checkpoint.hpp"

namespace relora {
namespace {

template <typename T>
void require_trainers_group(Trainer<T>& trainer, Communicator<T>& communicator, const char* what) {
  Communicator<T>* own = trainer.communicator();
  if (own != nullptr && own != &communicator) {
    throw ConfigError(std::string(what) + ": the communicator given is not the trainer's");
  }
}

}  // namespace

template <typename T>
void save_checkpoint(const std::string& path, Trainer<T>& trainer, Communicator<T>& communicator) {
  require_trainers_group(trainer, communicator, "save_checkpoint");
  std::string failure;
  std::exception_ptr own;
  if (communicator.rank() == 0) {
    try {
      save_checkpoint(path, trainer);
    } catch (const std::exception& e) {
      failure = e.what();
      own = std::current_exception();
    }
  }
  // Also the barrier: no rank has the sum before rank 0 gives its part, once the file is in place.
  const RankFailure failed = agree_on_failure(communicator, trainer.model().backend(), failure);
  if (own) std::rethrow_exception(own);
  if (failed) {
    throw IoError(path + ": rank " + std::to_string(failed.rank) + " could not write the checkpoint: " +
                  failed.message);
  }
}

template <typename T>
void load_checkpoint(const std::string& path, Trainer<T>& trainer, Communicator<T>& communicator) {
  require_trainers_group(trainer, communicator, "load_checkpoint");
  // A load either succeeds or leaves the trainer as it was; a rank that loaded while another
  // could not puts this snapshot back.
  const std::vector<std::uint8_t> snapshot = serialize_checkpoint(trainer);
  std::string failure;
  std::exception_ptr own;
  try {
    load_checkpoint(path, trainer);
  } catch (const std::exception& e) {
    failure = e.what();
    own = std::current_exception();
  }
  const RankFailure failed = agree_on_failure(communicator, trainer.model().backend(), failure);
  if (!failed) return;
  if (own) std::rethrow_exception(own);
  load_checkpoint_from_bytes(snapshot.data(), snapshot.size(), trainer, "the state before loading " + path);
  throw IoError(path + ": rank " + std::to_string(failed.rank) + " could not load the checkpoint: " + failed.message);
}

template void save_checkpoint(const std::string&, Trainer<float>&, Communicator<float>&);
template void save_checkpoint(const std::string&, Trainer<double>&, Communicator<double>&);
template void load_checkpoint(const std::string&, Trainer<float>&, Communicator<float>&);
template void load_checkpoint(const std::string&, Trainer<double>&, Communicator<double>&);

}  // namespace relora
