"""The frozen parts of train.py's pipeline, pre-trained once per out_dir (or loaded from a real checkpoint):
1. the Whisper-style encoder by masked log-mel reconstruction, 2. the decoder LLM on templated text.
cfg: a train.TrainConfig. Shapes: B batch, F mel bins, T mel frames, T' encoder frames, G global batch.
"""
import os
from dataclasses import asdict
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import encoder as enc
import hf
import llm as lm
from data import UsageError
from loop import Ctx, Schedule, barrier, check_same_config, fit, global_sum, load, save_atomic


def _frozen(model: nn.Module, ctx: Ctx, ck: Optional[dict] = None) -> nn.Module:
    """model (with ck["model"] loaded), frozen, in eval mode, on ctx.device."""
    if ck is not None:
        model.load_state_dict(ck["model"])
    return lm.freeze(model).to(ctx.device).eval()


def token_ce(logits: torch.Tensor, labels: torch.Tensor):
    """Sum of next-token cross-entropies (Eq. 5) and their count: a global batch's loss is sum / global count."""
    return lm.lm_loss(logits, labels, reduction="sum"), (labels[:, 1:] != lm.IGNORE_INDEX).sum().float()


# --- Stage 1: masked log-mel reconstruction
MASK_FRAC, MASK_SPAN = 0.4, 6          # share of the mel frames masked, in spans of this many frames


class MaskedMelModel(nn.Module):
    """Encoder + a linear head reconstructing masked log-mel frames (2 per encoder frame: the conv stride)."""

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


def span_mask(G: int, T: int, g: torch.Generator) -> torch.Tensor:
    """(G, T) bool: spans of MASK_SPAN frames starting at random frames, about MASK_FRAC of T covered."""
    starts = torch.randint(0, max(T - MASK_SPAN, 1), (G, max(1, round(MASK_FRAC * T / MASK_SPAN))), generator=g)
    t = torch.arange(T)
    return ((t[None, None, :] >= starts[..., None]) & (t[None, None, :] < starts[..., None] + MASK_SPAN)).any(1)


