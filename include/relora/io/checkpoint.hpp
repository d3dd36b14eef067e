#pragma once
// Training checkpoints that resume bit for bit: one safetensors file holding everything a Trainer
// will read again, so that N steps straight and k steps + save + load (into a fresh model and
// trainer built with the same configs) + N - k steps give the same losses and weights, bit for bit.
//
// The file is a format, a checksum and one loop over the components: each layer, the optimizer
// and the ReLoRA controller save and check their own state (a StateDict: tensors and fields); the
// checkpoint knows where each one's entries go, not what they mean.
//
// What the file holds:
//   tensors    model.<layer>.<tensor>   each layer's tensors, named as its save_state names them
//                                       (LoRA: weight, bias, lora_A, lora_B)
//              optim.<tensor>           the optimizer's (Adam: <parameter>.m / .v / .step)
//              in the trainer's scalar type (F32 for float, F64 for double), shapes as in memory.
//   metadata   "format": "relora-checkpoint", "version": "2",
//              "state":  JSON: per layer its name, activation, kind ("lora") and fields (LoRA: its
//                        config, merged and training flags, rng stream); the trainer's method and
//                        steps_done; the optimizer's phase (adapter or base), kind ("adam") and
//                        fields (Adam: steps_taken, prune_draws); the schedule's restart steps; the
//                        controller's fields (restarts_done and the config they count with). A
//                        field named "a.b" is member "b" of object "a".
//              "checksum": FNV-1a 64 (16 hex digits) over the data section, then the state JSON.
// Version 1 files (before kinds were saved) are read as LoRA layers and Adam.
//
// Loading checks everything first (format, version, checksum, the state's fields; every layer and
// the controller check their own state: configs against the model's, every tensor present with
// its shape, finite values; no tensor left over) and only then changes the model, the trainer,
// the optimizer and the schedule. The optimizer's state is checked by the optimizer the resumed
// step trains with, as it restores it; if it refuses, everything is put back from a snapshot
// taken before the first change. A rejected file leaves the trainer as it was; every rejection
// throws IoError naming the file and what was wrong.
//
// The configs of the model, the trainer and the schedule are not restored, they are checked (the
// layers' configs and the training method must match, the Adam hyper-parameters may change):
// build the fresh model and trainer as the first run did, then load.
//
// Tensors are read and written through the backend (to_host / upload), so CPU and CUDA models
// write the same file and each can resume the other's.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "relora/training/trainer.hpp"

namespace relora {

inline constexpr const char* kCheckpointFormat = "relora-checkpoint";
// The version this build writes, and the first it reads (version 1 files carry no component kinds:
// their layers are LoRA layers and their optimizer Adam).
inline constexpr const char* kCheckpointVersion = "2";
inline constexpr const char* kCheckpointFirstVersion = "1";

// The file's bytes (what save_checkpoint writes).
template <typename T>
std::vector<std::uint8_t> serialize_checkpoint(Trainer<T>& trainer);

// Writes the whole training state to `path` atomically (a temporary file, fsync, rename): a failed
// save throws IoError and leaves an existing file at `path` intact.
template <typename T>
void save_checkpoint(const std::string& path, Trainer<T>& trainer);

// Restores the state saved by save_checkpoint into `trainer` (and its model, optimizer, schedule
// and controller). Throws IoError, leaving everything untouched, when the file is unreadable,
// truncated, corrupt, of another version or does not fit the model.
template <typename T>
void load_checkpoint(const std::string& path, Trainer<T>& trainer);

// The same from bytes in memory; messages start with `source`.
template <typename T>
void load_checkpoint_from_bytes(const std::uint8_t* data, std::size_t size, Trainer<T>& trainer,
                                const std::string& source = "checkpoint data");

extern template std::vector<std::uint8_t> serialize_checkpoint(Trainer<float>&);
extern template std::vector<std::uint8_t> serialize_checkpoint(Trainer<double>&);
extern template void save_checkpoint(const std::string&, Trainer<float>&);
extern template void save_checkpoint(const std::string&, Trainer<double>&);
extern template void load_checkpoint(const std::string&, Trainer<float>&);
extern template void load_checkpoint(const std::string&, Trainer<double>&);
extern template void load_checkpoint_from_bytes(const std::uint8_t*, std::size_t, Trainer<float>&,
                                                const std::string&);
extern template void load_checkpoint_from_bytes(const std::uint8_t*, std::size_t, Trainer<double>&,
                                                const std::string&);

}  // namespace relora
