"""PyTorch DDP + PEFT reference for relora_bench --ranks: weak scaling of the same LoRA training step.

The model, data, loss and optimizer are peft_reference.py's: an MLP of nn.Linear layers (ReLU
between them), LoRA on every Linear with r, lora_alpha = 2 r, dropout 0; x and y drawn from
randn; MSE taken in fp32; Adam (foreach, lr 1e-3) on the trainable parameters; a bf16 base is the
whole model cast (model.to(torch.bfloat16)), PEFT keeping the adapters in fp32. Here the PEFT model
is wrapped in DistributedDataParallel, one process per GPU, and every rank trains on its own batch
of the case's n rows (weak scaling: the global batch is n times the world size). DDP sums the
gradients over the ranks in buckets during the backward, as relora's trainer does.

Timing, per rank: warm-up steps, then five runs of `iters` steps, each started together (a
barrier) and timed with CUDA events (perf_counter on the CPU); a rank's time is the median run.
The step's time is the slowest rank's, as in relora_bench --ranks. After the run every rank's
trainable parameters are compared with rank 0's, bit for bit (as integers of the same width).

usage:
  torchrun --standalone --nproc_per_node N apps/bench/ddp_reference.py [--cases mlp4x4k,llm_mlp]
           [--precision fp32|bf16] [--math strict|tf32] [--iters I] [--device cuda|cpu] [--json FILE]
      one world size; rank 0 prints a JSON line per case and writes --json.
  python3 apps/bench/ddp_reference.py --spawn 1,2 [the options above]
      runs torchrun once per process count and prints the weak-scaling table (efficiency =
      t(1) / t(N)); --json then holds every launch's results.
"""
import argparse, json, os, subprocess, sys, tempfile, time

import torch
import torch.distributed as dist
import torch.nn as nn

from peft_reference import MLP  # the model of the single-GPU reference, shared

CASES = [
    ("seed_demo", 200, [10, 5], 4),
    ("layer1k", 1024, [1024, 1024], 16),
    ("layer4k", 4096, [4096, 4096], 16),
    ("mlp4x2k", 2048, [2048] * 5, 16),
    ("mlp4x4k", 4096, [4096] * 5, 64),
    ("llm_mlp", 4096, [4096, 11008, 4096], 16),
]


def bench(fn, iters, warm, device, barrier):
    """peft_reference.py's bench(), each run started after a barrier; returns per-call seconds."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
            barrier()
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / iters / 1e3)
        else:
            barrier()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            ts.append((time.perf_counter() - t) / iters)
    ts.sort()
    return ts[len(ts) // 2], ts[0], ts[-1]


def same_bits_as_rank0(params):
    """Whether every parameter equals rank 0's to the bit, on every rank (a collective)."""
    as_int = {4: torch.int32, 2: torch.int16, 8: torch.int64}
    same = True
    for p in params:
        mine = p.detach().contiguous()
        ref = mine.clone()
        dist.broadcast(ref, 0)
        int_type = as_int[mine.element_size()]
        equal = torch.equal(mine.view(int_type), ref.view(int_type))  # every rank broadcasts every parameter
        same = same and equal
    flag = torch.tensor([1 if same else 0], device=params[0].device, dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def slowest(value, device):
    """The largest of every rank's `value` and the list of them (collectives)."""
    world = dist.get_world_size()
    mine = torch.tensor([value], device=device, dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    values = [float(t.item()) for t in every]
    return max(values), values


def ddp_step_time(n, dims, r, device, iters, dtype, rank, local_rank):
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel as DDP
    where = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)  # the same model on every rank (DDP also broadcasts rank 0's at construction)
    model = MLP(dims).to(where).to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                     target_modules=[f"layers.{i}" for i in range(len(dims) - 1)])
    model = get_peft_model(model, cfg)
    ddp = DDP(model, device_ids=[local_rank] if device == "cuda" else None)
    params = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    gen = torch.Generator(device=where).manual_seed(1 + rank)  # this rank's own batch
    x = torch.randn(n, dims[0], device=where, dtype=dtype, generator=gen)
    y = torch.randn(n, dims[-1], device=where, dtype=dtype, generator=gen)
    lossf = nn.MSELoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = lossf(ddp(x).float(), y.float())
        loss.backward()
        opt.step()

    med, lo, hi = bench(step, iters=iters, warm=5, device=device, barrier=dist.barrier)
    identical = same_bits_as_rank0(params)
    del ddp, model, opt, x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    return med, lo, hi, identical


