#pragma once
// Adapters in Hugging Face PEFT's format, and base weights from a PyTorch state_dict, so that what
// relora trains loads into PyTorch with PeftModel.from_pretrained and back.
//
// A PEFT LoRA adapter directory holds:
//   adapter_model.safetensors   base_model.model.<module>.lora_A.weight   r x in   (F32)
//                               base_model.model.<module>.lora_B.weight   out x r  (F32)
//                               __metadata__ {"format": "pt"}
//   adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, lora_dropout,
//                               use_rslora, bias "none", base_model_name_or_path, task_type, and
//                               the rest of LoraConfig's fields at PEFT's defaults; rank_pattern and
//                               alpha_pattern carry the layers whose rank or alpha differ from r's.
//
// DoRA (the layers are DoraLinear): adapter_config.json has use_dora true, and the safetensors also
//                               base_model.model.<module>.lora_magnitude_vector  out      (F32)
// the magnitude m, 1-D, under the key PEFT saves it with (LoraModel._get_adapter_state_dict drops
// the ".default.weight" of the live parameter lora_magnitude_vector.default.weight; read in PEFT
// 0.20.0 and its main branch after it). PEFT's forward is the layer's (g = m / ||W + s B A||, row by
// row, the norm detached in training) except that PEFT has no eps: they differ only on rows whose
// norm is below DoraConfig::eps, where PEFT's output is NaN (peft#2049). DoraConfig::gradient and
// eps are relora's own and not in the file. use_dora is one flag for all of PEFT's target modules,
// so one adapter holds LoRA layers or DoRA layers, not both.
//
// <module> is the layer's name in the Model (Model::add's `name`): a PyTorch
// nn.Sequential(Linear, ReLU, Linear) has modules "0" and "2", so name relora's layers so.
// Both sides scale the adapter alike: PEFT adds lora_B(lora_A(x)) * scaling with scaling =
// lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, exactly relora's s (lora_scale).
//
// A layer's rank, alpha and rsLoRA flag are fixed when it is built; importing checks them against
// the adapter's config and explains a mismatch instead of changing them.
#include <string>
#include <vector>

#include "relora/training/model.hpp"

namespace relora {

struct PeftExportOptions {
  std::string base_model_name_or_path;  // adapter_config.json's field; null when empty
};

// Writes dir/adapter_model.safetensors and dir/adapter_config.json (each atomically; `dir` is
// created if missing). Every layer is a target module. Throws ConfigError for a merged layer (its
// adapter is already in W), layers that disagree on use_rslora (PEFT has one flag), a model mixing
// LoRA and DoRA layers (use_dora is one flag too; the message names the first layer of the other
// kind) or a layer of any other kind; lora_dropout is the first layer's. The base weights are not in the adapter: see save_base_weights.
void export_peft_adapter(const Model<float>& model, const std::string& dir, const PeftExportOptions& options = {});

struct PeftImportResult {
  std::vector<std::string> loaded;  // layers whose A and B were set from the adapter
  // Layers the adapter does not target: B = 0 (a DoRA layer is reinit(): B = 0, A re-drawn and
  // m = the row norms of W, so g = 1), so each gives its base output, as the Linear PEFT leaves does.
  std::vector<std::string> zeroed;
};

// Reads dir/adapter_config.json and dir/adapter_model.safetensors into the model's adapters.
// Everything is checked before anything changes (IoError naming the file, the module and the
// field; ConfigError for a merged layer or one neither LoRA nor DoRA): peft_type LORA; no lora_bias,
// fan_in_fan_out or bias other than "none"; every targeted layer a DoraLinear when use_dora is true
// and a LoRA layer when it is false or absent (the message names the module: PEFT's use_dora
// applies to every target module, so a model mixing kinds imports an adapter that targets only
// the layers of its kind); each targeted layer's r, lora_alpha and use_rslora equal to its
// LoraConfig's; A and B (and with use_dora the magnitude, 1-D of out_features) of every targeted
// layer present with their shapes and finite; no tensor for a module the model does not have or
// the adapter does not target, and no magnitude when use_dora is false. A DoRA layer's m is set
// from the file; its eps and gradient mode stay as built.
PeftImportResult import_peft_adapter(Model<float>& model, const std::string& dir);

// Sets every layer's W (and b, where the layer has a bias) from `<prefix><module>.weight` (out x in)
// and `<prefix><module>.bias` (out) of a safetensors file, e.g. a PyTorch state_dict saved with
// safetensors.torch.save_file. Other tensors in the file are ignored. A DoRA layer's m is then set
// to the row norms of W + s B A (in double, rounded to float), as PEFT initialises m from the
// weights it wraps: with B = 0 the layer gives the loaded Linear's output (to rounding). All is checked first: a
// missing weight, a shape mismatch, a bias the layer lacks (built with BiasMode::none) or a bias
// missing for a layer that has one throws IoError and changes nothing.
void load_base_weights(Model<float>& model, const std::string& safetensors_path, const std::string& prefix = "");

// The inverse: writes every layer's (LoRA or DoRA) W (and b) as `<prefix><module>.weight` / `.bias`, F32, with
// __metadata__ {"format": "pt"}, a file torch's safetensors load_file reads as a state_dict. After
// ReLoRA the merged adapters live in W, so export both this and the adapter.
void save_base_weights(const Model<float>& model, const std::string& safetensors_path, const std::string& prefix = "");

}  // namespace relora
