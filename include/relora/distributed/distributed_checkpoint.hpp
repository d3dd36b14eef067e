#pragma once
// Checkpoints of data-parallel training (io/checkpoint.hpp's format, unchanged). Every rank holds
// the same state, so rank 0 alone writes the file, atomically as save_checkpoint does; every rank
// returns only once the file is in place, and if rank 0's write fails every rank throws (IoError
// with rank 0's message). Every rank reads the file to load it: the path must name the same file
// on every rank (a shared file system). A rank that cannot read or load it makes every rank throw
// IoError naming that rank, and every rank's trainer is left as it was (those that had loaded it
// put their state back), so the ranks never part ways. Collectives: every rank must call these
// together, as it calls Trainer::step.
//
//   save_checkpoint(path, trainer, *comm);  // rank 0 writes; all wait and agree
//   load_checkpoint(path, trainer, *comm);  // into trainers built as the first run's were
#include <string>

#include "relora/distributed/communicator.hpp"
#include "relora/training/trainer.hpp"

namespace relora {

// `communicator` is the trainer's (when it has one) or one of the same group.
template <typename T>
void save_checkpoint(const std::string& path, Trainer<T>& trainer, Communicator<T>& communicator);

template <typename T>
void load_checkpoint(const std::string& path, Trainer<T>& trainer, Communicator<T>& communicator);

extern template void save_checkpoint(const std::string&, Trainer<float>&, Communicator<float>&);
extern template void save_checkpoint(const std::string&, Trainer<double>&, Communicator<double>&);
extern template void load_checkpoint(const std::string&, Trainer<float>&, Communicator<float>&);
extern template void load_checkpoint(const std::string&, Trainer<double>&, Communicator<double>&);

}  // namespace relora
