"""Decoder LLM: a LLaMA / Qwen2 / Qwen3-style causal LM reading audio tokens from its input embeddings,
with KV-cache generation, LoRA and a word tokenizer (MoE-Adapter, arXiv 2601.02967, uses Qwen3-1.7B).

    input_ids: [BOS] <audio> x n_b  prompt  answer EOS           (B, T), n_b = audio_mask[b].sum()
    x = embed_tokens(input_ids);  x[input_ids == <audio>] = y[audio_mask]     row by row, in order
    block: h = x + o_proj(Attention(RMSNorm(x))),  out = h + MLP(RMSNorm(h))
    logits = lm_head(RMSNorm(blocks(x)))                         (B, T, V); loss on the answer only

LLaMA (arXiv 2302.13971): RMSNorm, SwiGLU, RoPE (arXiv 2104.09864), GQA (arXiv 2305.13245). Qwen2
(arXiv 2407.10671): + q/k/v bias. Qwen3 (arXiv 2505.09388): per-head q/k RMSNorm before RoPE. LoRA:
arXiv 2106.09685. Module names are HF's (hf.load_llm). B batch, T new tokens, L keys (cached + new),
D d_model, V vocab, H query / K kv heads, G = H / K, hd head_dim, F MLP width, T' audio per row.
    (1) RMSNorm(x) = w * x / sqrt(mean_D(x^2) + eps)                     in float32
    (2) RoPE at position p on the pair (i, i + hd/2): angle p * theta^(-2i/hd),
        x' = x cos + rotate_half(x) sin,   rotate_half(x) = (-x[hd/2:], x[:hd/2])
    (3) Attention = softmax(q k^T / sqrt(hd) + causal and padding mask) v; kv head j serves
        query heads jG .. jG + G - 1                                      softmax in float32
    (4) MLP(n) = down_proj(SiLU(gate_proj(n)) * up_proj(n))             SwiGLU
    (5) loss = mean over answer tokens t of -log p(x_t | x_<t)          labels -100 elsewhere
    (6) LoRA: y = W x + b + (alpha / r) B A x,   A (r, d_in), B (d_out, r), B = 0 at init
"""
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100                          # label of positions that carry no loss (Eq. 5)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Qwen2/2.5/3 tokenizers use ids up to 151668 of the 151936 embedding rows, so 151669 is free for
# the audio placeholder. Deviation: Qwen2-Audio adds its own <|AUDIO|> token instead.
QWEN_AUDIO_ID = 151669
# LLMConfig.preset(name): overrides of the defaults; "tiny" is CPU-sized, qwen3_1_7b is the paper's LLM.
PRESETS = {
    "tiny": {},
    "qwen3_1_7b": dict(vocab_size=151936, rope_theta=1000000.0, norm_eps=1e-6, pad_id=151643, bos_id=None,
                       audio_token_id=QWEN_AUDIO_ID, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       max_seq_len=40960, qk_norm=True, eos_id=151645, d_model=2048, d_ff=6144),
}


