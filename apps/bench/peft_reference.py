"""PyTorch + PEFT reference for relora_bench: the same LoRA training step on the same cases.

Method copied from shared/anchors/peft_anchor.py (the script that measured the anchor figures in
shared/anchors/README.md, 2026-11-23), which does not travel to the device machine: one step =
zero_grad, forward, MSE, backward, Adam (foreach) on the trainable parameters; LoRA on every
Linear with r, lora_alpha = 2 r, dropout 0; ReLU between layers; CUDA timed with events over
`iters` steps, five runs, median. Added here: --math tf32, --threads, --cases, peak memory
(torch.cuda.max_memory_allocated from before the model is built, the same scope as relora_bench's
tensor count) and JSON output.

usage: python3 peft_reference.py --device cuda|cpu [--math strict|tf32|strict,tf32] [--threads N]
                                 [--cases a,b] [--modes peft,peft_dora,full] [--json FILE] [--ceilings]
"""
import argparse, json, os, sys, time

import torch
import torch.nn as nn

CASES = [
    ("seed_demo", 200, [10, 5], 4),
    ("layer1k", 1024, [1024, 1024], 16),
    ("layer4k", 4096, [4096, 4096], 16),
    ("mlp4x2k", 2048, [2048] * 5, 16),
    ("mlp4x4k", 4096, [4096] * 5, 64),
    ("llm_mlp", 4096, [4096, 11008, 4096], 16),
]


def bench(fn, iters, warm, device):
    """peft_anchor.py's bench(): warm-up, then 5 runs of `iters` calls; returns per-call seconds."""
    for _ in range(warm):
        fn()
    ts = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(5):
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / iters / 1e3)
    else:
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            ts.append((time.perf_counter() - t) / iters)
    ts.sort()
    return ts[len(ts) // 2], ts[0], ts[-1]


class MLP(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])

    def forward(self, x):
        for i, l in enumerate(self.layers):
            x = l(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def step_time(n, dims, r, device, mode, iters, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    # A bf16 base: the whole model cast, as users do (model.to(torch.bfloat16)); PEFT then keeps
    # its adapters in fp32 (autocast_adapter_dtype), and the loss is taken in fp32.
    model = MLP(dims).to(device).to(dtype)
    if mode in ("peft", "peft_dora"):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, use_dora=mode == "peft_dora",
                         target_modules=[f"layers.{i}" for i in range(len(dims) - 1)])
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    x = torch.randn(n, dims[0], device=device, dtype=dtype)
    y = torch.randn(n, dims[-1], device=device, dtype=dtype)
    lossf = nn.MSELoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(x).float(), y.float())
        loss.backward()
        opt.step()

    med, lo, hi = bench(step, iters=iters, warm=5, device=device)
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    del model, opt, x, y
    return med, lo, hi, peak


def ceilings():
    out = {}
    for name, tf32 in [("fp32", False), ("tf32", True)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(8192, 8192, device="cuda")
        b = torch.randn(8192, 8192, device="cuda")
        t = bench(lambda: a @ b, iters=10, warm=3, device="cuda")[0]
        out[f"gemm_{name}_tflops"] = 2 * 8192 ** 3 / t / 1e12
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--math", default="strict", help="strict, tf32, or strict,tf32 (one after the other)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cases", default="")
    ap.add_argument("--modes", default="peft", help="of peft, peft_dora (LoraConfig(use_dora=True)), full")
    ap.add_argument("--json", default="")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16, or fp32,bf16: the base model's dtype")
    ap.add_argument("--ceilings", action="store_true")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    import peft
    out = {"tool": "peft_reference", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "peft": peft.__version__, "device": a.device, "math": a.math,
           "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"}
    if a.ceilings and a.device == "cuda":
        out.update(ceilings())
    names = [c for c in a.cases.split(",") if c] or [c[0] for c in CASES]
    res = []
    for math, name, n, dims, r in [(m, *c) for m in a.math.split(",") for c in CASES]:
        if name not in names:
            continue
        tf32 = math == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        for mode, precision in [(m, p) for m in a.modes.split(",") for p in a.precision.split(",")]:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            iters = 100 if a.device == "cuda" else (20 if dims[0] <= 1024 else 3)
            med, lo, hi, peak = step_time(n, dims, r, a.device, mode, iters, dtype)
            L = len(dims) - 1
            flops = sum(2 * n * dims[i] * dims[i + 1] for i in range(L))
            res.append(dict(case=name, device=a.device, math=math, mode=mode, precision=precision, n=n, dims=dims, r=r,
                            step_ms=med * 1e3, min_ms=lo * 1e3, max_ms=hi * 1e3, iters=iters,
                            peak_bytes=peak, fwd_gemm_tflops=flops / med / 1e12))
            print(json.dumps(res[-1]), flush=True)
    out["steps"] = res
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "steps"}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
