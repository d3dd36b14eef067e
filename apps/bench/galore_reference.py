"""PyTorch GaLore-Adam reference for `relora_bench --galore` (apps/bench/galore_cases.cpp).

GaLore's own package is not installable on the device machine, so this is the algorithm of the
paper (Zhao et al. 2024, algorithm 2) as its code runs it, written out as in
shared/anchors/peft_bf16_dora_galore.py: every T steps P (or Q) = the top-r singular vectors of a
weight's gradient from torch.linalg.svd on the GPU in fp32; each step the one-sided projection
R = P^T G (m <= n) or G Q (m > n), Adam's moments and bias correction on R, the update
W -= lr * scale * (P N or N Q^T); biases get plain Adam. fp32, TF32 off. The MLP, the data and the
loss are relora_bench's: n rows, nn.Linear layers with bias, ReLU between them, MSE.

Reported per case, as relora_bench --galore reports them:
  step_ms          a step without an SVD (CUDA events, median of five runs of `iters` steps)
  svd_step_ms      a step that takes new subspaces for every weight
  refresh_ms       the SVDs alone (every weight's gradient, torch.linalg.svd), median of three
  amortised_ms     step + (svd_step - step) / T, at T = --gap (200)
  state_mib        GaLore's optimizer state (moments, P or Q), beside adam_state_mib
  full_adam_ms     torch.optim.Adam (foreach) on the same model

usage: python3 galore_reference.py [--device cuda|cpu] [--cases mlp4x2k,mlp4x4k,llm_mlp]
                                   [--gap 200] [--threads N] [--json FILE]
"""
import argparse, json, time

import torch
import torch.nn as nn

CASES = {
    "mlp4x1k": (1024, [1024] * 5, 64),
    "mlp4x2k": (2048, [2048] * 5, 128),
    "mlp4x4k": (4096, [4096] * 5, 256),
    "llm_mlp": (4096, [4096, 11008, 4096], 256),
}


class MLP(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class GaLoreAdam:
    """One-sided GaLore with Adam on the projected gradient (the paper's algorithm 2)."""

    def __init__(self, params, lr, rank, gap=200, scale=0.25, b1=0.9, b2=0.999, eps=1e-8):
        self.params = list(params)
        self.lr, self.rank, self.gap, self.scale = lr, rank, gap, scale
        self.b1, self.b2, self.eps, self.t = b1, b2, eps, 0
        self.state = {}

    def refresh(self, p):
        """New subspace of p's gradient: the top-r left (m <= n) or right vectors."""
        g = p.grad
        U, S, Vh = torch.linalg.svd(g.float(), full_matrices=False)
        left = g.shape[0] <= g.shape[1]
        self.state[p]["P"] = (U[:, : self.rank] if left else Vh[: self.rank, :].t()).contiguous()

    @torch.no_grad()
    def step(self, force_svd=False):
        self.t += 1
        for p in self.params:
            g = p.grad
            st = self.state.setdefault(p, {})
            if p.dim() == 2:
                left = g.shape[0] <= g.shape[1]
                if force_svd or "P" not in st or (self.t - 1) % self.gap == 0:
                    self.refresh(p)
                P = st["P"]
                R = P.t() @ g if left else g @ P
            else:
                R = g
            if "m" not in st:
                st["m"] = torch.zeros_like(R)
                st["v"] = torch.zeros_like(R)
            st["m"].mul_(self.b1).add_(R, alpha=1 - self.b1)
            st["v"].mul_(self.b2).addcmul_(R, R, value=1 - self.b2)
            m_hat = st["m"] / (1 - self.b1 ** self.t)
            v_hat = st["v"] / (1 - self.b2 ** self.t)
            N = m_hat / (v_hat.sqrt() + self.eps)
            if p.dim() == 2:
                p.add_(P @ N if left else N @ P.t(), alpha=-self.lr * self.scale)
            else:
                p.add_(N, alpha=-self.lr)

    def state_bytes(self):
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values())


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn, iters, device, runs=5):
    """Median over `runs` of the mean time of `iters` calls, in ms."""
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    times.sort()
    return times[len(times) // 2]


def run_case(name, device, gap):
    n, dims, rank = CASES[name]
    torch.manual_seed(0)
    model = MLP(dims).to(device)
    x = torch.randn(n, dims[0], device=device)
    y = torch.randn(n, dims[-1], device=device)

    def forward_backward():
        for p in model.parameters():
            p.grad = None
        nn.functional.mse_loss(model(x), y).backward()

    opt = GaLoreAdam(model.parameters(), lr=1e-3, rank=rank, gap=gap)
    forward_backward()
    opt.step(force_svd=True)
    iters = 20 if device == "cuda" else 3
    step_ms = bench(lambda: (forward_backward(), opt.step()), iters, device)
    svd_step_ms = bench(lambda: (forward_backward(), opt.step(force_svd=True)), 1, device, runs=3)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    refresh_ms = bench(lambda: [opt.refresh(p) for p in matrices], 1, device, runs=3)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=(device == "cuda"))

    def adam_step():
        forward_backward()
        adam.step()

    adam_step()
    full_adam_ms = bench(adam_step, iters, device)
    result = dict(case=name, device=device, rank=rank, gap=gap, step_ms=step_ms, svd_step_ms=svd_step_ms,
                  refresh_ms=refresh_ms, amortised_ms=step_ms + (svd_step_ms - step_ms) / gap,
                  state_mib=opt.state_bytes() / 2**20,
                  adam_state_mib=2 * sum(p.numel() * 4 for p in model.parameters()) / 2**20,
                  full_adam_ms=full_adam_ms)
    print(json.dumps(result), flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--cases", default=None)
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = args.cases.split(",") if args.cases else (
        ["mlp4x2k", "mlp4x4k", "llm_mlp"] if args.device == "cuda" else ["mlp4x1k"])
    results = []
    for name in names:
        results.append(run_case(name, args.device, args.gap))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tool="galore_reference.py", torch=torch.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
