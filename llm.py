"""Decoder LLM: a LLaMA / Qwen2 / Qwen3-style causal language model that reads audio tokens from its
input embeddings, with KV-cache generation, a word-level tokenizer, LoRA and a checkpoint loader.

The last stage of a large audio language model (the MoE-Adapter paper, arXiv 2601.02967, uses
Qwen3-1.7B): the adapter's output replaces audio placeholder tokens next to the text prompt.

    adapter:   y (B, T', D), mask (B, T')                       mask = real audio tokens
    input_ids: [BOS] <audio> x n_b  prompt  answer EOS           (B, T), n_b = mask[b].sum()
    x = embed(input_ids);  x[input_ids == <audio>] = y[mask]     row by row, in order
    logits = lm_head(norm(blocks(x)))                            (B, T, V); loss on the answer only

Every block is pre-norm:
    h   = x + o_proj(Attention(RoPE(q), RoPE(k), v)),   q, k, v = projections of RMSNorm(x)
    out = h + MLP(RMSNorm(h))

Families, one config flag apart:
    LLaMA (Touvron et al., arXiv 2302.13971): RMSNorm, SwiGLU, RoPE, no biases.
    Qwen2 (Yang et al., arXiv 2407.10671): LLaMA + a bias on the q/k/v projections (qkv_bias).
    Qwen3 (Yang et al., arXiv 2505.09388): no biases; RMSNorm over each head of q and k before
          RoPE (qk_norm); head_dim set apart from d_model / n_heads.
RoPE: Su et al., arXiv 2104.09864. Grouped-query attention (GQA): Ainslie et al., arXiv 2305.13245.
LoRA: Hu et al., arXiv 2106.09685.

Module and parameter names mirror Hugging Face's (`layers.0.self_attn.q_proj.weight`, ...), so a
HF checkpoint loads by dropping its `model.` prefix (load_llm), and LoRA targets read as in PEFT.
This file imports only torch and the standard library; `safetensors` and `tokenizers` are imported
inside the two functions that read those formats.

Notation (shape comments use these):
    B batch, T tokens in this call, L keys attended (cached + new), D d_model, V vocab,
    H query heads, K key/value heads, G = H / K query heads per kv head, hd head_dim, F MLP width,
    T' audio tokens per row of the adapter output, N real audio tokens in the batch.

Equations, as numbered in this file:
    (1) RMSNorm(x) = w * x / sqrt(mean_D(x^2) + eps)                     computed in float32
    (2) RoPE at position p on the pair (i, i + hd/2): angle p * theta^(-2i/hd),
        x' = x cos + rotate_half(x) sin,   rotate_half(x) = (-x[hd/2:], x[:hd/2])
    (3) Attention = softmax(q k^T / sqrt(hd) + causal and padding mask) v; kv head j serves
        query heads jG .. jG + G - 1                                      softmax in float32
    (4) MLP(n) = down_proj(SiLU(gate_proj(n)) * up_proj(n))             SwiGLU (Shazeer 2020)
    (5) loss = mean over answer tokens t of -log p(x_t | x_<t)          labels -100 elsewhere
    (6) LoRA: y = W x + b + (alpha / r) B A x,   A (r, d_in), B (d_out, r), B = 0 at init
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100                          # label of positions that carry no loss (Eq. 5)
ATTN_IMPLS = ("sdpa", "math")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
HF_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Qwen2/2.5/3 tokenizers use ids 0..151668 at most; the embedding matrix is padded to 151936 rows.
# 151669 is therefore free for the audio placeholder: no text maps to it, and its row is never
# read (the audio overwrites it). Deviation: Qwen2-Audio adds its own <|AUDIO|> token instead.
QWEN_AUDIO_ID = 151669


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class LLMConfig:
    vocab_size: int = 512
    d_model: int = 128                  # D (HF: hidden_size)
    n_layers: int = 4
    n_heads: int = 4                    # H query heads
    n_kv_heads: int = 2                 # K key/value heads (GQA); K = H is plain multi-head
    head_dim: Optional[int] = None      # hd; None -> d_model // n_heads (Qwen3 sets it apart)
    d_ff: int = 352                     # F (HF: intermediate_size), ~8/3 D as in LLaMA
    max_seq_len: int = 512              # longest sequence accepted, KV cache included
    rope_theta: float = 10000.0         # RoPE base of the checkpoint (Eq. 2)
    norm_eps: float = 1e-6              # RMSNorm epsilon (Eq. 1)
    qkv_bias: bool = False              # bias on q/k/v projections (Qwen2)
    o_bias: bool = False                # bias on o_proj (only LLaMA with attention_bias=True)
    qk_norm: bool = False               # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_embeddings: bool = True         # lm_head shares the token-embedding matrix
    attn_impl: str = "sdpa"             # "sdpa" (F.scaled_dot_product_attention) | "math"
    init_std: float = 0.02              # N(0, init_std) weights when training from scratch
    pad_id: Optional[int] = 0           # special ids: the defaults are WordTokenizer's
    bos_id: Optional[int] = 1           # None: no BOS is prepended (Qwen)
    eos_id: Optional[int] = 2           # None: generate stops only at max_new_tokens
    audio_token_id: Optional[int] = 4   # the audio placeholder; None: the model takes no audio

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"LLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                                 f"set head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 (RoPE rotates pairs), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"rope_theta and norm_eps must be > 0, got {self.rope_theta}, {self.norm_eps}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}; allowed: {', '.join(ATTN_IMPLS)}")
        for name in ("pad_id", "bos_id", "eos_id", "audio_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"LLMConfig.{name}={v} must be in [0, vocab_size={self.vocab_size}) or None")
        if self.audio_token_id is not None and self.audio_token_id in (self.pad_id, self.bos_id, self.eos_id):
            raise ValueError(f"audio_token_id={self.audio_token_id} must differ from pad_id, bos_id "
                             f"and eos_id")

    # Presets. The real shapes are those of each checkpoint's published config.json (cross-checked
    # with copies quoted in public code); tests/test_llm.py checks their parameter counts against
    # the published totals. load_llm reads a local config.json, so these are for sizing and demos.

    @classmethod
    def tiny(cls, **overrides) -> "LLMConfig":
        """CPU-sized: 4 layers of width 128, 4 query / 2 kv heads, WordTokenizer's special ids."""
        return cls(**overrides)

    @classmethod
    def smollm2_135m(cls, **overrides) -> "LLMConfig":
        """HuggingFaceTB/SmolLM2-135M (LLaMA architecture, 134.5M parameters)."""
        cfg = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                   max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
                   pad_id=None, bos_id=0, eos_id=0, audio_token_id=None)
        return cls(**{**cfg, **overrides})

    @classmethod
    def tinyllama_1_1b(cls, **overrides) -> "LLMConfig":
        """TinyLlama/TinyLlama-1.1B (LLaMA-2 architecture, 1.1B parameters). Every id is a real
        token, so set audio_token_id (e.g. after adding a token) to feed audio."""
        cfg = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
                   max_seq_len=2048, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
                   pad_id=None, bos_id=1, eos_id=2, audio_token_id=None)
        return cls(**{**cfg, **overrides})

    @classmethod
    def qwen2_0_5b(cls, **overrides) -> "LLMConfig":
        """Qwen/Qwen2-0.5B (494M parameters): q/k/v bias, 14 heads sharing 2 kv heads, tied."""
        cfg = dict(vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864,
                   max_seq_len=131072, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                   tie_embeddings=True, pad_id=151643, bos_id=None, eos_id=151643,
                   audio_token_id=QWEN_AUDIO_ID)
        return cls(**{**cfg, **overrides})

    @classmethod
    def qwen3_0_6b(cls, **overrides) -> "LLMConfig":
        """Qwen/Qwen3-0.6B (0.6B parameters): q/k norm, head_dim 128 (so H * hd = 2048 != D)."""
        cfg = dict(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                   head_dim=128, d_ff=3072, max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6,
                   qk_norm=True, tie_embeddings=True, pad_id=151643, bos_id=None, eos_id=151645,
                   audio_token_id=QWEN_AUDIO_ID)
        return cls(**{**cfg, **overrides})

    @classmethod
    def qwen3_1_7b(cls, **overrides) -> "LLMConfig":
        """Qwen/Qwen3-1.7B, the MoE-Adapter paper's LLM (D = 2048 = the adapter's d_out)."""
        return cls.qwen3_0_6b(**{**dict(d_model=2048, d_ff=6144), **overrides})


