"""Measured speed and memory of the adapters, side by side with what users would pick instead.

    python bench.py --targets     # only the configurations behind the `targets:` line (< 3 min, 2 CPU cores)
    python bench.py               # the full tables (MoE sweeps, Soft-MoA vs Dense-MoA, training steps)

Timing on a shared, noisy machine: every variant of a comparison runs in the same rounds, in an
order that alternates every round (forward, then reversed), after warm-up. A comparison is reported
as the median of the same-round (paired) ratios, next to the ratio of the medians and the spread
(25th-75th percentile) of the paired ratios. CUDA is synchronised around each call, CPU never.

Work is counted as useful FLOPs: 2 x multiply-accumulates of the matrices a token really passes
through (the router and its k experts for an MoE, not the masked work of a naive MoE), times 3 for
forward + backward. Achieved GFLOP/s is printed next to the machine's measured peak: a large
square matmul in the same run. Memory: on CUDA the peak allocated bytes of one forward+backward; on
CPU (where torch keeps no allocator statistics) the bytes the forward saves for the backward.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_adapter import DenseAdapter, MoEAdapter, MoEAdapterConfig, count_params
from soft_moa import DenseMoA, SingleAdapter, SoftMoA, macs_per_token


# ----------------------------------------------------------------------------------------------
# Measurement


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_paired(fns: dict, device, rounds: int, warmup: int = 2) -> dict:
    """Seconds per call of each fn, over `rounds` rounds; the order alternates every round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, a: str, b: str) -> dict:
    """time(a) / time(b): paired median, ratio of medians, and the paired ratios' IQR."""
    paired = sorted(x / y for x, y in zip(times[a], times[b]))
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return dict(paired=statistics.median(paired), of_medians=statistics.median(times[a]) / statistics.median(times[b]),
                lo=q[0], hi=q[2])


def fmt_ratio(r: dict) -> str:
    return f"{r['paired']:.2f}x (of medians {r['of_medians']:.2f}x, IQR {r['lo']:.2f}-{r['hi']:.2f})"


