"""Train the MoE-Adapter comparison at a scale that fits the machine: the paper's audio language
model, the MoE adapter against its dense baselines (Lei et al., arXiv 2601.02967). The Soft-MoA
comparison (Cappellazzo et al., arXiv 2402.00828) is train_moa.py; the training loop and process
plumbing both share are in loop.py.

    audio -> log-mel -> Whisper-style encoder (frozen) -> adapter -> decoder LLM -> answer

The pipeline, one stage per command, each checkpointed in --out_dir and reused when finished:

    python train.py                        # everything below on the tiny config, then eval.py's table
    python train.py encoder                # 1. masked-spectrogram pre-training of the encoder
    python train.py llm                    # 2. text-only pre-training of the LLM
    python train.py adapter --adapter=moe --seed=0    # 3. one adapter run (3a + 3b)
    python train.py heterogeneity          # control: the comparison on speech alone vs all domains
    python train.py capacity               # control: the comparison with narrower / wider experts
    python train.py --config=small --seeds=5          # any TrainConfig field as --key=value
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel (gloo CPU / nccl GPU)

1. The encoder learns without any evaluation label: spans of log-mel frames are replaced by a
   learned vector and the encoder reconstructs them (a masked-acoustic-model objective standing in
   for Whisper's pre-training). `--encoder_checkpoint=PATH` (a Whisper checkpoint that
   encoder.load_whisper_encoder reads, or our own encoder.pt) skips it.
2. The LLM learns on text alone: documents state a few facts (bare label words) then ask one task
   question, or ask for the caption (every fact in a fixed order); the loss is on the answer. The
   audio tokens later take the place of the facts. `--llm_checkpoint=PATH` (our llm.pt, or a
   Hugging Face directory with tokenizer.json and an "audio_token_id" in its config.json) skips it.
3. Each adapter (`moe`, `moe-random`, `dense-flops`, `dense-params`, see moe_adapter.build_adapter)
   is trained as the paper's family trains (stage_adapter): 3a alignment, the adapter alone on the
   caption of every clip; 3b instruction tuning, the adapter and the LLM on every (clip, task)
   question, next-token loss on the answer plus the MoE losses over the global batch (Eq. 4).

The frozen encoder's outputs are computed once and cached (`cache_features`), so an adapter step
costs only the adapter and the LLM. With --cache_features=false nothing is cached (the paper
config's 30 s windows would not fit): each batch's clips are read, turned into log-mels and
encoded again, in every stage and in eval.py. Each adapter run keeps last.pt (resume), best.pt
(lowest validation loss, a copy) and metrics.jsonl per phase (3a in its align/ folder); eval.py
then scores the test split and prints the comparison.

Notation in shape comments: B batch, F mel bins, T mel frames, T' encoder frames, N tokens
(audio tokens after stacking, or text tokens), D LLM width, E experts, V vocabulary, G global batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
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
from loop import (Ctx, Schedule, barrier, check_same_config, finished_run, fit, global_sum, load, make_ctx,
                  run_script, save_atomic, split_args, write_json)
from moe_adapter import ADAPTER_KINDS, MoEAdapterConfig, build_adapter, count_params

COMMANDS = ("all", "encoder", "llm", "adapter", "heterogeneity", "capacity")
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
    align_steps: int = 1200
    align_lr: float = 3e-3
    # 3b. instruction tuning: the adapter and the LLM (full | lora | frozen) on the questions
    tune_llm: str = "full"
    tune_captions: bool = True      # 3b also trains on every clip's caption (Eureka-Audio's SFT keeps dense captions)
    llm_tune_lr: float = 1e-3       # the LLM's own (lower) lr in 3b; the adapter keeps `lr`
    lora_rank: int = 8              # tune_llm=lora: LoRA rank on the LLM's attention projections
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 20                # warm-up-stable-decay, as the paper trains
    decay_frac: float = 0.5         # share of each phase's steps in the linear decay
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 250           # validation loss (and best.pt) every this many steps
    valid_items: int = 512          # validation questions used for it
    log_every: int = 50
    cache_features: bool = True     # run the frozen encoder once over every clip (false: on every batch)
    widths: str = "0.25,4"          # `capacity`: factors on d_expert and d_shared, each a whole comparison

    def __post_init__(self):
        try:
            ok = all(float(w) > 0 for w in self.widths.split(","))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"widths must be comma-separated factors > 0 (e.g. 0.25,4), got {self.widths!r}")
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
                             align_steps=4000, steps=4000, batch=64, lr=1e-3, llm_tune_lr=3e-4,
                             eval_every=250), **kw})

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
RUN_CONTROL = ("out_dir", "adapters", "seeds", "evaluate", "workers", "device", "compile", "cache_features", "widths")


def parse_args(argv: Sequence[str]):
    """[COMMAND] [--config=NAME] [--resume] [--key=value ...] -> (command, TrainConfig, resume)."""
    command, preset, resume, rest = split_args(argv, COMMANDS, PRESETS)
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
# Data: sources, the log-mel cache, instruction items


# The fixed folds of the corpora in folds (train, valid, test); the others keep their splits.
REAL_FOLDS = {"esc50": (["fold1", "fold2", "fold3"], ["fold4"], ["fold5"]),
              "us8k": ([f"fold{k}" for k in range(1, 9)], ["fold9"], ["fold10"])}


def real_sources(root: str, label: str) -> Dict[str, object]:
    """train/valid/test of a real corpus in any layout data.py reads (detected from its files)."""
    layout, full = data.load_corpus(root, label)
    folds = REAL_FOLDS.get(layout, (["train"], ["valid"], ["test"]))
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


def clip_labels(items: List[dict]) -> Dict[int, Dict[str, str]]:
    """{clip index: {task: answer}}: every label each clip of a split's questions carries."""
    by_clip: Dict[int, Dict[str, str]] = {}
    for it in items:
        by_clip.setdefault(it["index"], {})[it["task"]] = it["answer"]
    return by_clip


