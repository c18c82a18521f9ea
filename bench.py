"""Speed and memory of the adapters beside what users would pick instead, fp32 forward + backward.

    python bench.py [--targets]   # the target comparisons (+ a whole AST unless --targets), the targets line

Method: a comparison's variants run in the same rounds after warm-up, in an order that reverses every
round, CUDA synchronised around each call; a ratio is the median (IQR) of the same-round ratios.
Useful FLOPs: 3 (fwd + bwd) x 2 x the multiply-accumulates a token needs (router + its k experts).
Memory: peak allocated on CUDA, saved for the backward on CPU. Targets (BOUNDS): MoE over a dense of
equal active FLOPs; naive (every expert on every token, E/k = 4x the work) over MoE; our useful GFLOP/s
over HF Mixtral's (out of reach where HF runs at the matmul peak, as on CPU); Soft- over Dense-MoA.
"""
import argparse
import importlib.util
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_adapter import DenseAdapter, MoEAdapter, MoEAdapterConfig, count_params
from soft_moa import DenseMoA, SingleAdapter, SoftMoA, macs_per_token, mark_trainable

TARGET_MOE = dict(tokens=16384, d=512, n_experts=8, top_k=2, d_expert=1024)
TARGET_MOA = dict(n_experts=16, d=768, r=64, b=8, m=600)
PEAK_N = 2048                                          # the peak: one PEAK_N^3 fp32 matmul
BOUNDS = {"moe/dense": "<= 1.10", "naive/moe": ">= 3.5", "moe/hf-mixtral GFLOP/s": ">= 1.2", "soft/dense": "<= 0.3"}


def time_paired(fns: dict, device, rounds: int, warmup: int = 2) -> dict:
    """Milliseconds per call of each fn over `rounds` rounds after `warmup`; the order reverses every round."""
    names, times = list(fns), {name: [] for name in fns}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(-warmup, rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            if r >= 0:
                times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def ratio(times: dict, a: str, b: str, scale: float = 1.0) -> str:
    """scale x time(a) / time(b) of the same rounds: "median (first-third quartile)"."""
    paired = sorted(scale * x / y for x, y in zip(times[a], times[b]))
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return f"{statistics.median(paired):.2f}x ({q[0]:.2f}-{q[2]:.2f})"


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward during fn() (distinct storages)."""
    seen = {}
    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(models: dict, x, device, rounds: int):
    """Paired times of each model's forward + backward on x (a fixed output gradient + aux loss), its MB."""
    grad = torch.randn_like(x)

    def step(module):
        y, aux = module(x)
        ((y * grad).sum() + aux.get("loss", 0)).backward()
        module.zero_grad(set_to_none=True)

    def memory_mb(module):
        if device.type != "cuda":
            return saved_bytes(lambda: module(x)) / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(module)                                   # the allocator's peak needs no sync
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    times = time_paired({k: (lambda m=m: step(m)) for k, m in models.items()}, device, rounds)
    return dict(times=times, mem={k: memory_mb(m) for k, m in models.items()})


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
        self.block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=hidden,
                                                         num_local_experts=n_experts, num_experts_per_tok=top_k))
        for p in self.block.parameters():
            nn.init.normal_(p, 0, d ** -0.5)
        self.flops_per_token = 2 * (d * n_experts + top_k * 3 * d * hidden)   # router + k SwiGLUs

    def forward(self, x, mask=None):
        return self.block(x), {}