def peak_matmul_gflops(device, dtype=torch.float32, n: int = 2048, rounds: int = 5) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = time_paired({"mm": lambda: a @ b}, device, rounds)["mm"]
    return 2 * n ** 3 / statistics.median(t) / 1e9


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward during fn() (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def memory_mb(step, device) -> float:
    """Peak allocated MB of one call on CUDA; on CPU the activations saved for the backward."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return saved_bytes(lambda: step(backward=False)) / 2 ** 20


def fwd_bwd(module, x, mask=None, grad=None):
    """A call that runs forward (+ backward with a fixed output gradient and the aux loss)."""

    def step(backward=True):
        y, aux = module(x, mask)
        if backward:
            loss = (y * grad).sum()
            if "loss" in aux and aux["loss"].requires_grad:
                loss = loss + aux["loss"]
            loss.backward()
            for p in module.parameters():
                p.grad = None
        return y

    return step


# ----------------------------------------------------------------------------------------------
# What users would pick instead


class NaiveMoE(nn.Module):
    """Every expert on every token, masked by the gates: the same function as `adapter`, E/k x the work."""

    def __init__(self, adapter: MoEAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, x, mask=None):
        a = self.adapter
        h = a.norm_in(x.reshape(-1, a.cfg.d_token))                          # (N, D)
        logits, probs, gate, index = a._route(h)                             # (N, E), (N, k)
        dense_gate = torch.zeros_like(probs).scatter(1, index, gate)          # (N, E), 0 off the top-k
        y = sum(dense_gate[:, e:e + 1].to(h.dtype) * a.experts[e](h) for e in range(a.cfg.n_experts))
        if a.shared is not None:
            y = y + a.shared(h)
        return a.norm_out(y).reshape(x.shape[0], -1, a.cfg.d_out), {}


class MixtralPeer(nn.Module):
    """Hugging Face transformers' Mixtral sparse-MoE block (SwiGLU experts), as most users have it."""

    def __init__(self, d: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=d, intermediate_size=hidden, num_local_experts=n_experts,
                            num_experts_per_tok=top_k)
        self.block = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            for p in self.block.parameters():
                p.normal_(0, d ** -0.5)
        self.flops_per_token = 2 * (d * n_experts + top_k * 3 * d * hidden)

    def forward(self, x, mask=None):
        return self.block(x), {}


def moe_cfg(d=512, n_experts=8, top_k=2, d_expert=1024):
    """The bench configuration: d-wide tokens in and out, routed experts only (no shared expert),
    so the compute-matched dense hidden is k * d_expert."""
    return MoEAdapterConfig(d_in=d, d_out=d, stack=1, n_experts=n_experts, top_k=top_k,
                            d_expert=d_expert, n_shared=0)


# ----------------------------------------------------------------------------------------------
# Comparisons


def compare_moe(tokens, n_experts, top_k, device, rounds, d=512, d_expert=1024, naive=True, peer=False):
    """MoE-Adapter vs compute-matched dense (hidden k*d_expert) vs naive MoE (vs HF Mixtral)."""
    torch.manual_seed(0)
    cfg = moe_cfg(d, n_experts, top_k, d_expert)
    moe = MoEAdapter(cfg).to(device)
    models = {"moe": moe, "dense": DenseAdapter(d, top_k * d_expert, d).to(device)}
    if naive:
        models["naive"] = NaiveMoE(moe)
    if peer:
        models["hf-mixtral"] = MixtralPeer(d, d_expert, n_experts, top_k).to(device)
    B = max(tokens // 1024, 1)
    x = torch.randn(B, tokens // B, d, device=device)
    grad = torch.randn(B, tokens // B, d, device=device)
    steps = {k: fwd_bwd(m, x, None, grad) for k, m in models.items()}
    times = time_paired(steps, device, rounds)
    flops = {k: 3 * tokens * (m.flops_per_token if isinstance(m, MixtralPeer)
                              else count_params(m.adapter if isinstance(m, NaiveMoE) else m)["flops_per_token"])
             for k, m in models.items()}
    out = dict(times=times, flops=flops,
               gflops={k: flops[k] / statistics.median(times[k]) / 1e9 for k in models})
    out["mem"] = {k: memory_mb(s, device) for k, s in steps.items()}
    return out


def compare_moa(n_experts, device, rounds, d=768, r=64, b=8, m=600, slots=1):
    """Soft-MoA vs Dense-MoA vs one adapter, forward + backward, up-projections made non-zero."""
    torch.manual_seed(0)
    models = {"soft": SoftMoA(d, n_experts, slots, r), "dense": DenseMoA(d, n_experts, r),
              "single": SingleAdapter(d, r)}
    for mod in models.values():
        mod.to(device)
        with torch.no_grad():
            for name, p in mod.named_parameters():
                if ".up." in name or name.startswith("adapter.up"):
                    p.normal_(0, 0.02)
    x = torch.randn(b, m, d, device=device)
    grad = torch.randn(b, m, d, device=device)
    steps = {k: fwd_bwd(mod, x, None, grad) for k, mod in models.items()}
    times = time_paired(steps, device, rounds)
    return dict(times=times, mem={k: memory_mb(s, device) for k, s in steps.items()})


def compare_ast(device, rounds, frames=1024, batch=1, preset="base", n_experts=7, r=0):
    """A whole AST forward + backward (frozen backbone, trainable parts as the paper trains them)
    with no adapter, one adapter, Dense-MoA and Soft-MoA in Pfeiffer placement beside MHSA."""
    import soft_moa
    from encoder import AST, ASTConfig
    variants = {"none": dict(placement="none"), "single": dict(placement="pfeiffer", adapter_kind="single"),
                "dense": dict(placement="pfeiffer", adapter_kind="dense"),
                "soft": dict(placement="pfeiffer", adapter_kind="soft")}
    x = torch.randn(batch, frames, 128, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for name, kw in variants.items():
        torch.manual_seed(0)
        cfg = getattr(ASTConfig, preset)(max_length=frames, n_classes=10, n_experts=n_experts, r=r, **kw)
        model = AST(cfg).to(device)
        soft_moa.mark_trainable(model)

        def step(model=model):
            loss = F.cross_entropy(model(x).logits, labels)
            loss.backward()
            for p in model.parameters():
                p.grad = None
        steps[name] = step
    return time_paired(steps, device, rounds, warmup=1)


def denormal_penalty(device, rounds=5) -> float:
    """Time of a matmul whose operand is all subnormal over the same matmul on normal values."""
    a = torch.randn(8, 600, 768, device=device)
    tiny = torch.full((8, 16, 600), torch.finfo(torch.float32).tiny / 4, device=device)   # subnormal
    normal = torch.full((8, 16, 600), 1e-3, device=device)
    t = time_paired({"sub": lambda: torch.bmm(tiny, a), "normal": lambda: torch.bmm(normal, a)}, device, rounds)
    return ratio(t, "sub", "normal")["paired"]


def training_steps(device, rounds):
    """One optimiser step (forward, backward, AdamW) of each adapter at its tiny size."""
    from moe_adapter import build_adapter, ADAPTER_KINDS
    from soft_moa import build_mixture
    torch.manual_seed(0)
    cfg = MoEAdapterConfig.tiny()
    x_moe = torch.randn(32, 32, cfg.d_in, device=device)                    # 32 clips x 8 tokens
    x_moa = torch.randn(8, 100, 192, device=device)                          # a scaled-down AST
    runs = {}
    for kind in ADAPTER_KINDS:
        runs[kind] = (build_adapter(kind, cfg).to(device), x_moe)
    for kind in ("single", "dense", "soft"):
        runs[f"moa-{kind}"] = (build_mixture(kind, d=192, r=8, n_experts=7).to(device), x_moa)
    steps = {}
    for name, (model, x) in runs.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, x=x, opt=opt):
            y, aux = model(x)
            loss = y.float().pow(2).mean() + (aux["loss"] if "loss" in aux else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps[name] = step
    return time_paired(steps, device, rounds)


# ----------------------------------------------------------------------------------------------
# Reports


def header(device):
    threads = torch.get_num_threads()
    hw = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    cpu_model = ""
    if device.type == "cpu" and os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    print(f"device {device} ({cpu_model or hw}), torch {torch.__version__}, {threads} threads, "
          f"python {platform.python_version()}")


def run_targets(device, rounds):
    peak = peak_matmul_gflops(device)
    print(f"peak fp32 matmul (2048^3): {peak:.1f} GFLOP/s")
    have_hf = importlib.util.find_spec("transformers") is not None
    res = compare_moe(16384, 8, 2, device, rounds, naive=True, peer=have_hf)
    t = res["times"]
    print("\nMoE-Adapter, 16k tokens, width 512, 8 experts top-2, expert hidden 1024, fp32 fwd+bwd:")
    for k in t:
        print(f"  {k:11s} {statistics.median(t[k]) * 1e3:8.1f} ms  {res['gflops'][k]:7.1f} useful GFLOP/s "
              f"({res['gflops'][k] / peak:.0%} of peak)  {res['mem'][k]:7.1f} MB")
    r1 = ratio(t, "moe", "dense")
    r2 = ratio(t, "naive", "moe")
    print(f"  moe / dense      {fmt_ratio(r1)}")
    print(f"  naive / moe      {fmt_ratio(r2)}")
    if have_hf:
        # Useful GFLOP/s ratio = (F_moe / F_hf) * paired time ratio t_hf / t_moe.
        r3 = ratio(t, "hf-mixtral", "moe")
        f = res["flops"]["moe"] / res["flops"]["hf-mixtral"]
        g_ratio = f * r3["paired"]
        print(f"  moe / hf-mixtral useful GFLOP/s {g_ratio:.2f}x (of medians {f * r3['of_medians']:.2f}x, "
              f"IQR {f * r3['lo']:.2f}-{f * r3['hi']:.2f})")
    moa = compare_moa(16, device, rounds)
    r4 = ratio(moa["times"], "soft", "dense")
    print("\nSoft-MoA vs Dense-MoA, 16 adapters (p=1), d 768, r 64, 8 x 600 tokens, fp32 fwd+bwd:")
    for k, v in moa["times"].items():
        print(f"  {k:11s} {statistics.median(v) * 1e3:8.1f} ms  {moa['mem'][k]:7.1f} MB")
    print(f"  soft / dense     {fmt_ratio(r4)}")
    print(f"\ndenormal penalty of this machine (bmm on subnormal / normal operands): {denormal_penalty(device):.2f}x")
    hf = f"{g_ratio:.2f}x (>= 1.2)" if have_hf else "n/a (transformers not installed)"
    print(f"\ntargets: moe/dense {r1['paired']:.2f}x (<= 1.10) | naive/moe {r2['paired']:.2f}x (>= 3.5) | "
          f"moe/hf-mixtral GFLOP/s {hf} | soft/dense {r4['paired']:.2f}x (<= 0.3)")


def run_full(device, rounds):
    peak = peak_matmul_gflops(device)
    print(f"peak fp32 matmul (2048^3): {peak:.1f} GFLOP/s")
    small = device.type == "cpu"
    print("\n### MoE-Adapter vs compute-matched dense vs naive (width 512, expert hidden 1024, fp32 fwd+bwd)\n")
    print("| tokens | E | k | moe ms | dense ms | naive ms | moe/dense | naive/moe | moe GFLOP/s (% peak) | MB moe / dense / naive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    grid = [(t, 8, 2) for t in ((1024, 4096, 16384) if small else (1024, 4096, 16384, 65536))]
    grid += [(16384, e, 2) for e in (4, 16, 32, 64)] + [(16384, 8, k) for k in (1, 4)]
    for tokens, E, k in grid:
        naive = E / k <= 8                                 # bounded: the naive MoE does E/k x the work
        res = compare_moe(tokens, E, k, device, rounds, naive=naive)
        t, g, mem = res["times"], res["gflops"], res["mem"]
        med = {n: statistics.median(v) * 1e3 for n, v in t.items()}
        nv = f"{med['naive']:.1f}" if naive else "–"
        nr = f"{ratio(t, 'naive', 'moe')['paired']:.2f}x" if naive else "–"
        nm = f"{mem['naive']:.0f}" if naive else "–"
        print(f"| {tokens} | {E} | {k} | {med['moe']:.1f} | {med['dense']:.1f} | {nv} | "
              f"{ratio(t, 'moe', 'dense')['paired']:.2f}x | {nr} | {g['moe']:.0f} ({g['moe'] / peak:.0%}) | "
              f"{mem['moe']:.0f} / {mem['dense']:.0f} / {nm} |")

    print("\n### Soft-MoA vs Dense-MoA vs one adapter as adapters grow (d 768, r 64, p 1, 8 x 600 tokens, fwd+bwd)\n")
    print("| adapters | soft ms | dense ms | single ms | soft/dense | MACs/token soft / dense | MB soft / dense |")
    print("|---|---|---|---|---|---|---|")
    for n in (2, 4, 8, 16, 32):
        res = compare_moa(n, device, rounds)
        t = res["times"]
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        macs = (macs_per_token("soft", 768, 64, n, 1, 600), macs_per_token("dense", 768, 64, n))
        print(f"| {n} | {med['soft']:.1f} | {med['dense']:.1f} | {med['single']:.1f} | "
              f"{ratio(t, 'soft', 'dense')['paired']:.2f}x | {macs[0] / 1e3:.0f}k / {macs[1] / 1e3:.0f}k | "
              f"{res['mem']['soft']:.0f} / {res['mem']['dense']:.0f} |")

    res = compare_moa(7, device, rounds, r=6, b=1, m=1214)
    t = res["times"]
    med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    print(f"| 7, paper's r 6, 1 x 1214 tokens | {med['soft']:.1f} | {med['dense']:.1f} | {med['single']:.1f} | "
          f"{ratio(t, 'soft', 'dense')['paired']:.2f}x | {macs_per_token('soft', 768, 6, 7, 1, 1214) / 1e3:.0f}k / "
          f"{macs_per_token('dense', 768, 6, 7) / 1e3:.0f}k | {res['mem']['soft']:.0f} / {res['mem']['dense']:.0f} |")

    print("\n### A whole AST-Base forward+backward, 1 clip of 10 s (1214 tokens), frozen backbone, Pfeiffer at MHSA\n")
    t = compare_ast(device, max(rounds - 2, 5))
    print("| adapter (N=7, r=6) | ms/step | vs no adapter | soft / dense |")
    print("|---|---|---|---|")
    for name, v in t.items():
        extra = f"{ratio(t, 'soft', 'dense')['paired']:.2f}x" if name == "soft" else ""
        print(f"| {name} | {statistics.median(v) * 1e3:.0f} | {ratio(t, name, 'none')['paired']:.2f}x | {extra} |")

    print("\n### One training step (forward, backward, AdamW) of each tiny configuration\n")
    t = training_steps(device, rounds)
    print("| adapter | ms/step |")
    print("|---|---|")
    for name, v in t.items():
        print(f"| {name} | {statistics.median(v) * 1e3:.2f} |")
    print(f"\ndenormal penalty of this machine (bmm on subnormal / normal operands): {denormal_penalty(device):.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", action="store_true", help="only the configurations behind the targets line")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison (default 7 CPU, 20 CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (20 if device.type == "cuda" else 7)
    header(device)
    t0 = time.perf_counter()
    (run_targets if args.targets else run_full)(device, rounds)
    print(f"\nbench wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
