#pragma once
// Makes every rank's model equal rank `root`'s, for ranks that did not build the same model: rank 0
// loaded the pretrained weights, say, and the others built placeholders. Data-parallel training
// needs no such step when every rank builds its model from the same configs and seeds (the layers
// draw the same numbers everywhere).
//
// Each layer's whole saved state is sent from the root: its tensors (the base W and bias, a 16-bit
// base's bits and fp32 master, the adapter's A and B, DoRA's magnitude m) and its flags and
// random-stream position (ReLoRA's restarts draw the next A from it). The layers' configs, seeds
// included, are not sent: every rank's layer checks the root's state against its own config, as
// a checkpoint's load does. If any rank's layers differ from the root's in number, kind or config,
// every rank throws ConfigError naming that rank and what differs, and no model changes. A
// collective: every rank calls it, before its trainer steps (an optimizer's state is not sent).
#include "relora/distributed/communicator.hpp"
#include "relora/training/model.hpp"

namespace relora {

template <typename T>
void broadcast_parameters(Model<T>& model, Communicator<T>& communicator, int root = 0);

extern template void broadcast_parameters(Model<float>&, Communicator<float>&, int);
extern template void broadcast_parameters(Model<double>&, Communicator<double>&, int);

}  // namespace relora
