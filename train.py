"""Train the MoE-Adapter comparison (Lei et al., arXiv 2601.02967) at a scale that fits the machine:
audio -> log-mel -> Whisper-style encoder (frozen) -> adapter -> decoder LLM -> answer. The frozen parts
are pre-trained by pretrain.py; Soft-MoA (arXiv 2402.00828) is train_moa.py; the shared loop is loop.py.

    python train.py                        # every stage on the tiny config, then eval.py's comparison
    python train.py encoder                # 1. masked log-mel pre-training of the encoder
    python train.py llm                    # 2. text-only pre-training of the LLM
    python train.py adapter --adapter=moe --seed=0    # 3. one adapter run (3a alignment + 3b tuning)
    python train.py heterogeneity          # control: the comparison on speech alone vs all domains
    python train.py capacity               # control: the comparison with narrower / wider experts
    python train.py --config=small --seeds=5          # any TrainConfig field as --key=value
    torchrun --nproc_per_node=2 train.py ...          # DistributedDataParallel (gloo CPU / nccl GPU)

Finished stages in --out_dir are reused; --encoder_checkpoint / --llm_checkpoint skip stages 1 / 2.
Shapes: B batch, F mel bins, T mel frames, T' encoder frames, N tokens, D LLM width, E experts, G global batch.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import encoder as enc
import llm as lm
from data import UsageError
from loop import (Ctx, Schedule, barrier, check_inputs, finished_run, fit, global_sum, load, make_ctx, out_dir_lock,
                  read_json, run_script, save_atomic, split_args, write_json)
from moe_adapter import ADAPTER_KINDS, MoEAdapterConfig, build_adapter, count_params
from pretrain import CAPTION, caption, stage_encoder, stage_llm, token_ce


# --- Config: one block of defaults (the tiny config), presets, strict --key=value overrides
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
    groups: str = ""                # data_dir in the audiofolder layout: COLUMN:semantic|paralinguistic,... (data.py)
    n_clips: int = 4000
    domains: str = "all"            # synthetic corpus: "all" four domains, or "speech" alone (a control)
    clip_seconds: float = 1.0       # also the crop of longer real clips
    data_seed: int = 0
    # 1. encoder pre-training (masked log-mel reconstruction)
    encoder_checkpoint: str = ""    # Whisper (any hf.load_whisper_encoder reads) or our encoder.pt
    n_mels: int = 80
    enc_d: int = 64
    enc_layers: int = 2
    enc_heads: int = 4
    enc_ff: int = 256
    enc_steps: int = 600
    enc_batch: int = 32
    enc_lr: float = 1e-3
    # 2. LLM pre-training on templated text
    llm_checkpoint: str = ""        # our llm.pt, or a Hugging Face folder with "audio_token_id" in config.json
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
    # 3a. alignment: the adapter alone (encoder and LLM frozen) learns to caption every label of a clip
    align_steps: int = 1200
    align_lr: float = 3e-3
    # 3b. instruction tuning: the adapter and the LLM (full | lora | frozen) on the questions and captions
    tune_llm: str = "full"
    llm_tune_lr: float = 1e-3       # the LLM's own (lower) lr in 3b; the adapter keeps `lr`
    lora_rank: int = 8              # tune_llm=lora: LoRA rank on the LLM's attention projections
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 20                # warm-up-stable-decay, as the paper trains
    decay_frac: float = 0.5         # share of each phase's steps in the linear decay
    eval_every: int = 250           # validation loss (and best.pt) every this many steps
    valid_items: int = 512          # validation questions used for it
    log_every: int = 50
    cache_features: bool = True     # run the frozen encoder once over every clip (false: on every batch)
    widths: str = "0.25,4"          # `capacity`: factors on d_expert and d_shared, each a whole comparison

    def __post_init__(self):
        for name, allowed in (("domains", ("all", "speech")), ("tune_llm", ("full", "lora", "frozen")),
                              ("device", ("auto", "cpu", "cuda")), ("dtype", ("auto", "fp32", "bf16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {getattr(self, name)!r}")
        if bad := [k for k in self.adapters.split(",") + [self.adapter] if k not in ADAPTER_KINDS]:
            raise ValueError(f"unknown adapter {bad[0]!r}; allowed: {', '.join(ADAPTER_KINDS)}")
        if bad := [k for k in ("seeds", "enc_steps", "enc_batch", "llm_steps", "llm_batch", "steps", "batch",
                               "eval_every", "log_every", "max_facts", "n_clips", "clip_seconds", "enc_lr", "llm_lr",
                               "align_lr", "llm_tune_lr", "lr") if not getattr(self, k) > 0]:     # ints: >= 1
            raise ValueError(f"{bad[0]} must be > 0, got {getattr(self, bad[0])}")
        if not all(w.replace(".", "", 1).isdigit() and float(w) > 0 for w in self.widths.split(",")):
            raise ValueError(f"widths must be comma-separated factors > 0 (e.g. 0.25,4), got {self.widths!r}")
        self.adapter_config(self.enc_d, self.llm_d)          # MoEAdapterConfig checks its own fields

    def adapter_config(self, d_in: int, d_out: int) -> MoEAdapterConfig:
        fields = ("stack", "n_experts", "top_k", "d_expert", "n_shared", "d_shared", "balance_weight")
        return MoEAdapterConfig(d_in=d_in, d_out=d_out, **{k: getattr(self, k) for k in fields})

    @property
    def mel_frames(self) -> int:
        return math.ceil(self.clip_seconds * data.SAMPLE_RATE / 160)    # T: a clip_seconds window, 10 ms hop

    def mel_config(self) -> dict:
        """What a log-mel depends on: mel.pt and the encoder pre-training are checked against it."""
        fields = ("data_dir", "data_label", "n_clips", "domains", "clip_seconds", "data_seed", "n_mels")
        return {k: getattr(self, k) for k in fields}

# tiny (the defaults) for a 2-core CPU; small for one GPU; paper: Whisper-large-v3 and Qwen3-1.7B from
# local checkpoints, the paper's adapter (E 8, top-4, experts 1280 wide, one shared expert of 10240).
# Deviation (paper): its adapter takes 2560-wide tokens at 12.5 Hz from a front-end it does not describe;
# stacking 2 frames of large-v3's 1280 gives the same width (so the same 94.4M parameters) at 25 Hz.
PRESETS = {"tiny": {},
           "small": dict(out_dir="runs/small", n_clips=20000, clip_seconds=2.5, enc_d=256, enc_layers=4,
                         enc_heads=4, enc_ff=1024, enc_steps=4000, enc_batch=64, llm_d=384, llm_layers=6,
                         llm_heads=6, llm_kv_heads=2, llm_ff=1024, llm_steps=6000, llm_batch=128, llm_lr=1e-3,
                         d_expert=256, d_shared=1024, align_steps=4000, steps=4000, batch=64, lr=1e-3,
                         llm_tune_lr=3e-4, eval_every=250),
           "paper": dict(out_dir="runs/paper", n_mels=128, clip_seconds=30.0, stack=2, n_experts=8, top_k=4,
                         d_expert=1280, n_shared=1, d_shared=10240, lr=1e-5, warmup=20, batch=16, steps=20000,
                         eval_every=1000, cache_features=False)}
COMMANDS = ("all", "encoder", "llm", "adapter", "heterogeneity", "capacity")
# What to run and where, not what a run learns: a finished run is reused whatever they are.
RUN_CONTROL = ("out_dir", "adapters", "seeds", "evaluate", "workers", "device", "compile", "cache_features", "widths",
               "groups")


def parse_args(argv: Sequence[str]):
    """[COMMAND] [--config=NAME] [--resume] [--key=value ...] -> (command, TrainConfig, resume)."""
    command, preset, cfg, resume = split_args(argv, COMMANDS, PRESETS, TrainConfig)
    if preset == "paper" and not (cfg.encoder_checkpoint and cfg.llm_checkpoint):
        raise UsageError("--config=paper runs on the real checkpoints: pass --encoder_checkpoint=PATH "
                         "(Whisper large-v3) and --llm_checkpoint=DIR (Qwen3-1.7B, a Hugging Face folder)")
    return command, cfg, resume


# --- Data: sources, log-mels and encoder features (cached in out_dir, or live), instruction items
REAL_FOLDS = {"esc50": (["fold1", "fold2", "fold3"], ["fold4"], ["fold5"]),      # (train, valid, test)
              "us8k": ([f"fold{k}" for k in range(1, 9)], ["fold9"], ["fold10"])}


def sources(cfg: TrainConfig) -> Dict[str, object]:
    """train/valid/test: the synthetic corpus, or a real one in any layout data.py reads."""
    if cfg.data_dir:
        layout, full = data.load_corpus(cfg.data_dir, cfg.data_label, cfg.groups)
        folds = REAL_FOLDS.get(layout, (["train"], ["valid"], ["test"]))
        return dict(zip(("train", "valid", "test"), (full.select(f) for f in folds)))
    weights = dict(domain_weights=(1.0, 0.0, 0.0, 0.0)) if cfg.domains == "speech" else {}
    corpus = data.CorpusConfig.tiny(n_clips=cfg.n_clips, clip_seconds=cfg.clip_seconds, seed=cfg.data_seed, **weights)
    return {s: data.SyntheticCorpus(corpus, s) for s in ("train", "valid", "test")}


def clip_batch(source, max_seconds: float, js) -> dict:
    """data.collate of the clips js of a source, centre-cropped to max_seconds, with their domains."""
    clips = [source[int(j)] for j in js]
    return data.collate([dict(audio=data._audio_tensor(c, max_seconds), domain=c.domain) for c in clips])


def log_mel(b: dict, n_mels: int, n_frames: int):
    """Whisper's log-mel of a collated batch: (B, F, n_frames) and real frames (B,)."""
    mel, mask = enc.whisper_log_mel(b["audio"], n_mels=n_mels, n_frames=n_frames, lengths=b["lengths"])
    return mel, mask.sum(1)


