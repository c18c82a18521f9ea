"""Soft-MoA fine-tuning of a frozen AST (Cappellazzo et al., Interspeech 2024, arXiv 2402.00828).

    python train_moa.py           # pre-train a tiny AST, probes, linear / full / Pfeiffer x benchmark x 5 seeds, tables
    python train_moa.py --methods=single-houlsby,dense-houlsby,soft-houlsby   # the Houlsby rows, same backbone
    python train_moa.py ablate    # adapters at a fixed N x r budget, slots per adapter
    python train_moa.py --config=paper --ast_checkpoint=DIR --data_dir=DIR   # any MoAConfig field as --key=value

The paper's AdamW (lr 5e-3, betas (0.9, 0.98), weight decay 0.1, cosine, no warm-up); best validation loss kept.
Deviations (tiny config, CPU): 64 mel bins, not 128; r = d / 16 = 4 (d / 128 is 1 wide); fbank normalised by the
pre-training clips' mean and std (a real AST: AST's); gradients clipped to norm 1; the head on `pooled_rows` (the
paper's: the mean token; --head_pool=mean). Pre-training: from scratch on 4,800 synthetic scenes, not ImageNet DeiT
weights and AudioSet's 2M clips; tags and phonemes (PHONE_TAGS). b batch, T frames, F mel bins."""
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import encoder as enc
import soft_moa as sm
import synth
from data import UsageError
from loop import (Ctx, Schedule, barrier, check_inputs, check_same_config, finished_run, fit, global_sum, load,
                  make_ctx, out_dir_lock, run_script, save_atomic, split_args, write_json)

# Fields that say which runs to make and where, not how one is made: a finished run is reused whatever they are.
RUN_CONTROL = ("out_dir", "seeds", "evaluate", "probes", "device", "benchmarks", "methods",
               "ablate_experts", "ablate_slots", "ablate_benchmark", "ablate_budget")
# method: (placement, mixture kind); "linear" trains the head alone, "full" every weight.
MOA_METHODS = {"linear": ("none", "single"), "full": ("none", "single"),
               **{f"{kind}-{at}": (at, kind) for at in ("pfeiffer", "houlsby") for kind in sm.KINDS}}
# The AST config fields a backbone checkpoint keeps (its head and mixtures are made per run).
BACKBONE_FIELDS = ("d", "n_layers", "n_heads", "d_ff", "num_mel_bins", "max_length", "patch", "freq_stride",
                   "time_stride", "norm_eps", "qkv_bias")
# Deviation: AudioSet has no phonetic labels. Our scenes' speech is tagged with the phonemes it contains (a bag, no
# order, no word), as a transcribed speech corpus would give; without it the frozen AST knows "speech", not what is said.
PHONE_TAGS = tuple(f"phone:{p}" for p in (*synth.PHONEMES, *synth.DIPHTHONGS))
PROBE_L2 = (1e-3, 1e-2, 1e-1, 1.0)   # the probes' l2 grid, chosen on validation
REAL_SECONDS = {"esc50": 5.0, "us8k": 4.0, "speechcommands": 1.0, "fsc": 4.0}   # AST's recipes, real corpora


def _ints(text: str, name: str) -> List[int]:
    if not all(v.strip().isdecimal() and int(v) >= 1 for v in text.split(",")):
        raise ValueError(f"{name} must be comma-separated integers >= 1, got {text!r}")
    return [int(v) for v in text.split(",")]


def _frames(seconds: float) -> int:
    return 1 + (int(seconds * synth.SAMPLE_RATE) - 400) // 160          # Kaldi fbank: 25 ms window, 10 ms shift