def compare_moe(tokens, n_experts, top_k, device, rounds, d=512, d_expert=1024, peer=False):
    """MoE-Adapter (routed experts only) vs dense of hidden k*d_expert vs naive (vs HF Mixtral)."""
    torch.manual_seed(0)
    cfg = MoEAdapterConfig(d_in=d, d_out=d, stack=1, n_experts=n_experts, top_k=top_k, d_expert=d_expert, n_shared=0)
    moe = MoEAdapter(cfg).to(device)
    models = {"moe": moe, "dense": DenseAdapter(d, top_k * d_expert, d).to(device), "naive": NaiveMoE(moe)}
    per_token = {k: count_params(m.adapter if k == "naive" else m)["flops_per_token"] for k, m in models.items()}
    if peer:
        models["hf-mixtral"] = MixtralPeer(d, d_expert, n_experts, top_k).to(device)
        per_token["hf-mixtral"] = models["hf-mixtral"].flops_per_token
    B = max(tokens // 1024, 1)
    res = measure(models, torch.randn(B, tokens // B, d, device=device), device, rounds)
    res["flops"] = {k: 3 * tokens * per_token[k] for k in models}
    res["gflops"] = {k: res["flops"][k] / statistics.median(res["times"][k]) / 1e6 for k in models}
    return res


def compare_moa(n_experts, device, rounds, d=768, r=64, b=8, m=600):
    """Soft-MoA (one slot an adapter) vs Dense-MoA vs one adapter, up-projections made non-zero."""
    torch.manual_seed(0)
    models = {"soft": SoftMoA(d, n_experts, 1, r), "dense": DenseMoA(d, n_experts, r), "single": SingleAdapter(d, r)}
    for name, p in ((n, p) for mod in models.values() for n, p in mod.named_parameters()):
        if ".up." in name or name.startswith("adapter.up"):
            nn.init.normal_(p, 0, 0.02)
    return measure({k: v.to(device) for k, v in models.items()}, torch.randn(b, m, d, device=device), device, rounds)


def compare_ast(device, rounds, frames=1024, preset="base"):
    """Paired times of a whole AST forward + backward, frozen backbone, no / one / Dense / Soft adapter."""
    from encoder import AST, ASTConfig
    x, labels = torch.randn(1, frames, 128, device=device), torch.randint(0, 10, (1,), device=device)  # one clip
    models = {}
    for kind in ("none", "single", "dense", "soft"):
        torch.manual_seed(0)
        kw = dict(placement="none") if kind == "none" else dict(placement="pfeiffer", adapter_kind=kind)
        models[kind] = AST(getattr(ASTConfig, preset)(max_length=frames, n_classes=10, n_experts=7, **kw)).to(device)
        mark_trainable(models[kind])                                          # r = d // 128

    def step(model):
        F.cross_entropy(model(x).logits, labels).backward()
        model.zero_grad(set_to_none=True)
    return time_paired({k: (lambda m=m: step(m)) for k, m in models.items()}, device, rounds, warmup=1)


def table(title, head, rows):
    print(f"\n### {title}\n")
    for row in [head, ["---"] * len(head), *rows]:
        print("| " + " | ".join(row) + " |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", action="store_true", help="skip the whole-AST table")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison (default 7 CPU, 20 CUDA)")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1 or args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--rounds must be >= 1, got {args.rounds}" if args.device != "cuda" else "--device=cuda: no CUDA device")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rounds = args.rounds or (20 if device.type == "cuda" else 7)
    hw = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    if device.type == "cpu" and platform.system() == "Linux":
        hw = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), hw)
    print(f"device {device} ({hw}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}")
    a, b = torch.randn(PEAK_N, PEAK_N, device=device), torch.randn(PEAK_N, PEAK_N, device=device)
    peak = 2 * PEAK_N ** 3 / statistics.median(time_paired({"mm": lambda: a @ b}, device, 5)["mm"]) / 1e6
    print(f"peak fp32 matmul ({PEAK_N}^3): {peak:.1f} GFLOP/s")

    c = TARGET_MOE
    res = compare_moe(**c, device=device, rounds=rounds, peer=importlib.util.find_spec("transformers") is not None)
    t, g = res["times"], res["gflops"]
    table("MoE-Adapter vs dense (same active FLOPs), naive, HF Mixtral: " + ", ".join(f"{k} {v}" for k, v in c.items()),
          ["variant", "ms", "MB", "time / moe", "useful GFLOP/s", "% of peak"],
          ([k, f"{statistics.median(v):.1f}", f"{res['mem'][k]:.1f}", ratio(t, k, "moe"), f"{g[k]:.1f}",
            f"{g[k] / peak:.0%}"] for k, v in t.items()))
    hf = "hf-mixtral" in t and ratio(t, "hf-mixtral", "moe", res["flops"]["moe"] / res["flops"]["hf-mixtral"])
    got = {"moe/dense": ratio(t, "moe", "dense"), "naive/moe": ratio(t, "naive", "moe"),
           "moe/hf-mixtral GFLOP/s": hf or "n/a (transformers not installed)"}   # GFLOP/s moe / hf: time hf / moe

    c = TARGET_MOA
    res = compare_moa(**c, device=device, rounds=rounds)
    t, macs = res["times"], {k: macs_per_token(k, c["d"], c["r"], c["n_experts"], 1, c["m"]) for k in res["times"]}
    table("Soft-MoA (1 slot an adapter) vs Dense-MoA vs one adapter: " + ", ".join(f"{k} {v}" for k, v in c.items()),
          ["variant", "ms", "MB", "time / dense", "MACs/token"],
          ([k, f"{statistics.median(v):.1f}", f"{res['mem'][k]:.1f}", ratio(t, k, "dense"), f"{macs[k] / 1e3:.0f}k"]
           for k, v in t.items()))
    got["soft/dense"] = ratio(t, "soft", "dense")
    if not args.targets:
        t = compare_ast(device, max(rounds - 2, 5))
        table("A whole AST-Base forward+backward, 1 clip of 10 s (1214 tokens), frozen backbone, Pfeiffer at MHSA",
              ["adapter (N=7, r=6)", "ms/step", "vs no adapter"],
              ([k, f"{statistics.median(v):.0f}", ratio(t, k, "none")] for k, v in t.items()))
    print("\ntargets: " + " | ".join(f"{k} {got[k]} ({bound})" for k, bound in BOUNDS.items()))


if __name__ == "__main__":
    main()