def cached(path: str, want: dict, ctx: Ctx, make: Callable[[], dict]) -> dict:
    """make()'s dict, computed by the main process into path once, and again when `want` changes."""
    if ctx.main and (not os.path.exists(path) or load(path)["stage_config"] != want):
        save_atomic(dict(stage_config=want, **make()), path)
    barrier(ctx)
    return {k: v for k, v in load(path).items() if k != "stage_config"}


@dataclass
class Mels:
    """One split's log-mels: mel.pt's (mel (N, F, T) fp16, frames (N,)), or from `source` on every call."""
    domain: List[str]
    n_frames: int                   # T
    mel: Optional[torch.Tensor] = None
    frames: Optional[torch.Tensor] = None
    source: object = None
    cfg: Optional[TrainConfig] = None

    def __len__(self) -> int:
        return len(self.domain)

    def batch(self, j: torch.Tensor):
        """Clips j (B,) -> mel (B, F, T) (fp16 cached, fp32 live; on the CPU), frames (B,)."""
        if self.source is None:
            return self.mel[j], self.frames[j]
        return log_mel(clip_batch(self.source, self.cfg.clip_seconds, j), self.cfg.n_mels, self.n_frames)


def live_mels(source, cfg: TrainConfig) -> Mels:
    """Mels computed on every call; the domains from the labels, without reading audio."""
    domain = ([r.domain for r in source.records] if isinstance(source, data.AudioFiles)
              else [source.labels(j)["domain"] for j in range(len(source))])
    return Mels(domain, cfg.mel_frames, source=source, cfg=cfg)