@dataclass
class MoAConfig:
    out_dir: str = "runs/moa"
    benchmarks: str = "esc50,us8k,speechcommands,fsc"   # data.BENCHMARKS names
    methods: str = "linear,full,single-pfeiffer,dense-pfeiffer,soft-pfeiffer"   # MOA_METHODS; Houlsby: README
    seeds: int = 5                  # fold benchmarks: seed i tests on fold i+1 (cross-validation)
    device: str = "auto"
    dtype: str = "auto"
    evaluate: bool = True
    probes: bool = True             # probe_runs; their features take N x (layers + 1) x Fp x d floats (AST-Base: 120k)
    data_dir: str = ""              # a real corpus (any layout data.py reads) instead of the benchmarks
    data_label: str = "event"       # data_dir with one folder per class: what the folders name
    bench_clips: int = 1000         # clips of each synthetic benchmark (all folds / splits)
    max_seconds: float = 0.0        # crop / pad to this; 0: the benchmark's clip length (folder per class: 5 s)
    head_pool: str = "rows"         # the fine-tuning head's pooling, encoder.HEAD_POOLS ("mean": the paper's)
    # the AST and its pre-training on AudioSet-like scenes (multi-label, binary cross-entropy)
    ast_checkpoint: str = ""        # a real AST (hf.load_ast) or our ast.pt: skips pre-training
    ast_d: int = 64
    ast_layers: int = 4
    ast_heads: int = 4
    ast_ff: int = 256
    n_mels: int = 64
    pre_clips: int = 6000
    pre_seconds: float = 2.5        # also the positional grid's length
    pre_epochs: int = 5
    pre_phones: bool = True         # a bag-of-phonemes target beside the tags (see PHONE_TAGS)
    pre_batch: int = 32
    pre_lr: float = 1e-3
    # the mixtures (soft_moa) and the fine-tuning recipe
    r: int = 4                      # adapter bottleneck
    n_experts: int = 7
    slots: int = 1                  # slots per adapter (Soft-MoA)
    epochs: int = 6
    batch: int = 32
    lr: float = 5e-3
    full_lr: float = 3e-3           # full fine-tuning: chosen on validation (README), the paper gives none
    weight_decay: float = 0.1
    # ablate, on one benchmark: Soft- and Dense-MoA with n adapters of r = budget / n, Soft-MoA with p slots each
    ablate_benchmark: str = "fsc"
    ablate_budget: int = 24
    ablate_experts: str = "2,4,8"
    ablate_slots: str = "1,2,4"

    def __post_init__(self):
        for what, names, allowed in (("benchmark", self.benchmarks.split(",") + [self.ablate_benchmark], data.BENCHMARKS),
                                     ("method", self.methods.split(","), MOA_METHODS),
                                     ("device", [self.device], ("auto", "cpu", "cuda")),
                                     ("dtype", [self.dtype], ("auto", "fp32", "bf16")),
                                     ("head_pool", [self.head_pool], enc.HEAD_POOLS)):
            if bad := [name for name in names if name not in allowed]:
                raise ValueError(f"unknown {what} {bad[0]!r}; allowed: {', '.join(allowed)}")
        if small := [k for k in ("seeds", "bench_clips", "pre_clips", "pre_epochs", "pre_batch", "r", "n_experts",
                                 "slots", "epochs", "batch", "ablate_budget", "pre_seconds", "pre_lr", "lr", "full_lr")
                     if not getattr(self, k) > 0]:                                          # ints: >= 1
            raise ValueError(f"{small[0]} must be > 0, got {getattr(self, small[0])}")
        if not self.max_seconds >= 0:
            raise ValueError(f"max_seconds must be >= 0 (0: the benchmark's clip length), got {self.max_seconds}")
        if bad := [n for n in _ints(self.ablate_experts, "ablate_experts") if self.ablate_budget % n]:
            raise ValueError(f"ablate_experts: {bad[0]} adapters do not divide ablate_budget={self.ablate_budget}")
        _ints(self.ablate_slots, "ablate_slots")


# --config=paper: AudioSet-pretrained AST-Base from --ast_checkpoint (required), 128 mel bins, r = d / 128 = 6, the
# paper's mean-token head.
PRESETS = {"tiny": {}, "paper": dict(out_dir="runs/moa-paper", n_mels=128, r=6, epochs=50, batch=32, head_pool="mean")}


