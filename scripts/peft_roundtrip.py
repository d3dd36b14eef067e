#!/usr/bin/env python3
"""relora <-> PyTorch + PEFT, both directions, with use_rslora false and true.

The model: nn.Sequential(Linear(16, 32), ReLU(), Linear(32, 32), ReLU(), Linear(32, 8)), LoRA on
modules "0", "2", "4" with r = 4, lora_alpha = 8, and r = 2, lora_alpha = 4 on "4" (rank_pattern,
alpha_pattern), exactly as tools/peft_check/peft_check.cpp builds it.

  relora -> PEFT: relora loads the base weights torch saved, trains its adapters (B != 0), exports
                  them; PeftModel.from_pretrained loads the adapter onto the same base model and
                  its outputs on a fixed input must match relora's.
  PEFT -> relora: PEFT trains an adapter (init_lora_weights=False, then Adam steps), saves it with
                  save_pretrained; relora imports it and its outputs must match PEFT's.

Relative error: max |y_relora - y_peft| / max |y_peft|, required <= 1e-5. The adapter's effect,
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


def relora_to_peft(tool, work, base, x, y_base, rslora):
    adapter = os.path.join(work, f"relora_adapter_rslora{int(rslora)}")
    out = os.path.join(work, f"relora_out_export_rslora{int(rslora)}.safetensors")
    run_tool(tool, "export", os.path.join(work, "base.safetensors"), os.path.join(work, "x.safetensors"), adapter, out,
             "1" if rslora else "0")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    print(f"  adapter_config.json: r={config['r']} lora_alpha={config['lora_alpha']} "
          f"use_rslora={config['use_rslora']} target_modules={config['target_modules']} "
          f"rank_pattern={config['rank_pattern']} alpha_pattern={config['alpha_pattern']}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    for w in caught:
        print(f"  warning from PEFT while loading: {w.category.__name__}: {w.message}")
    scalings = {name: module.scaling["default"] for name, module in model.named_modules()
                if hasattr(module, "scaling") and "default" in getattr(module, "scaling", {})}
    print(f"  PEFT scalings: {scalings}")
    with torch.no_grad():
        y_peft = model(x)
    y_relora = load_file(out)["y"]
    error = relative_error(y_relora, y_peft)
    effect = relative_error(y_peft, y_base)
    print(f"  relora -> PEFT (use_rslora={rslora}): max relative error {error:.3e}, adapter effect {effect:.3e}")
    return error, effect


def peft_to_relora(tool, work, base, x, y_base, rslora):
    adapter = os.path.join(work, f"peft_adapter_rslora{int(rslora)}")
    out = os.path.join(work, f"relora_out_import_rslora{int(rslora)}.safetensors")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"], rank_pattern={"4": 2},
                        alpha_pattern={"4": 4}, lora_dropout=0.1, use_rslora=rslora, init_lora_weights=False)
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
    print(f"  PEFT saved {sorted(saved)}; max |B| "
          f"{max(v.abs().max().item() for k, v in saved.items() if 'lora_B' in k):.4f}")
    run_tool(tool, "import", os.path.join(work, "base.safetensors"), os.path.join(work, "x.safetensors"), adapter, out,
             "1" if rslora else "0")
    y_relora = load_file(out)["y"]
    error = relative_error(y_relora, y_peft)
    effect = relative_error(y_peft, y_base)
    print(f"  PEFT -> relora (use_rslora={rslora}): max relative error {error:.3e}, adapter effect {effect:.3e}")
    return error, effect


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
    for rslora in (False, True):
        for direction in (relora_to_peft, peft_to_relora):
            print(f"{direction.__name__}, use_rslora={rslora}")
            error, effect = direction(args.tool, args.work, base, x, y_base, rslora)
            if not error <= TOLERANCE:
                failures.append(f"{direction.__name__} use_rslora={rslora}: {error:.3e} > {TOLERANCE:g}")
            if not effect > 1e-3:
                failures.append(f"{direction.__name__} use_rslora={rslora}: the adapter changes nothing ({effect:.3e})")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"PASSED: all four comparisons within {TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