def mel_cache(cfg: TrainConfig, srcs: dict, ctx: Ctx) -> Dict[str, Mels]:
    """{split: Mels} of every clip, made once (out_dir/mel.pt), rendered by worker processes."""
    def make():
        out = {}
        for split, src in srcs.items():
            loader = torch.utils.data.DataLoader(range(len(src)), batch_size=64, num_workers=cfg.workers,
                                                 collate_fn=functools.partial(clip_batch, src, cfg.clip_seconds))
            mels, frames, domains = [], [], []
            for b in tqdm(loader, desc=f"audio {split}", leave=False, mininterval=1.0, disable=not sys.stderr.isatty()):
                mel, n = log_mel(b, cfg.n_mels, cfg.mel_frames)
                mels.append(mel.half())
                frames.append(n)
                domains += b["domain"]
            out[split] = dict(mel=torch.cat(mels), frames=torch.cat(frames), domain=domains)
        return out
    out = cached(os.path.join(cfg.out_dir, "mel.pt"), cfg.mel_config(), ctx, make)
    return {k: Mels(v["domain"], v["mel"].shape[2], v["mel"], v["frames"]) for k, v in out.items()}


def live_features(encoder: enc.WhisperEncoder, mels: Mels, ctx: Ctx, chunk: int = 64) -> Callable:
    """features(j (B,), device) -> (B, T', d) fp32, (B, T') bool: the frozen encoder, `chunk` distinct clips at a time."""
    @torch.no_grad()
    def encode(clips):
        mel, frames = mels.batch(clips)                                            # (U, F, T), (U,)
        real = torch.arange(mel.shape[2], device=ctx.device)[None, :] < frames[:, None].to(ctx.device)
        with ctx.autocast():
            out = encoder(mel.to(ctx.device).float(), real)
        return out.features.float(), out.mask

    def features(j: torch.Tensor, device):
        clips, back = torch.unique(j, return_inverse=True)                         # (U,), (B,)
        xs, ms = zip(*(encode(c) for c in clips.split(chunk)))
        back = back.to(device)
        return torch.cat([x.to(device) for x in xs])[back], torch.cat([m.to(device) for m in ms])[back]
    return features