def config_from_hf(hf: Mapping, **overrides) -> LLMConfig:
    """LLMConfig from a Hugging Face config.json dict of a llama, qwen2 or qwen3 model.

    Variants this file does not implement (RoPE scaling such as Llama 3's, sliding-window attention,
    MLP biases, activations other than SiLU) are refused by name rather than run wrongly. A list of
    EOS ids keeps its first; pass eos_id to generate for the others. audio_token_id is read from
    an `audio_token_id` key, which no published LLM config.json has (add it, or pass it). `overrides`
    win (e.g. audio_token_id, or max_seq_len).
    """
    kind = hf.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"config.json model_type {kind!r} is not supported; expected one of "
                         f"{', '.join(HF_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; expected 'silu' (SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported; expected bias-free MLP projections")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported; expected full causal attention")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"RoPE type {rope_type!r} (rope scaling) is not implemented; expected plain "
                         f"RoPE ('default')")
    # transformers' default base when a config names none (RotaryEmbeddingConfigMixin.default_theta).
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    cfg = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=kind == "qwen2" or attention_bias, o_bias=kind != "qwen2" and attention_bias,
        qk_norm=kind == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_id=hf.get("pad_token_id"), bos_id=hf.get("bos_token_id"),
        eos_id=eos[0] if isinstance(eos, (list, tuple)) else eos, audio_token_id=hf.get("audio_token_id"))
    return LLMConfig(**{**cfg, **overrides})


# ----------------------------------------------------------------------------------------------
# Parts


class RMSNorm(nn.Module):
    """Eq. 1 in float32 (float64 stays float64); back to the input dtype before the gain, as HF."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (B, T, hd) of Eq. 2 for integer positions (B, T).

    Half-split layout (pair i is (i, i + hd/2)), as in Hugging Face's checkpoints, whose q/k rows
    were permuted from Meta's interleaved pairs (2i, 2i + 1) at conversion. Angles are computed in
    float32 (float64 for a float64 model), then cast to the activations' dtype, as HF does.
    Deviation from gpt-fast/nanoGPT-style cached tables: recomputed per call (hd/2 frequencies),
    so there is no buffer for model.to(bfloat16) to round.
    """
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    angles = positions.to(work)[..., None] * inv_freq                  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)                       # (B, T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eq. 2 on x (B, h, T, hd) with cos, sin (B, T, hd)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              impl: str = "sdpa") -> torch.Tensor:
    """Eq. 3. q (B, H, T, hd); k, v (B, K, L, hd); mask (B, 1, T, L) bool, True = may attend, or
    None for plain causal attention with T == L. Returns (B, H, T, hd).

    impl "sdpa": F.scaled_dot_product_attention (flash / memory-efficient kernels where they apply).
    impl "math": the written-out reference, scores and softmax in float32.
    Deviation: kv heads are repeated explicitly rather than with SDPA's enable_gqa (torch >= 2.5).
    """
    G = q.shape[1] // k.shape[1]
    if G > 1:                                       # kv head j -> query heads jG .. jG+G-1
        k = k.repeat_interleave(G, dim=1)           # (B, H, L, hd)
        v = v.repeat_interleave(G, dim=1)
    if impl == "sdpa":
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    work = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(work) @ k.to(work).transpose(-2, -1) / math.sqrt(q.shape[-1])   # (B, H, T, L)
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(work)).to(q.dtype)                      # (B, H, T, hd)


