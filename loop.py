"""What train.py and train_moa.py share: devices and the process group (Ctx), collectives, atomic
checkpoints, reuse of finished stages, the command line, and `fit`, the training loop written out once."""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

import hf
from data import UsageError, load_corpus, parse_overrides


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
    """Device, autocast (auto: bf16 on CUDA, fp32 on CPU) and under torchrun the process group."""
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UsageError("--device=cuda but torch sees no CUDA device; allowed here: auto, cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = dtype == "bf16" or (dtype == "auto" and cuda)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    return Ctx(dev, rank, world, autocast)


def global_sum(x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    """Sum of a (no-grad) tensor over the processes."""
    if ctx.world > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
    return x


def barrier(ctx: Ctx) -> None:
    dist.barrier() if ctx.world > 1 else None


def save_atomic(obj, path: str, save: Callable = torch.save) -> None:
    """save(obj, temp file), then rename: a crash never leaves a half-written checkpoint or JSON."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save(obj, tmp)
    except BaseException as e:              # a full disk, a kill: the file there before stays as it was
        os.path.lexists(tmp) and os.remove(tmp)
        if not isinstance(e, Exception):
            raise
        free = shutil.disk_usage(os.path.dirname(path) or ".").free / 2 ** 20
        raise SystemExit(f"{path}: writing failed ({type(e).__name__}: {str(e)[:200]}; {free:.0f} MiB free there); "
                         f"the previous file is intact: free space, then run again (train: --resume)") from None
    os.replace(tmp, path)


@contextmanager
def out_dir_lock(out_dir: str, ctx: Ctx):
    """Make out_dir and hold out_dir/.lock while the run lives: a second run there is refused, and since the
    kernel drops a dead process's flock, a killed run leaves none stuck."""
    if not ctx.main:
        yield
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise UsageError(f"--out_dir={out_dir}: cannot write there ({e.strerror}); pass a writable folder") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise UsageError(f"--out_dir={out_dir} is in use by a live run (pid {f.read().strip()}); wait for it "
                             f"to end, or pass another --out_dir") from None
        f.truncate(0), f.write(f"{os.getpid()}\n"), f.flush()
        yield


def write_json(obj, path: str) -> None:
    save_atomic(obj, path, lambda o, tmp: Path(tmp).write_text(json.dumps(o, indent=1)))


def read_json(path: str):
    return json.loads(Path(path).read_text())


def load(path: str) -> dict:
    try:                                        # a truncated or foreign file: one error that names it
        if isinstance(ck := torch.load(path, map_location="cpu", weights_only=False), dict):
            return ck
        raise TypeError(f"holds a {type(ck).__name__}, not a dict")
    except Exception as e:
        raise ValueError(f"{path}: not a checkpoint of this project ({type(e).__name__}: {str(e)[:300]})") from None


def check_inputs(cfg, checkpoints: Sequence[str], label: str) -> None:
    """Before any work: --data_dir has a layout data.load_corpus reads, each checkpoint option names a file or
    folder that parses (ours: a .pt; else a Hugging Face folder or weight file). Else one line naming it."""
    opt = f"--data_dir={cfg.data_dir}"
    try:
        cfg.data_dir and load_corpus(cfg.data_dir, label, getattr(cfg, "groups", ""))
        for opt in (f"--{k}={getattr(cfg, k)}" for k in checkpoints if getattr(cfg, k)):
            if not os.path.exists(path := opt.split("=", 1)[1]):
                raise FileNotFoundError("no such file or folder")
            load(path) if path.endswith(".pt") and os.path.isfile(path) else hf.read_checkpoint(path)
    except (ValueError, OSError) as e:
        raise UsageError(f"{opt}: {e}") from None


def check_same_config(path: str, want: dict, what: str, have: Optional[dict] = None) -> None:
    """A finished (or, on --resume, partial) stage is reused only if made with the same settings."""
    have = load(path)["stage_config"] if have is None else have
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        changes = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in diff[:6])
        raise UsageError(f"{path} holds a {what} made with other settings ({changes}); use another "
                         f"--out_dir, or delete it to retrain")


def finished_run(run_dir: str, want: dict) -> Optional[dict]:
    """summary.json of a finished run (None if unfinished), if trained with `want`."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    summary = read_json(path)
    check_same_config(path, want, "finished run", have={k: summary["config"].get(k) for k in want})
    return summary


def split_args(argv: Sequence[str], commands: Sequence[str], presets: dict, cls) -> Tuple[str, str, object, bool]:
    """[COMMAND] [--config=NAME] [--resume] [--key=value ...] -> (command (default the first), preset, cls, resume)."""
    argv = list(argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else commands[0]
    if command not in commands:
        raise UsageError(f"unknown command {command!r}; allowed: {', '.join(commands)}")
    preset = ([a.split("=", 1)[1] for a in argv if a.startswith("--config=")] or ["tiny"])[-1]
    if preset not in presets:
        raise UsageError(f"unknown config {preset!r}; allowed: {', '.join(presets)}")
    base = cls(**presets[preset])
    try:
        rest = [a for a in argv if a != "--resume" and not a.startswith("--config=")]
        return command, preset, dataclasses.replace(base, **parse_overrides(base, rest)), "--resume" in argv
    except ValueError as e:
        raise UsageError(str(e)) from None


def run_script(script: str, *args: str) -> None:
    """Run eval.py / eval_moa.py in a new single process (without torchrun's variables: no process group)."""
    sys.stdout.flush()                                  # our lines first, then the script's
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    subprocess.run([sys.executable, path, *args], check=True, env=env)


@dataclass
class Schedule:
    steps: int
    batch: int                      # global batch (split evenly over the processes)
    lr: float
    warmup: int = 20
    decay_frac: float = 0.2
    weight_decay: float = 0.0
    shape: str = "wsd"              # wsd (MoE-Adapter) | cosine (Soft-MoA)
    betas: Tuple[float, float] = (0.9, 0.95)


def lr_at(step: int, s: Schedule) -> float:
    """Linear warm-up, then constant and a linear decay to 0 (wsd, MoE-Adapter's) or half a cosine (Soft-MoA's)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.shape == "cosine":
        return s.lr * 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(s.steps - s.warmup, 1)))
    decay_start = int(s.steps * (1 - s.decay_frac))
    return s.lr if step < decay_start else s.lr * (s.steps - step) / max(s.steps - decay_start, 1)


def batch_indices(step: int, n: int, G: int, seed: int, ctx: Ctx) -> torch.Tensor:
    """This process's share of `step`'s global batch: seeded permutations per epoch, whatever the world size."""
    epoch, k = divmod(step, n // G)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    per = G // ctx.world
    return perm[k * G:(k + 1) * G][ctx.rank * per:(ctx.rank + 1) * per]           # (G,) -> (G / world,)


def fit(name: str, model: nn.Module, step_loss: Callable, s: Schedule, ctx: Ctx, run_dir: str, resume: bool,
        seed: int, n_items: Optional[int], state: Callable[[], dict], load_state: Callable[[dict], None],
        validate: Optional[Callable[[], float]] = None, eval_every: int = 0, log_every: int = 50,
        tokens_per_item: float = 1.0, verbose: bool = True, settings: Optional[dict] = None,
        param_groups: Optional[List[dict]] = None) -> dict:
    """Train `model`, checkpoints and metrics in run_dir. step_loss(model, step, idx) -> (loss, logged): idx this
    process's items of the global batch (n_items None: positions in it), the loss scaled so that DDP's gradient
    *average* is the global batch's; state() / load_state(d): what the stage trains; param_groups' lr_scale."""
    groups = param_groups or [dict(params=[p for p in model.parameters() if p.requires_grad], lr_scale=1.0)]
    params = [p for g in groups for p in g["params"]]
    if s.batch % ctx.world or (n_items is not None and n_items < s.batch):
        raise UsageError(f"{name}: the global batch {s.batch} must be a multiple of the {ctx.world} processes "
                         f"and at most the {n_items} training items")
    opt = torch.optim.AdamW([dict(g) for g in groups], lr=s.lr, betas=s.betas, weight_decay=s.weight_decay,
                            fused=ctx.device.type == "cuda")
    last, metrics_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "metrics.jsonl")
    start, best, best_step, elapsed, good, stop = 0, math.inf, -1, 0.0, "none yet", []
    if resume and os.path.exists(last):
        ck = load(last)
        if settings is not None:
            check_same_config(last, settings, f"partial {name} run", have=ck["settings"])
        load_state(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, best, best_step, elapsed = ck["step"], ck["best"], ck["best_step"], ck["elapsed"]
        torch.set_rng_state(ck["rng"])
        good = last
        if ctx.main:
            print(f"{name}: resuming at step {start} from {last}")
            kept = [line for line in Path(metrics_path).read_text().splitlines(True)   # later steps: trained again
                    if line.strip() and json.loads(line)["step"] <= start]
            Path(metrics_path).write_text("".join(kept))
    elif ctx.main:
        os.makedirs(run_dir, exist_ok=True)
        open(metrics_path, "w").close()
    ddp = model if ctx.world == 1 else nn.parallel.DistributedDataParallel(   # an expert may get no token on a rank
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, find_unused_parameters=True)
    handlers = {sig: signal.signal(sig, lambda n, f: signal.default_int_handler(n, f) if stop else stop.append(n))
                for sig in (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread()}
    try:                    # SIGTERM / SIGINT: end the step, save last.pt, exit 128 + signal; a 2nd one: at once
        for step in range(start, s.steps):
            t0, lr = time.perf_counter(), lr_at(step, s)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            model.train()
            idx = batch_indices(step, n_items, s.batch, seed, ctx) if n_items else \
                torch.arange(s.batch).chunk(ctx.world)[ctx.rank]
            loss, logged = step_loss(ddp, step, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()   # clipped at norm 1; one host sync a step: the norm, + 0 * loss: non-finite if either is
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0) + 0 * loss.detach())
            if not math.isfinite(grad_norm):              # before the update: no NaN reaches last.pt / best.pt
                raise SystemExit(f"{name}: the loss or gradient norm of step {step + 1} is {grad_norm}; "
                                 f"stopped before the update; the last good checkpoint: {good}")
            opt.step()
            if ctx.world > 1 and float(global_sum(torch.tensor(float(bool(stop)), device=ctx.device), ctx)) and not stop:
                stop.append(signal.SIGTERM)         # one process signalled: every process stops after this step
            elapsed, done = elapsed + (time.perf_counter() - t0), step + 1
            record = dict(step=done, lr=lr, grad_norm=grad_norm, **logged)
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
                    print(f"{name} step {done:5d} | {shown} | lr {lr:.2e} grad {grad_norm:.2f} | "
                          f"{record['ms_per_step']:.0f} ms/step {s.batch * tokens_per_item / (elapsed / done):,.0f} tok/s{valid}")
                if stop or done % max(eval_every or log_every, 1) == 0 or done == s.steps:
                    save_atomic(dict(model=state(), optimizer=opt.state_dict(), step=done, best=best, best_step=best_step,
                                     elapsed=elapsed, rng=torch.get_rng_state(), settings=settings), last)
                    good = last
            if stop:
                print(f"{name}: stopped by signal {stop[0]} after step {done}, saved in {good}; to continue, run the "
                      f"same command with --resume", file=sys.stderr, flush=True)
                raise SystemExit(128 + stop[0])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    barrier(ctx)
    return dict(steps=s.steps, seconds=elapsed, best_valid=best, best_step=best_step)