def feature_cache(cfg: TrainConfig, encoder, mels: Dict[str, Mels], ctx: Ctx) -> Dict[str, Callable]:
    """{split: features(j, device)} from the frozen encoder's (N, T', d), (N, T'): made once per encoder file."""
    src = cfg.encoder_checkpoint or os.path.join(cfg.out_dir, "encoder", "encoder.pt")
    out = cached(os.path.join(cfg.out_dir, "features.pt"), dict(encoder=os.path.abspath(src), mtime=os.path.getmtime(src)),
                 ctx, lambda: {s: live_features(encoder, m, ctx, 256)(torch.arange(len(m)), "cpu") for s, m in mels.items()})
    return {s: (lambda j, device, x=x, m=m: (x[j].to(device), m[j].to(device))) for s, (x, m) in out.items()}


def instruction_items(cfg: TrainConfig, srcs: dict) -> Dict[str, List[dict]]:
    """Every (clip, task) question of each split, without audio (data.InstructionDataset.meta)."""
    out = {}
    for split, src in srcs.items():
        ds = data.InstructionDataset(src, all_tasks=True, seed=cfg.data_seed)
        out[split] = [ds.meta(i) for i in range(len(ds))]
        if not out[split]:
            raise UsageError(f"the {split} split has no clip with a task label "
                             f"({', '.join(sorted({t.label for t in data.TASKS.values()}))})")
    return out


def caption_items(items: List[dict]) -> List[dict]:
    """One alignment item per clip: the caption prompt, answered by every label its questions carry."""
    labels: Dict[int, Dict[str, str]] = {}                                         # {clip: {task: answer}}
    for it in items:
        labels.setdefault(it["index"], {})[it["task"]] = it["answer"]
    return [dict(index=j, task="caption", group="caption", question=CAPTION, answer=caption(v), choices=[])
            for j, v in labels.items()]


# --- Stage 3: the adapter between the frozen encoder and the LLM
class AudioLLM(nn.Module):
    """encoder features -> adapter -> LLM: (logits, labels (answer + EOS), the adapter's aux, the batch)."""

    def __init__(self, adapter: nn.Module, llm: lm.LLM):
        super().__init__()
        self.adapter, self.llm = adapter, llm

    def forward(self, feats, fmask, prompts: List[List[int]], answers: Optional[List[List[int]]] = None):
        y, aux = self.adapter(feats, fmask)                                        # (B, N_a, D)
        b = lm.build_batch(prompts, answers, aux["mask"].sum(1).tolist(), cfg=self.llm.cfg, device=feats.device)
        logits, _ = self.llm(b["input_ids"], b["attention_mask"], audio_embeds=y, audio_mask=aux["mask"])
        return logits, b.get("labels"), aux, b

    def trained_state(self, tune_llm: str) -> dict:
        """What a run trains (its checkpoints): the adapter, and the LLM (full) or its LoRA weights."""
        sd = dict(adapter=self.adapter.state_dict())
        if tune_llm == "full":
            sd["llm"] = self.llm.state_dict()
        elif tune_llm == "lora":
            sd["lora"] = {k: v for k, v in self.llm.state_dict().items() if "lora_" in k}
        return sd

    def load_trained(self, sd: dict) -> None:
        self.adapter.load_state_dict(sd["adapter"])
        if "llm" in sd or "lora" in sd:
            self.llm.load_state_dict(sd.get("llm", sd.get("lora")), strict="llm" in sd)