def causal_padding_mask(key_real: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(B, 1, T, L) bool: query i (absolute column start + i) may attend key j when j <= start + i
    and key j is a real token. Every query also sees itself, so a padding query never has an empty
    softmax row (its output is never used: no loss, no generation reads it)."""
    L = key_real.shape[1]
    q_col = torch.arange(start, start + T, device=key_real.device)[:, None]      # (T, 1)
    k_col = torch.arange(L, device=key_real.device)[None, :]                     # (1, L)
    allowed = (k_col <= q_col) & key_real[:, None, :]                            # (B, T, L)
    return (allowed | (k_col == q_col))[:, None]                                 # (B, 1, T, L)


class KVCache:
    """Keys and values of every layer, preallocated, plus which cached columns are real tokens.

    k, v: (n_layers, B, K, max_len, hd); mask: (B, max_len) bool; length: columns filled, the same
    for every row (rows stay aligned; left padding makes them end together).
    """

    def __init__(self, cfg: LLMConfig, batch_size: int, max_len: int,
                 device=None, dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    def append_mask(self, real: torch.Tensor):
        """Record which of the T new columns are real; return (key_real (B, L), past (B, 1)):
        the real-key mask over all L = length + T columns and each row's count of real cached
        tokens, from which the new tokens' positions continue."""
        B, T = real.shape
        if B != self.mask.shape[0]:
            raise ValueError(f"cache holds batch size {self.mask.shape[0]}, got a batch of {B}")
        if self.length + T > self.max_len:
            raise ValueError(f"cache of max_len={self.max_len} is full: {self.length} cached + {T} new")
        s = self.length
        self.mask[:, s:s + T] = real
        return self.mask[:, :s + T], self.mask[:, :s].sum(1, keepdim=True)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, hd) at the current length; return all L columns (B, K, L, hd)."""
        s, T = self.length, k.shape[2]
        self.k[layer, :, :, s:s + T] = k
        self.v[layer, :, :, s:s + T] = v
        return self.k[layer, :, :, :s + T], self.v[layer, :, :, :s + T]


class Attention(nn.Module):
    """GQA self-attention with RoPE; q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3) optional."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        D, H, K, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, K * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, K * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None, layer: int = 0):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_heads, cfg.head_dim)        # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim)     # (B, T, K, hd)
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim)     # (B, T, K, hd)
        if cfg.qk_norm:                                                 # Qwen3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, H|K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)         # Eq. 2
        if cache is not None:
            k, v = cache.update(layer, k, v)                            # (B, K, L, hd)
        y = attention(q, k, v, mask, cfg.attn_impl)                     # (B, H, T, hd) Eq. 3
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))  # (B, T, D)