def parse_args(argv: Sequence[str]) -> Tuple[str, MoAConfig, bool]:
    """[all | ablate] [--config=NAME] [--resume] [--key=value ...] -> (command, MoAConfig, resume)."""
    command, preset, cfg, resume = split_args(argv, ("all", "ablate"), PRESETS, MoAConfig)
    if preset == "paper" and not cfg.ast_checkpoint:   # its AST fields are tiny: pre-training them is no AST-Base
        raise UsageError("--config=paper fine-tunes AST-Base: pass --ast_checkpoint=PATH (a transformers AST folder)")
    return command, cfg, resume


def fbank_cache(cfg: MoAConfig, ctx: Ctx, name: str) -> dict:
    """OUT_DIR/data/NAME.pt, made once, of "audioset" (pre-training), a benchmark or "data" (--data_dir): {x (N, T, F)
    fp16 log-fbank cropped / zero-padded to the clip length, frames (N,), y (N,) or multi-hot (N, C), split, classes}."""
    if name == "audioset":
        src = synth.SyntheticCorpus(synth.CorpusConfig.audioset_like(n_clips=cfg.pre_clips, clip_seconds=cfg.pre_seconds))
        label, classes, seconds = "tags", list(synth.AUDIOSET_TAGS) + list(PHONE_TAGS) * cfg.pre_phones, cfg.pre_seconds
        want = dict(pre_clips=cfg.pre_clips, pre_seconds=cfg.pre_seconds, n_mels=cfg.n_mels, pre_phones=cfg.pre_phones)
    else:
        if name == "data":
            layout, src = data.load_corpus(cfg.data_dir, cfg.data_label)
            label = data.BENCHMARKS[layout][1] if layout in data.BENCHMARKS else cfg.data_label
            try:                    # audiofolder: --data_label names the column classified; clips without one left out
                src = data.AudioFiles([r for r in src.records if label in r.labels], src.name, {label: src.classes(label)})
            except ValueError as e:
                raise UsageError(f"--data_label={label}: {e}") from None
            seconds = cfg.max_seconds or REAL_SECONDS.get(layout, 5.0)
        else:
            preset, label, _ = data.BENCHMARKS[name]
            corpus = getattr(synth.CorpusConfig, preset)(n_clips=cfg.bench_clips)
            src, seconds = synth.SyntheticCorpus(corpus), cfg.max_seconds or corpus.clip_seconds
        classes = src.classes(label)
        want = dict(data_dir=cfg.data_dir, data_label=label, bench_clips=cfg.bench_clips, seconds=seconds, n_mels=cfg.n_mels)
    path = os.path.join(cfg.out_dir, "data", f"{name}.pt")
    if ctx.main and not os.path.exists(path):
        T, index = _frames(seconds), {c: i for i, c in enumerate(classes)}
        xs, ns, ys = [], [], []
        for j in tqdm(range(len(src)), desc=f"fbank {name}", leave=False, disable=not sys.stderr.isatty()):
            wave = data._audio_tensor(clip := src[j], seconds)
            # Shorter than one AST patch (16 frames; a few real UrbanSound8K slices): zero-padded to it, never empty.
            fb, n = enc.kaldi_fbank(F.pad(wave, (0, max(400 + 15 * 160 - len(wave), 0)))[None], n_mels=cfg.n_mels)
            xs.append(F.pad(fb[0], (0, 0, 0, max(T - fb.shape[1], 0)))[:T].half())   # (1, T', F) -> (T, F)
            ns.append(min(int(n), T))
            if label == "tags":                               # the scene's tags and its word's phonemes, multi-hot
                word = synth.WORDS.get(clip.labels.get("word"), "")                # "y eh s"; "" without speech
                on = {*synth.audioset_tags(clip.labels), *(f"phone:{p}" for p in word.split())}
                ys.append(torch.tensor([float(c in on) for c in classes]))
            else:
                ys.append(index[clip.labels[label]])
        save_atomic(dict(stage_config=want, x=torch.stack(xs), frames=torch.tensor(ns),
                         y=torch.stack(ys) if label == "tags" else torch.tensor(ys),
                         split=[src.split(j) for j in range(len(src))], classes=classes), path)
    barrier(ctx)
    check_same_config(path, want, "fbank cache")
    return load(path)