def balance_loss(aux: dict, ctx: Ctx) -> torch.Tensor:
    """Eq. 4 over the GLOBAL batch (every process's real tokens; f a count), x world for DDP's average."""
    n_local = aux["mask"].sum().float()
    if aux["router_prob"].numel() <= 1:                                            # dense: no router
        return aux["router_prob"].sum() * 0.0
    counts = global_sum(aux["expert_load"].detach() * n_local, ctx)                # (E,) slots / k
    n_all = global_sum(n_local, ctx)
    f = counts / n_all                                                             # (E,) sums to 1
    return f.numel() * (f * aux["router_prob"] * n_local).sum() / n_all * ctx.world


class AdapterData:
    """One split's questions as token ids, and `features(clips (B,), device) -> (B, T', d), (B, T')`."""

    def __init__(self, items, features: Callable, tok, domains):
        self.items = items
        self.clip = torch.tensor([it["index"] for it in items], dtype=torch.long)
        self.features, self.domains = features, domains
        self.prompts = [tok.encode(it["question"]) for it in items]
        self.answers = [tok.encode(it["answer"]) for it in items]

    def __len__(self):
        return len(self.items)

    def batch(self, idx, device):
        feats, fmask = self.features(self.clip[idx], device)
        return feats, fmask, [self.prompts[i] for i in idx.tolist()], [self.answers[i] for i in idx.tolist()]


def stage_adapter(cfg: TrainConfig, kind: str, seed: int, parts: dict, ctx: Ctx, resume: bool) -> dict:
    """Eureka-Audio's (arXiv 2602.13954) two phases: 3a the adapter alone captions every label of a clip; 3b the
    adapter and the LLM (full, LoRA or frozen) on every question and caption; next-token loss + Eq. 4.
    Deviation: the paper's family unfreezes everything in stage 2; the encoder stays frozen here."""
    name = f"{kind}-s{seed}"
    run_dir = os.path.join(cfg.out_dir, name)
    want = asdict(cfg) | dict(adapter=kind, seed=seed)
    settings = {k: v for k, v in want.items() if k not in RUN_CONTROL}
    if (summary := finished_run(run_dir, settings)) is not None:
        if ctx.main:
            print(f"adapter {name}: finished earlier, reusing {run_dir}")
        return summary
    torch.manual_seed(seed)
    llm_model = copy.deepcopy(parts["llm"])        # every run starts from the same pre-trained LLM
    acfg = cfg.adapter_config(parts["encoder"].cfg.d, llm_model.cfg.d_model)
    adapter = build_adapter(kind, acfg).to(ctx.device)
    if cfg.tune_llm == "lora":
        lm.add_lora(llm_model, rank=cfg.lora_rank)
        llm_model.to(ctx.device)
    model = AudioLLM(adapter, llm_model)
    step_model = torch.compile(model) if cfg.compile else model

    def step_loss_on(data_: AdapterData):
        def step_loss(m, step, idx):
            feats, fmask, prompts, answers = data_.batch(idx, ctx.device)
            with ctx.autocast():
                logits, labels, aux, _ = m(feats, fmask, prompts, answers)
            ce, n = token_ce(logits, labels)
            n_all = global_sum(n, ctx)
            bal = balance_loss(aux, ctx)
            n_audio = aux["mask"].sum()
            z = aux["z_loss"] * n_audio / global_sum(n_audio.float(), ctx) * ctx.world
            loss = ce * ctx.world / n_all + acfg.balance_weight * bal + acfg.z_weight * z
            logged = dict(ce=float(global_sum(ce.detach(), ctx) / n_all))
            if kind.startswith("moe"):
                logged["balance"] = float(bal.detach()) / ctx.world
            return loss, logged
        return step_loss

    def validate_on(data_: AdapterData):
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
        print(f"adapter {name}: {n_params['total']:,} params, {n_params['active']:,} active, "
              f"{n_params['flops_per_token'] / 1e6:.3f} MFLOPs/token; LLM {cfg.tune_llm} in 3b")
    train = parts["train"]
    # For the tokens/s log only: audio tokens of 16 clips (live: one extra small batch) + ~12 of text.
    tokens = train.features(train.clip.unique()[:16], "cpu")[1].sum(1).float().mean().item() / cfg.stack + 12
    common = dict(ctx=ctx, resume=resume, seed=seed, state=lambda: model.trained_state(cfg.tune_llm),
                  load_state=model.load_trained, eval_every=cfg.eval_every, log_every=cfg.log_every,
                  tokens_per_item=tokens, settings=settings)
    summary, phase = {}, (cfg.warmup, cfg.decay_frac)                   # weight decay 0, clipping at 1
    if cfg.align_steps:                                   # 3a: the adapter alone, on captions
        s = Schedule(cfg.align_steps, cfg.batch, cfg.align_lr, *phase)
        a_dir = os.path.join(run_dir, "align")
        summary["align"] = fit(f"{kind} s{seed} align", step_model, step_loss_on(parts["align_train"]), s,
                               run_dir=a_dir, n_items=len(parts["align_train"]),
                               validate=validate_on(parts["align_valid"]), **common)
        model.load_trained(load(os.path.join(a_dir, "best.pt")))
    groups = [dict(params=list(adapter.parameters()), lr_scale=1.0)]
    if cfg.tune_llm != "frozen":                          # 3b: the LLM learns too, at its own lr
        if cfg.tune_llm == "full":
            llm_model.requires_grad_(True)
        else:
            lm.mark_trainable(llm_model, lora=True)
        groups.append(dict(params=[p for p in llm_model.parameters() if p.requires_grad],
                           lr_scale=cfg.llm_tune_lr / cfg.lr))
    s = Schedule(cfg.steps, cfg.batch, cfg.lr, *phase)
    summary.update(fit(f"{kind} s{seed}", step_model, step_loss_on(parts["tune_train"]), s, run_dir=run_dir,
                       n_items=len(parts["tune_train"]), validate=validate_on(parts["valid"]), param_groups=groups,
                       **common))
    seconds = summary["seconds"] + summary.get("align", {}).get("seconds", 0.0)
    summary.update(kind=kind, seed=seed, params=n_params, adapter_config=asdict(acfg), config=want,
                   train_seconds=seconds, ms_per_step=1e3 * seconds / (cfg.steps + cfg.align_steps))
    if ctx.main:
        write_json(summary, os.path.join(run_dir, "summary.json"))
    barrier(ctx)
    return summary