class MLP(nn.Module):
    """Eq. 4, SwiGLU: down_proj(SiLU(gate_proj(n)) * up_proj(n))."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, n: torch.Tensor) -> torch.Tensor:                  # (B, T, D) -> (B, T, D)
        return self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def _check_attention_mask(mask, B: int, T: int, device) -> torch.Tensor:
    """(B, T) bool, True = real token; None means every token is real. 0/1 integers accepted."""
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must have shape (B, T) = {(B, T)}, got {shape}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"attention_mask must be bool or 0/1 integers (1 = real token), "
                             f"got {mask.dtype}")
        mask = mask != 0
    return mask.to(device)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor,
            attention_mask: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """Eq. 5: mean next-token cross-entropy (in float32 at least) over the labelled positions;
    reduction="sum" gives their sum (a global-batch mean is a sum over processes / a count).

    logits (B, T, V); labels (B, T) aligned with the input, as in Hugging Face: labels[b, t] is
    the token at t, predicted from position t - 1; IGNORE_INDEX (-100) marks prompt, audio and
    padding positions, which carry no loss. Labels on padding are an error, as is a batch with no
    labelled token (its mean is undefined).
    """
    B, T, V = logits.shape
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape (B, T) = {(B, T)}, got {shape}")
    target = labels[:, 1:].to(logits.device)                           # (B, T-1)
    keep = target != IGNORE_INDEX
    if bool((keep & ((target < 0) | (target >= V))).any()):
        raise ValueError(f"labels must be token ids in [0, vocab_size={V}) or {IGNORE_INDEX}")
    if attention_mask is not None and bool((keep & ~attention_mask[:, 1:]).any()):
        raise ValueError(f"labels on padding positions: set them to {IGNORE_INDEX}")
    if not bool(keep.any()):
        raise ValueError(f"labels hold no answer token (every target is {IGNORE_INDEX}): "
                         f"the loss is undefined")
    work = torch.promote_types(logits.dtype, torch.float32)             # float32 at least
    return F.cross_entropy(logits[:, :-1].to(work).reshape(-1, V), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,).

    temperature 0: greedy (argmax; a tie goes to the lowest id). Otherwise a draw from
    softmax(logits / temperature) restricted to the top-p nucleus (Holtzman et al., ICLR 2020):
    the most likely tokens, in order, until their probability reaches top_p (the first always kept).
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    work = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(work) / temperature, dim=-1)       # (B, V)
    if top_p < 1.0:
        p_sorted, order = probs.sort(dim=-1, descending=True)          # (B, V)
        mass_before = p_sorted.cumsum(dim=-1) - p_sorted
        p_sorted = p_sorted.masked_fill(mass_before >= top_p, 0.0)     # outside the nucleus
        probs = torch.zeros_like(probs).scatter(-1, order, p_sorted)   # multinomial renormalises
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The decoder


class LLM(nn.Module):
    """Causal decoder: `logits, loss = model(input_ids, attention_mask, audio_embeds=y, audio_mask=m,
    labels=labels)`.

    Inputs (exactly one of input_ids / inputs_embeds):
        input_ids       (B, T) token ids in [0, vocab_size)
        inputs_embeds   (B, T, D) embeddings, used as given
        audio_embeds    (B, T', D) with input_ids: row b's real audio tokens (audio_mask[b], in
                        order) replace row b's audio placeholder tokens (in order); the counts
                        must match row by row. The MoE adapter's (y, aux["mask"]) fit directly.
        audio_mask      (B, T') bool, True = real audio token; None = all real
        attention_mask  (B, T) bool or 0/1, True = real token; None = all real. Left or right
                        padding; positions count real tokens only, so a padded row gets the
                        logits it gets alone. With a cache it covers the new tokens only.
        labels          (B, T), -100 where no loss (Eq. 5); see build_batch
        cache           a KVCache (new_cache), filled in place; last_only: logits of the last
                        position only (generation)
    Returns logits (B, T, V) (or (B, 1, V)) in the model's dtype, and the loss or None.
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        # HF's scheme for these families: N(0, initializer_range) weights, zero biases, unit gains.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (a tied lm_head counted once); non_embedding drops embedding and lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_len, device=w.device, dtype=w.dtype)

    # -- inputs ------------------------------------------------------------------------------------

    def embed(self, input_ids=None, inputs_embeds=None, audio_embeds=None, audio_mask=None) -> torch.Tensor:
        """Token embeddings with the audio written over the placeholders: (B, T, D)."""
        cfg = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        dtype = self.embed_tokens.weight.dtype
        if inputs_embeds is not None:
            if audio_embeds is not None:
                raise ValueError("audio_embeds needs input_ids (the audio goes where input_ids holds "
                                 "the placeholder); with inputs_embeds, write the audio in yourself")
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                    or inputs_embeds.shape[-1] != cfg.d_model or inputs_embeds.shape[1] == 0:
                shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else None
                raise ValueError(f"inputs_embeds must be (B, T >= 1, d_model={cfg.d_model}), got {shape}")
            return inputs_embeds.to(dtype)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0 \
                or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            desc = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) \
                else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor (B, T >= 1), got {desc}")
        bad = (input_ids < 0) | (input_ids >= cfg.vocab_size)
        if bool(bad.any()):
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(f"input_ids[{b}, {t}] = {int(input_ids[b, t])} is out of range: token ids "
                             f"must be in [0, vocab_size={cfg.vocab_size})")
        x = self.embed_tokens(input_ids)                                   # (B, T, D)
        if cfg.audio_token_id is None:
            if audio_embeds is not None:
                raise ValueError("audio_embeds given but LLMConfig.audio_token_id is None: set the "
                                 "placeholder token id")
            return x
        is_audio = input_ids == cfg.audio_token_id                          # (B, T)
        n_slots = is_audio.sum(1).tolist()                                  # placeholders per row
        if audio_embeds is None:
            if any(n_slots):
                raise ValueError(f"input_ids holds {sum(n_slots)} audio placeholder tokens "
                                 f"(id {cfg.audio_token_id}) but no audio_embeds were given")
            return x
        B = input_ids.shape[0]
        if not isinstance(audio_embeds, torch.Tensor) or audio_embeds.dim() != 3 \
                or audio_embeds.shape[0] != B or audio_embeds.shape[-1] != cfg.d_model:
            shape = tuple(audio_embeds.shape) if isinstance(audio_embeds, torch.Tensor) else None
            raise ValueError(f"audio_embeds must be (B={B}, T', d_model={cfg.d_model}), got {shape}")
        if audio_mask is None:
            audio_mask = torch.ones(audio_embeds.shape[:2], dtype=torch.bool, device=audio_embeds.device)
        if not isinstance(audio_mask, torch.Tensor) or audio_mask.dtype != torch.bool \
                or audio_mask.shape != audio_embeds.shape[:2]:
            desc = f"{tuple(audio_mask.shape)} {audio_mask.dtype}" if isinstance(audio_mask, torch.Tensor) \
                else type(audio_mask).__name__
            raise ValueError(f"audio_mask must be a bool tensor (B, T') = {tuple(audio_embeds.shape[:2])}, "
                             f"got {desc}")
        n_audio = audio_mask.sum(1).tolist()                                # real audio tokens per row
        for b, (slots, real) in enumerate(zip(n_slots, n_audio)):
            if slots != real:
                raise ValueError(f"row {b}: input_ids holds {slots} audio placeholder tokens "
                                 f"(id {cfg.audio_token_id}) but audio_mask marks {real} real audio "
                                 f"tokens; they must be equal")
        audio = audio_embeds[audio_mask].to(device=x.device, dtype=x.dtype)  # (N, D), row-major
        # Placeholders are also visited row-major, so row b's k-th audio token fills its k-th slot.
        return x.masked_scatter(is_audio[..., None], audio)                 # (B, T, D)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, audio_embeds=None,
                audio_mask=None, labels=None, cache: Optional[KVCache] = None, last_only: bool = False):
        cfg = self.cfg
        if last_only and labels is not None:
            raise ValueError("last_only=True drops the logits the loss needs; pass labels=None")
        x = self.embed(input_ids, inputs_embeds, audio_embeds, audio_mask)    # (B, T, D)
        B, T, _ = x.shape
        start = 0 if cache is None else cache.length
        if start + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens ({start} cached + {T} new) exceeds "
                             f"max_seq_len={cfg.max_seq_len}")
        real = _check_attention_mask(attention_mask, B, T, x.device)         # (B, T)
        if cache is None:
            key_real, past = real, torch.zeros(B, 1, dtype=torch.long, device=x.device)
        else:
            key_real, past = cache.append_mask(real)                         # (B, L), (B, 1)
        # A token's position is the number of real tokens before it in its row (left padding too).
        positions = (past + real.long().cumsum(1) - 1).clamp(min=0)          # (B, T)
        mask = None if start == 0 and bool(key_real.all()) else causal_padding_mask(key_real, start, T)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)   # (B, T, hd)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i)                           # (B, T, D)
        if cache is not None:
            cache.length = start + T
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]                                                    # (B, 1, D)
        logits = self.lm_head(x)                                             # (B, T, V)
        loss = None if labels is None else lm_loss(logits, labels, real)
        return logits, loss

    # -- generation --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, *, audio_embeds=None,
                 audio_mask=None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                 eos_id: Union[int, Sequence[int], None] = None) -> torch.Tensor:
        """Batched decoding with a KV cache; returns the new tokens (B, n), n <= max_new_tokens.

        Prompts must be left-padded (build_batch(..., padding_side="left")) so every row's next
        token lands in the same column. temperature 0 is greedy; otherwise temperature / top-p
        sampling drawn from `generator`. A row stops at its first EOS (eos_id, default cfg.eos_id;
        several ids allowed) and is filled with cfg.pad_id (EOS if None) after it; decoding ends
        when every row has stopped. The audio placeholder is never generated. Call model.eval()
        first if LoRA dropout is on.
        """
        cfg = self.cfg
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be (B, T)")
        B, T = input_ids.shape
        real = _check_attention_mask(attention_mask, B, T, input_ids.device)
        if not bool(real[:, -1].all()):
            b = int((~real[:, -1]).nonzero()[0])
            raise ValueError(f"generate needs left padding: row {b} ends in padding "
                             f"(use build_batch(..., padding_side='left'))")
        if max_new_tokens < 1 or T + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 and prompt ({T}) + "
                             f"max_new_tokens must be <= max_seq_len={cfg.max_seq_len}")
        eos = cfg.eos_id if eos_id is None else eos_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = cfg.pad_id if cfg.pad_id is not None else (eos[0] if eos else 0)
        eos = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
        cache = self.new_cache(B, T + max_new_tokens)
        logits, _ = self(input_ids, real, audio_embeds=audio_embeds, audio_mask=audio_mask,
                         cache=cache, last_only=True)                       # (B, 1, V) prefill
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out = []
        for step in range(max_new_tokens):
            scores = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))   # (B, V)
            if cfg.audio_token_id is not None:                              # input-only token
                scores = scores.index_fill(1, torch.tensor([cfg.audio_token_id], device=scores.device),
                                           float("-inf"))
            nxt = sample_next_token(scores, temperature, top_p, generator)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            done = done | torch.isin(nxt, eos)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            logits, _ = self(nxt[:, None], cache=cache, last_only=True)     # (B, 1, V)
        return torch.stack(out, dim=1)                                      # (B, n)


