"""Train the two papers' comparisons at a scale that fits the machine.

Part 1: the MoE-Adapter paper's audio language model, the MoE adapter against its dense baselines
(Lei et al., arXiv 2601.02967). Part 2 (`python train.py moa`, at the end of this file): Soft-MoA
fine-tuning of a frozen AST against one adapter and Dense-MoA (Cappellazzo et al., arXiv 2402.00828).

    audio -> log-mel -> Whisper-style encoder (frozen) -> adapter -> decoder LLM (frozen) -> answer

The pipeline, one stage per command, each checkpointed in --out_dir and reused when finished:

    python train.py                        # everything below on the tiny config, then eval.py's table
    python train.py encoder                # 1. masked-spectrogram pre-training of the encoder
    python train.py llm                    # 2. text-only pre-training of the LLM
    python train.py adapter --adapter=moe --seed=0    # 3. one adapter run (encoder and LLM frozen)
    python train.py --config=small --seeds=5          # any TrainConfig field as --key=value
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel (gloo CPU / nccl GPU)
    python train.py moa                    # part 2: the Soft-MoA comparison (see its section)
    python train.py moa-ablate             # part 2: adapters at a fixed budget, slots per adapter

1. The encoder learns without any evaluation label: spans of log-mel frames are replaced by a
   learned vector and the encoder reconstructs them (a masked-acoustic-model objective standing in
   for Whisper's pre-training). `--encoder_checkpoint=PATH` (a Whisper checkpoint that
   encoder.load_whisper_encoder reads, or our own encoder.pt) skips it.
2. The LLM learns on text alone: documents that state a few facts in templated sentences ("the
   emotion is happy. the word is yes.") then ask one task question and answer it, so it learns the
   answer sets and to read the answer off the context. The audio tokens later take the place of
   the facts. `--llm_checkpoint=PATH` (our llm.pt, or a Hugging Face directory with
   tokenizer.json and an "audio_token_id" in its config.json) skips it.
3. Each adapter (`moe`, `dense-flops`, `dense-params`, see moe_adapter.build_adapter) is trained
   on every (clip, task) question of the training split with the next-token loss on the answer plus
   the MoE auxiliary losses, formed over the global batch (Eq. 4 with data parallelism too).

The frozen encoder's outputs are computed once and cached (`cache_features`), so an adapter step
costs only the adapter and the LLM. With --cache_features=false nothing is cached (the paper
config's 30 s windows would not fit): each batch's clips are read, turned into log-mels and
encoded again, in every stage and in eval.py. Each adapter run keeps last.pt (resume), best.pt
(lowest validation loss, a copy), adapter snapshots for eval.py's gradient-conflict analysis,
and metrics.jsonl; eval.py then scores the test split and prints the comparison.

Notation in shape comments: B batch, F mel bins, T mel frames, T' encoder frames, N tokens
(audio tokens after stacking, or text tokens), D LLM width, E experts, V vocabulary, G global batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import encoder as enc
import llm as lm
import soft_moa as sm
from moe_adapter import ADAPTER_KINDS, MoEAdapterConfig, build_adapter, count_params

COMMANDS = ("all", "encoder", "llm", "adapter", "moa", "moa-ablate")
IGNORE_INDEX = lm.IGNORE_INDEX


# ----------------------------------------------------------------------------------------------
# Config: one block of defaults (the tiny config), presets, strict --key=value overrides


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    adapters: str = "moe,dense-flops,dense-params"   # `all`: the kinds to compare
    seeds: int = 3                  # `all`: seeds 0 .. seeds-1 of each kind
    adapter: str = "moe"            # `adapter`: the one kind to train
    seed: int = 0                   # `adapter`: its seed
    device: str = "auto"            # auto | cpu | cuda
    dtype: str = "auto"             # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False           # torch.compile the adapter step's model
    workers: int = 2                # processes rendering / reading audio
    evaluate: bool = True           # `all`: run eval.py on each run and print the comparison
    # data: the synthetic corpus, or a real one (any layout data.py reads)
    data_dir: str = ""
    data_label: str = "event"       # data_dir with one folder per class: what the folders name
    n_clips: int = 4000
    n_speakers: int = 45            # synthetic speakers (a multiple of 9), split by speaker
    domains: str = "all"            # synthetic corpus: "all" four domains, or "speech" alone (a control)
    clip_seconds: float = 1.0       # also the crop of longer real clips
    data_seed: int = 0
    prompt: str = "question"        # "question", or "full": the question + the answer set
    # 1. encoder pre-training (masked log-mel reconstruction)
    encoder_checkpoint: str = ""
    n_mels: int = 80
    enc_d: int = 64
    enc_layers: int = 2
    enc_heads: int = 4
    enc_ff: int = 256
    enc_steps: int = 600
    enc_batch: int = 32
    enc_lr: float = 1e-3
    enc_mask_frac: float = 0.4      # share of mel frames masked, in spans of enc_span frames
    enc_span: int = 6
    # 2. LLM pre-training on templated text
    llm_checkpoint: str = ""
    llm_d: int = 128
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_ff: int = 352
    llm_steps: int = 500
    llm_batch: int = 64
    llm_lr: float = 2e-3
    max_facts: int = 6              # facts stated before the question (1 .. max_facts)
    # 3. adapter (moe_adapter.MoEAdapterConfig fields) and its training
    stack: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 64
    n_shared: int = 1
    d_shared: int = 256
    balance_weight: float = 1e-2
    z_weight: float = 0.0
    # 3a. alignment: the adapter alone (encoder and LLM frozen) learns to caption every label of a clip
    align_steps: int = 300
    align_lr: float = 2e-3
    # 3b. instruction tuning: the adapter and the LLM (full | lora | frozen) on the questions
    tune_llm: str = "full"
    llm_tune_lr: float = 3e-4       # the LLM's own (lower) lr in 3b; the adapter keeps `lr`
    lora_rank: int = 8              # tune_llm=lora: LoRA rank on the LLM's attention projections
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 20                # warm-up-stable-decay, as the paper trains
    decay_frac: float = 0.2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 250           # validation loss (and best.pt) every this many steps
    valid_items: int = 512          # validation questions used for it
    log_every: int = 50
    cache_features: bool = True     # run the frozen encoder once over every clip (false: on every batch)

    def __post_init__(self):
        if self.domains not in ("all", "speech"):
            raise ValueError(f"domains must be all or speech, got {self.domains!r}")
        if self.tune_llm not in ("full", "lora", "frozen"):
            raise ValueError(f"tune_llm must be full, lora or frozen, got {self.tune_llm!r}")
        if self.prompt not in ("question", "full"):
            raise ValueError(f"prompt must be 'question' or 'full', got {self.prompt!r}")
        for kind in self.adapters.split(",") + [self.adapter]:
            if kind not in ADAPTER_KINDS:
                raise ValueError(f"unknown adapter {kind!r}; allowed: {', '.join(ADAPTER_KINDS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        for name in ("seeds", "enc_steps", "enc_batch", "llm_steps", "llm_batch", "steps", "batch",
                     "eval_every", "log_every", "max_facts", "enc_span", "n_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.enc_mask_frac < 1.0:
            raise ValueError(f"enc_mask_frac must be in (0, 1), got {self.enc_mask_frac}")

    # Presets: tiny (the defaults above) for a 2-core CPU; small for one GPU in about half an hour;
    # paper: the published shapes, for users with the real checkpoints.

    @classmethod
    def tiny(cls, **kw) -> "TrainConfig":
        return cls(**kw)

    @classmethod
    def small(cls, **kw) -> "TrainConfig":
        return cls(**{**dict(out_dir="runs/small", n_clips=20000, clip_seconds=2.5, enc_d=256,
                             enc_layers=4, enc_heads=4, enc_ff=1024, enc_steps=4000, enc_batch=64,
                             llm_d=384, llm_layers=6, llm_heads=6, llm_kv_heads=2, llm_ff=1024,
                             llm_steps=6000, llm_batch=128, llm_lr=1e-3, d_expert=256, d_shared=1024,
                             steps=4000, batch=64, lr=1e-3, eval_every=250), **kw})

    @classmethod
    def paper(cls, **kw) -> "TrainConfig":
        """Whisper-large-v3 encoder and Qwen3-1.7B from local checkpoints, the paper's adapter
        (E 8, top-4, experts 1280 wide, one shared expert of 10240). Deviation: the paper's adapter
        takes 2560-wide tokens at 12.5 Hz from a front-end it does not describe; stacking 2 frames
        of large-v3's 1280 gives the same width (so the same 94.4M parameters) at 25 Hz."""
        return cls(**{**dict(out_dir="runs/paper", n_mels=128, clip_seconds=30.0, stack=2,
                             n_experts=8, top_k=4, d_expert=1280, n_shared=1, d_shared=10240,
                             lr=1e-5, warmup=20, batch=16, steps=20000, eval_every=1000,
                             cache_features=False, prompt="full"), **kw})

    def adapter_config(self, d_in: int, d_out: int) -> MoEAdapterConfig:
        return MoEAdapterConfig(d_in=d_in, d_out=d_out, stack=self.stack, n_experts=self.n_experts,
                                top_k=self.top_k, d_expert=self.d_expert, n_shared=self.n_shared,
                                d_shared=self.d_shared, balance_weight=self.balance_weight,
                                z_weight=self.z_weight)


PRESETS = ("tiny", "small", "paper")
# Fields that say what to run and where, not what a run learns: a finished run is reused whatever they are.
# cache_features only says where the same encoder features come from (up to the cache's fp16 log-mels).
RUN_CONTROL = ("out_dir", "adapters", "seeds", "evaluate", "workers", "device", "compile", "cache_features")