# --- Putting the stages together, and the command line
def prepare(cfg: TrainConfig, ctx: Ctx, resume: bool, stages=("encoder", "llm", "features")) -> dict:
    """Everything an adapter run (or eval.py) needs: items, frozen parts, encoder features of every split."""
    srcs = sources(cfg)
    items = instruction_items(cfg, srcs)
    choices = {it["task"]: it["choices"] for split in ("train", "valid", "test") for it in items[split]}
    if ctx.main:                                           # write_json makes out_dir
        write_json(asdict(cfg), os.path.join(cfg.out_dir, "config.json"))
    if cfg.cache_features:
        mels = mel_cache(cfg, srcs, ctx)
    else:                                                  # nothing written: mel.pt, features.pt
        mels = {split: live_mels(src, cfg) for split, src in srcs.items()}
    parts = dict(cfg=cfg, mels=mels, domains={s: m.domain for s, m in mels.items()})
    if "encoder" in stages:
        parts["encoder"] = stage_encoder(cfg, mels, ctx, resume)
    if "llm" in stages:
        parts["tok"], parts["llm"] = stage_llm(cfg, choices, ctx, resume)
    if "features" in stages:
        if cfg.cache_features:
            features = feature_cache(cfg, parts["encoder"], mels, ctx)
        else:
            features = {s: live_features(parts["encoder"], m, ctx) for s, m in mels.items()}
        cap = {s: caption_items(items[s]) for s in ("train", "valid")}
        views = dict(train=items["train"], valid=items["valid"], test=items["test"], align_train=cap["train"],
                     align_valid=cap["valid"], tune_train=items["train"] + cap["train"])
        for name, its in views.items():                    # align_train holds the train split's clips, ...
            split = name.rsplit("_", 1)[-1]
            parts[name] = AdapterData(its, features[split], parts["tok"], parts["domains"][split])
    return parts