def _check(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


def _shape(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


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
    rope_theta: float = 10000.0         # RoPE base (Eq. 2)
    norm_eps: float = 1e-6              # RMSNorm epsilon (Eq. 1)
    qkv_bias: bool = False              # bias on q/k/v projections (Qwen2)
    o_bias: bool = False                # bias on o_proj (LLaMA with attention_bias=True)
    qk_norm: bool = False               # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_embeddings: bool = True         # lm_head shares the token-embedding matrix
    attn_impl: str = "sdpa"             # "sdpa" (F.scaled_dot_product_attention) | "math"
    init_std: float = 0.02              # N(0, init_std) weights when training from scratch
    pad_id: Optional[int] = 0           # special ids: the defaults are WordTokenizer's
    bos_id: Optional[int] = 1           # None: no BOS is prepended (Qwen)
    eos_id: Optional[int] = 2           # None: generate stops only at max_new_tokens
    audio_token_id: Optional[int] = 4   # the audio placeholder; None: the model takes no audio

    @classmethod
    def preset(cls, name: str, **kw) -> "LLMConfig":
        _check(name in PRESETS, f"unknown LLM preset {name!r}; allowed: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **kw})

    def __post_init__(self):
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            _check(getattr(self, k) >= 1, f"LLMConfig.{k} must be >= 1, got {getattr(self, k)}")
        _check(self.head_dim is not None or self.d_model % self.n_heads == 0,
               f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        self.head_dim = hd = self.d_model // self.n_heads if self.head_dim is None else self.head_dim
        _check(hd >= 2 and hd % 2 == 0, f"head_dim must be even and >= 2 (RoPE rotates pairs), got {hd}")
        _check(self.n_heads % self.n_kv_heads == 0,
               f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        _check(self.rope_theta > 0 and self.norm_eps > 0, "rope_theta and norm_eps must be > 0")
        _check(self.attn_impl in ("sdpa", "math"), f"attn_impl must be sdpa or math, got {self.attn_impl!r}")
        V, ids = self.vocab_size, dict(pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id)
        for k, v in {**ids, "audio_token_id": self.audio_token_id}.items():
            _check(v is None or 0 <= v < V, f"LLMConfig.{k}={v} must be in [0, vocab_size={V}) or None")
        _check(self.audio_token_id is None or self.audio_token_id not in ids.values(),
               f"audio_token_id={self.audio_token_id} must differ from pad_id, bos_id, eos_id")


class RMSNorm(nn.Module):
    """Eq. 1 in float32 (float64 stays float64); back to the input dtype before the gain, as HF."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (B, T, hd) of Eq. 2 at positions (B, T), angles in float32 at least. Deviation from
    gpt-fast's cached tables: recomputed, so model.to(bf16) rounds no buffer."""
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
    """Eq. 3. q (B, H, T, hd); k, v (B, K, L, hd); mask (B, 1, T, L) bool, True = may attend, None:
    causal with T == L. "math": the float32 reference. Deviation: kv heads repeated, not enable_gqa."""
    G = q.shape[1] // k.shape[1]
    if G > 1:                                       # kv head j -> query heads jG .. jG+G-1
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)   # (B, H, L, hd)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    work = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(work) @ k.to(work).transpose(-2, -1) / math.sqrt(q.shape[-1])   # (B, H, T, L)
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.to(work)).to(q.dtype)                      # (B, H, T, hd)


def causal_padding_mask(key_real: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(B, 1, T, L) bool: query i (column start + i) sees key j <= start + i if key j is real, and
    always itself, so a padding query never has an empty softmax row (its output is never read)."""
    q_col = torch.arange(start, start + T, device=key_real.device)[:, None]      # (T, 1)
    k_col = torch.arange(key_real.shape[1], device=key_real.device)[None, :]     # (1, L)
    allowed = (k_col <= q_col) & key_real[:, None, :]                            # (B, T, L)
    return (allowed | (k_col == q_col))[:, None]                                 # (B, 1, T, L)


class KVCache:
    """k, v (n_layers, B, K, max_len, hd), real columns (B, max_len), rows ending together (left padding);
    LLM.forward advances `length` to L first, then each layer's update writes the newest T columns."""

    def __init__(self, cfg: LLMConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):   # (B, K, T, hd) -> (B, K, L, hd)
        L = self.length
        self.k[layer, :, :, L - k.shape[2]:L], self.v[layer, :, :, L - k.shape[2]:L] = k, v
        return self.k[layer, :, :, :L], self.v[layer, :, :, :L]


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
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache: Optional[KVCache] = None, layer: int = 0):
        cfg, (B, T, _) = self.cfg, x.shape
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
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, n: torch.Tensor) -> torch.Tensor:                  # Eq. 4: (B, T, D) -> (B, T, D)
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


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Eq. 5 in float32 at least, mean (or sum) over the labelled targets; labels (B, T) as in HF:
    labels[:, t] is predicted at t - 1, -100 on prompt, audio and padding (none labelled: nan)."""
    B, T, V = logits.shape
    _check(isinstance(labels, torch.Tensor) and tuple(labels.shape) == (B, T),
           f"labels must have shape (B, T) = {(B, T)}, got {_shape(labels)}")
    work, target = torch.promote_types(logits.dtype, torch.float32), labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits[:, :-1].to(work).reshape(-1, V), target.reshape(-1),   # (B (T-1), V)
                           ignore_index=IGNORE_INDEX, reduction=reduction)


class LLM(nn.Module):
    """`logits (B, T or 1, V), loss = model(input_ids, attention_mask, audio_embeds=y, audio_mask=m, labels=labels)`;
    attention_mask (B, T) bool, True = real token, left or right padding (None: all real): positions count real
    tokens. cache: a KVCache (new_cache) filled in place, the mask covering the new tokens; last_only: last logits."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for m in self.modules():                # HF's init: N(0, init_std) weights, zero biases, unit gains
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_len, device=w.device, dtype=w.dtype)

    def _real_mask(self, mask, B: int, T: int, device) -> torch.Tensor:   # (B, T) bool, True = real token
        if mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        _check(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == (B, T),
               f"attention_mask must be a bool tensor (B, T) = {(B, T)}, got {_shape(mask)}")
        return mask.to(device)

    def embed(self, input_ids, audio_embeds=None, audio_mask=None) -> torch.Tensor:
        """(B, T, D) embeddings, row b's placeholders taking y[b][audio_mask[b]] in order; shapes checked, no sync."""
        cfg, ids, a = self.cfg, input_ids, audio_embeds
        _check(isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 0 and ids.dtype in (
            torch.int64, torch.int32), f"input_ids must be an integer tensor (B, T >= 1), got {_shape(ids)}")
        x = self.embed_tokens(ids)                                          # (B, T, D)
        if a is None:
            return x
        _check(cfg.audio_token_id is not None, "audio_embeds given but LLMConfig.audio_token_id is None")
        B, D = ids.shape[0], cfg.d_model
        _check(isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[0] == B and a.shape[2] == D,
               f"audio_embeds must be (B={B}, T', d_model={D}), got {_shape(a)}")
        m = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device) if audio_mask is None else audio_mask
        _check(isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.shape == a.shape[:2],
               f"audio_mask must be a bool tensor (B, T') = {tuple(a.shape[:2])}, got {_shape(m)}")
        audio = a[m].to(device=x.device, dtype=x.dtype)             # (N, D) row-major, as the placeholders
        return x.masked_scatter((ids == cfg.audio_token_id)[..., None], audio)

    def forward(self, input_ids, attention_mask=None, *, audio_embeds=None, audio_mask=None,
                labels=None, cache: Optional[KVCache] = None, last_only: bool = False):
        cfg = self.cfg
        x = self.embed(input_ids, audio_embeds, audio_mask)                 # (B, T, D)
        (B, T, _), s = x.shape, 0 if cache is None else cache.length
        _check(s + T <= cfg.max_seq_len, f"sequence of {s + T} tokens ({s} cached + {T} new) exceeds "
                                         f"max_seq_len={cfg.max_seq_len}")
        real = self._real_mask(attention_mask, B, T, x.device)               # (B, T)
        key_real, past = real, torch.zeros(B, 1, dtype=torch.long, device=x.device)
        if cache is not None:
            _check(B == cache.mask.shape[0] and s + T <= cache.mask.shape[1], f"cache of batch "
                   f"{cache.mask.shape[0]} and max_len={cache.mask.shape[1]} cannot take a batch of {B}: "
                   f"it is full ({s} cached + {T} new)")
            cache.mask[:, s:s + T], cache.length = real, s + T
            key_real, past = cache.mask[:, :s + T], cache.mask[:, :s].sum(1, keepdim=True)   # (B, L), (B, 1)
        # A token's position is the number of real tokens before it in its row (left padding too).
        positions = (past + real.long().cumsum(1) - 1).clamp(min=0)          # (B, T)
        # No mask given and nothing cached: plain causal attention (SDPA's is_causal kernels).
        mask = None if attention_mask is None and s == 0 else causal_padding_mask(key_real, s, T)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)   # (B, T, hd)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i)                           # (B, T, D)
        x = self.norm(x)
        logits = self.lm_head(x[:, -1:] if last_only else x)                 # (B, T or 1, V)
        return logits, None if labels is None else lm_loss(logits, labels)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, audio_embeds=None, audio_mask=None,
                 max_new_tokens: int = 32, eos_id: Optional[int] = None) -> torch.Tensor:
        """Greedy new tokens (B, n <= max_new_tokens) for left-padded prompts, KV-cached (ties: lowest id);
        a row stops at its first EOS (eos_id, default cfg.eos_id), then pads; never the audio placeholder."""
        cfg, (B, T) = self.cfg, input_ids.shape
        real = self._real_mask(attention_mask, B, T, input_ids.device)
        _check(bool(real[:, -1].all()), "generate needs left padding: a row of attention_mask ends in padding "
                                        "(use build_batch(..., padding_side='left'))")
        _check(1 <= max_new_tokens <= cfg.max_seq_len - T, f"max_new_tokens={max_new_tokens} must be >= 1 "
               f"and prompt ({T}) + max_new_tokens must be <= max_seq_len={cfg.max_seq_len}")
        eos = cfg.eos_id if eos_id is None else eos_id
        pad = next(i for i in (cfg.pad_id, eos, 0) if i is not None)
        cache = self.new_cache(B, T + max_new_tokens)                  # unpadded prompts: no mask (is_causal)
        logits, _ = self(input_ids, None if bool(real.all()) else real, audio_embeds=audio_embeds,
                         audio_mask=audio_mask, cache=cache, last_only=True)   # (B, 1, V) prefill
        done, out = torch.zeros(B, dtype=torch.bool, device=input_ids.device), []
        for step in range(max_new_tokens):
            scores = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))   # (B, V)
            if cfg.audio_token_id is not None:                              # input-only token
                scores[:, cfg.audio_token_id] = float("-inf")
            out.append(scores.argmax(dim=-1).masked_fill(done, pad))
            done = done if eos is None else done | (out[-1] == eos)
            if bool(done.all()) or step + 1 == max_new_tokens:             # one host sync per token
                break
            logits, _ = self(out[-1][:, None], cache=cache, last_only=True)   # (B, 1, V)
        return torch.stack(out, dim=1)                                      # (B, n)