def parse_args(argv: Sequence[str]):
    """[COMMAND] [--config=NAME] [--resume] [--key=value ...] -> (command, config, resume): a
    TrainConfig, or for the Soft-MoA commands (moa, moa-ablate) a MoAConfig."""
    argv = list(argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "all"
    if command not in COMMANDS:
        raise SystemExit(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
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
    if preset not in PRESETS:
        raise SystemExit(f"unknown config {preset!r}; allowed: {', '.join(PRESETS)}")
    if command in MOA_COMMANDS:
        return command, parse_moa_args(preset, rest), resume
    base = getattr(TrainConfig, preset)()
    try:
        cfg = dataclasses.replace(base, **data.parse_overrides(base, rest))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if preset == "paper" and not (cfg.encoder_checkpoint and cfg.llm_checkpoint):
        # Its encoder and LLM fields keep the tiny defaults: pre-training them would not give the paper's model.
        raise SystemExit("--config=paper runs on the real checkpoints: pass --encoder_checkpoint=PATH "
                         "(Whisper large-v3) and --llm_checkpoint=DIR (Qwen3-1.7B, a Hugging Face folder "
                         "with tokenizer.json)")
    return command, cfg, resume


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


def make_ctx(cfg: TrainConfig) -> Ctx:
    """Device, autocast and (under torchrun) the process group: gloo on CPU, nccl on CUDA."""
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device=cuda but torch sees no CUDA device")
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if world > 1:
        rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    return Ctx(device, rank, world, autocast)


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


# ----------------------------------------------------------------------------------------------
# The training loop, written out once for all three stages


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
        snapshot_steps: Sequence[int] = (), snapshot: Optional[Callable[[], dict]] = None,
        tokens_per_item: float = 1.0, verbose: bool = True, settings: Optional[dict] = None,
        param_groups: Optional[List[dict]] = None) -> dict:
    """Train `model`'s trainable parameters; checkpoints, logs and metrics go to run_dir.

    step_loss(model, step, idx) -> (loss, logged): idx are this process's items of the step's
    global batch (batch_indices over n_items; n_items None: an endless stream, idx are the
    positions 0..G-1 inside the step's global batch); loss must be scaled so that DDP's gradient *average* over the processes is the
    gradient of the global-batch loss (see AdapterStep). state()/load_state(d) save and restore
    what the stage trains. verbose False: no log lines (many short runs). settings: what defines
    the run, kept in last.pt; --resume refuses a last.pt made with other settings. param_groups:
    [{"params", "lr_scale"}] (default: every trainable parameter at scale 1), each group's lr is
    lr_at(step) x lr_scale. Returns a summary dict.
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
    if ctx.main and snapshot is not None and 0 in snapshot_steps and start == 0:
        save_atomic(snapshot(), os.path.join(run_dir, "snapshots", "step0.pt"))
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
        if ctx.main and snapshot is not None and done in snapshot_steps:
            save_atomic(snapshot(), os.path.join(run_dir, "snapshots", f"step{done}.pt"))
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


# ----------------------------------------------------------------------------------------------
# Data: sources, the log-mel cache, instruction items


def real_sources(root: str, label: str) -> Dict[str, object]:
    """train/valid/test of a real corpus in any layout data.py reads (detected from its files)."""
    j = lambda *p: os.path.join(root, *p)
    if os.path.exists(j("meta", "esc50.csv")):
        full, folds = data.load_esc50(root), (["fold1", "fold2", "fold3"], ["fold4"], ["fold5"])
    elif os.path.exists(j("metadata", "UrbanSound8K.csv")):
        full, folds = data.load_urbansound8k(root), ([f"fold{k}" for k in range(1, 9)], ["fold9"], ["fold10"])
    elif os.path.exists(j("validation_list.txt")):
        full, folds = data.load_speech_commands(root), (["train"], ["valid"], ["test"])
    elif os.path.exists(j("data", "train_data.csv")):
        full, folds = data.load_fluent_speech_commands(root), (["train"], ["valid"], ["test"])
    elif os.path.isdir(root):
        if label not in {t.label for t in data.TASKS.values()}:
            raise SystemExit(f"--data_label={label!r} names no task label; allowed: "
                             f"{', '.join(sorted({t.label for t in data.TASKS.values()}))}")
        full = data.load_folder_per_class(root, label=label)
        # No split files: 80/10/10 by a hash of the file name, stable across runs and machines.
        for r in full.records:
            h = zlib.crc32(os.path.basename(r.path).encode()) % 10
            r.split = "test" if h == 0 else "valid" if h == 1 else "train"
        folds = (["train"], ["valid"], ["test"])
    else:
        raise SystemExit(f"--data_dir={root}: no such folder")
    return dict(zip(("train", "valid", "test"), (full.select(f) for f in folds)))


def sources(cfg: TrainConfig) -> Dict[str, object]:
    if cfg.data_dir:
        return real_sources(cfg.data_dir, cfg.data_label)
    weights = dict(domain_weights=(1.0, 0.0, 0.0, 0.0)) if cfg.domains == "speech" else {}
    corpus = data.CorpusConfig.tiny(n_clips=cfg.n_clips, n_speakers=cfg.n_speakers, clip_seconds=cfg.clip_seconds,
                                    seed=cfg.data_seed, **weights)
    return {s: data.SyntheticCorpus(corpus, s) for s in ("train", "valid", "test")}


class _Clips(torch.utils.data.Dataset):
    def __init__(self, source, max_seconds):
        self.source, self.max_seconds = source, max_seconds

    def __len__(self):
        return len(self.source)

    def __getitem__(self, j):
        clip = self.source[j]
        return dict(audio=data._audio_tensor(clip, self.max_seconds), domain=clip.domain)


def log_mel(audio: torch.Tensor, lengths: torch.Tensor, n_mels: int, n_frames: int):
    """Whisper's log-mel of a padded batch: (B, F, n_frames) and frame lengths (B,)."""
    mel, mask = enc.whisper_log_mel(audio, n_mels=n_mels, n_frames=n_frames, lengths=lengths)
    return mel, mask.sum(1)


def mel_config(cfg: TrainConfig) -> dict:
    """The settings a log-mel depends on: what mel.pt and the encoder pre-training are checked against."""
    return dict(data_dir=cfg.data_dir, data_label=cfg.data_label, n_clips=cfg.n_clips, n_speakers=cfg.n_speakers,
                domains=cfg.domains,
                clip_seconds=cfg.clip_seconds, data_seed=cfg.data_seed, n_mels=cfg.n_mels)


def mel_frames(cfg: TrainConfig) -> int:
    """T: mel frames of a clip_seconds window (10 ms hop); shorter clips are zero-padded to it."""
    return math.ceil(cfg.clip_seconds * data.SAMPLE_RATE / 160)


def clip_domains(src) -> List[str]:
    """Domain of every clip of a source without reading or rendering audio: a real corpus keeps it
    in its file records, the synthetic one draws it with the labels (SyntheticCorpus.spec)."""
    if isinstance(src, data.AudioFiles):
        return [r.domain for r in src.records]
    return [src.labels(j)["domain"] for j in range(len(src))]


@dataclass
class CachedMels:
    """The log-mels of one split, stored once in out_dir/mel.pt. Same interface as LiveMels."""
    mel: torch.Tensor               # (N, F, T) float16
    frames: torch.Tensor            # (N,) real frames of each clip
    domain: List[str]

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def n_frames(self) -> int:
        return self.mel.shape[2]

    def batch(self, j: torch.Tensor):
        """Clips j (B,) -> mel (B, F, T) float16 (half the bytes to move to the GPU), frames (B,)."""
        return self.mel[j], self.frames[j]


class LiveMels:
    """The log-mels of one split, computed from the source on every call and never stored (the
    paper config's 30 s x 128-bin windows of a real corpus would not fit in memory as a cache).
    Each call reads (or renders) its clips in this process. Same interface as CachedMels, and the
    same numbers before the cache's float16 rounding: one clip's log-mel does not depend on the
    batch it is computed in (whisper_log_mel pads every clip to T frames and clamps per clip)."""

    def __init__(self, source, cfg: TrainConfig):
        self.clips = _Clips(source, cfg.clip_seconds)
        self.n_mels, self.n_frames = cfg.n_mels, mel_frames(cfg)
        self.domain = clip_domains(source)

    def __len__(self) -> int:
        return len(self.clips)

    def batch(self, j: torch.Tensor):
        """Clips j (B,) -> mel (B, F, T) float32, frames (B,), on the CPU."""
        b = data.collate([self.clips[int(i)] for i in j])
        return log_mel(b["audio"], b["lengths"], self.n_mels, self.n_frames)


def mel_cache(cfg: TrainConfig, srcs: dict, ctx: Ctx) -> Dict[str, CachedMels]:
    """{split: CachedMels} for every clip, made once (out_dir/mel.pt: per split mel (N, F, T) fp16,
    frames (N,), domain [N]). Rendering the synthetic clips is the slow part, hence the worker processes."""
    path = os.path.join(cfg.out_dir, "mel.pt")
    want = mel_config(cfg)
    if ctx.main and not os.path.exists(path):
        n_frames = mel_frames(cfg)
        out = {}
        for split, src in srcs.items():
            loader = torch.utils.data.DataLoader(_Clips(src, cfg.clip_seconds), batch_size=64,
                                                 num_workers=cfg.workers, collate_fn=data.collate)
            mels, frames, domains = [], [], []
            for b in tqdm(loader, desc=f"audio {split}", leave=False, mininterval=1.0, disable=not sys.stderr.isatty()):
                mel, n = log_mel(b["audio"], b["lengths"], cfg.n_mels, n_frames)
                mels.append(mel.half())
                frames.append(n)
                domains += b["domain"]
            out[split] = dict(mel=torch.cat(mels), frames=torch.cat(frames), domain=domains)
        save_atomic(dict(stage_config=want, **out), path)
    barrier(ctx)
    check_same_config(path, want, "log-mel cache")
    return {k: CachedMels(**v) for k, v in load(path).items() if k != "stage_config"}


def instruction_items(cfg: TrainConfig, srcs: dict) -> Dict[str, List[dict]]:
    """Every (clip, task) question of each split, without audio (data.InstructionDataset.meta)."""
    out = {}
    for split, src in srcs.items():
        ds = data.InstructionDataset(src, all_tasks=True, seed=cfg.data_seed)
        out[split] = [ds.meta(i) for i in range(len(ds))]
        if not out[split]:
            raise SystemExit(f"the {split} split has no clip with a task label "
                             f"({', '.join(sorted({t.label for t in data.TASKS.values()}))})")
    return out


def task_choices(items: List[dict]) -> Dict[str, List[str]]:
    return {it["task"]: it["choices"] for it in items}


def prompt_text(item: dict, style: str) -> str:
    return item["question"] if style == "question" else item["prompt"]


# ----------------------------------------------------------------------------------------------
# Stage 1: masked log-mel reconstruction


class MaskedMelModel(nn.Module):
    """Encoder + a linear head that reconstructs the masked log-mel frames (2 per encoder frame,
    Whisper's conv stride). Masked input frames are replaced by a learned vector."""

    def __init__(self, encoder: enc.WhisperEncoder):
        super().__init__()
        n_mels, d = encoder.cfg.n_mels, encoder.cfg.d
        self.encoder = encoder
        self.mask_vector = nn.Parameter(torch.zeros(n_mels))
        self.head = nn.Linear(d, 2 * n_mels)

    def forward(self, mel, frames, masked):
        # mel (B, F, T), frames (B,) real frame counts, masked (B, T) bool
        B, Fm, T = mel.shape
        real = torch.arange(T, device=mel.device)[None, :] < frames[:, None]       # (B, T)
        x = torch.where(masked[:, None, :], self.mask_vector[None, :, None].to(mel.dtype), mel)
        h = self.encoder(x, real).features                                         # (B, T', d)
        pred = self.head(h).float()                                                # (B, T', 2F)
        Tp = h.shape[1]
        target = F.pad(mel, (0, 2 * Tp - T)).float()                               # (B, F, 2T')
        target = target.view(B, Fm, Tp, 2).permute(0, 2, 3, 1).reshape(B, Tp, 2 * Fm)
        hit = F.pad(masked & real, (0, 2 * Tp - T)).view(B, Tp, 2).any(-1)         # (B, T')
        err = (pred - target).pow(2).mean(-1)                                      # (B, T')
        return (err * hit).sum(), hit.sum()


def span_mask(G: int, T: int, frac: float, span: int, g: torch.Generator) -> torch.Tensor:
    """(G, T) bool: spans of `span` frames starting at random frames, about `frac` of T covered."""
    n_starts = max(1, round(frac * T / span))
    starts = torch.randint(0, max(T - span, 1), (G, n_starts), generator=g)      # (G, S)
    t = torch.arange(T)
    return ((t[None, None, :] >= starts[..., None]) & (t[None, None, :] < starts[..., None] + span)).any(1)


def encoder_config(cfg: TrainConfig) -> enc.WhisperEncoderConfig:
    return enc.WhisperEncoderConfig(n_mels=cfg.n_mels, d=cfg.enc_d, n_layers=cfg.enc_layers,
                                    n_heads=cfg.enc_heads, d_ff=cfg.enc_ff)


def stage_encoder(cfg: TrainConfig, mels: dict, ctx: Ctx, resume: bool) -> enc.WhisperEncoder:
    """Pre-train (or load) the encoder on mels["train"] (CachedMels or LiveMels); returns it
    frozen, in eval mode, on ctx.device."""
    if cfg.encoder_checkpoint:
        path = cfg.encoder_checkpoint
        if not os.path.exists(path):
            raise SystemExit(f"--encoder_checkpoint={path}: no such file or folder (expected a Whisper "
                             f"checkpoint or train.py's encoder.pt)")
        if path.endswith(".pt") and "stage_config" in load(path):                 # our own encoder.pt
            ck = load(path)
            model = enc.WhisperEncoder(enc.WhisperEncoderConfig(**ck["config"]))
            model.load_state_dict(ck["model"])
        else:
            model, report = enc.load_whisper_encoder(path)
            if ctx.main:
                print(report)
        if model.cfg.n_mels != cfg.n_mels:
            raise SystemExit(f"{path}: the encoder takes {model.cfg.n_mels} mel bins but --n_mels="
                             f"{cfg.n_mels}; set --n_mels={model.cfg.n_mels}")
        return lm.freeze(model).to(ctx.device).eval()
    run_dir = os.path.join(cfg.out_dir, "encoder")
    final = os.path.join(run_dir, "encoder.pt")
    ecfg = encoder_config(cfg)
    want = dict(asdict(ecfg), steps=cfg.enc_steps, batch=cfg.enc_batch, lr=cfg.enc_lr,
                mask_frac=cfg.enc_mask_frac, span=cfg.enc_span, **mel_config(cfg))
    if not os.path.exists(final):
        torch.manual_seed(cfg.data_seed)
        model = MaskedMelModel(enc.WhisperEncoder(ecfg)).to(ctx.device)
        train_mels = mels["train"]
        s = Schedule(cfg.enc_steps, cfg.enc_batch, cfg.enc_lr, warmup=min(50, cfg.enc_steps // 10 + 1))

        def step_loss(m, step, idx):
            g = torch.Generator().manual_seed(cfg.data_seed * 7919 + step)
            masked = span_mask(s.batch, train_mels.n_frames, cfg.enc_mask_frac, cfg.enc_span, g)   # (G, T)
            per = s.batch // ctx.world
            masked = masked[ctx.rank * per:(ctx.rank + 1) * per]
            x, frames = train_mels.batch(idx)                                      # (B, F, T), (B,)
            with ctx.autocast():
                err, n = m(x.to(ctx.device).float(), frames.to(ctx.device), masked.to(ctx.device))
            n_all = global_sum(n.float(), ctx)
            loss = err * ctx.world / n_all.clamp(min=1)        # DDP averages: x world -> global mean
            return loss, dict(mse=float(global_sum(err.detach(), ctx) / n_all.clamp(min=1)))
        summary = fit("encoder", model, step_loss, s, ctx, run_dir, resume, cfg.data_seed, len(train_mels),
                      state=model.state_dict, load_state=model.load_state_dict,
                      tokens_per_item=train_mels.n_frames / 2, settings=want)
        if ctx.main:
            save_atomic(dict(stage_config=want, config=asdict(ecfg), model=model.encoder.state_dict(),
                             summary=summary), final)
        barrier(ctx)
    check_same_config(final, want, "pre-trained encoder")
    ck = load(final)
    model = enc.WhisperEncoder(enc.WhisperEncoderConfig(**ck["config"]))
    model.load_state_dict(ck["model"])
    return lm.freeze(model).to(ctx.device).eval()


@torch.no_grad()
def encode_batch(encoder: enc.WhisperEncoder, mel: torch.Tensor, frames: torch.Tensor, ctx: Ctx):
    """Frozen encoder over one batch of log-mels (B, F, T) with frames (B,) real: (B, T', d)
    float32 and (B, T') bool, on ctx.device."""
    x = mel.to(ctx.device).float()
    real = torch.arange(x.shape[2], device=ctx.device)[None, :] < frames[:, None].to(ctx.device)   # (B, T)
    with ctx.autocast():
        out = encoder(x, real)
    return out.features.float(), out.mask


def encode(encoder: enc.WhisperEncoder, mel: torch.Tensor, frames: torch.Tensor, ctx: Ctx, batch: int = 256):
    """Frozen encoder over cached log-mels: (N, T', d) float32 and (N, T') bool, on the CPU."""
    feats, masks = [], []
    for i in range(0, len(mel), batch):
        x, m = encode_batch(encoder, mel[i:i + batch], frames[i:i + batch], ctx)
        feats.append(x.cpu())
        masks.append(m.cpu())
    return torch.cat(feats), torch.cat(masks)


def feature_cache(cfg: TrainConfig, encoder, mels: Dict[str, CachedMels], ctx: Ctx) -> dict:
    """{split: (features (N, T', d), mask (N, T'))} of the frozen encoder: made once per out_dir."""
    path = os.path.join(cfg.out_dir, "features.pt")
    src = cfg.encoder_checkpoint or os.path.join(cfg.out_dir, "encoder", "encoder.pt")
    want = dict(encoder=os.path.abspath(src), mtime=os.path.getmtime(src))
    if ctx.main and (not os.path.exists(path) or load(path)["stage_config"] != want):
        out = {s: encode(encoder, m.mel, m.frames, ctx) for s, m in mels.items()}
        save_atomic(dict(stage_config=want, **out), path)
    barrier(ctx)
    return {k: v for k, v in load(path).items() if k != "stage_config"}


class CachedFeatures:
    """Encoder features of every clip of a split, from feature_cache: indexed, never recomputed."""

    def __init__(self, feats: torch.Tensor, fmask: torch.Tensor):
        self.feats, self.fmask = feats, fmask                                      # (N, T', d), (N, T')

    def __call__(self, j: torch.Tensor, device):
        return self.feats[j].to(device), self.fmask[j].to(device)


class LiveFeatures:
    """Encoder features computed on every call: log-mels from LiveMels, then the frozen encoder
    under no_grad (ctx's autocast), `chunk` clips at a time (eval.py asks for up to 256 clips at
    once; 30 s windows through Whisper large-v3 would need tens of GB). Stores nothing."""

    def __init__(self, encoder: enc.WhisperEncoder, mels: LiveMels, ctx: Ctx, chunk: int = 64):
        self.encoder, self.mels, self.ctx, self.chunk = encoder, mels, ctx, chunk

    def __call__(self, j: torch.Tensor, device):
        # eval.py's batches are clip-major (several questions per clip): each clip once.
        clips, back = torch.unique(j, return_inverse=True)                         # (U,), (B,)
        xs, ms = [], []
        for c in clips.split(self.chunk):
            mel, frames = self.mels.batch(c)                                       # (u, F, T), (u,)
            x, m = encode_batch(self.encoder, mel, frames, self.ctx)               # (u, T', d), (u, T')
            xs.append(x)
            ms.append(m)
        x, m = torch.cat(xs), torch.cat(ms)                                        # (U, T', d), (U, T')
        back = back.to(x.device)
        return x[back].to(device), m[back].to(device)                              # (B, T', d), (B, T')


# ----------------------------------------------------------------------------------------------
# Stage 2: the LLM on templated text


def fact(task: str, value: str) -> str:
    """A fact is its value alone ("happy", "yes"): answer sets rarely share words, so the LLM
    learns to answer with the context word that belongs to the asked task's answer set.
    Deviation from a richer caption ("the emotion is happy."), chosen on validation loss: with
    sentences the frozen LLM's reading circuit keyed on the label words, which the adapter's
    audio tokens had no gradient path to imitate, and no adapter learned from the audio at all
    (chance-level validation loss after 400 steps)."""
    return value


CAPTION = "Describe the audio."       # the alignment prompt: its answer states every label of the clip
CAPTION_SHARE = 0.3                  # share of the LLM's text documents that ask for the caption


def caption(values: Dict[str, str]) -> str:
    """All facts of a clip {task: value} as one answer, in data.TASKS order (a dense target).
    Deviation: the paper family's alignment data (ASR, captions) is not available here; a caption
    of every label is the synthetic corpus's dense equivalent."""
    return " ".join(fact(t, values[t]) for t in data.TASKS if t in values)


def text_document(rng: np.random.Generator, choices: Dict[str, List[str]], style: str, max_facts: int):
    """(context text, answer): 1..max_facts facts about distinct tasks in random order, then a
    question about one of them, or (CAPTION_SHARE of the documents) the caption prompt, whose
    answer is every fact in the fixed task order. Values are uniform over each task's answer set."""
    tasks = sorted(choices)
    n = int(rng.integers(1, min(max_facts, len(tasks)) + 1))
    told = [tasks[i] for i in rng.choice(len(tasks), size=n, replace=False)]
    values = {t: choices[t][int(rng.integers(len(choices[t])))] for t in told}
    context = " ".join(fact(t, values[t]) for t in told) + ". "
    if rng.random() < CAPTION_SHARE:
        return context + CAPTION, caption(values)
    asked = told[int(rng.integers(n))]
    q = data.TASKS[asked].questions[int(rng.integers(len(data.TASKS[asked].questions)))]
    item = dict(question=q, prompt=f"{q} Answer with one of: {', '.join(choices[asked])}.")
    return context + prompt_text(item, style), values[asked]


def caption_items(items: List[dict]) -> List[dict]:
    """One alignment item per clip: the caption prompt, answered by every label the clip carries."""
    by_clip: Dict[int, Dict[str, str]] = {}
    for it in items:
        by_clip.setdefault(it["index"], {})[it["task"]] = it["answer"]
    return [dict(index=j, task="caption", group="caption", question=CAPTION, prompt=CAPTION,
                 answer=caption(v), choices=[]) for j, v in by_clip.items()]


def build_tokenizer(choices: Dict[str, List[str]]) -> lm.WordTokenizer:
    """Every word the documents and the questions can use, from the task tables alone."""
    texts = []
    for t, values in choices.items():
        texts += list(data.TASKS[t].questions) + [f"Answer with one of: {', '.join(values)}."]
        texts += [fact(t, v) for v in values]
    return lm.WordTokenizer.build(texts + [CAPTION])


def llm_config(cfg: TrainConfig, tok) -> lm.LLMConfig:
    return lm.LLMConfig(d_model=cfg.llm_d, n_layers=cfg.llm_layers, n_heads=cfg.llm_heads,
                        n_kv_heads=cfg.llm_kv_heads, d_ff=cfg.llm_ff, max_seq_len=1024, **tok.config_ids())


def text_batch(tok, lcfg: lm.LLMConfig, texts, answers, device):
    """[BOS] context answer EOS, with the loss on the answer and its EOS only.

    Deviation from plain language-model pre-training: the facts are random, so their tokens carry
    no learnable signal, and with the loss on every token the tiny LLM plateaued at reading the
    right fact about half the time (0.48 held-out accuracy after 1200 steps). The loss on the
    answer alone (instruction-tuning style) teaches the skill the audio stage relies on."""
    b = lm.build_batch([tok.encode(t) for t in texts], [tok.encode(a) for a in answers], cfg=lcfg,
                       device=device)
    return b["input_ids"], b["attention_mask"], b["labels"]


@torch.no_grad()
def text_accuracy(model: lm.LLM, tok, choices, style, max_facts, ctx: Ctx, n: int = 256, seed: int = 10**6) -> float:
    """Held-out documents: share whose greedy answer is exactly right (the LLM's reading skill)."""
    rng = np.random.default_rng(seed)
    docs = [text_document(rng, choices, style, max_facts) for _ in range(n)]
    b = lm.build_batch([tok.encode(c) for c, _ in docs], cfg=model.cfg, padding_side="left", device=ctx.device)
    model.eval()
    out = model.generate(b["input_ids"], b["attention_mask"], max_new_tokens=16)
    return float(np.mean([tok.decode(o.tolist()) == tok.decode(tok.encode(a)) for o, (_, a) in zip(out, docs)]))


def stage_llm(cfg: TrainConfig, choices: Dict[str, List[str]], ctx: Ctx, resume: bool):
    """Pre-train (or load) the LLM; returns (tokenizer, frozen LLM on ctx.device)."""
    if cfg.llm_checkpoint:
        path = cfg.llm_checkpoint
        if not os.path.exists(path):
            raise SystemExit(f"--llm_checkpoint={path}: no such file or folder (expected train.py's llm.pt "
                             f"or a Hugging Face folder with config.json, weights and tokenizer.json)")
        if path.endswith(".pt"):                                                   # our own llm.pt
            ck = load(path)
            tok = lm.WordTokenizer.from_dict(ck["tokenizer"])
            model = lm.LLM(lm.LLMConfig(**ck["config"]))
            model.load_state_dict(ck["model"])
        else:                                                                      # Hugging Face dir
            model = lm.load_llm(path, dtype=torch.float32)
            c = model.cfg
            if c.audio_token_id is None:
                raise SystemExit(f"{path}: the LLM has no audio placeholder token; add \"audio_token_id\": ID "
                                 f"to its config.json, an id no text encodes to (Qwen2/3: {lm.QWEN_AUDIO_ID})")
            tok = lm.HFTokenizer(path)
            tok.bos_id, tok.eos_id, tok.pad_id, tok.audio_id = c.bos_id, c.eos_id, c.pad_id, c.audio_token_id
        return tok, lm.freeze(model).to(ctx.device).eval()
    tok = build_tokenizer(choices)
    lcfg = llm_config(cfg, tok)
    run_dir = os.path.join(cfg.out_dir, "llm")
    final = os.path.join(run_dir, "llm.pt")
    want = dict(asdict(lcfg), steps=cfg.llm_steps, batch=cfg.llm_batch, lr=cfg.llm_lr, prompt=cfg.prompt,
                max_facts=cfg.max_facts, vocab=tok.itos, data_seed=cfg.data_seed)
    if not os.path.exists(final):
        torch.manual_seed(cfg.data_seed)
        model = lm.LLM(lcfg).to(ctx.device)
        s = Schedule(cfg.llm_steps, cfg.llm_batch, cfg.llm_lr, warmup=min(50, cfg.llm_steps // 10 + 1),
                     weight_decay=0.1)

        def step_loss(m, step, idx):
            # Document p of the stream is a pure function of (seed, p): nothing to store or shard.
            docs = [text_document(np.random.default_rng([cfg.data_seed, 17, step * s.batch + int(i)]),
                                  choices, cfg.prompt, cfg.max_facts) for i in idx]
            ids, attn, labels = text_batch(tok, lcfg, [c for c, _ in docs], [a for _, a in docs], ctx.device)
            with ctx.autocast():
                logits, _ = m(ids, attn)
            ce, n = token_ce(logits, labels)
            n_all = global_sum(n, ctx)
            return ce * ctx.world / n_all, dict(ce=float(global_sum(ce.detach(), ctx) / n_all))
        summary = fit("llm", model, step_loss, s, ctx, run_dir, resume, cfg.data_seed, None,
                      state=model.state_dict, load_state=model.load_state_dict, tokens_per_item=20,
                      settings=want)
        if ctx.main:
            summary["text_accuracy"] = text_accuracy(model, tok, choices, cfg.prompt, cfg.max_facts, ctx)
            print(f"llm: held-out text question accuracy {summary['text_accuracy']:.3f}")
            save_atomic(dict(stage_config=want, config=asdict(lcfg), model=model.state_dict(),
                             tokenizer=tok.to_dict(), summary=summary), final)
        barrier(ctx)
    check_same_config(final, want, "pre-trained LLM")
    ck = load(final)
    model = lm.LLM(lm.LLMConfig(**ck["config"]))
    model.load_state_dict(ck["model"])
    return tok, lm.freeze(model).to(ctx.device).eval()


def token_ce(logits: torch.Tensor, labels: torch.Tensor):
    """Sum of next-token cross-entropies (float32) over the labelled positions, and their count:
    the loss of a global batch is sum / global count, whatever the split over processes."""
    target = labels[:, 1:]                                                         # (B, N-1)
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    return ce, (target != IGNORE_INDEX).sum().float()


# ----------------------------------------------------------------------------------------------
# Stage 3: the adapter between the frozen encoder and the frozen LLM


class AudioLLM(nn.Module):
    """encoder features -> adapter -> LLM. forward(features, mask, prompts, answers) returns the
    logits, the labels (answer + EOS, build_batch's layout) and the adapter's aux record."""

    def __init__(self, adapter: nn.Module, llm: lm.LLM):
        super().__init__()
        self.adapter, self.llm = adapter, llm

    def forward(self, feats, fmask, prompts: List[List[int]], answers: Optional[List[List[int]]] = None,
                padding_side: str = "right"):
        y, aux = self.adapter(feats, fmask)                                        # (B, N_a, D)
        b = lm.build_batch(prompts, answers, aux["mask"].sum(1).tolist(), cfg=self.llm.cfg,
                           padding_side=padding_side, device=feats.device)
        logits, _ = self.llm(b["input_ids"], b["attention_mask"], audio_embeds=y, audio_mask=aux["mask"])
        return logits, b.get("labels"), aux, b


def balance_loss(aux: dict, ctx: Ctx) -> torch.Tensor:
    """Eq. 4 over the GLOBAL batch, scaled for DDP's gradient average.

    L = E sum_e f_e P_e with f_e, P_e over every process's real tokens. f is a count (no gradient),
    so L = E sum_e f_e (sum over all tokens of p_te) / N: its gradient is the sum over processes of
    the gradients of E sum_e f_e (local sum of p_te) / N, which is what each process returns times
    `world` (DDP divides by it). In one process this is aux["balance_loss"] exactly.
    """
    n_local = aux["mask"].sum().float()
    if aux["router_prob"].numel() <= 1:                                            # dense: no router
        return aux["router_prob"].sum() * 0.0
    counts = global_sum(aux["expert_load"].detach() * n_local, ctx)                # (E,) slots / k
    n_all = global_sum(n_local, ctx)
    f = counts / n_all                                                             # (E,) sums to 1
    E = f.numel()
    return E * (f * aux["router_prob"] * n_local).sum() / n_all * ctx.world


class AdapterData:
    """Questions of one split as token ids, with the encoder features of their clips from
    `features` (CachedFeatures or LiveFeatures: clip indices (B,), device -> (B, T', d), (B, T'))."""

    def __init__(self, items, features: Callable, tok, style, domains):
        self.items = items
        self.clip = torch.tensor([it["index"] for it in items], dtype=torch.long)
        self.features, self.domains = features, domains
        self.prompts = [tok.encode(prompt_text(it, style)) for it in items]
        self.answers = [tok.encode(it["answer"]) for it in items]

    def __len__(self):
        return len(self.items)

    def clip_features(self, j: torch.Tensor, device):
        """Features (B, T', d) and mask (B, T') of clips j (B,), whichever way they are made."""
        return self.features(j, device)

    def batch(self, idx, device):
        feats, fmask = self.clip_features(self.clip[idx], device)
        return feats, fmask, [self.prompts[i] for i in idx.tolist()], [self.answers[i] for i in idx.tolist()]


def run_name(kind: str, seed: int) -> str:
    return f"{kind}-s{seed}"


def stage_adapter(cfg: TrainConfig, kind: str, seed: int, parts: dict, ctx: Ctx, resume: bool) -> dict:
    """Train one adapter in two phases, as the paper's family does (Eureka-Audio, arXiv 2602.13954):
    3a. alignment: the adapter alone (encoder and LLM frozen) learns to make the LLM caption every
        label of a clip (a dense target: all of a clip's facts in one answer);
    3b. instruction tuning: the adapter and the LLM (its own copy: full fine-tuning at llm_tune_lr,
        or LoRA, or frozen) on every (clip, task) question, next-token loss + the MoE losses.
    Deviation: the paper's family unfreezes everything in stage 2 and does not publish what the
    MoE-Adapter paper freezes; the encoder stays frozen here (its features are cached)."""
    run_dir = os.path.join(cfg.out_dir, run_name(kind, seed))
    done_path = os.path.join(run_dir, "summary.json")
    want = asdict(cfg) | dict(adapter=kind, seed=seed)
    if os.path.exists(done_path):
        with open(done_path) as f:
            summary = json.load(f)
        keys = [k for k in want if k not in RUN_CONTROL and summary["config"].get(k) != want[k]]
        if keys:
            raise SystemExit(f"{run_dir} was trained with other settings ({', '.join(keys[:6])}); use "
                             f"another --out_dir, or delete it to retrain")
        if ctx.main:
            print(f"adapter {run_name(kind, seed)}: finished earlier, reusing {run_dir}")
        return summary
    torch.manual_seed(seed)
    llm_model = copy.deepcopy(parts["llm"])        # every run starts from the same pre-trained LLM
    acfg = cfg.adapter_config(parts["d_in"], llm_model.cfg.d_model)
    adapter = build_adapter(kind, acfg).to(ctx.device)
    if cfg.tune_llm == "lora":
        lm.add_lora(llm_model, rank=cfg.lora_rank)
        llm_model.to(ctx.device)
    model = AudioLLM(adapter, llm_model)
    settings = {k: v for k, v in want.items() if k not in RUN_CONTROL}

    def trained_state():
        sd = dict(adapter=adapter.state_dict())
        if cfg.tune_llm == "full":
            sd["llm"] = llm_model.state_dict()
        elif cfg.tune_llm == "lora":
            sd["lora"] = {k: v for k, v in llm_model.state_dict().items() if "lora_" in k}
        return sd

    def load_trained(sd):
        adapter.load_state_dict(sd["adapter"])
        if "llm" in sd:
            llm_model.load_state_dict(sd["llm"])
        elif "lora" in sd:
            llm_model.load_state_dict(sd["lora"], strict=False)

    step_model = torch.compile(model) if cfg.compile else model

    def step_loss_on(data_: "AdapterData"):
        def step_loss(m, step, idx):
            feats, fmask, prompts, answers = data_.batch(idx, ctx.device)
            with ctx.autocast():
                logits, labels, aux, _ = m(feats, fmask, prompts, answers)
            ce, n = token_ce(logits, labels)
            n_all = global_sum(n, ctx)
            task = ce * ctx.world / n_all
            bal = balance_loss(aux, ctx)
            z = aux["z_loss"] * aux["mask"].sum() / global_sum(aux["mask"].sum().float(), ctx) * ctx.world
            loss = task + acfg.balance_weight * bal + acfg.z_weight * z
            logged = dict(ce=float(global_sum(ce.detach(), ctx) / n_all))
            if kind.startswith("moe"):
                logged.update(balance=float(bal.detach()) / ctx.world,
                              max_load=float(global_sum(aux["expert_load"] * aux["mask"].sum(), ctx).max()
                                             / global_sum(aux["mask"].sum().float(), ctx)))
            return loss, logged
        return step_loss

    def validate_on(data_: "AdapterData"):
        idx = torch.randperm(len(data_), generator=torch.Generator().manual_seed(12345))[:cfg.valid_items]

        @torch.no_grad()
        def validate():
            model.eval()
            tot, cnt = 0.0, 0.0
            for i in range(0, len(idx), 128):
                feats, fmask, prompts, answers = data_.batch(idx[i:i + 128], ctx.device)
                with ctx.autocast():
                    logits, labels, _, _ = model(feats, fmask, prompts, answers)
                ce, n = token_ce(logits, labels)
                tot, cnt = tot + float(ce), cnt + float(n)
            return tot / cnt
        return validate

    n_params = count_params(adapter)
    if ctx.main:
        print(f"adapter {run_name(kind, seed)}: {n_params['total']:,} params, {n_params['active']:,} active, "
              f"{n_params['flops_per_token'] / 1e6:.3f} MFLOPs/token; LLM {cfg.tune_llm} in 3b")
    train = parts["train"]
    # For the tokens/s log only: audio tokens of 16 clips (live: one extra small batch) + ~12 of text.
    tokens = train.clip_features(train.clip.unique()[:16], "cpu")[1].sum(1).float().mean().item() / cfg.stack + 12
    common = dict(ctx=ctx, resume=resume, seed=seed, state=trained_state, load_state=load_trained,
                  eval_every=cfg.eval_every, log_every=cfg.log_every, tokens_per_item=tokens)
    summary = {}
    if cfg.align_steps:                                   # 3a: the adapter alone, on captions
        s = Schedule(cfg.align_steps, cfg.batch, cfg.align_lr, cfg.warmup, cfg.decay_frac, cfg.weight_decay,
                     cfg.grad_clip)
        a_dir = os.path.join(run_dir, "align")
        summary["align"] = fit(f"{kind} s{seed} align", step_model, step_loss_on(parts["align_train"]), s,
                               run_dir=a_dir, n_items=len(parts["align_train"]),
                               validate=validate_on(parts["align_valid"]), settings=settings, **common)
        load_trained(load(os.path.join(a_dir, "best.pt")))
    groups = [dict(params=list(adapter.parameters()), lr_scale=1.0)]
    if cfg.tune_llm != "frozen":                          # 3b: the LLM learns too, at its own lr
        if cfg.tune_llm == "full":
            llm_model.requires_grad_(True)
        else:
            lm.mark_trainable(llm_model, lora=True)
        groups.append(dict(params=[p for p in llm_model.parameters() if p.requires_grad],
                           lr_scale=cfg.llm_tune_lr / cfg.lr))
    s = Schedule(cfg.steps, cfg.batch, cfg.lr, cfg.warmup, cfg.decay_frac, cfg.weight_decay, cfg.grad_clip)
    summary.update(fit(f"{kind} s{seed}", step_model, step_loss_on(train), s, run_dir=run_dir, n_items=len(train),
                       validate=validate_on(parts["valid"]), settings=settings, param_groups=groups, **common))
    seconds = summary["seconds"] + summary.get("align", {}).get("seconds", 0.0)
    summary.update(kind=kind, seed=seed, params=n_params, adapter_config=asdict(acfg),
                   config=asdict(cfg) | dict(adapter=kind, seed=seed), train_seconds=seconds,
                   ms_per_step=1e3 * seconds / (cfg.steps + cfg.align_steps))
    if ctx.main:
        write_json(summary, done_path)
    barrier(ctx)
    return summary


# ----------------------------------------------------------------------------------------------
# Putting the stages together


def prepare(cfg: TrainConfig, ctx: Ctx, resume: bool, stages=("encoder", "llm", "features")) -> dict:
    """Everything an adapter run (or eval.py) needs: items, frozen parts, encoder features of
    every split (cached in out_dir, or computed on each batch with --cache_features=false)."""
    srcs = sources(cfg)
    items = instruction_items(cfg, srcs)
    choices = task_choices(items["train"] + items["valid"] + items["test"])
    parts = dict(items=items, choices=choices, cfg=cfg)
    if ctx.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
    t0 = time.perf_counter()
    if cfg.cache_features:
        mels = mel_cache(cfg, srcs, ctx)
    else:                                                  # nothing written: mel.pt, features.pt
        mels = {split: LiveMels(src, cfg) for split, src in srcs.items()}
    parts["domains"] = {s: m.domain for s, m in mels.items()}
    parts["mels"] = mels
    if "encoder" in stages:
        encoder = stage_encoder(cfg, mels, ctx, resume)
        parts["encoder"] = encoder
        parts["d_in"] = encoder.cfg.d
    if "llm" in stages:
        parts["tok"], parts["llm"] = stage_llm(cfg, choices, ctx, resume)
    if "features" in stages:
        if cfg.cache_features:
            features = {s: CachedFeatures(*xm) for s, xm in feature_cache(cfg, parts["encoder"], mels, ctx).items()}
        else:
            features = {s: LiveFeatures(parts["encoder"], m, ctx) for s, m in mels.items()}
        for split, f in features.items():
            parts[split] = AdapterData(items[split], f, parts["tok"], cfg.prompt, parts["domains"][split])
            parts[f"align_{split}"] = AdapterData(caption_items(items[split]), f, parts["tok"], cfg.prompt,
                                                  parts["domains"][split])
    parts["prepare_seconds"] = time.perf_counter() - t0
    return parts


# ==============================================================================================
# Part 2: Soft-MoA fine-tuning of a frozen AST (Cappellazzo et al., Interspeech 2024, arXiv 2402.00828)
#
#   python train.py moa           # pre-train a tiny AST (multi-label, AudioSet-like), then every
#                                 # method x benchmark x seed, then eval.py's table and analyses
#   python train.py moa-ablate    # adapters at a fixed N x r budget, slots per adapter
#
# The AST is pre-trained once on the multi-label AudioSet-like scenes and frozen; each benchmark
# run trains only what the paper trains (soft_moa.mark_trainable: the mixtures, the LayerNorm that
# feeds each, the final LayerNorm and a linear head on the mean of all output tokens) with the
# paper's optimiser: AdamW lr 5e-3, betas (0.9, 0.98), weight decay 0.1, cosine, no warm-up.
# "linear" (the head alone) and "full" (every weight, at full_lr) are the reference rows; every
# row runs the same epochs, batch, schedule and gradient clipping (1.0), and is scored on the
# test fold at its lowest validation loss (best.pt, checked once per epoch).
# Deviations of the tiny config, for a 2-core CPU: 64 mel bins instead of 128 (5 instead of 12
# frequency patches, so 47 tokens per second of audio instead of ~120); r = 4 at d = 64 (d / 16,
# the paper's d / 128 would leave a 1-wide bottleneck); the fbank is normalised by the mean and
# std of the pre-training clips, as AST does with AudioSet's (the `paper` preset with a real AST
# uses AST's own constants). Shape symbols: b batch, T fbank frames, F mel bins, m AST tokens,
# d width, C classes.

MOA_COMMANDS = ("moa", "moa-ablate")
# method: (placement, mixture kind); "linear" trains the head alone, "full" every weight.
MOA_METHODS = {"linear": ("none", "single"), "full": ("none", "single"),
               "single-pfeiffer": ("pfeiffer", "single"), "dense-pfeiffer": ("pfeiffer", "dense"),
               "soft-pfeiffer": ("pfeiffer", "soft"), "single-houlsby": ("houlsby", "single"),
               "dense-houlsby": ("houlsby", "dense"), "soft-houlsby": ("houlsby", "soft")}


def _ints(text: str, name: str) -> List[int]:
    """Comma-separated integers >= 1, at least one."""
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError(f"{name} must be comma-separated integers >= 1, got {text!r}")
    return out


@dataclass
class MoAConfig:
    out_dir: str = "runs/moa"
    benchmarks: str = "esc50,us8k,speechcommands,fsc"   # data.BENCHMARKS names
    methods: str = ",".join(MOA_METHODS)
    seeds: int = 3                  # fold benchmarks: seed i tests on fold i+1 (cross-validation)
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False           # torch.compile the fine-tuning step's model
    workers: int = 2
    evaluate: bool = True
    data_dir: str = ""              # a real corpus (any layout data.py reads) instead of the benchmarks
    data_label: str = "event"       # data_dir with one folder per class: what the folders name
    bench_clips: int = 1000         # clips of each synthetic benchmark (all folds / splits)
    max_seconds: float = 0.0        # crop / pad to this; 0: the benchmark's clip length (folder per class: 5 s)
    # the AST and its pre-training on AudioSet-like scenes (multi-label, binary cross-entropy)
    ast_checkpoint: str = ""        # a real AST (encoder.load_ast) or our ast.pt: skips pre-training
    ast_d: int = 64
    ast_layers: int = 4
    ast_heads: int = 4
    ast_ff: int = 256
    n_mels: int = 64
    pre_clips: int = 3000
    pre_seconds: float = 2.5        # also the positional grid's length
    pre_epochs: int = 10
    pre_batch: int = 32
    pre_lr: float = 1e-3
    # the mixtures (soft_moa) and the fine-tuning recipe
    r: int = 4                      # adapter bottleneck
    n_experts: int = 7
    slots: int = 1                  # slots per adapter (Soft-MoA)
    epochs: int = 6
    batch: int = 32
    lr: float = 5e-3
    full_lr: float = 1e-3           # full fine-tuning: chosen on validation (README), the paper gives none
    weight_decay: float = 0.1
    # moa-ablate: on one benchmark, Soft- and Dense-MoA with n adapters of r = budget / n each,
    # and Soft-MoA with p slots per adapter
    ablate_benchmark: str = "fsc"
    ablate_budget: int = 24
    ablate_experts: str = "2,4,8"
    ablate_slots: str = "1,2,4"

    def __post_init__(self):
        for name in self.benchmarks.split(",") + [self.ablate_benchmark]:
            if name not in data.BENCHMARKS:
                raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(data.BENCHMARKS)}")
        for m in self.methods.split(","):
            if m not in MOA_METHODS:
                raise ValueError(f"unknown method {m!r}; allowed: {', '.join(MOA_METHODS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        for name in ("seeds", "bench_clips", "pre_clips", "pre_epochs", "pre_batch", "r", "n_experts",
                     "slots", "epochs", "batch", "ablate_budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for n in _ints(self.ablate_experts, "ablate_experts"):
            if self.ablate_budget % n:
                raise ValueError(f"ablate_experts: {n} adapters do not divide ablate_budget={self.ablate_budget}")
        _ints(self.ablate_slots, "ablate_slots")

    @classmethod
    def tiny(cls, **kw) -> "MoAConfig":
        return cls(**kw)

    @classmethod
    def small(cls, **kw) -> "MoAConfig":
        return cls(**{**dict(out_dir="runs/moa-small", bench_clips=4000, ast_d=192, ast_layers=12,
                             ast_heads=3, ast_ff=768, n_mels=128, pre_clips=20000, pre_epochs=20,
                             r=12, epochs=20), **kw})

    @classmethod
    def paper(cls, **kw) -> "MoAConfig":
        """AST-Base from --ast_checkpoint (required; AudioSet-pretrained), 128 mel bins, r = d / 128 = 6,
        7 adapters of 1 slot; pass --data_dir for the real benchmark."""
        return cls(**{**dict(out_dir="runs/moa-paper", n_mels=128, r=6, epochs=50, batch=32), **kw})


def parse_moa_args(preset: str, rest: Sequence[str]) -> MoAConfig:
    base = getattr(MoAConfig, preset)()
    try:
        cfg = dataclasses.replace(base, **data.parse_overrides(base, rest))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if preset == "paper" and not cfg.ast_checkpoint:
        # Its AST fields keep the tiny defaults: pre-training them would not give AST-Base.
        raise SystemExit("--config=paper fine-tunes AudioSet-pretrained AST-Base: pass --ast_checkpoint=PATH "
                         "(a transformers AST folder or state dict; nothing is downloaded)")
    return cfg


class _Fbank(torch.utils.data.Dataset):
    """Kaldi fbank of each clip, cropped / zero-padded to `seconds`: (T, F) float16, real frames,
    and the target (a class index, or AudioSet-like multi-hot tags when label is "tags")."""

    def __init__(self, source, label: str, classes: List[str], n_mels: int, seconds: float):
        self.source, self.label, self.n_mels, self.seconds = source, label, n_mels, seconds
        self.index = {c: i for i, c in enumerate(classes)}
        self.tags = data.MultiLabelAudio(source, classes) if label == "tags" else None

    def __len__(self):
        return len(self.source)

    def __getitem__(self, j):
        clip = self.source[j]
        wave = data._audio_tensor(clip, self.seconds)
        # A clip shorter than one AST patch (16 frames, 0.175 s; a few real UrbanSound8K slices) is
        # zero-padded to it, so it is never masked empty; AST's own recipe zero-pads every clip.
        wave = F.pad(wave, (0, max(400 + 15 * 160 - len(wave), 0)))
        frames = 1 + (int(self.seconds * data.SAMPLE_RATE) - 400) // 160
        fb, n = enc.kaldi_fbank(wave[None], n_mels=self.n_mels)                 # (1, T', F)
        fb = F.pad(fb[0], (0, 0, 0, max(frames - fb.shape[1], 0)))[:frames]      # (T, F)
        y = self.tags.multi_hot(clip.labels) if self.tags else torch.tensor(self.index[clip.labels[self.label]])
        return fb.half(), min(int(n), frames), y


def fbank_cache(path: str, source, label: str, classes: List[str], n_mels: int, seconds: float,
                workers: int, ctx: Ctx, want: dict) -> dict:
    """{x (N, T, F) fp16 raw log-fbank, frames (N,), y (N,) or (N, C), split [N], classes}, made once."""
    if ctx.main and not os.path.exists(path):
        loader = torch.utils.data.DataLoader(_Fbank(source, label, classes, n_mels, seconds), batch_size=64,
                                             num_workers=workers)
        xs, ns, ys = [], [], []
        for x, n, y in tqdm(loader, desc=f"fbank {os.path.basename(path)}", leave=False,
                            disable=not sys.stderr.isatty()):
            xs.append(x), ns.append(n), ys.append(y)
        save_atomic(dict(stage_config=want, x=torch.cat(xs), frames=torch.cat(ns), y=torch.cat(ys),
                         split=[source.split(j) for j in range(len(source))], classes=classes), path)
    barrier(ctx)
    check_same_config(path, want, "fbank cache")
    return load(path)


# Real corpora: the file that marks each benchmark's layout, and the seconds AST's recipes use.
_REAL_MARKERS = {"esc50": ("meta", "esc50.csv"), "us8k": ("metadata", "UrbanSound8K.csv"),
                 "speechcommands": ("validation_list.txt",), "fsc": ("data", "train_data.csv")}
_REAL_SECONDS = {"esc50": 5.0, "us8k": 4.0, "speechcommands": 1.0, "fsc": 4.0}


def moa_source(cfg: MoAConfig, name: str):
    """(source holding every split or fold, task label, seconds per clip) of one synthetic
    benchmark, or of the real corpus at --data_dir (a benchmark's layout keeps its folds)."""
    if cfg.data_dir:
        for bench, (_, label, loader) in data.BENCHMARKS.items():
            if os.path.exists(os.path.join(cfg.data_dir, *_REAL_MARKERS[bench])):
                return loader(cfg.data_dir), label, cfg.max_seconds or _REAL_SECONDS[bench]
        parts = real_sources(cfg.data_dir, cfg.data_label)            # one folder per class
        full = parts["train"]
        full.records = parts["train"].records + parts["valid"].records + parts["test"].records
        return full, cfg.data_label, cfg.max_seconds or 5.0
    preset, label, _ = data.BENCHMARKS[name]
    corpus = getattr(data.CorpusConfig, preset)(n_clips=cfg.bench_clips)
    return data.SyntheticCorpus(corpus), label, cfg.max_seconds or corpus.clip_seconds


def fold_split(splits: List[str], seed: int) -> Dict[str, torch.Tensor]:
    """Item indices of train / valid / test. Corpora in folds (ESC-50, UrbanSound8K) are
    cross-validated as the benchmarks define it: seed i tests on fold i % k + 1 and validates on
    the next fold; the others train. Other corpora keep their train / valid / test splits."""
    names = sorted(set(splits), key=lambda s: (len(s), s))
    if set(names) <= {"train", "valid", "test"}:
        roles = {"train": "train", "valid": "valid", "test": "test"}
    else:
        k = len(names)
        test, valid = names[seed % k], names[(seed + 1) % k]
        roles = {s: "test" if s == test else "valid" if s == valid else "train" for s in names}
    out = {r: torch.tensor([i for i, s in enumerate(splits) if roles[s] == r], dtype=torch.long)
           for r in ("train", "valid", "test")}
    for r, idx in out.items():
        if len(idx) == 0:
            raise SystemExit(f"no {r} clips (splits present: {', '.join(names)})")
    return out


class FbankData:
    """Clips of one role (train / valid / test) as normalised AST inputs."""

    def __init__(self, cache: dict, idx: torch.Tensor, mean: float, std: float):
        self.x, self.frames, self.y = cache["x"][idx], cache["frames"][idx], cache["y"][idx]
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.y)

    def batch(self, idx, device):
        x = (self.x[idx].to(device).float() - self.mean) / (2 * self.std)        # (b, T, F), AST's norm
        frames = self.frames[idx].to(device)
        T = x.shape[1]
        mask = torch.arange(T, device=device)[None, :] < frames[:, None]          # (b, T)
        return x, (None if bool(mask.all()) else mask), self.y[idx].to(device)


def summed_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss summed over the batch: cross-entropy for class indices y (b,); for AudioSet-like
    multi-hot tags y (b, C), binary cross-entropy averaged over the tags."""
    if y.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum") / y.shape[1]
    return F.cross_entropy(logits.float(), y, reduction="sum")


def fbank_step_loss(data: FbankData, batch: int, ctx: Ctx, key: str) -> Callable:
    """fit's step_loss on FbankData: the global batch's mean loss, logged as `key`."""
    def step_loss(m, step, idx):
        x, mask, y = data.batch(idx, ctx.device)
        with ctx.autocast():
            logits = m(x, mask).logits
        loss = summed_loss(logits, y)
        return loss * ctx.world / batch, {key: float(global_sum(loss.detach(), ctx)) / batch}
    return step_loss


@torch.no_grad()
def mean_loss(model: nn.Module, data: FbankData, ctx: Ctx, chunk: int) -> float:
    """Mean loss per clip over all of `data` (validation), `chunk` clips at a time."""
    model.eval()
    tot = 0.0
    for i in range(0, len(data), chunk):
        x, mask, y = data.batch(torch.arange(i, min(i + chunk, len(data))), ctx.device)
        with ctx.autocast():
            logits = model(x, mask).logits
        tot += float(summed_loss(logits, y))
    return tot / len(data)


def ast_config(cfg: MoAConfig, frames: int, **kw) -> enc.ASTConfig:
    return enc.ASTConfig(d=cfg.ast_d, n_layers=cfg.ast_layers, n_heads=cfg.ast_heads, d_ff=cfg.ast_ff,
                         num_mel_bins=cfg.n_mels, max_length=frames, **kw)


def stage_ast(cfg: MoAConfig, ctx: Ctx, resume: bool) -> dict:
    """Pre-train (or load) the AST: {config, backbone state dict, fbank mean, std, summary}."""
    if cfg.ast_checkpoint:
        if not os.path.exists(cfg.ast_checkpoint):
            raise SystemExit(f"--ast_checkpoint={cfg.ast_checkpoint}: no such file or folder")
        ours = load(cfg.ast_checkpoint) if cfg.ast_checkpoint.endswith(".pt") else None
        if isinstance(ours, dict) and "stage_config" in ours:            # an ast.pt of an earlier run
            out = ours
        else:
            model, report = enc.load_ast(cfg.ast_checkpoint)
            if ctx.main:
                print(report)
            sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
            c = {k: v for k, v in asdict(model.cfg).items() if k in ("d", "n_layers", "n_heads", "d_ff",
                 "num_mel_bins", "max_length", "patch", "freq_stride", "time_stride", "norm_eps", "qkv_bias")}
            out = dict(config=c, model=sd, mean=enc.AST_MEAN, std=enc.AST_STD)
        if out["config"]["num_mel_bins"] != cfg.n_mels:
            raise SystemExit(f"{cfg.ast_checkpoint}: the AST takes {out['config']['num_mel_bins']} mel bins but "
                             f"--n_mels={cfg.n_mels}; set --n_mels={out['config']['num_mel_bins']}")
        return out
    run_dir = os.path.join(cfg.out_dir, "ast")
    final = os.path.join(run_dir, "ast.pt")
    frames = 1 + (int(cfg.pre_seconds * data.SAMPLE_RATE) - 400) // 160
    acfg = ast_config(cfg, frames, n_classes=len(data.AUDIOSET_TAGS))
    src_want = dict(pre_clips=cfg.pre_clips, pre_seconds=cfg.pre_seconds, n_mels=cfg.n_mels)
    want = dict(asdict(acfg), epochs=cfg.pre_epochs, batch=cfg.pre_batch, lr=cfg.pre_lr, **src_want)
    if not os.path.exists(final):
        corpus = data.SyntheticCorpus(data.CorpusConfig.audioset_like(n_clips=cfg.pre_clips,
                                                                      clip_seconds=cfg.pre_seconds))
        cache = fbank_cache(os.path.join(cfg.out_dir, "data", "audioset.pt"), corpus, "tags",
                            list(data.AUDIOSET_TAGS), cfg.n_mels, cfg.pre_seconds, cfg.workers, ctx, src_want)
        roles = fold_split(cache["split"], 0)
        tr = cache["x"][roles["train"]].float()
        real = torch.arange(tr.shape[1])[None, :] < cache["frames"][roles["train"], None]   # (N, T)
        mean, std = float(tr[real].mean()), float(tr[real].std())    # AST normalises by its data's stats
        train, valid = (FbankData(cache, roles[r], mean, std) for r in ("train", "valid"))
        torch.manual_seed(0)
        model = enc.AST(acfg).to(ctx.device)
        s = Schedule(cfg.pre_epochs * (len(train) // cfg.pre_batch), cfg.pre_batch, cfg.pre_lr,
                     warmup=20, weight_decay=0.05)
        summary = fit("ast", model, fbank_step_loss(train, s.batch, ctx, "bce"), s, ctx, run_dir, resume, 0,
                      len(train), state=model.state_dict, load_state=model.load_state_dict,
                      validate=lambda: mean_loss(model, valid, ctx, 128), eval_every=max(s.steps // 4, 1),
                      log_every=max(s.steps // 8, 1), tokens_per_item=acfg.n_tokens, settings=want)
        if ctx.main:
            best = load(os.path.join(run_dir, "best.pt"))
            backbone = {k: v for k, v in best.items() if not k.startswith("head.")}
            c = {k: v for k, v in asdict(acfg).items() if k in ("d", "n_layers", "n_heads", "d_ff",
                 "num_mel_bins", "max_length", "patch", "freq_stride", "time_stride", "norm_eps", "qkv_bias")}
            save_atomic(dict(stage_config=want, config=c, model=backbone, mean=mean, std=std,
                             summary=summary), final)
        barrier(ctx)
    check_same_config(final, want, "pre-trained AST")
    return load(final)


def build_peft_model(ast: dict, method: str, n_classes: int, frames: int, r: int, n_experts: int,
                     slots: int) -> Tuple[enc.AST, List[str]]:
    """The pre-trained AST with the method's mixtures and a new head; returns it and what trains."""
    placement, kind = MOA_METHODS[method]
    c = dict(ast["config"])
    grid_src = enc.ASTConfig(**c).grid
    # Deviation: shorter clips use the first time columns of the position table (AST's recipe
    # zero-pads every clip to the table's length); longer ones get the table interpolated.
    c["max_length"] = max(c["max_length"], frames)
    acfg = enc.ASTConfig(**c, placement=placement, adapter_kind=kind, r=r, n_experts=n_experts,
                         slots_per_expert=slots, n_classes=n_classes, head_pool="mean")
    model = enc.AST(acfg)
    sd = dict(ast["model"])
    if acfg.grid != grid_src:                          # longer clips than pre-training saw
        sd["pos_embed"] = enc.resize_pos_embed(sd["pos_embed"], grid_src, acfg.grid)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    new = [k for k in missing if not (k.startswith("head.") or ".adapters." in k)]
    if new or unexpected:
        raise SystemExit(f"the AST checkpoint does not fit: missing {new[:4]}, unexpected {unexpected[:4]}")
    if method == "full":
        trainable = [k for k, _ in model.named_parameters()]
    elif method == "linear":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        trainable = [k for k, _ in model.named_parameters() if k.startswith("head.")]
    else:
        trainable = sm.mark_trainable(model, extra=("norm", "head"))
    for k, p in model.named_parameters():
        p.requires_grad_(k in trainable)
    return model, trainable


def adapter_macs(method: str, d: int, n_layers: int, r: int, n_experts: int, slots: int, m: int) -> float:
    """Per-token MACs of all the mixtures of a model (soft_moa.macs_per_token times their number)."""
    placement, kind = MOA_METHODS[method]
    per_block = {"none": 0, "pfeiffer": 1, "houlsby": 2}[placement]
    if not per_block:
        return 0.0
    return n_layers * per_block * sm.macs_per_token(kind, d, r, n_experts, slots, m)


def peft_run(cfg: MoAConfig, ast: dict, bench: str, cache: dict, method: str, seed: int, ctx: Ctx,
             resume: bool, run_dir: str, r: int, n_experts: int, slots: int) -> dict:
    """Fine-tune one method on one benchmark for one seed; eval.py scores best.pt on the test role."""
    done_path = os.path.join(run_dir, "summary.json")
    want = dict(asdict(cfg), bench=bench, method=method, seed=seed, r=r, n_experts=n_experts, slots=slots)
    control = RUN_CONTROL + ("benchmarks", "methods", "ablate_experts", "ablate_slots", "ablate_benchmark",
                             "ablate_budget")       # which runs to make, not how one is made
    if os.path.exists(done_path):
        with open(done_path) as f:
            summary = json.load(f)
        keys = [k for k in want if k not in control and summary["config"].get(k) != want[k]]
        if keys:
            raise SystemExit(f"{run_dir} was trained with other settings ({', '.join(keys[:6])}); use "
                             f"another --out_dir, or delete it to retrain")
        return summary
    roles = fold_split(cache["split"], seed)
    train, valid = (FbankData(cache, roles[k], ast["mean"], ast["std"]) for k in ("train", "valid"))
    frames = cache["x"].shape[1]
    torch.manual_seed(seed)
    model, trainable = build_peft_model(ast, method, len(cache["classes"]), frames, r, n_experts, slots)
    model.to(ctx.device)
    steps = cfg.epochs * (len(train) // cfg.batch)
    # The paper's AdamW and cosine schedule; weight decay on every trainable tensor (the paper names
    # no exception). Deviation: gradients clipped to norm 1, as in part 1 (Schedule.grad_clip).
    s = Schedule(steps, cfg.batch, cfg.full_lr if method == "full" else cfg.lr, warmup=0, shape="cosine",
                 weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    wanted = set(trainable)

    def state():
        return {k: v for k, v in model.state_dict().items() if k in wanted}

    def load_state(sd):
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or set(sd) != wanted:
            raise SystemExit(f"{run_dir}: checkpoint keys do not match the method's trainable parameters")

    steps_per_epoch = len(train) // cfg.batch
    step_model = torch.compile(model) if cfg.compile else model
    summary = fit(f"{bench} {method} s{seed}", step_model, fbank_step_loss(train, s.batch, ctx, "ce"), s, ctx,
                  run_dir, resume, seed, len(train), state=state, load_state=load_state,
                  validate=lambda: mean_loss(model, valid, ctx, 256), eval_every=steps_per_epoch,
                  verbose=False, tokens_per_item=float(model.cfg.n_tokens),
                  settings={k: v for k, v in want.items() if k not in control})
    m_tokens = 2 + model.cfg.grid[0] * ((frames - model.cfg.patch) // model.cfg.time_stride + 1)
    summary.update(bench=bench, method=method, seed=seed, config=want, trainable=len(trainable),
                   params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   head_params=sum(p.numel() for p in model.head.parameters()),
                   macs_per_token=adapter_macs(method, model.cfg.d, model.cfg.n_layers, r, n_experts, slots, m_tokens),
                   tokens=m_tokens, ms_per_step=1e3 * summary["seconds"] / steps, classes=cache["classes"],
                   n_train=len(train), n_valid=len(valid), n_test=len(roles["test"]))
    if ctx.main:
        write_json(summary, done_path)
        print(f"{bench} {method} s{seed}: {summary['params']:,} trainable params, best valid ce "
              f"{summary['best_valid']:.3f} at step {summary['best_step']}/{steps}, "
              f"{summary['ms_per_step']:.0f} ms/step, {summary['seconds']:.0f} s")
    barrier(ctx)
    return summary


def moa_data(cfg: MoAConfig, ctx: Ctx, names: Sequence[str]) -> Dict[str, dict]:
    """{benchmark: fbank cache} of the named benchmarks (with --data_dir: {"data": that corpus})."""
    out = {}
    for name in (["data"] if cfg.data_dir else names):
        src, label, seconds = moa_source(cfg, name)
        classes = src.classes(label)
        want = dict(data_dir=cfg.data_dir, data_label=label, bench_clips=cfg.bench_clips, seconds=seconds,
                    n_mels=cfg.n_mels)
        out[name] = fbank_cache(os.path.join(cfg.out_dir, "data", f"{name}.pt"), src, label, classes,
                                cfg.n_mels, seconds, cfg.workers, ctx, want)
    return out


def moa_main(command: str, cfg: MoAConfig, ctx: Ctx, resume: bool) -> List[str]:
    """`moa`: every method x benchmark x seed, then eval.py's table. `moa-ablate`: on one
    benchmark, Soft- and Dense-MoA with n adapters of r = budget / n (fixed adapter weights),
    and Soft-MoA with p slots per adapter. Returns the run folders."""
    if ctx.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
    ast = stage_ast(cfg, ctx, resume)
    ablate = command == "moa-ablate"
    caches = moa_data(cfg, ctx, [cfg.ablate_benchmark] if ablate else cfg.benchmarks.split(","))
    if ablate:
        ns = sorted(_ints(cfg.ablate_experts, "ablate_experts"))
        n_mid = ns[len(ns) // 2]                       # the slots sweep runs at the middle adapter count
        grid = [(f"{kind}-pfeiffer", n, cfg.ablate_budget // n, 1) for kind in ("soft", "dense") for n in ns]
        grid += [("soft-pfeiffer", n_mid, cfg.ablate_budget // n_mid, p) for p in _ints(cfg.ablate_slots, "ablate_slots")]
        plan = [(bench, method, seed, os.path.join(cfg.out_dir, "ablate", bench, f"{method}-n{n}-r{r}-p{p}-s{seed}"),
                 r, n, p) for bench in caches for method, n, r, p in dict.fromkeys(grid) for seed in range(cfg.seeds)]
    else:
        plan = [(bench, method, seed, os.path.join(cfg.out_dir, bench, f"{method}-s{seed}"), cfg.r, cfg.n_experts,
                 cfg.slots) for bench in caches for method in cfg.methods.split(",") for seed in range(cfg.seeds)]
    for bench, method, seed, run_dir, r, n, p in plan:
        peft_run(cfg, ast, bench, caches[bench], method, seed, ctx, resume, run_dir, r, n, p)
    runs = [run[3] for run in plan]
    if ctx.main and cfg.evaluate:
        import eval as evaluation
        for bench, *_, run_dir, r, n, p in plan:
            evaluation.evaluate_moa_run(run_dir, ast, caches[bench], ctx)
        evaluation.moa_compare(cfg.out_dir, runs, ablation=ablate)
    return runs


# ----------------------------------------------------------------------------------------------
# The command line


def main(argv: Optional[Sequence[str]] = None) -> None:
    command, cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    ctx = make_ctx(cfg)
    t0 = time.perf_counter()
    if ctx.main:
        print(f"train.py {command}: device {ctx.device}, {ctx.world} process(es), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, out_dir {cfg.out_dir}")
    if command in MOA_COMMANDS:
        moa_main(command, cfg, ctx, resume)
        parts = None
    else:
        stages = {"encoder": ("encoder",), "llm": ("llm",)}.get(command, ("encoder", "llm", "features"))
        parts = prepare(cfg, ctx, resume, stages)
    if command == "adapter":
        stage_adapter(cfg, cfg.adapter, cfg.seed, parts, ctx, resume)
    elif command == "all":
        runs = [(k, s) for k in cfg.adapters.split(",") for s in range(cfg.seeds)]
        for kind, seed in runs:
            stage_adapter(cfg, kind, seed, parts, ctx, resume)
        if ctx.main and cfg.evaluate:
            import eval as evaluation
            dirs = [os.path.join(cfg.out_dir, run_name(k, s)) for k, s in runs]
            for d in dirs:
                evaluation.evaluate_run(d, parts=parts, ctx=ctx)
            evaluation.compare(cfg.out_dir, dirs)
    if ctx.main:
        print(f"train.py {command}: {time.perf_counter() - t0:.0f} s wall")
    if ctx.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