def caption_items(items: List[dict]) -> List[dict]:
    """One alignment item per clip: the caption prompt, answered by every label the clip carries."""
    return [dict(index=j, task="caption", group="caption", question=CAPTION, prompt=CAPTION,
                 answer=caption(v), choices=[]) for j, v in clip_labels(items).items()]


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
    """Sum of next-token cross-entropies (llm.lm_loss, Eq. 5) over the labelled positions, and
    their count: the loss of a global batch is sum / global count, whatever the split over processes."""
    return lm.lm_loss(logits, labels, reduction="sum"), (labels[:, 1:] != IGNORE_INDEX).sum().float()


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
        or LoRA, or frozen) on every (clip, task) question, and with tune_captions on every clip's
        caption too (Eureka-Audio's SFT mix keeps dense captions); next-token loss + the MoE losses.
    Deviation: the paper's family unfreezes everything in stage 2 and does not publish what the
    MoE-Adapter paper freezes; the encoder stays frozen here (its features are cached). Steps,
    lrs and the caption mix are our choices, made on validation loss (README)."""
    run_dir = os.path.join(cfg.out_dir, run_name(kind, seed))
    done_path = os.path.join(run_dir, "summary.json")
    want = asdict(cfg) | dict(adapter=kind, seed=seed)
    summary = finished_run(run_dir, want, ignore=RUN_CONTROL)
    if summary is not None:
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
    tune = parts["tune_train"] if cfg.tune_captions else train
    summary.update(fit(f"{kind} s{seed}", step_model, step_loss_on(tune), s, run_dir=run_dir, n_items=len(tune),
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
        captions = {s: caption_items(items[s]) for s in ("train", "valid")}
        for split, its in (("align_train", captions["train"]), ("align_valid", captions["valid"]),
                           ("tune_train", items["train"] + captions["train"])):
            split_of = split.rsplit("_", 1)[1]
            parts[split] = AdapterData(its, features[split_of], parts["tok"], cfg.prompt, parts["domains"][split_of])
    parts["prepare_seconds"] = time.perf_counter() - t0
    return parts


# ----------------------------------------------------------------------------------------------
# The command line


def train_all(cfg: TrainConfig, ctx: Ctx, resume: bool) -> None:
    """`all`: the pre-training stages once, every adapter kind x seed, then eval.py's comparison."""
    parts = prepare(cfg, ctx, resume)
    runs = [(k, s) for k in cfg.adapters.split(",") for s in range(cfg.seeds)]
    for kind, seed in runs:
        stage_adapter(cfg, kind, seed, parts, ctx, resume)
    if ctx.main and cfg.evaluate:                          # eval.py on these runs, and their comparison
        run_script("eval.py", cfg.out_dir, "--force", "--runs=" + ",".join(run_name(k, s) for k, s in runs))


def control_settings(command: str, cfg: TrainConfig) -> List[Tuple[str, TrainConfig]]:
    """The controls: the main comparison (cfg.out_dir) beside the same comparison
    heterogeneity: on speech clips alone (its own corpus, encoder and LLM, in OUT/speech);
    capacity: with every expert `widths` times as wide (the main run's encoder and LLM, in OUT/width-xW)."""
    settings = [("main run", cfg)]
    if command == "heterogeneity":
        return settings + [("speech only", dataclasses.replace(cfg, domains="speech",
                                                              out_dir=os.path.join(cfg.out_dir, "speech")))]
    ckpt = dict(encoder_checkpoint=cfg.encoder_checkpoint or os.path.join(cfg.out_dir, "encoder", "encoder.pt"),
                llm_checkpoint=cfg.llm_checkpoint or os.path.join(cfg.out_dir, "llm", "llm.pt"))
    for w in (float(x) for x in cfg.widths.split(",")):
        settings.append((f"experts x{w:g}", dataclasses.replace(
            cfg, d_expert=max(1, round(cfg.d_expert * w)), d_shared=max(1, round(cfg.d_shared * w)),
            out_dir=os.path.join(cfg.out_dir, f"width-x{w:g}"), **ckpt)))
    return settings


def control_table(settings: List[Tuple[str, TrainConfig]]) -> str:
    """One row per setting and kind: accuracy (mean ± std over its seeds) and the MoE's margin over
    it, paired by seed (seeds won), from each setting's comparison.json."""
    lines = ["| setting | adapter | seeds | semantic | paralinguistic | MoE − it, semantic | MoE − it, paralinguistic |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
    for label, c in settings:
        with open(os.path.join(c.out_dir, "comparison.json")) as f:
            table = json.load(f)
        for kind, row in table["kinds"].items():
            pr = table["paired"].get(f"moe - {kind}")
            margin = [f"{pr[g]['mean']:+.3f} ± {pr[g]['std']:.3f} ({pr[g]['wins']}/{pr[g]['n']})" if pr else "–"
                      for g in ("semantic", "paralinguistic")]
            lines.append(f"| {label} (d_expert {c.d_expert}) | {kind} | {len(row['seeds'])} | {fmt(row['semantic_closed'])} "
                         f"| {fmt(row['paralinguistic_closed'])} | {margin[0]} | {margin[1]} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    command, cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    ctx = make_ctx(cfg.device, cfg.dtype)
    t0 = time.perf_counter()
    if ctx.main:
        print(f"train.py {command}: device {ctx.device}, {ctx.world} process(es), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, out_dir {cfg.out_dir}")
    if command == "all":
        train_all(cfg, ctx, resume)
    elif command in ("heterogeneity", "capacity"):
        settings = control_settings(command, cfg)
        if not os.path.exists(os.path.join(cfg.out_dir, "comparison.json")):     # the main run, as it is
            train_all(dataclasses.replace(cfg, evaluate=True), ctx, resume)
        for _, c in settings[1:]:
            if c.encoder_checkpoint and ctx.main:       # same clips and encoder: the main run's caches
                os.makedirs(c.out_dir, exist_ok=True)
                for f in ("mel.pt", "features.pt"):
                    src, dst = os.path.join(cfg.out_dir, f), os.path.join(c.out_dir, f)
                    if os.path.exists(src) and not os.path.exists(dst):
                        os.link(src, dst)
            train_all(dataclasses.replace(c, evaluate=True), ctx, resume)
        if ctx.main:
            text = control_table(settings)
            print(f"\n{command}: test accuracy, mean ± std over seeds; MoE margins paired by seed (seeds won)"
                  f"\n\n{text}\n")
            with open(os.path.join(cfg.out_dir, f"{command}.md"), "w") as f:
                f.write(text + "\n")
    else:
        stages = {"encoder": ("encoder",), "llm": ("llm",)}.get(command, ("encoder", "llm", "features"))
        parts = prepare(cfg, ctx, resume, stages)
        if command == "adapter":
            stage_adapter(cfg, cfg.adapter, cfg.seed, parts, ctx, resume)
    if ctx.main:
        print(f"train.py {command}: {time.perf_counter() - t0:.0f} s wall")
    if ctx.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