def fold_split(splits: List[str], seed: int) -> Dict[str, torch.Tensor]:
    """Item indices of train / valid / test. Corpora in k folds (ESC-50, UrbanSound8K) are cross-validated:
    seed i tests on fold i % k + 1, validates on the next, trains on the others."""
    names = sorted(set(splits), key=lambda s: (len(s), s))
    test, valid, plain = names[seed % len(names)], names[(seed + 1) % len(names)], set(names) <= {"train", "valid", "test"}
    role = {s: s if plain else "test" if s == test else "valid" if s == valid else "train" for s in names}
    out = {r: torch.tensor([i for i, s in enumerate(splits) if role[s] == r]).long() for r in ("train", "valid", "test")}
    if empty := [r for r, idx in out.items() if len(idx) == 0]:
        raise UsageError(f"no {empty[0]} clips (splits present: {', '.join(names)})")
    return out


class FbankData:
    """Clips of one role (train / valid / test): normalised AST inputs and their losses."""

    def __init__(self, cache: dict, idx: torch.Tensor, mean: float, std: float):
        self.x, self.frames, self.y, self.mean, self.std = cache["x"][idx], cache["frames"][idx], cache["y"][idx], mean, std

    def __len__(self):
        return len(self.y)

    def batch(self, idx, device):
        x = (self.x[idx].to(device).float() - self.mean) / (2 * self.std)        # (b, T, F), AST's norm
        mask = torch.arange(x.shape[1])[None, :] < self.frames[idx][:, None]      # (b, T), on the host: no sync
        return x, (None if bool(mask.all()) else mask.to(device)), self.y[idx].to(device)

    def loss(self, model: nn.Module, idx: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        """Summed over clips idx: cross-entropy on class indices y (b,), on multi-hot y (b, C) BCE averaged over tags."""
        x, mask, y = self.batch(idx, ctx.device)
        with ctx.autocast():
            logits = model(x, mask).logits
        if y.dim() == 2:
            return F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum") / y.shape[1]
        return F.cross_entropy(logits.float(), y, reduction="sum")

    def step_loss(self, batch: int, ctx: Ctx, key: str):
        """loop.fit's step_loss: the global batch's mean loss, logged as `key`."""
        def step_loss(m, step, idx):
            loss = self.loss(m, idx, ctx)
            return loss * ctx.world / batch, {key: float(global_sum(loss.detach(), ctx)) / batch}
        return step_loss

    @torch.no_grad()
    def mean_loss(self, model: nn.Module, ctx: Ctx, chunk: int) -> float:
        """Mean loss per clip (validation), `chunk` clips at a time."""
        model.eval()
        return sum(float(self.loss(model, torch.arange(i, min(i + chunk, len(self))), ctx))
                   for i in range(0, len(self), chunk)) / len(self)


def _backbone(acfg: enc.ASTConfig, sd: dict) -> dict:
    return dict(config={k: v for k, v in asdict(acfg).items() if k in BACKBONE_FIELDS},
                model={k: v for k, v in sd.items() if not k.startswith("head.")})


def stage_ast(cfg: MoAConfig, ctx: Ctx, resume: bool) -> dict:
    """Pre-train (or load) the AST: {config (BACKBONE_FIELDS), backbone state dict, fbank mean, std, summary}."""
    if cfg.ast_checkpoint:                              # found and parsed at start-up: loop.check_inputs
        out = load(cfg.ast_checkpoint) if cfg.ast_checkpoint.endswith(".pt") else None
        if not (isinstance(out, dict) and "stage_config" in out):          # not an ast.pt of an earlier run
            from hf import load_ast                                         # Hugging Face / state-dict reader
            model, report = load_ast(cfg.ast_checkpoint)
            if ctx.main:
                print(report)
            out = dict(_backbone(model.cfg, model.state_dict()), mean=enc.AST_MEAN, std=enc.AST_STD)
        if out["config"]["num_mel_bins"] != cfg.n_mels:
            raise UsageError(f"{cfg.ast_checkpoint}: the AST takes {out['config']['num_mel_bins']} mel bins but "
                             f"--n_mels={cfg.n_mels}; set --n_mels={out['config']['num_mel_bins']}")
        return out
    run_dir, final = os.path.join(cfg.out_dir, "ast"), os.path.join(cfg.out_dir, "ast", "ast.pt")
    acfg = enc.ASTConfig(d=cfg.ast_d, n_layers=cfg.ast_layers, n_heads=cfg.ast_heads, d_ff=cfg.ast_ff,
                         num_mel_bins=cfg.n_mels, max_length=_frames(cfg.pre_seconds),
                         n_classes=len(synth.AUDIOSET_TAGS) + len(PHONE_TAGS) * cfg.pre_phones)
    want = dict(asdict(acfg), epochs=cfg.pre_epochs, batch=cfg.pre_batch, lr=cfg.pre_lr, pre_clips=cfg.pre_clips,
                pre_seconds=cfg.pre_seconds, n_mels=cfg.n_mels, pre_phones=cfg.pre_phones)
    if not os.path.exists(final):
        cache = fbank_cache(cfg, ctx, "audioset")
        roles = fold_split(cache["split"], 0)
        tr = cache["x"][roles["train"]].float()
        real = torch.arange(tr.shape[1])[None, :] < cache["frames"][roles["train"], None]   # (N, T)
        mean, std = float(tr[real].mean()), float(tr[real].std())    # AST normalises by its data's stats
        train, valid = (FbankData(cache, roles[r], mean, std) for r in ("train", "valid"))
        torch.manual_seed(0)
        model = enc.AST(acfg).to(ctx.device)
        s = Schedule(cfg.pre_epochs * (len(train) // cfg.pre_batch), cfg.pre_batch, cfg.pre_lr, warmup=20, weight_decay=0.05)
        summary = fit("ast", model, train.step_loss(s.batch, ctx, "bce"), s, ctx, run_dir, resume, 0,
                      len(train), state=model.state_dict, load_state=model.load_state_dict,
                      validate=lambda: valid.mean_loss(model, ctx, 128), eval_every=max(s.steps // 4, 1),
                      log_every=max(s.steps // 8, 1), tokens_per_item=acfg.n_tokens, settings=want)
        if ctx.main:
            save_atomic(dict(stage_config=want, **_backbone(acfg, load(os.path.join(run_dir, "best.pt"))),
                             mean=mean, std=std, summary=summary), final)
        barrier(ctx)
    check_same_config(final, want, "pre-trained AST")
    return load(final)


def build_peft_model(ast: dict, method: str, n_classes: int, frames: int, r: int, n_experts: int,
                     slots: int, head_pool: str = "rows") -> Tuple[enc.AST, List[str]]:
    """The pre-trained AST with the method's mixtures and a new head; returns it and what trains."""
    placement, kind = MOA_METHODS[method]
    c = dict(ast["config"])
    grid_src = enc.ASTConfig(**c).grid
    # Deviation: shorter clips use the first time columns of the position table (AST's recipe
    # zero-pads every clip to the table's length); longer ones get the table interpolated.
    c["max_length"] = max(c["max_length"], frames)
    model = enc.AST(enc.ASTConfig(**c, placement=placement, adapter_kind=kind, r=r, n_experts=n_experts,
                                  slots_per_expert=slots, n_classes=n_classes, head_pool=head_pool))
    sd = dict(ast["model"])
    if model.cfg.grid != grid_src:                     # longer clips than pre-training saw
        sd["pos_embed"] = enc.resize_pos_embed(sd["pos_embed"], grid_src, model.cfg.grid)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    new = [k for k in missing if not (k.startswith("head.") or ".adapters." in k)]
    if new or unexpected:
        raise UsageError(f"the AST checkpoint does not fit: missing {new[:4]}, unexpected {unexpected[:4]}")
    names = [k for k, _ in model.named_parameters()]
    trainable = (names if method == "full" else [k for k in names if k.startswith("head.")] if method == "linear"
                 else sm.mark_trainable(model, extra=("norm", "head")))
    for k, p in model.named_parameters():
        p.requires_grad_(k in trainable)
    return model, trainable


def peft_run(cfg: MoAConfig, ast: dict, ctx: Ctx, resume: bool, cache: dict, run_dir: str, bench: str, method: str,
             n_experts: int, r: int, slots: int, seed: int) -> dict:
    """Fine-tune one method on one benchmark for one seed; eval_moa.py scores best.pt on the test role."""
    want = dict(asdict(cfg), bench=bench, method=method, seed=seed, r=r, n_experts=n_experts, slots=slots)
    settings = {k: v for k, v in want.items() if k not in RUN_CONTROL}
    if (summary := finished_run(run_dir, settings)) is not None:
        return summary
    roles = fold_split(cache["split"], seed)
    train, valid = (FbankData(cache, roles[k], ast["mean"], ast["std"]) for k in ("train", "valid"))
    frames = cache["x"].shape[1]
    torch.manual_seed(seed)
    model, trainable = build_peft_model(ast, method, len(cache["classes"]), frames, r, n_experts, slots, cfg.head_pool)
    model.to(ctx.device)
    steps_per_epoch = len(train) // cfg.batch
    # The paper's AdamW and cosine schedule; weight decay on every trainable tensor (the paper names no exception).
    s = Schedule(cfg.epochs * steps_per_epoch, cfg.batch, cfg.full_lr if method == "full" else cfg.lr, warmup=0,
                 shape="cosine", weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    summary = fit(f"{bench} {method} s{seed}", model, train.step_loss(s.batch, ctx, "ce"), s, ctx, run_dir, resume,
                  seed, len(train), state=lambda: {k: v for k, v in model.state_dict().items() if k in trainable},
                  load_state=lambda sd: model.load_state_dict(sd, strict=False),
                  validate=lambda: valid.mean_loss(model, ctx, 256), eval_every=steps_per_epoch,
                  verbose=False, settings=settings)
    m = 2 + model.cfg.grid[0] * ((frames - model.cfg.patch) // model.cfg.time_stride + 1)     # tokens per clip
    mixtures = sum(len(b.adapters) for b in model.blocks)
    summary.update(bench=bench, method=method, seed=seed, config=want, trainable=len(trainable),
                   params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   head_params=sum(p.numel() for p in model.head.parameters()),
                   macs_per_token=mixtures * sm.macs_per_token(model.cfg.adapter_kind, model.cfg.d, r, n_experts, slots, m),
                   tokens=m, ms_per_step=1e3 * summary["seconds"] / s.steps, classes=cache["classes"],
                   n_train=len(train), n_valid=len(valid), n_test=len(roles["test"]))
    if ctx.main:
        write_json(summary, os.path.join(run_dir, "summary.json"))
    barrier(ctx)
    return summary


@torch.no_grad()
def frozen_features(ast: dict, cache: dict, ctx: Ctx, chunk: int = 128) -> torch.Tensor:
    """(N, (L + 1) Fp d): every clip's `pooled_rows` of each block's output and of the final norm, concatenated.
    Deviation: AST probes read one pooled token; at d = 64 that loses where in frequency and how deep a pattern sits."""
    model = build_peft_model(ast, "linear", 1, cache["x"].shape[1], 1, 1, 1)[0].to(ctx.device).eval()
    clips, hs, out = FbankData(cache, torch.arange(len(cache["y"])), ast["mean"], ast["std"]), [], []
    hooks = [blk.register_forward_hook(lambda mod, args, o: hs.append(o[0])) for blk in model.blocks]
    try:
        for i in range(0, len(clips), chunk):
            hs.clear()
            with ctx.autocast():
                o = model(*clips.batch(torch.arange(i, min(i + chunk, len(clips))), ctx.device)[:2])
            out.append(torch.cat([enc.pooled_rows(h, o.mask, model.cfg.grid[0]) for h in hs + [o.tokens]], 1).float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(out)


def mean_logmel(cache: dict) -> torch.Tensor:
    """(N, F): each clip's log-mel averaged over its real frames, the floor a frozen backbone must clear."""
    return data.frame_mean(cache["x"], cache["frames"])


def probe_runs(cfg: MoAConfig, ast: dict, ctx: Ctx, cache: dict, bench: str) -> None:
    """OUT_DIR/BENCH/probe-s{seed}.json: data.probe_fit on frozen_features and on mean_logmel, on each seed's
    folds; l2 chosen per side on the valid role from PROBE_L2, then scored on test."""
    paths = {s: os.path.join(cfg.out_dir, bench, f"probe-s{s}.json") for s in range(cfg.seeds)}
    todo = [s for s, p in paths.items() if not os.path.exists(p)] if ctx.main else []
    feats = dict(frozen=frozen_features(ast, cache, ctx), log_mel=mean_logmel(cache)) if todo else {}
    y, C, done = cache["y"], len(cache["classes"]), {}
    for seed in todo:
        roles, path = fold_split(cache["split"], seed), paths[seed]
        if (key := tuple(tuple(v.tolist()) for v in roles.values())) not in done:   # split corpora: every seed's
            done[key] = {}
            for name, x in feats.items():
                acc = {}                                           # l2 -> (valid, test) accuracy
                for l2 in PROBE_L2:
                    predict = data.probe_fit((x[roles["train"]], y[roles["train"]]), C, l2)
                    acc[l2] = [float((predict(x[roles[r]]) == y[roles[r]]).float().mean()) for r in ("valid", "test")]
                l2 = max(PROBE_L2, key=lambda k: acc[k][0])
                done[key][name] = dict(l2=l2, valid=acc[l2][0], test=acc[l2][1], width=x.shape[1])
        write_json(dict(bench=bench, seed=seed, **done[key]), path)
        print(f"{bench} s{seed} probe valid / test: frozen AST " + " | mean log-mel ".join(
            f"{done[key][k]['valid']:.3f} / {done[key][k]['test']:.3f}" for k in ("frozen", "log_mel")))
    barrier(ctx)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`all` or `ablate` (MoAConfig's ablate_* fields): train the runs not yet finished, then eval_moa.py on them."""
    command, cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(cfg, ("ast_checkpoint",), cfg.data_label)
    ctx = make_ctx(cfg.device, cfg.dtype)
    with out_dir_lock(cfg.out_dir, ctx):
        if ctx.main:
            print(f"train_moa.py {command}: device {ctx.device}, {ctx.world} process(es), out_dir {cfg.out_dir}")
            write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
        run_all(command, cfg, resume, ctx)
    if ctx.world > 1:
        dist.destroy_process_group()


def run_all(command: str, cfg: MoAConfig, resume: bool, ctx: Ctx) -> None:
    ablate = command == "ablate"
    benches = ["data"] if cfg.data_dir else [cfg.ablate_benchmark] if ablate else cfg.benchmarks.split(",")
    caches = {b: fbank_cache(cfg, ctx, b) for b in benches}      # first: a bad --data_label stops before pre-training
    ast = stage_ast(cfg, ctx, resume)
    grid = [(m, cfg.n_experts, cfg.r, cfg.slots) for m in cfg.methods.split(",")]
    if ablate:
        ns = sorted(_ints(cfg.ablate_experts, "ablate_experts"))
        n_mid = ns[len(ns) // 2]                       # the slots sweep runs at the middle adapter count
        grid = [(f"{kind}-pfeiffer", n, cfg.ablate_budget // n, 1) for kind in ("soft", "dense") for n in ns]
        grid += [("soft-pfeiffer", n_mid, cfg.ablate_budget // n_mid, p) for p in _ints(cfg.ablate_slots, "ablate_slots")]
    runs = [(os.path.join("ablate", b, f"{m}-n{n}-r{r}-p{p}-s{seed}") if ablate else os.path.join(b, f"{m}-s{seed}"),
             b, m, n, r, p, seed) for b in benches for m, n, r, p in dict.fromkeys(grid) for seed in range(cfg.seeds)]
    for b in [] if ablate or not cfg.probes else benches:
        probe_runs(cfg, ast, ctx, caches[b], b)
    for name, *run in runs:
        peft_run(cfg, ast, ctx, resume, caches[run[0]], os.path.join(cfg.out_dir, name), *run)
    if ctx.main and cfg.evaluate:                      # eval_moa.py on these runs, and their table
        run_script("eval_moa.py", cfg.out_dir, "--force", "--runs=" + ",".join(run[0] for run in runs))


if __name__ == "__main__":
    data.cli(main)
