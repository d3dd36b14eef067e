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
// adapter is already in W) or layers that disagree on use_rslora (PEFT has one flag); lora_dropout
// is the first layer's. The base weights are not in the adapter: see save_base_weights.
void export_peft_adapter(const Model<float>& model, const std::string& dir, const PeftExportOptions& options = {});

struct PeftImportResult {
  std::vector<std::string> loaded;  // layers whose A and B were set from the adapter
  std::vector<std::string> zeroed;  // layers the adapter does not target: B = 0, as PEFT leaves them
};

// Reads dir/adapter_config.json and dir/adapter_model.safetensors into the model's adapters.
// Everything is checked before anything changes (IoError naming the file, the module and the
// field; ConfigError for a merged layer): peft_type LORA; no DoRA, lora_bias, fan_in_fan_out or
// bias other than "none"; each targeted layer's r, lora_alpha and use_rslora equal to its
// LoraConfig's; both tensors of every targeted layer present with their shapes; no tensor for a
// module the model does not have or the adapter does not target.
PeftImportResult import_peft_adapter(Model<float>& model, const std::string& dir);

// Sets every layer's W (and b, where the layer has a bias) from `<prefix><module>.weight` (out x in)
// and `<prefix><module>.bias` (out) of a safetensors file, e.g. a PyTorch state_dict saved with
// safetensors.torch.save_file. Other tensors in the file are ignored. All is checked first: a
// missing weight, a shape mismatch, a bias the layer lacks (built with BiasMode::none) or a bias
// missing for a layer that has one throws IoError and changes nothing.
void load_base_weights(Model<float>& model, const std::string& safetensors_path, const std::string& prefix = "");

// The inverse: writes every layer's W (and b) as `<prefix><module>.weight` / `.bias`, F32, with
// __metadata__ {"format": "pt"}, a file torch's safetensors load_file reads as a state_dict. After
// ReLoRA the merged adapters live in W, so export both this and the adapter.
void save_base_weights(const Model<float>& model, const std::string& safetensors_path, const std::string& prefix = "");

}  // namespace relora