def build_batch(prompts: Sequence[Sequence[int]], answers: Optional[Sequence[Sequence[int]]] = None,
                n_audio: Optional[Sequence[int]] = None, *, cfg: LLMConfig,
                padding_side: str = "right", device=None) -> Dict[str, torch.Tensor]:
    """Rows in the audio-prefix layout, padded into a batch:

        [BOS] <audio> x n_audio[b]  prompt[b]  answer[b] EOS        (BOS only if cfg.bos_id is set)

    prompts, answers: token-id lists per row (answers None: prompts for generate, no labels);
    n_audio: real audio tokens per row, e.g. adapter aux["mask"].sum(1).tolist() (None: no audio).
    Returns input_ids (B, T) long, attention_mask (B, T) bool and, with answers, labels (B, T):
    the answer and its EOS, -100 on BOS, audio, prompt and padding (Eq. 5). padding_side "right"
    for training, "left" for generate. Padding uses cfg.pad_id (EOS, then 0, if None).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"unknown padding_side {padding_side!r}; allowed: left, right")
    B = len(prompts)
    answers_ = answers if answers is not None else [None] * B
    n_audio_ = list(n_audio) if n_audio is not None else [0] * B
    if len(answers_) != B or len(n_audio_) != B:
        raise ValueError(f"prompts, answers and n_audio must have one entry per row; got {B}, "
                         f"{len(answers_)}, {len(n_audio_)}")
    if any(n_audio_) and cfg.audio_token_id is None:
        raise ValueError("n_audio given but LLMConfig.audio_token_id is None")
    if answers is not None and cfg.eos_id is None:
        raise ValueError("answers need an EOS to end them but LLMConfig.eos_id is None")
    pad = next(i for i in (cfg.pad_id, cfg.eos_id, 0) if i is not None)
    rows, targets = [], []
    for prompt, answer, n in zip(prompts, answers_, n_audio_):
        head = ([cfg.bos_id] if cfg.bos_id is not None else []) + [cfg.audio_token_id] * int(n) + list(prompt)
        tail = [] if answer is None else list(answer) + [cfg.eos_id]
        rows.append(head + tail)
        targets.append([IGNORE_INDEX] * len(head) + tail)
    T = max(len(r) for r in rows)
    ids = torch.full((B, T), pad, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (row, tgt) in enumerate(zip(rows, targets)):
        cols = slice(0, len(row)) if padding_side == "right" else slice(T - len(row), T)
        ids[b, cols] = torch.tensor(row, dtype=torch.long)
        labels[b, cols] = torch.tensor(tgt, dtype=torch.long)
        mask[b, cols] = True
    batch = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
    if answers is not None:
        batch["labels"] = labels.to(device)
    return batch


# ----------------------------------------------------------------------------------------------
# LoRA and freezing


class LoRALinear(nn.Module):
    """Eq. 6 around an existing nn.Linear: y = W x + b + (alpha / r) B A x.

    Keeps the base layer's `weight` and `bias` under the same names (a checkpoint of the base model
    still loads), adds `lora_A` (r, d_in) and `lora_B` (d_out, r). B starts at zero, so a fresh
    LoRA layer is the base layer exactly. Deviation: A is Kaiming-uniform as in the authors'
    loralib and in PEFT, where the paper says "random Gaussian".
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.reset_lora()
        self.lora_dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A drawn afresh, B = 0: the layer is the base layer again (same draws as a new layer)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)   # (..., d_out)
        return F.linear(x, self.weight, self.bias) + self.scaling * delta

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A (summed in float32 at least), same bias."""
        work = torch.promote_types(self.weight.dtype, torch.float32)
        w = self.weight.to(work) + self.scaling * (self.lora_B.to(work) @ self.lora_A.to(work))
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=self.weight.requires_grad)
        lin.bias = self.bias
        return lin


def add_lora(model: LLM, rank: int = 8, alpha: float = 16.0,
             targets: Sequence[str] = ("q_proj", "v_proj"), dropout: float = 0.0) -> List[str]:
    """Wrap the chosen attention projections of every layer in LoRALinear; return their names.

    targets: any of q_proj, k_proj, v_proj, o_proj (default q and v, as in the LoRA paper).
    Add LoRA after loading the base weights; mark_trainable then trains only A and B.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"unknown LoRA targets {unknown or list(targets)}; "
                         f"allowed: {', '.join(LORA_TARGETS)}")
    names = []
    for i, block in enumerate(model.layers):
        for t in targets:
            layer = getattr(block.self_attn, t)
            if isinstance(layer, LoRALinear):
                raise ValueError(f"layers.{i}.self_attn.{t} already has LoRA")
            setattr(block.self_attn, t, LoRALinear(layer, rank, alpha, dropout))
            names.append(f"layers.{i}.self_attn.{t}")
    return names


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear into a plain nn.Linear (W + (alpha / r) B A); return how many."""
    merged = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                merged += 1
    return merged


def freeze(module: nn.Module) -> nn.Module:
    """requires_grad False on every parameter of `module`; returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def mark_trainable(model: nn.Module, lora: bool = True, extra: Iterable[str] = ()) -> List[str]:
    """Freeze the model, then unfreeze the LoRA A/B matrices (if `lora`) and every parameter under
    the module paths in `extra` (e.g. "norm", "embed_tokens"); return the trainable names.

    lora=True without any LoRA layer, or a path in `extra` that matches nothing, is an error.
    With tied embeddings, "embed_tokens" also trains the lm_head (one tensor, listed once).
    """
    freeze(model)
    if lora:
        found = [m for m in model.modules() if isinstance(m, LoRALinear)]
        if not found:
            raise ValueError("lora=True but the model has no LoRA layer: call add_lora first, "
                             "or pass lora=False")
        for m in found:
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    named = dict(model.named_parameters())
    for path in extra:
        hits = [k for k in named if k == path or k.startswith(path + ".")]
        if not hits:
            raise ValueError(f"module path {path!r} matches no parameter; expected a prefix such as "
                             f"one of {sorted({k.split('.')[0] for k in named})}")
        for k in hits:
            named[k].requires_grad_(True)
    return sorted(k for k, p in named.items() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Tokenizers

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<audio>")   # ids 0..4: LLMConfig's defaults
_WORD = re.compile(r"\w+|[^\w\s]")                                   # words and single punctuation


class WordTokenizer:
    """Word-level vocabulary for the scaled-down setup, built from the task texts.

    A word is a run of letters/digits/underscore; each other non-space character is its own token.
    Ids 0..4 are <pad> <bos> <eos> <unk> <audio>; words follow by decreasing count, then
    alphabetically. Text never produces a special token ("<audio>" splits into "<", "audio", ">"),
    so placeholders come only from build_batch. decode joins words with single spaces.
    """

    def __init__(self, words: Sequence[str], lowercase: bool = True):
        vocab = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        if len(set(vocab)) != len(vocab):
            dup = sorted({w for w in vocab if vocab.count(w) > 1})
            raise ValueError(f"duplicate words in the vocabulary: {dup[:10]}")
        self.lowercase = lowercase
        self.itos = vocab
        self.stoi = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.audio_id = range(len(SPECIAL_TOKENS))

    def split(self, text: str) -> List[str]:
        return _WORD.findall(text.lower() if self.lowercase else text)

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: Optional[int] = None,
              lowercase: bool = True) -> "WordTokenizer":
        """Vocabulary of the words seen at least min_count times, at most max_size ids in all."""
        if isinstance(texts, str):
            raise ValueError("texts must be an iterable of strings, got one string")
        splitter = cls([], lowercase)
        counts = Counter(w for t in texts for w in splitter.split(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            if max_size < len(SPECIAL_TOKENS):
                raise ValueError(f"max_size must be >= {len(SPECIAL_TOKENS)} (the special tokens), "
                                 f"got {max_size}")
            words = words[:max_size - len(SPECIAL_TOKENS)]
        return cls(words, lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = [self.stoi.get(w, self.unk_id) for w in self.split(text)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id, self.audio_id} if skip_special else set()
        return " ".join(self.itos[int(i)] for i in ids if int(i) not in skip)

    def config_ids(self) -> dict:
        """vocab_size and special ids for LLMConfig: LLMConfig.tiny(**tok.config_ids())."""
        return dict(vocab_size=self.vocab_size, pad_id=self.pad_id, bos_id=self.bos_id,
                    eos_id=self.eos_id, audio_token_id=self.audio_id)

    def to_dict(self) -> dict:
        """What a checkpoint stores next to the weights (JSON-serialisable)."""
        return dict(format="word-tokenizer-1", lowercase=self.lowercase,
                    words=self.itos[len(SPECIAL_TOKENS):])

    @classmethod
    def from_dict(cls, d: Mapping) -> "WordTokenizer":
        if d.get("format") != "word-tokenizer-1":
            raise ValueError(f"not a WordTokenizer record: format {d.get('format')!r}, "
                             f"expected 'word-tokenizer-1'")
        return cls(d["words"], d["lowercase"])

    def save(self, path: str) -> None:
        """JSON, written to a temp file then renamed (atomic)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=0)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


class HFTokenizer:
    """Thin wrapper over a checkpoint's local tokenizer.json through the `tokenizers` package.

    Same calls as WordTokenizer (encode, decode, vocab_size, config_ids). Special tokens are named
    by their strings (e.g. eos="<|im_end|>" for Qwen3); a name the vocabulary lacks is an error.
    encode adds nothing the caller did not ask for (no template, no automatic BOS).
    """

    def __init__(self, path: str, bos: Optional[str] = None, eos: Optional[str] = None,
                 pad: Optional[str] = None, audio: Optional[str] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("HFTokenizer needs the `tokenizers` package: pip install tokenizers") from None
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self.tok = Tokenizer.from_file(path)
        ids = {}
        for role, name in (("bos", bos), ("eos", eos), ("pad", pad), ("audio", audio)):
            ids[role] = None if name is None else self.tok.token_to_id(name)
            if name is not None and ids[role] is None:
                raise ValueError(f"{role} token {name!r} is not in the vocabulary of {path}")
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id, self.audio_id = ids["pad"], ids["audio"]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        for flag, i, role in ((bos, self.bos_id, "bos"), (eos, self.eos_id, "eos")):
            if flag and i is None:
                raise ValueError(f"{role}=True but no {role} token was named")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def config_ids(self) -> dict:
        """Special ids for LLMConfig (vocab_size is the checkpoint's; take it from its config)."""
        return dict(pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id, audio_token_id=self.audio_id)


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints

_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                 "pytorch_model.bin.index.json", "pytorch_model.bin")
_IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")   # a buffer old checkpoints stored


def _read_weight_file(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the `safetensors` package: "
                              f"pip install safetensors") from None
        return load_file(path, device="cpu")
    if path.endswith((".bin", ".pt", ".pth")):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path} does not hold a flat state dict of tensors")
        return dict(sd)
    raise ValueError(f"unknown weight file type {path!r}; expected .safetensors, .bin, .pt, .pth "
                     f"or an index .json")


def read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state dict, config.json dict or None) from a checkpoint directory, a weight file, or a
    sharded index (`model.safetensors.index.json`: its weight_map names the shard of every key).
    config.json is read from the same directory when present."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [f for f in _WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
        if not found:
            raise ValueError(f"no weights in {path}; looked for {', '.join(_WEIGHT_FILES)}")
        path = os.path.join(path, found[0])
    if not os.path.exists(path):
        raise ValueError(f"no such checkpoint file: {path}")
    folder = os.path.dirname(path)
    if path.endswith(".json"):
        with open(path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path} has no weight_map; expected a sharded-checkpoint index")
        sd = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_read_weight_file(os.path.join(folder, shard)))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise ValueError(f"shards of {path} lack keys its weight_map lists: {missing[:10]}")
    else:
        sd = _read_weight_file(path)
    config_path = os.path.join(folder, "config.json")
    hf_config = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            hf_config = json.load(f)
    return sd, hf_config