def build_batch(prompts: Sequence[Sequence[int]], answers: Optional[Sequence[Sequence[int]]] = None,
                n_audio: Optional[Sequence[int]] = None, *, cfg: LLMConfig,
                padding_side: str = "right", device=None) -> dict[str, torch.Tensor]:
    """Rows `[BOS] <audio> x n_audio[b]  prompt[b]  answer[b] EOS` padded with cfg.pad_id (else EOS, 0),
    right for training, left for generate (answers None); n_audio e.g. aux["mask"].sum(1).tolist().
    -> input_ids, attention_mask and, with answers, labels (B, T): answer and EOS, -100 elsewhere."""
    B = len(prompts)
    answers_ = [None] * B if answers is None else answers
    n_audio_ = [0] * B if n_audio is None else list(n_audio)
    _check(padding_side in ("left", "right") and len(answers_) == len(n_audio_) == B,
           f"padding_side must be left or right (got {padding_side!r}) and prompts, answers and n_audio "
           f"have one entry per row (got {B}, {len(answers_)}, {len(n_audio_)})")
    _check(not (any(n_audio_) and cfg.audio_token_id is None or answers is not None and cfg.eos_id is None),
           "n_audio needs LLMConfig.audio_token_id and answers need LLMConfig.eos_id, not None")
    bos = [] if cfg.bos_id is None else [cfg.bos_id]
    rows = [(bos + [cfg.audio_token_id] * int(n) + list(prompt), [] if a is None else list(a) + [cfg.eos_id])
            for prompt, n, a in zip(prompts, n_audio_, answers_)]                    # (head, tail) per row
    T = max(len(head) + len(tail) for head, tail in rows)
    ids = torch.full((B, T), next(i for i in (cfg.pad_id, cfg.eos_id, 0) if i is not None), dtype=torch.long)
    labels, mask = torch.full((B, T), IGNORE_INDEX, dtype=torch.long), torch.zeros(B, T, dtype=torch.bool)
    for b, (head, tail) in enumerate(rows):
        n = len(head) + len(tail)
        cols = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[b, cols] = torch.tensor(head + tail, dtype=torch.long)
        labels[b, cols] = torch.tensor([IGNORE_INDEX] * len(head) + tail, dtype=torch.long)
        mask[b, cols] = True
    batch = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
    return batch if answers is None else {**batch, "labels": labels.to(device)}


