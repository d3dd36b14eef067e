#!/usr/bin/env python3
"""relora <-> PyTorch + PEFT, both directions, with use_rslora false and true, LoRA and DoRA.

The model: nn.Sequential(Linear(16, 32), ReLU(), Linear(32, 32), ReLU(), Linear(32, 8)), LoRA on
modules "0", "2", "4" with r = 4, lora_alpha = 8, and r = 2, lora_alpha = 4 on "4" (rank_pattern,
alpha_pattern), exactly as tools/peft_check/peft_check.cpp builds it; with use_dora=True the same
modules are DoRA layers (relora's DoraLinear), the magnitude saved as
base_model.model.<module>.lora_magnitude_vector, 1-D [out_features].

  relora -> PEFT: relora loads the base weights torch saved, trains its adapters (B != 0), exports
                  them; PeftModel.from_pretrained loads the adapter onto the same base model and
                  its outputs on a fixed input must match relora's.
  PEFT -> relora: PEFT trains an adapter (init_lora_weights=False, then Adam steps), saves it with
                  save_pretrained; relora imports it and its outputs must match PEFT's.

Relative error: max |y_relora - y_peft| / max |y_peft|, required <= 1e-5 for LoRA and <= 1e-6 for
DoRA (issue 14's bound, float on both sides). The adapter's effect,
max |y_peft - y_base| / max |y_base|, is printed too, to show the comparison is not vacuous.
Exits 1 when a comparison fails.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import warnings

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-5
DORA_TOLERANCE = 1e-6
MAGNITUDE_KEYS = {"base_model.model.0.lora_magnitude_vector": (32,), "base_model.model.2.lora_magnitude_vector": (32,),
                  "base_model.model.4.lora_magnitude_vector": (8,)}


def base_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    ).eval()


def relative_error(y, reference):
    return ((y - reference).abs().max() / reference.abs().max()).item()


def run_tool(tool, *args):
    result = subprocess.run([tool, *args], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stdout.write(result.stderr)
        raise SystemExit(f"relora_peft_check {args[0]} failed with exit code {result.returncode}")


def tag(rslora, dora):
    return f"rslora{int(rslora)}_dora{int(dora)}"


def check_magnitudes(saved, dora, who):
    """The DoRA magnitudes are where PEFT puts them, 1-D; a LoRA adapter has none. Returns failures."""
    found = {k: tuple(v.shape) for k, v in saved.items() if "lora_magnitude_vector" in k}
    expected = MAGNITUDE_KEYS if dora else {}
    if found != expected:
        return [f"{who}: magnitude tensors {found}, expected {expected}"]
    return []


def relora_to_peft(tool, work, base, x, y_base, rslora, dora):
    adapter = os.path.join(work, f"relora_adapter_{tag(rslora, dora)}")
    out = os.path.join(work, f"relora_out_export_{tag(rslora, dora)}.safetensors")
    run_tool(tool, "export", os.path.join(work, "base.safetensors"), os.path.join(work, "x.safetensors"), adapter, out,
             "1" if rslora else "0", "1" if dora else "0")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    print(f"  adapter_config.json: r={config['r']} lora_alpha={config['lora_alpha']} "
          f"use_rslora={config['use_rslora']} use_dora={config['use_dora']} target_modules={config['target_modules']} "
          f"rank_pattern={config['rank_pattern']} alpha_pattern={config['alpha_pattern']}")
    failures = check_magnitudes(load_file(os.path.join(adapter, "adapter_model.safetensors")), dora, "relora's export")
    if config["use_dora"] is not dora:
        failures.append(f"relora's export: use_dora is {config['use_dora']!r}, expected {dora}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    for w in caught:
        print(f"  warning from PEFT while loading: {w.category.__name__}: {w.message}")
    scalings = {name: module.scaling["default"] for name, module in model.named_modules()
                if hasattr(module, "scaling") and "default" in getattr(module, "scaling", {})}
    print(f"  PEFT scalings: {scalings}")
    # PEFT built DoRA layers exactly where relora has them, and loaded relora's m into them
    # (load_state_dict is strict about the adapter's keys only through its warnings, so check).
    dora_modules = sorted(name for name, module in model.named_modules()
                          if "default" in getattr(module, "lora_magnitude_vector", {}))
    print(f"  PEFT DoRA modules: {dora_modules}")
    if bool(dora_modules) != dora:
        failures.append(f"relora -> PEFT: PEFT's DoRA modules {dora_modules} with use_dora={dora}")
    if dora:
        saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        for name in dora_modules:
            module_name = name.split("base_model.model.", 1)[-1]
            loaded = model.get_submodule(name).lora_magnitude_vector["default"].weight.detach()
            if not torch.equal(loaded, saved[f"base_model.model.{module_name}.lora_magnitude_vector"]):
                failures.append(f"relora -> PEFT: module {module_name}'s m did not load as saved")
    with torch.no_grad():
        y_peft = model(x)
    y_relora = load_file(out)["y"]
    error = relative_error(y_relora, y_peft)
    effect = relative_error(y_peft, y_base)
    print(f"  relora -> PEFT (use_rslora={rslora}, use_dora={dora}): max relative error {error:.3e}, "
          f"adapter effect {effect:.3e}")
    return error, effect, failures


def peft_to_relora(tool, work, base, x, y_base, rslora, dora):
    adapter = os.path.join(work, f"peft_adapter_{tag(rslora, dora)}")
    out = os.path.join(work, f"relora_out_import_{tag(rslora, dora)}.safetensors")
    # init_lora_weights=False: B starts random (so DoRA's m starts at ||W + s B A||, not ||W||);
    # the Adam steps then move A, B and m.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"], rank_pattern={"4": 2},
                        alpha_pattern={"4": 4}, lora_dropout=0.1, use_rslora=rslora, use_dora=dora,
                        init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), config)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, targets = torch.randn(64, 16), torch.randn(64, 8)
    for _ in range(10):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
    print(f"  PEFT: 10 Adam steps, loss {loss.item():.6f}")
    model.eval()
    with torch.no_grad():
        y_peft = model(x)
    model.save_pretrained(adapter)
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    print(f"  PEFT saved {sorted((k, tuple(v.shape)) for k, v in saved.items())}; max |B| "
          f"{max(v.abs().max().item() for k, v in saved.items() if 'lora_B' in k):.4f}")
    failures = check_magnitudes(saved, dora, "PEFT's save_pretrained")
    run_tool(tool, "import", os.path.join(work, "base.safetensors"), os.path.join(work, "x.safetensors"), adapter, out,
             "1" if rslora else "0", "1" if dora else "0")
    y_relora = load_file(out)["y"]
    error = relative_error(y_relora, y_peft)
    effect = relative_error(y_peft, y_base)
    print(f"  PEFT -> relora (use_rslora={rslora}, use_dora={dora}): max relative error {error:.3e}, "
          f"adapter effect {effect:.3e}")
    return error, effect, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", required=True, help="path to relora_peft_check")
    parser.add_argument("--work", required=True, help="a directory for the files exchanged")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    print(f"torch {torch.__version__}, peft {peft.__version__}")
    torch.set_num_threads(1)  # a plain, deterministic CPU reference

    base = base_model()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, os.path.join(args.work, "base.safetensors"))
    torch.manual_seed(123)
    x = torch.randn(10, 16)
    save_file({"x": x}, os.path.join(args.work, "x.safetensors"))
    with torch.no_grad():
        y_base = base(x)

    failures = []
    count = 0
    for dora in (False, True):
        tolerance = DORA_TOLERANCE if dora else TOLERANCE
        for rslora in (False, True):
            for direction in (relora_to_peft, peft_to_relora):
                what = f"{direction.__name__} use_rslora={rslora} use_dora={dora}"
                print(f"{direction.__name__}, use_rslora={rslora}, use_dora={dora}")
                error, effect, found = direction(args.tool, args.work, base, x, y_base, rslora, dora)
                count += 1
                failures += found
                if not error <= tolerance:
                    failures.append(f"{what}: {error:.3e} > {tolerance:g}")
                if not effect > 1e-3:
                    failures.append(f"{what}: the adapter changes nothing ({effect:.3e})")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"PASSED: all {count} comparisons (LoRA within {TOLERANCE:g}, DoRA within {DORA_TOLERANCE:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
