#pragma once
// Everything relora offers, in one include.
#include "relora/adam.hpp"
#include "relora/backend.hpp"
#include "relora/errors.hpp"
#include "relora/host_matrix.hpp"
#include "relora/lora_config.hpp"
#include "relora/lora_linear.hpp"
#include "relora/model.hpp"
#include "relora/mse_loss.hpp"
#include "relora/parameter.hpp"
#include "relora/tensor.hpp"