def stage_encoder(cfg, mels: dict, ctx: Ctx, resume: bool) -> enc.WhisperEncoder:
    """Pre-train (or load) the encoder on mels["train"] (a train.Mels); returns it frozen on ctx.device."""
    path = cfg.encoder_checkpoint
    if path:                                    # loop.check_inputs found it and parsed it at start-up
        if path.endswith(".pt") and "stage_config" in (ck := load(path)):        # our own encoder.pt
            model = _frozen(enc.WhisperEncoder(enc.WhisperEncoderConfig(**ck["config"])), ctx, ck)
        else:
            model, report = hf.load_whisper_encoder(path)
            if ctx.main:
                print(report)
        if model.cfg.n_mels != cfg.n_mels:
            raise UsageError(f"{path}: the encoder takes {model.cfg.n_mels} mel bins but --n_mels="
                             f"{cfg.n_mels}; set --n_mels={model.cfg.n_mels}")
        return _frozen(model, ctx)
    final = os.path.join(cfg.out_dir, "encoder", "encoder.pt")
    ecfg = enc.WhisperEncoderConfig(n_mels=cfg.n_mels, d=cfg.enc_d, n_layers=cfg.enc_layers, n_heads=cfg.enc_heads,
                                    d_ff=cfg.enc_ff)
    want = dict(asdict(ecfg), steps=cfg.enc_steps, batch=cfg.enc_batch, lr=cfg.enc_lr, mask_frac=MASK_FRAC,
                span=MASK_SPAN, **cfg.mel_config())
    if not os.path.exists(final):
        torch.manual_seed(cfg.data_seed)
        model = MaskedMelModel(enc.WhisperEncoder(ecfg)).to(ctx.device)
        train_mels = mels["train"]
        s = Schedule(cfg.enc_steps, cfg.enc_batch, cfg.enc_lr, warmup=min(50, cfg.enc_steps // 10 + 1))

        def step_loss(m, step, idx):
            g = torch.Generator().manual_seed(cfg.data_seed * 7919 + step)
            masked = span_mask(s.batch, train_mels.n_frames, g)                    # (G, T)
            masked = masked.chunk(ctx.world)[ctx.rank]                             # this rank's (B, T)
            x, frames = train_mels.batch(idx)                                      # (B, F, T), (B,)
            with ctx.autocast():
                err, n = m(x.to(ctx.device).float(), frames.to(ctx.device), masked.to(ctx.device))
            n_all = global_sum(n.float(), ctx)
            loss = err * ctx.world / n_all.clamp(min=1)        # DDP averages: x world -> global mean
            return loss, dict(mse=float(global_sum(err.detach(), ctx) / n_all.clamp(min=1)))
        summary = fit("encoder", model, step_loss, s, ctx, os.path.dirname(final), resume, cfg.data_seed,
                      len(train_mels), state=model.state_dict, load_state=model.load_state_dict,
                      tokens_per_item=train_mels.n_frames / 2, settings=want)
        if ctx.main:
            save_atomic(dict(stage_config=want, config=asdict(ecfg), model=model.encoder.state_dict(),
                             summary=summary), final)
        barrier(ctx)
    check_same_config(final, want, "pre-trained encoder")
    ck = load(final)
    return _frozen(enc.WhisperEncoder(enc.WhisperEncoderConfig(**ck["config"])), ctx, ck)


# --- Stage 2: the LLM on templated text
CAPTION = "Describe the audio."       # the alignment prompt: its answer states every label of the clip
CAPTION_SHARE = 0.3                  # share of the LLM's text documents that ask for the caption


def caption(values: Dict[str, str]) -> str:
    """All label words of a clip {task: value}, in data.TASKS order. Deviation: the paper family aligns on ASR
    and captions; a caption of every label is our corpus's equivalent (audio tokens imitate words, not sentences)."""
    return " ".join(values[t] for t in data.TASKS if t in values)


def text_document(rng: np.random.Generator, choices: Dict[str, List[str]], max_facts: int):
    """(context, answer): 1..max_facts facts (uniform values), then a question on one or the caption prompt."""
    tasks = sorted(choices)
    n = int(rng.integers(1, min(max_facts, len(tasks)) + 1))
    told = [tasks[i] for i in rng.choice(len(tasks), size=n, replace=False)]
    values = {t: choices[t][int(rng.integers(len(choices[t])))] for t in told}
    context = " ".join(values[t] for t in told) + ". "
    if rng.random() < CAPTION_SHARE:
        return context + CAPTION, caption(values)
    asked = told[int(rng.integers(n))]
    return context + data.TASKS[asked].questions[int(rng.integers(len(data.TASKS[asked].questions)))], values[asked]


def stage_llm(cfg, choices: Dict[str, List[str]], ctx: Ctx, resume: bool):
    """Pre-train (or load) the LLM; returns (tokenizer, frozen LLM on ctx.device). Deviation (plain LM
    pre-training): the loss is on the answer and its EOS only; the random facts carry no signal."""
    path = cfg.llm_checkpoint                   # checked at start-up: loop.check_inputs
    if path and not path.endswith(".pt"):                                          # Hugging Face dir
        model = hf.load_llm(path, dtype=torch.float32)
        c = model.cfg
        if c.audio_token_id is None:
            raise UsageError(f"{path}: the LLM has no audio placeholder token; add \"audio_token_id\": ID "
                             f"to its config.json, an id no text encodes to (Qwen2/3: {lm.QWEN_AUDIO_ID})")
        tok = hf.HFTokenizer(path)
        tok.bos_id, tok.eos_id, tok.pad_id, tok.audio_id = c.bos_id, c.eos_id, c.pad_id, c.audio_token_id
        return tok, _frozen(model, ctx)
    final = path or os.path.join(cfg.out_dir, "llm", "llm.pt")               # our own llm.pt
    if not path:
        texts = []                      # every word of the documents and questions (and data.meta's prompts)
        for t, values in choices.items():
            texts += list(data.TASKS[t].questions) + [f"Answer with one of: {', '.join(values)}."] + list(values)
        tok = lm.WordTokenizer.build(texts + [CAPTION])
        lcfg = lm.LLMConfig(d_model=cfg.llm_d, n_layers=cfg.llm_layers, n_heads=cfg.llm_heads,
                            n_kv_heads=cfg.llm_kv_heads, d_ff=cfg.llm_ff, max_seq_len=1024, **tok.config_ids())
        want = dict(asdict(lcfg), steps=cfg.llm_steps, batch=cfg.llm_batch, lr=cfg.llm_lr,
                    max_facts=cfg.max_facts, vocab=tok.itos, data_seed=cfg.data_seed)
        if not os.path.exists(final):
            torch.manual_seed(cfg.data_seed)
            model = lm.LLM(lcfg).to(ctx.device)
            s = Schedule(cfg.llm_steps, cfg.llm_batch, cfg.llm_lr, warmup=min(50, cfg.llm_steps // 10 + 1), weight_decay=0.1)

            def step_loss(m, step, idx):
                # Document p of the stream is a pure function of (seed, p): nothing to store or shard.
                docs = [text_document(np.random.default_rng([cfg.data_seed, 17, step * s.batch + int(i)]),
                                      choices, cfg.max_facts) for i in idx]
                b = lm.build_batch([tok.encode(c) for c, _ in docs], [tok.encode(a) for _, a in docs], cfg=lcfg,
                                   device=ctx.device)          # [BOS] context answer EOS, labels on answer + EOS
                with ctx.autocast():
                    logits, _ = m(b["input_ids"], b["attention_mask"])
                ce, n = token_ce(logits, b["labels"])
                n_all = global_sum(n, ctx)
                return ce * ctx.world / n_all, dict(ce=float(global_sum(ce.detach(), ctx) / n_all))
            summary = fit("llm", model, step_loss, s, ctx, os.path.dirname(final), resume, cfg.data_seed, None,
                          state=model.state_dict, load_state=model.load_state_dict, tokens_per_item=20, settings=want)
            if ctx.main:
                save_atomic(dict(stage_config=want, config=asdict(lcfg), model=model.state_dict(),
                                 tokenizer=tok.to_dict(), summary=summary), final)
            barrier(ctx)
        check_same_config(final, want, "pre-trained LLM")
    ck = load(final)
    return lm.WordTokenizer.from_dict(ck["tokenizer"]), _frozen(lm.LLM(lm.LLMConfig(**ck["config"])), ctx, ck)
