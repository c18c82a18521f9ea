"""Soft-MoA fine-tuning of a frozen AST (Cappellazzo et al., Interspeech 2024, arXiv 2402.00828).

    python train_moa.py           # pre-train a tiny AST (multi-label, AudioSet-like), then every
                                  # method x benchmark x seed, then eval_moa.py's table and analyses
    python train_moa.py ablate    # adapters at a fixed N x r budget, slots per adapter
    python train_moa.py --config=small --seeds=5      # any MoAConfig field as --key=value

The AST is pre-trained once on the multi-label AudioSet-like scenes and frozen; each benchmark
run trains only what the paper trains (soft_moa.mark_trainable: the mixtures, the LayerNorm that
feeds each, the final LayerNorm and a linear head on the mean of all output tokens) with the
paper's optimiser: AdamW lr 5e-3, betas (0.9, 0.98), weight decay 0.1, cosine, no warm-up.
"linear" (the head alone) and "full" (every weight, at full_lr) are the reference rows; every
row runs the same epochs, batch, schedule and gradient clipping (1.0), and is scored on the
test fold at its lowest validation loss (best.pt, checked once per epoch).
Deviations of the tiny config, for a 2-core CPU: 64 mel bins instead of 128 (5 instead of 12
frequency patches, so 47 tokens per second of audio instead of ~120); r = 4 at d = 64 (d / 16,
the paper's d / 128 would leave a 1-wide bottleneck); the fbank is normalised by the mean and
std of the pre-training clips, as AST does with AudioSet's (the `paper` preset with a real AST
uses AST's own constants). Shape symbols: b batch, T fbank frames, F mel bins, m AST tokens,
d width, C classes.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import encoder as enc
import soft_moa as sm
from loop import (Ctx, Schedule, barrier, check_same_config, finished_run, fit, global_sum, load, make_ctx,
                  run_script, save_atomic, split_args, write_json)

COMMANDS = ("all", "ablate")
PRESETS = ("tiny", "small", "paper")
# Fields that say which runs to make and where, not how one is made: a finished run is reused whatever they are.
RUN_CONTROL = ("out_dir", "seeds", "evaluate", "workers", "device", "compile", "benchmarks", "methods",
               "ablate_experts", "ablate_slots", "ablate_benchmark", "ablate_budget")
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
    # ablate: on one benchmark, Soft- and Dense-MoA with n adapters of r = budget / n each,
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


def parse_args(argv: Sequence[str]):
    """[all | ablate] [--config=NAME] [--resume] [--key=value ...] -> (command, MoAConfig, resume)."""
    command, preset, resume, rest = split_args(argv, COMMANDS, PRESETS)
    return command, parse_moa_args(preset, rest), resume


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


# Real corpora: the seconds AST's recipes use for each benchmark.
_REAL_SECONDS = {"esc50": 5.0, "us8k": 4.0, "speechcommands": 1.0, "fsc": 4.0}


def moa_source(cfg: MoAConfig, name: str):
    """(source holding every split or fold, task label, seconds per clip) of one synthetic
    benchmark, or of the real corpus at --data_dir (a benchmark's layout keeps its folds)."""
    if cfg.data_dir:
        layout, full = data.load_corpus(cfg.data_dir, cfg.data_label)
        if layout in data.BENCHMARKS:
            return full, data.BENCHMARKS[layout][1], cfg.max_seconds or _REAL_SECONDS[layout]
        return full, cfg.data_label, cfg.max_seconds or 5.0          # one folder per class
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
    """Fine-tune one method on one benchmark for one seed; eval_moa.py scores best.pt on the test role."""
    done_path = os.path.join(run_dir, "summary.json")
    want = dict(asdict(cfg), bench=bench, method=method, seed=seed, r=r, n_experts=n_experts, slots=slots)
    summary = finished_run(run_dir, want, ignore=RUN_CONTROL)
    if summary is not None:
        return summary
    roles = fold_split(cache["split"], seed)
    train, valid = (FbankData(cache, roles[k], ast["mean"], ast["std"]) for k in ("train", "valid"))
    frames = cache["x"].shape[1]
    torch.manual_seed(seed)
    model, trainable = build_peft_model(ast, method, len(cache["classes"]), frames, r, n_experts, slots)
    model.to(ctx.device)
    steps = cfg.epochs * (len(train) // cfg.batch)
    # The paper's AdamW and cosine schedule; weight decay on every trainable tensor (the paper names
    # no exception). Deviation: gradients clipped to norm 1, as in train.py (Schedule.grad_clip).
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
                  settings={k: v for k, v in want.items() if k not in RUN_CONTROL})
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
    """`all`: every method x benchmark x seed, then eval_moa.py's table. `ablate`: on one
    benchmark, Soft- and Dense-MoA with n adapters of r = budget / n (fixed adapter weights),
    and Soft-MoA with p slots per adapter. Returns the run folders."""
    if ctx.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
    ast = stage_ast(cfg, ctx, resume)
    ablate = command == "ablate"
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
    if ctx.main and cfg.evaluate:                      # eval_moa.py on these runs, and their table
        run_script("eval_moa.py", cfg.out_dir, "--force",
                   "--runs=" + ",".join(os.path.relpath(r, cfg.out_dir) for r in runs))
    return runs


def main(argv: Optional[Sequence[str]] = None) -> None:
    command, cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    ctx = make_ctx(cfg.device, cfg.dtype)
    t0 = time.perf_counter()
    if ctx.main:
        print(f"train_moa.py {command}: device {ctx.device}, {ctx.world} process(es), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, out_dir {cfg.out_dir}")
    moa_main(command, cfg, ctx, resume)
    if ctx.main:
        print(f"train_moa.py {command}: {time.perf_counter() - t0:.0f} s wall")
    if ctx.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