def config_from_state_dict(sd: Mapping[str, torch.Tensor], **overrides) -> LLMConfig:
    """LLMConfig inferred from the shapes of a state dict in this file's names (no `model.`).

    From shapes: vocab_size and d_model (embed_tokens), n_layers (layer indices), d_ff (gate_proj),
    qkv_bias and o_bias (bias keys), qk_norm and head_dim (Qwen3's q_norm has hd entries), then
    n_heads and n_kv_heads (q_proj / k_proj rows / hd), tie_embeddings (no lm_head.weight).
    Not from shapes: without q_norm, q_proj's H * hd rows do not tell 4 heads of 16 from 2 of 32,
    so pass n_heads (or head_dim); the RoPE base and the norm epsilon leave no trace, so pass
    rope_theta and norm_eps. Special ids are None unless passed. Or use the checkpoint's config.json.
    """
    for key in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight",
                "layers.0.self_attn.k_proj.weight", "layers.0.mlp.gate_proj.weight"):
        if key not in sd:
            raise ValueError(f"cannot infer a config: the state dict has no {key!r}")
    V, D = sd["embed_tokens.weight"].shape
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    q_rows = sd["layers.0.self_attn.q_proj.weight"].shape[0]
    k_rows = sd["layers.0.self_attn.k_proj.weight"].shape[0]
    qk_norm = "layers.0.self_attn.q_norm.weight" in sd
    if qk_norm:
        hd = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    elif overrides.get("head_dim") is not None:
        hd = overrides["head_dim"]
    elif overrides.get("n_heads") is not None:
        hd = q_rows // overrides["n_heads"]
    else:
        raise ValueError(f"cannot infer the head count from shapes: q_proj has {q_rows} rows = n_heads x "
                         f"head_dim and there is no q_norm (Qwen3) giving head_dim; pass n_heads=... "
                         f"or put the checkpoint's config.json next to it")
    if q_rows % hd or k_rows % hd:
        raise ValueError(f"head_dim {hd} does not divide q_proj rows {q_rows} and k_proj rows {k_rows}")
    unknown = [name for name in ("rope_theta", "norm_eps") if name not in overrides]
    if unknown:
        raise ValueError(f"shapes cannot give {', '.join(unknown)}: pass them (e.g. rope_theta=1e6, "
                         f"norm_eps=1e-6) or put the checkpoint's config.json next to it")
    cfg = dict(vocab_size=V, d_model=D, n_layers=max(layer_ids) + 1, n_heads=q_rows // hd,
               n_kv_heads=k_rows // hd, head_dim=hd, d_ff=sd["layers.0.mlp.gate_proj.weight"].shape[0],
               qkv_bias="layers.0.self_attn.q_proj.bias" in sd,
               o_bias="layers.0.self_attn.o_proj.bias" in sd, qk_norm=qk_norm,
               tie_embeddings="lm_head.weight" not in sd,
               pad_id=None, bos_id=None, eos_id=None, audio_token_id=None)
    return LLMConfig(**{**cfg, **overrides})