def run_rank(a):
    """One rank of a torchrun launch: every case, rank 0 reporting."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if a.device == "cuda":
        if local_rank >= torch.cuda.device_count():
            sys.exit(f"ddp_reference: local rank {local_rank} needs GPU {local_rank}, but "
                     f"{torch.cuda.device_count()} are visible")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    tf32 = a.math == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    import peft
    out = {"tool": "ddp_reference", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "peft": peft.__version__, "device": a.device, "math": a.math,
           "world_size": world, "weak_scaling": True,
           "device_name": torch.cuda.get_device_name(local_rank) if a.device == "cuda" else "cpu"}
    names = [c for c in a.cases.split(",") if c]
    unknown = [c for c in names if c not in [k[0] for k in CASES]]
    if unknown:
        sys.exit(f"ddp_reference: unknown case {unknown[0]!r} (cases: {', '.join(k[0] for k in CASES)})")
    res = []
    for name, n, dims, r in CASES:
        if name not in names:
            continue
        for precision in a.precision.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            iters = a.iters or (30 if a.device == "cuda" else (20 if dims[0] <= 1024 else 3))
            med, lo, hi, identical = ddp_step_time(n, dims, r, a.device, iters, dtype, rank, local_rank)
            where = torch.device("cuda", local_rank) if a.device == "cuda" else torch.device("cpu")
            step, per_rank = slowest(med, where)
            row = dict(case=name, device=a.device, math=a.math, mode="peft_ddp", precision=precision, n=n, dims=dims,
                       r=r, ranks=world, global_batch=n * world, step_ms=step * 1e3,
                       rank_step_ms=[t * 1e3 for t in per_rank], min_ms=lo * 1e3, max_ms=hi * 1e3, iters=iters,
                       samples_per_s=n * world / step, bit_identical=identical)
            res.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    out["steps"] = res
    if rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def forwarded(a):
    """The options a --spawn run hands to each torchrun launch."""
    args = ["--cases", a.cases, "--precision", a.precision, "--math", a.math, "--device", a.device]
    if a.iters:
        args += ["--iters", str(a.iters)]
    if a.threads:
        args += ["--threads", str(a.threads)]
    return args


def spawn(a):
    """torchrun for each process count, then the weak-scaling table: t(1) / t(N) per case."""
    counts = [int(c) for c in a.spawn.split(",") if c]
    if len(counts) == 1:
        counts = list(range(1, counts[0] + 1))
    docs = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            path = os.path.join(tmp, f"ddp_{count}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
                   os.path.abspath(__file__), *forwarded(a), "--json", path]
            print("+ " + " ".join(cmd), flush=True)
            rc = subprocess.call(cmd)
            if rc != 0:
                sys.exit(f"ddp_reference --spawn: the launch of {count} processes failed (rc {rc})")
            with open(path) as f:
                docs.append(json.load(f))
    one = {(s["case"], s["precision"]): s["step_ms"] for d in docs for s in d["steps"] if s["ranks"] == 1}
    print(f"{'case':<10} {'precision':<9} {'ranks':>5} {'step ms':>10} {'efficiency':>10} {'samples/s':>12}  identical")
    for d in docs:
        for s in d["steps"]:
            t1 = one.get((s["case"], s["precision"]))
            s["efficiency"] = t1 / s["step_ms"] if t1 else None
            eff = "-" if s["efficiency"] is None else f"{s['efficiency']:.3f}"
            print(f"{s['case']:<10} {s['precision']:<9} {s['ranks']:>5} {s['step_ms']:>10.4g} {eff:>10} "
                  f"{s['samples_per_s']:>12.4g}  {'yes' if s['bit_identical'] else 'NO'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tool": "ddp_reference --spawn", "launches": docs}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="mlp4x4k,llm_mlp")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16, or fp32,bf16: the base model's dtype")
    ap.add_argument("--math", default="strict", choices=["strict", "tf32"])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--iters", type=int, default=0, help="steps per timed run (0: 30 on cuda)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--spawn", default="", help="N (1..N) or a list 1,2: torchrun once per process count")
    a = ap.parse_args()
    if a.spawn:
        spawn(a)
    elif "RANK" not in os.environ:
        sys.exit("ddp_reference: start it with torchrun (or use --spawn N); RANK is not set")
    else:
        run_rank(a)


if __name__ == "__main__":
    sys.exit(main())
