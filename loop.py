"""The training loop and process plumbing shared by train.py and train_moa.py.

Contents, top to bottom:
    Ctx, make_ctx .......... device, autocast and (under torchrun) the process group
    global_sum, barrier .... the two collectives the stages need
    save_atomic, write_json, load, check_same_config, finished_run
                             atomic checkpoints, and reusing a finished stage or run
    split_args, run_script . the command line both scripts share; running eval.py / eval_moa.py
    Schedule, lr_at, batch_indices, fit
                             the training loop, written out once for every stage of both scripts

This file imports neither training script, and they never import the evaluation scripts: they
run them in a new process (run_script). Notation in shape comments: G global batch (over all
processes).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# Devices, processes, checkpoints


@dataclass
class Ctx:
    device: torch.device
    rank: int = 0
    world: int = 1
    autocast: Callable = nullcontext

    @property
    def main(self) -> bool:
        return self.rank == 0


def make_ctx(device: str, dtype: str) -> Ctx:
    """Device, autocast and (under torchrun) the process group: gloo on CPU, nccl on CUDA.
    device: auto | cpu | cuda; dtype: auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16."""
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device=cuda but torch sees no CUDA device")
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if world > 1:
        rank = dist.get_rank()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = dtype == "bf16" or (dtype == "auto" and cuda)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    return Ctx(dev, rank, world, autocast)


def global_sum(x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    """Sum of a (no-grad) tensor over the processes; itself in a single process."""
    if ctx.world > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
    return x


def barrier(ctx: Ctx) -> None:
    if ctx.world > 1:
        dist.barrier()


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load(path: str):
    return torch.load(path, map_location="cpu", weights_only=False)


def check_same_config(path: str, want: dict, what: str, have: Optional[dict] = None) -> None:
    """A finished stage (or a partial one, on --resume) is reused only if it was made with the
    same settings."""
    have = load(path)["stage_config"] if have is None else have
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        changes = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in diff[:6])
        raise SystemExit(f"{path} holds a {what} made with other settings ({changes}); use another "
                         f"--out_dir, or delete it to retrain")


def finished_run(run_dir: str, want: dict, ignore: Sequence[str] = ()) -> Optional[dict]:
    """The summary.json of a finished run in run_dir, or None if it has not finished. A finished
    run is reused only if it was trained with the settings `want` (its summary's "config"), the
    keys in `ignore` aside (what to run and where, not how one run is made)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    keys = [k for k in want if k not in ignore and summary["config"].get(k) != want[k]]
    if keys:
        raise SystemExit(f"{run_dir} was trained with other settings ({', '.join(keys[:6])}); use "
                         f"another --out_dir, or delete it to retrain")
    return summary


# ----------------------------------------------------------------------------------------------
# The command line both training scripts share


def split_args(argv: Sequence[str], commands: Sequence[str], presets: Sequence[str]) -> Tuple[str, str, bool, List[str]]:
    """[COMMAND] [--config=NAME] [--resume] [--key=value ...] -> (command, preset, resume, the
    --key=value rest, for data.parse_overrides). No command: the first of `commands`."""
    argv = list(argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else commands[0]
    if command not in commands:
        raise SystemExit(f"unknown command {command!r}; allowed: {', '.join(commands)}")
    preset, resume, rest = "tiny", False, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            resume = True
        elif a == "--config" and i + 1 < len(argv):
            preset, i = argv[i + 1], i + 1
        elif a.startswith("--config="):
            preset = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if preset not in presets:
        raise SystemExit(f"unknown config {preset!r}; allowed: {', '.join(presets)}")
    return command, preset, resume, rest


def run_script(script: str, *args: str) -> None:
    """Run a script of this folder (eval.py, eval_moa.py) in a new process, so the training
    scripts never import the evaluation ones. It runs as one process: without torchrun's
    variables, or its make_ctx would wait for the other ranks of this run's process group."""
    sys.stdout.flush()                                  # our lines first, then the script's
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    subprocess.run([sys.executable, path, *args], check=True, env=env)


# ----------------------------------------------------------------------------------------------
# The training loop, written out once for every stage of both scripts


@dataclass
class Schedule:
    steps: int
    batch: int                      # global batch G (split evenly over the processes)
    lr: float
    warmup: int = 20
    decay_frac: float = 0.2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    shape: str = "wsd"              # wsd (MoE-Adapter) | cosine (Soft-MoA)
    betas: Tuple[float, float] = (0.9, 0.95)


def lr_at(step: int, s: Schedule) -> float:
    """Warm-up-stable-decay: linear warm-up, constant, then linear decay to 0 (the MoE-Adapter
    paper's WSD); or "cosine": linear warm-up, then half a cosine from lr to 0 (Soft-MoA's)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.shape == "cosine":
        return s.lr * 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(s.steps - s.warmup, 1)))
    decay_start = int(s.steps * (1 - s.decay_frac))
    if step < decay_start:
        return s.lr
    return s.lr * (s.steps - step) / max(s.steps - decay_start, 1)


def batch_indices(step: int, n: int, G: int, seed: int, ctx: Ctx) -> torch.Tensor:
    """This process's share of the global batch of `step`: epochs are seeded permutations of the
    n items (the last incomplete batch dropped), so the order is a pure function of (seed, step),
    the same for any number of processes, and a resumed run continues where it stopped."""
    epoch, k = divmod(step, n // G)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    glob = perm[k * G:(k + 1) * G]                                           # (G,)
    per = G // ctx.world
    return glob[ctx.rank * per:(ctx.rank + 1) * per]


def fit(name: str, model: nn.Module, step_loss: Callable, s: Schedule, ctx: Ctx, run_dir: str,
        resume: bool, seed: int, n_items: Optional[int], state: Callable[[], dict], load_state: Callable[[dict], None],
        validate: Optional[Callable[[], float]] = None, eval_every: int = 0, log_every: int = 50,
        tokens_per_item: float = 1.0, verbose: bool = True, settings: Optional[dict] = None,
        param_groups: Optional[List[dict]] = None) -> dict:
    """Train `model`'s trainable parameters; checkpoints, logs and metrics go to run_dir.

    step_loss(model, step, idx) -> (loss, logged): idx are this process's items of the step's
    global batch (batch_indices over n_items; n_items None: an endless stream, idx are the
    positions 0..G-1 inside the step's global batch); loss must be scaled so that DDP's gradient *average* over the processes is the
    gradient of the global-batch loss (see AdapterStep). state()/load_state(d) save and restore
    what the stage trains. verbose False: no log lines (many short runs). settings: what defines
    the run, kept in last.pt; --resume refuses a last.pt made with other settings. param_groups:
    [{"params", "lr_scale"}] (default: every trainable parameter at scale 1); a group's lr is
    lr_at(step) x its lr_scale. Returns a summary dict.
    """
    groups = param_groups or [dict(params=[p for p in model.parameters() if p.requires_grad], lr_scale=1.0)]
    params = [p for g in groups for p in g["params"]]
    if s.batch % ctx.world:
        raise SystemExit(f"{name}: the global batch {s.batch} must be a multiple of the {ctx.world} processes")
    if n_items is not None and n_items < s.batch:
        raise SystemExit(f"{name}: {n_items} training items are fewer than one batch of {s.batch}")
    opt = torch.optim.AdamW([dict(g) for g in groups], lr=s.lr, betas=s.betas, weight_decay=s.weight_decay,
                            fused=ctx.device.type == "cuda")
    last, metrics_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "metrics.jsonl")
    start, best, best_step, elapsed = 0, math.inf, -1, 0.0
    if resume and os.path.exists(last):
        ck = load(last)
        if settings is not None and ck.get("settings") is not None:      # (older last.pt files hold none)
            check_same_config(last, settings, f"partial {name} run", have=ck["settings"])
        load_state(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, best, best_step, elapsed = ck["step"], ck["best"], ck["best_step"], ck["elapsed"]
        torch.set_rng_state(ck["rng"])
        if ctx.main:
            print(f"{name}: resuming at step {start} from {last}")
            # Steps logged after that checkpoint are trained again: keep one record per step.
            kept = []
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    elif ctx.main:
        os.makedirs(run_dir, exist_ok=True)
        open(metrics_path, "w").close()
    ddp = model
    if ctx.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True)                 # an expert may get no token on a rank

    def checkpoint(step):
        save_atomic(dict(model=state(), optimizer=opt.state_dict(), step=step, best=best,
                         best_step=best_step, elapsed=elapsed, rng=torch.get_rng_state(), settings=settings), last)

    bar = tqdm(range(start, s.steps), desc=name, disable=not ctx.main or not sys.stderr.isatty(), leave=False,
               dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, s)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        model.train()
        idx = batch_indices(step, n_items, s.batch, seed, ctx) if n_items else \
            torch.arange(s.batch).chunk(ctx.world)[ctx.rank]
        loss, logged = step_loss(ddp, step, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        elapsed += time.perf_counter() - t0
        done = step + 1
        record = dict(step=done, lr=lr, grad_norm=float(grad_norm), **logged)
        if validate is not None and (done % eval_every == 0 or done == s.steps):
            if ctx.main:
                record["valid_loss"] = v = validate()
                if v < best:
                    best, best_step = v, done
                    save_atomic(state(), os.path.join(run_dir, "best.pt"))   # a copy, not a reference
            barrier(ctx)
        if ctx.main:
            record["ms_per_step"] = 1e3 * elapsed / done          # elapsed counts every step, resumed too
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if verbose and (done % log_every == 0 or done == s.steps or "valid_loss" in record):
                shown = " ".join(f"{k} {v:.4g}" for k, v in logged.items())
                valid = f" | valid {record['valid_loss']:.4f}" if "valid_loss" in record else ""
                tqdm.write(f"{name} step {done:5d} | {shown} | lr {lr:.2e} grad {float(grad_norm):.2f} "
                           f"| {record['ms_per_step']:.0f} ms/step "
                           f"{s.batch * tokens_per_item / (elapsed / done):,.0f} tok/s{valid}")
            if done % max(eval_every or log_every, 1) == 0 or done == s.steps:
                checkpoint(done)
    bar.close()
    barrier(ctx)
    return dict(steps=s.steps, seconds=elapsed, best_valid=best, best_step=best_step)
