"""Demo: the MoE-Adapter against its dense baselines on a toy heterogeneous mapping.

A stand-in main job until the audio-LLM pipeline lands (encoder -> adapter -> LLM). Sequences of
encoder-like frames come from `n_domains` sources; each source has its own frame statistics and
needs its own map from stacked frames to the LLM width (a low-rank linear map per domain). This
is the setting the MoE-Adapter paper argues for: one shared dense map must serve every domain,
while routed experts can split them. Each adapter is trained with the same loop, budget and data
for several seeds, and evaluated on held-out sequences:

    python train.py                          # defaults below, 3 seeds, about a minute on 2 CPU cores
    python train.py --steps=600 --seeds=5    # any DemoConfig field as --key=value
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import parse_overrides
from moe_adapter import ADAPTER_KINDS, MoEAdapterConfig, build_adapter, count_params


@dataclass
class DemoConfig:
    adapters: str = ",".join(ADAPTER_KINDS)   # comma-separated kinds to compare
    seeds: int = 3
    steps: int = 400
    batch: int = 32                 # sequences per step
    frames: int = 32                # encoder frames per sequence (8 tokens after stacking by 4)
    n_domains: int = 8
    rank: int = 16                  # rank of each domain's target map
    lr: float = 3e-3
    warmup: int = 20                # warm-up-stable-decay schedule, as the paper trains
    decay_frac: float = 0.2         # last 20% of steps decay linearly to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_sequences: int = 1024
    log_every: int = 100
    device: str = "auto"            # auto | cpu | cuda
    n_experts: int = 8              # the adapter: MoEAdapterConfig.tiny() with these overrides
    top_k: int = 2
    d_expert: int = 64
    n_shared: int = 1
    d_shared: int = 256
    balance_weight: float = 1e-2


# ----------------------------------------------------------------------------------------------
# Toy heterogeneous data: a pure function of the seed.


class ToyDomains:
    """Domain c: frames ~ N(mu_c, diag(s_c)^2); target token = W_c . stacked frames (rank r)."""

    def __init__(self, adapter_cfg: MoEAdapterConfig, n_domains: int, rank: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        d, D, O = adapter_cfg.d_in, adapter_cfg.d_token, adapter_cfg.d_out
        self.cfg, self.n_domains = adapter_cfg, n_domains
        self.mu = torch.randn(n_domains, d, generator=g)                     # (C, d)
        self.scale = torch.rand(n_domains, d, generator=g) + 0.5             # (C, d)
        u = torch.randn(n_domains, O, rank, generator=g) / rank ** 0.5
        v = torch.randn(n_domains, rank, D, generator=g) / D ** 0.5
        self.maps = u @ v                                                     # (C, O, D)
        self.target_std = 1.0
        _, target, _ = self.batch(256, 32, g)                                 # fixed normaliser
        self.target_std = target.std().item()

    def batch(self, n: int, frames: int, g: torch.Generator):
        c = torch.randint(0, self.n_domains, (n,), generator=g)              # (B,)
        x = self.mu[c, None] + self.scale[c, None] * torch.randn(n, frames, self.cfg.d_in, generator=g)
        tokens = x.reshape(n, frames // self.cfg.stack, self.cfg.d_token)     # (B, T', D)
        target = torch.einsum("bod,btd->bto", self.maps[c], tokens)           # (B, T', O)
        return x, target / self.target_std, c


# ----------------------------------------------------------------------------------------------
# The training loop, written out.


def lr_at(step: int, cfg: DemoConfig) -> float:
    """Warm-up-stable-decay: linear warm-up, constant, then linear decay to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_start = int(cfg.steps * (1 - cfg.decay_frac))
    if step < decay_start:
        return cfg.lr
    return cfg.lr * (cfg.steps - step) / max(cfg.steps - decay_start, 1)


def train_one(kind: str, seed: int, cfg: DemoConfig, adapter_cfg: MoEAdapterConfig, device) -> dict:
    torch.manual_seed(seed)
    data = ToyDomains(adapter_cfg, cfg.n_domains, cfg.rank, seed)
    model = build_adapter(kind, adapter_cfg).to(device)
    use_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay, fused=use_cuda)
    g = torch.Generator().manual_seed(1000 + seed)                # training stream
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, target, _ = data.batch(cfg.batch, cfg.frames, g)
        x, target = x.to(device), target.to(device)
        with autocast:
            y, aux = model(x)
            task = F.mse_loss(y.float(), target)
            loss = task + aux["loss"]                             # aux is on whenever its weight > 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            dt = (time.perf_counter() - t0) / (step + 1)
            tokens = cfg.batch * cfg.frames // adapter_cfg.stack
            print(f"  {kind:12s} seed {seed} step {step + 1:4d} | mse {task.item():.4f} "
                  f"balance {aux['balance_loss'].item():.3f} lr {lr_at(step, cfg):.2e} "
                  f"grad {grad_norm.item():.2f} | {dt * 1e3:.1f} ms/step {tokens / dt:,.0f} tok/s")
    # Held-out sequences from a stream the training never drew from.
    model.eval()
    x, target, domain = data.batch(cfg.eval_sequences, cfg.frames, torch.Generator().manual_seed(10**6 + seed))
    with torch.no_grad(), autocast:
        y, aux = model(x.to(device))
    mse = F.mse_loss(y.float().cpu(), target).item() / target.var().item()
    return dict(mse=mse, max_load=aux["expert_load"].max().item(), seconds=time.perf_counter() - t0)


def main(argv):
    cfg = DemoConfig()
    cfg = dataclasses.replace(cfg, **parse_overrides(cfg, argv))
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    adapter_cfg = MoEAdapterConfig.tiny(n_experts=cfg.n_experts, top_k=cfg.top_k, d_expert=cfg.d_expert,
                                        n_shared=cfg.n_shared, d_shared=cfg.d_shared,
                                        balance_weight=cfg.balance_weight)
    kinds = cfg.adapters.split(",")
    for kind in kinds:
        if kind not in ADAPTER_KINDS:
            raise SystemExit(f"unknown adapter {kind!r}; allowed: {', '.join(ADAPTER_KINDS)}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"adapter config {dataclasses.asdict(adapter_cfg)}")
    results = {}
    for kind in kinds:
        results[kind] = [train_one(kind, seed, cfg, adapter_cfg, device) for seed in range(cfg.seeds)]

    print(f"\nHeld-out relative MSE (MSE / target variance; lower is better), "
          f"{cfg.seeds} seeds, {cfg.steps} steps:\n")
    print("| adapter | params (total) | params (active) | MFLOPs/token | rel. MSE, mean ± std | max expert load |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        with torch.device("meta"):
            n = count_params(build_adapter(kind, adapter_cfg))
        mses = [r["mse"] for r in results[kind]]
        std = statistics.stdev(mses) if len(mses) > 1 else math.nan
        load = f"{statistics.mean(r['max_load'] for r in results[kind]):.3f}" if kind == "moe" else "–"
        print(f"| {kind} | {n['total']:,} | {n['active']:,} | {n['flops_per_token'] / 1e6:.3f} "
              f"| {statistics.mean(mses):.4f} ± {std:.4f} | {load} |")
    total = sum(r["seconds"] for rs in results.values() for r in rs)
    print(f"\ntotal training time {total:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