# LoRA and freezing ------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """Eq. 6 around an nn.Linear, keeping its `weight`, `bias` names (base checkpoints load); B = 0 at
    init. Deviation: A is Kaiming-uniform (loralib, PEFT) where the paper says "random Gaussian"."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        _check(rank >= 1, f"LoRA rank must be >= 1, got {rank}")
        w = self.weight = base.weight                                      # (d_out, d_in)
        self.bias, self.scaling = base.bias, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(x, self.lora_A), self.lora_B)                      # (..., d_out)
        return F.linear(x, self.weight, self.bias) + self.scaling * delta


def add_lora(model: LLM, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("q_proj", "v_proj")) -> list:
    """Wrap `targets` (of LORA_TARGETS; q, v as in the paper) of every layer in LoRALinear; -> names."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    _check(targets and not unknown, f"unknown LoRA targets {unknown or list(targets)}; allowed: {LORA_TARGETS}")
    names = []
    for i, attn in enumerate(block.self_attn for block in model.layers):
        for t in targets:
            _check(not isinstance(getattr(attn, t), LoRALinear), f"layers.{i}.self_attn.{t} already has LoRA")
            setattr(attn, t, LoRALinear(getattr(attn, t), rank, alpha))
            names.append(f"layers.{i}.self_attn.{t}")
    return names


def freeze(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False)


def mark_trainable(model: nn.Module, lora: bool = True, extra: Iterable[str] = ()) -> list[str]:
    """Freeze the model but the LoRA A/B matrices (if `lora`) and the parameters under the module
    paths in `extra` (e.g. "norm"; a tied lm_head is "embed_tokens"); return the trainable names."""
    named = dict(freeze(model).named_parameters())
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)] if lora else []
    _check(loras or not lora, "lora=True but the model has no LoRA layer: call add_lora, or pass lora=False")
    hits = [p for m in loras for p in (m.lora_A, m.lora_B)]
    for path in extra:
        under = [p for k, p in named.items() if k == path or k.startswith(path + ".")]
        _check(under, f"module path {path!r} matches no parameter; expected a prefix such as one of "
                      f"{sorted({k.split('.')[0] for k in named})}")
        hits += under
    for p in hits:
        p.requires_grad_(True)
    return sorted(k for k, p in named.items() if p.requires_grad)


# Tokenizer --------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<audio>")   # ids 0..4: LLMConfig's defaults
_WORD = re.compile(r"\w+|[^\w\s]")                                   # words and single punctuation


class WordTokenizer:
    """Lowercased word-level vocabulary: SPECIAL_TOKENS, then the words by decreasing count, then a-z. Text never
    yields a special token ("<audio>" is "<", "audio", ">"): placeholders come from build_batch."""

    def __init__(self, words: Sequence[str]):
        self.itos = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.audio_id = range(len(SPECIAL_TOKENS))
        self.vocab_size = len(self.itos)

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        _check(not isinstance(texts, str), "texts must be an iterable of strings, got one string")
        counts = Counter(w for t in texts for w in _WORD.findall(t.lower()))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.stoi.get(w, self.unk_id) for w in _WORD.findall(text.lower())]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        skip = {self.pad_id, self.bos_id, self.eos_id, self.audio_id} if skip_special else set()
        return " ".join(self.itos[int(i)] for i in ids if int(i) not in skip)

    def config_ids(self) -> dict:
        return dict(vocab_size=self.vocab_size, pad_id=self.pad_id, bos_id=self.bos_id,
                    eos_id=self.eos_id, audio_token_id=self.audio_id)

    def to_dict(self) -> dict:
        """What a checkpoint stores beside the weights (JSON-serialisable); from_dict reads it."""
        return dict(format="word-tokenizer-1", lowercase=True, words=self.itos[len(SPECIAL_TOKENS):])

    @classmethod
    def from_dict(cls, d: Mapping) -> "WordTokenizer":
        _check(d.get("format") == "word-tokenizer-1", f"not a WordTokenizer record: {d.get('format')!r}")
        return cls(d["words"])