def train_all(cfg: TrainConfig, ctx: Ctx, resume: bool) -> None:
    """`all`: the pre-training stages once, every adapter kind x seed, then eval.py's comparison."""
    parts = prepare(cfg, ctx, resume)
    runs = [(k, s) for k in cfg.adapters.split(",") for s in range(cfg.seeds)]
    for kind, seed in runs:
        stage_adapter(cfg, kind, seed, parts, ctx, resume)
    if ctx.main and cfg.evaluate:
        run_script("eval.py", cfg.out_dir, "--force", "--runs=" + ",".join(f"{k}-s{s}" for k, s in runs))


def controls(command: str, cfg: TrainConfig, ctx: Ctx, resume: bool) -> None:
    """The main comparison beside the same on speech alone (heterogeneity: OUT/speech, own encoder and LLM) or
    with experts `widths` times as wide (capacity: OUT/width-xW, the main run's parts); accuracy, MoE margin."""
    settings = [("main run", cfg)]
    if command == "heterogeneity":
        settings.append(("speech only", replace(cfg, domains="speech", out_dir=os.path.join(cfg.out_dir, "speech"))))
    ckpt = dict(encoder_checkpoint=cfg.encoder_checkpoint or os.path.join(cfg.out_dir, "encoder", "encoder.pt"),
                llm_checkpoint=cfg.llm_checkpoint or os.path.join(cfg.out_dir, "llm", "llm.pt"))
    for w in (float(x) for x in cfg.widths.split(",")) if command == "capacity" else ():
        settings.append((f"experts x{w:g}", replace(
            cfg, d_expert=max(1, round(cfg.d_expert * w)), d_shared=max(1, round(cfg.d_shared * w)),
            out_dir=os.path.join(cfg.out_dir, f"width-x{w:g}"), **ckpt)))
    if not os.path.exists(os.path.join(cfg.out_dir, "comparison.json")):     # the main run, as it is
        train_all(replace(cfg, evaluate=True), ctx, resume)
    for _, c in settings[1:]:
        if c.domains == cfg.domains and ctx.main:       # capacity: same clips and encoder, the main run's caches
            os.makedirs(c.out_dir, exist_ok=True)
            for f in ("mel.pt", "features.pt"):
                src, dst = os.path.join(cfg.out_dir, f), os.path.join(c.out_dir, f)
                if os.path.exists(src) and not os.path.exists(dst):
                    os.link(src, dst)
        train_all(replace(c, evaluate=True), ctx, resume)
    if not ctx.main:
        return
    lines = ["| setting | adapter | seeds | semantic | paralinguistic | MoE − it, semantic | MoE − it, paralinguistic |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
    for label, c in settings:
        table = read_json(os.path.join(c.out_dir, "comparison.json"))
        for kind, row in table["kinds"].items():
            pr = table["paired"].get(f"moe - {kind}")
            margin = [f"{pr[g]['mean']:+.3f} ± {pr[g]['std']:.3f} ({pr[g]['wins']}/{pr[g]['n']})" if pr else "–"
                      for g in ("semantic", "paralinguistic")]
            lines.append(f"| {label} (d_expert {c.d_expert}) | {kind} | {len(row['seeds'])} | {fmt(row['semantic_closed'])} "
                         f"| {fmt(row['paralinguistic_closed'])} | {margin[0]} | {margin[1]} |")
    text = "\n".join(lines)
    print(f"\n{command}: test accuracy, mean ± std over seeds; MoE margins paired by seed (seeds won)\n\n{text}\n")
    with open(os.path.join(cfg.out_dir, f"{command}.md"), "w") as f:
        f.write(text + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    command, cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    check_inputs(cfg, ("encoder_checkpoint", "llm_checkpoint"), cfg.data_label)
    ctx = make_ctx(cfg.device, cfg.dtype)
    t0 = time.perf_counter()
    if ctx.main:
        print(f"train.py {command}: device {ctx.device}, {ctx.world} process(es), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, out_dir {cfg.out_dir}")
    with out_dir_lock(cfg.out_dir, ctx):
        if command == "all":
            train_all(cfg, ctx, resume)
        elif command in ("heterogeneity", "capacity"):
            controls(command, cfg, ctx, resume)
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
    data.cli(main)