def _names(keys, limit=12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_llm(path_or_state_dict, config: Union[LLMConfig, Mapping, None] = None, *,
             dtype: Optional[torch.dtype] = None, device=None, **overrides) -> LLM:
    """An LLM with the weights of a Hugging Face LLaMA, Qwen2 or Qwen3 checkpoint (or our own).

    path_or_state_dict: a checkpoint directory, a .safetensors / .bin / .pt file, a sharded index
        (model.safetensors.index.json), or a state dict (HF `model.`-prefixed names or ours).
    config: an LLMConfig, or a dict of its fields (asdict) or of a HF config.json; None: read the
        config.json next to the weights (one without tie_word_embeddings: tied iff the weights have
        no lm_head.weight), else infer from shapes (config_from_state_dict says what needs
        passing). `overrides` replace config fields (e.g. audio_token_id, max_seq_len).
    dtype: default the checkpoint's (bf16 stays bf16). Weights are assigned, not copied into a
    randomly initialised model (the model is built on the meta device).
    Missing, unexpected and wrong-shaped keys are reported by name (ValueError). With tied
    embeddings lm_head.weight is absent, or must equal embed_tokens.weight.
    """
    hf_config = None
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd, hf_config = read_checkpoint(path_or_state_dict)
    elif isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
    else:
        raise TypeError(f"load_llm takes a path or a state dict, got {type(path_or_state_dict).__name__}")
    sd = {k[len("model."):] if k.startswith("model.") else k: v
          for k, v in sd.items() if not _IGNORED_KEY.search(k)}
    if isinstance(config, Mapping):
        config = config_from_hf(config) if "model_type" in config else LLMConfig(**config)
    if config is None and hf_config is not None:
        if "tie_word_embeddings" not in hf_config:    # older configs may leave it out: ask the weights
            overrides = {"tie_embeddings": "lm_head.weight" not in sd, **overrides}
        config = config_from_hf(hf_config, **overrides)
    elif config is None:
        config = config_from_state_dict(sd, **overrides)
    elif overrides:
        config = replace(config, **overrides)
    if not isinstance(config, LLMConfig):
        raise TypeError(f"config must be an LLMConfig, a dict or None, got {type(config).__name__}")

    if config.tie_embeddings and "lm_head.weight" in sd:
        head, emb = sd.pop("lm_head.weight"), sd.get("embed_tokens.weight")
        if emb is None or head.shape != emb.shape or not torch.equal(head, emb):
            raise ValueError("the checkpoint has its own lm_head.weight but the config ties it to "
                             "embed_tokens.weight; set tie_embeddings=False")
    with torch.device("meta"):
        model = LLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    wrong = [f"{k} (checkpoint {tuple(sd[k].shape)}, model {expected[k]})"
             for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"checkpoint does not fit the config (d_model={config.d_model}, n_layers="
                 f"{config.n_layers}, n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, "
                 f"head_dim={config.head_dim}, vocab_size={config.vocab_size}):"]
        lines += [f"  missing keys: {_names(missing)}"] if missing else []
        lines += [f"  unexpected keys: {_names(unexpected)}"] if unexpected else []
        lines += [f"  wrong shapes: {_names(wrong)}"] if wrong else []
        raise ValueError("\n".join(lines))
    dtype = dtype or sd["embed_tokens.weight"].dtype
    sd = {k: v.to(device=device or "cpu", dtype=dtype if v.is_floating_point() else v.dtype)
          for k, v in sd.items()}
    if config.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight         # assign=True gave two Parameters
    return model
