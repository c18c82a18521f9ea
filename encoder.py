"""Audio front-ends (kaldi_fbank / ast_features, whisper_log_mel) and the pretrained encoders the papers start from,
with soft_moa mixtures: the Audio Spectrogram Transformer (Soft-MoA's; Gong, Chung, Glass, Interspeech 2021, arXiv
2104.01778), Whisper's encoder (MoE-Adapter's; Radford et al., ICML 2023, arXiv 2212.04356). hf.py loads HF weights.

Notation: b batch, N samples (16 kHz), T frames (10 ms), F mel bins, d width, h heads, dh = d / h, d_ff MLP width,
m tokens. AST: patch grid Fp = (F - 16) // fs + 1, Tp = (T - 16) // ts + 1, m = 2 + Fp * Tp. Whisper: m = T' =
(T - 1) // 2 + 1 encoder frames (20 ms). Masks are bool, True = real (frame / token), real first, then padding.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from soft_moa import KINDS, PLACEMENTS, Info, _check_choice, adapted_sublayer, make_block_adapters

SAMPLE_RATE = 16000
FLT_EPSILON = 1.1920928955078125e-07  # float32 machine epsilon: Kaldi's log floor
LOG_FLOOR = math.log(FLT_EPSILON)  # -15.942385..., the log-mel value of silence and of empty filters
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AST's AudioSet statistics of the log-mel fbank
WINDOWS, HEAD_POOLS = ("hanning", "povey"), ("mean", "cls_dist", "rows")
ATTN_IMPLS, POS_RESIZE = ("sdpa", "reference"), ("ast", "bilinear")


def _check_waveform(wave, sample_rate: int, min_samples: int, lengths) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where audio enters: -> (wave (b, N) float32 (float64 stays), zero past each length; lengths (b,) long)."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"sample_rate is {sample_rate} Hz; expected {SAMPLE_RATE} Hz (resample the audio first)")
    wave = torch.as_tensor(wave)
    if (not wave.is_floating_point() or wave.dim() not in (1, 2) or wave.numel() == 0
            or (wave.dim() == 2 and wave.shape[1] <= 8 < wave.shape[0])):  # (N, channels) audio
        raise ValueError(f"audio must be float samples in [-1, 1] (int16 PCM: divide by 32768), mono (N,) or a batch "
                         f"(b, N) (channels: use wave.mean(-1)), not empty; got {wave.dtype} {tuple(wave.shape)}")
    wave = wave[None] if wave.dim() == 1 else wave  # (b, N)
    b, n = wave.shape
    lengths = torch.full((b,), n) if lengths is None else torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (b,) or (lengths > n).any():
        raise ValueError(f"lengths must have shape (b,) = ({b},) and be <= {n} samples; got {lengths.tolist()}")
    if (lengths < min_samples).any():
        raise ValueError(f"audio too short: {lengths.min().item()} samples; expected at least {min_samples} (a window)")
    real = (torch.arange(n)[None, :] < lengths[:, None]).to(wave.device)  # (b, N)
    if (~torch.isfinite(wave) & real).any():
        raise ValueError("audio holds NaN/inf samples inside its lengths; expected finite samples")
    wave = wave.masked_fill(~real, 0.0)  # padding beyond a clip's length reads as silence
    return wave.to(torch.float64 if wave.dtype == torch.float64 else torch.float32), lengths


def _triangles(x: torch.Tensor, left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Triangular filters (F,) at points x (n, 1): rise left -> centre, fall to right, 0 outside. -> (n, F)"""
    return torch.minimum((x - left) / (centre - left), (right - x) / (right - centre)).clamp_min(0.0)


def _power_mel(frames: torch.Tensor, window: torch.Tensor, n_fft: int, banks: torch.Tensor) -> torch.Tensor:
    """Mel energies |rfft(frames * window, n_fft)|^2 @ banks: (b, T, L) -> (b, T, F)."""
    spec = torch.fft.rfft(frames * window.to(frames), n=n_fft)  # (b, T, n_fft/2 + 1)
    power = spec.real.square() + spec.imag.square()
    return power @ banks.to(power)


# --- Front-ends: Kaldi's fbank as AST uses it, Whisper's log-mel ----------------------------------
def kaldi_fbank(wave, sample_rate: int = SAMPLE_RATE, *, n_mels: int = 128, window: str = "hanning",
                lengths=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kaldi's fbank (dither 0, snip_edges, no energy), batched: wave (N,) or (b, N) in [-1, 1], lengths (b,) real
    samples -> (fbank (b, T, F), frames (b,)), T = 1 + (N - 400) // 160, 0 past a clip's frames (as AST pads).
    Deviation (the issue says Povey): window "hanning" as AST and its HF extractor; "povey" (hann^0.85) is Kaldi's."""
    _check_choice("window", window, WINDOWS)
    L, S, n_fft, pre = 400, 160, 512, 0.97  # frame length and shift, FFT size (next power of two)
    wave, lengths = _check_waveform(wave, sample_rate, L, lengths)
    frames = wave.unfold(-1, L, S)  # (b, T, L)
    frames = frames - frames.mean(-1, keepdim=True)
    frames = torch.cat([frames[..., :1] * (1 - pre), frames[..., 1:] - pre * frames[..., :-1]], dim=-1)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(L, dtype=torch.float64) / (L - 1))  # symmetric
    # Kaldi's mel filters (257, F) float64: mel(f) = 1127 ln(1 + f / 700), corners evenly spaced in mel over [20 Hz,
    # 8 kHz], unnormalised triangles. With 128 filters filter 3 holds no bin: its log is always LOG_FLOOR (as in AST).
    to_mel = lambda f: 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)  # noqa: E731
    delta = (to_mel(8000.0) - to_mel(20.0)) / (n_mels + 1)
    left = to_mel(20.0) + delta * torch.arange(n_mels, dtype=torch.float64)  # (F,) left corners
    bins = to_mel(torch.arange(256, dtype=torch.float64) * 16000 / 512)[:, None]  # (256, 1) the bins below Nyquist
    banks = F.pad(_triangles(bins, left, left + delta, left + 2 * delta), (0, 0, 0, 1))  # (257, F): Nyquist row 0
    mel = _power_mel(frames, hann if window == "hanning" else hann.pow(0.85), n_fft, banks)
    fbank = torch.log(mel.clamp_min(FLT_EPSILON))  # (b, T, F)
    n_frames = 1 + (lengths - L) // S  # (b,)
    real = torch.arange(fbank.shape[1])[None, :] < n_frames[:, None]  # (b, T)
    return fbank.masked_fill(~real[..., None].to(fbank.device), 0.0), n_frames


def ast_features(wave, sample_rate: int = SAMPLE_RATE, *, target_frames: int = 1024, n_mels: int = 128,
                 window: str = "hanning", lengths=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """AST's input: kaldi_fbank zero-padded / trimmed to target_frames (1024 = 10.24 s), (x - AST_MEAN) / (2 AST_STD)
    -> (x (b, target_frames, F), mask). As AST's extractor, it pads before normalising (0.467); mask: real frames."""
    if target_frames < 1:
        raise ValueError(f"target_frames must be >= 1, got {target_frames}")
    fbank, n_frames = kaldi_fbank(wave, sample_rate, n_mels=n_mels, window=window, lengths=lengths)
    fbank = F.pad(fbank, (0, 0, 0, max(target_frames - fbank.shape[1], 0)))[:, :target_frames]  # (b, target, F)
    mask = torch.arange(target_frames)[None, :] < n_frames.clamp(max=target_frames)[:, None]
    return (fbank - AST_MEAN) / (2 * AST_STD), mask.to(fbank.device)


def whisper_log_mel(wave, sample_rate: int = SAMPLE_RATE, *, n_mels: int = 80, n_frames: int = 3000,
                    lengths=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whisper's log-mel, batched -> (mel (b, F, n_frames), mask): pad / trim to n_frames * 160 samples (3000 = 30 s);
    centred STFT (reflect pad 200, 400 / 160, periodic Hann, last frame dropped); Slaney mel; log10(max(e, 1e-10)),
    clamp at the clip's max - 8, (x + 4) / 4. Frame j is real when j * 160 < length (transformers' attention_mask)."""
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2 (the centred STFT needs 320 samples), got {n_frames}")
    n_fft, hop, n_samples = 400, 160, n_frames * 160
    wave, lengths = _check_waveform(wave, sample_rate, n_fft, lengths)
    wave = F.pad(wave, (0, max(n_samples - wave.shape[1], 0)))[:, :n_samples]
    padded = F.pad(wave[:, None], (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]  # (b, n_samples + n_fft)
    frames = padded.unfold(-1, n_fft, hop)[:, :-1]  # (b, n_frames, n_fft)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(n_fft, dtype=torch.float64) / n_fft)  # periodic
    # librosa's Slaney mel filters, float64 over 0 .. 8 kHz: mel linear below 1 kHz (3 f / 200), logarithmic above
    mels = torch.linspace(0.0, 15 + math.log(8.0) * 27 / math.log(6.4), n_mels + 2, dtype=torch.float64)  # (F + 2,)
    hz = torch.where(mels < 15, mels * 200 / 3, 1000 * torch.exp((mels - 15) * math.log(6.4) / 27))  # corners
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None] * 16000 / n_fft  # (201, 1) FFT bins
    left, centre, right = hz[:-2], hz[1:-1], hz[2:]  # (F,)
    banks = _triangles(freqs, left, centre, right) * (2.0 / (right - left))  # (201, F), triangles of unit area
    log_mel = _power_mel(frames, hann, n_fft, banks).clamp_min(1e-10).log10()  # (b, n_frames, F)
    log_mel = torch.maximum(log_mel, log_mel.amax(dim=(1, 2), keepdim=True) - 8.0)
    mask = torch.arange(n_frames)[None, :] < ((lengths + hop - 1) // hop).clamp(max=n_frames)[:, None]
    return ((log_mel + 4.0) / 4.0).transpose(1, 2), mask.to(log_mel.device)  # (b, F, n_frames)


# --- Attention and the pre-norm block (shared by both encoders) -----------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              impl: str = "sdpa") -> torch.Tensor:
    """(b, h, m, dh) each -> (b, h, m, dh); mask (b, m) True = real key. "reference": softmax(Q K^T / sqrt(dh)) V."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (b, h, m, m)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
    return weights @ v  # (b, h, m, dh)


class SelfAttention(nn.Module):
    """q, k, v, proj around `attention`. Whisper's key projection has no bias (k_bias=False)."""

    def __init__(self, d: int, n_heads: int, qkv_bias: bool = True, k_bias: bool = True, impl: str = "sdpa"):
        super().__init__()
        self.n_heads, self.impl = n_heads, impl
        self.q = nn.Linear(d, d, bias=qkv_bias)
        self.k = nn.Linear(d, d, bias=qkv_bias and k_bias)
        self.v = nn.Linear(d, d, bias=qkv_bias)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, m, d = x.shape
        q, k, v = (lin(x).view(b, m, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))  # (b, h, m, dh) each
        y = attention(q, k, v, mask, self.impl)  # (b, h, m, dh)
        return self.proj(y.transpose(1, 2).reshape(b, m, d))  # (b, m, d)


@dataclass
class AdapterConfig:
    """The soft_moa mixtures in both encoders' blocks: placement none | pfeiffer (beside attn) | houlsby (both);
    adapter_kind single | dense | soft; r bottleneck (0 -> d // 128: the paper's 6 at d = 768)."""
    placement: str = "none"
    adapter_kind: str = "soft"
    r: int = 0
    n_experts: int = 7
    slots_per_expert: int = 1
    router_normalize: bool = False

    def _check(self, sizes: Tuple[str, ...]) -> None:  # the choices, r's default, sizes >= 1, heads divide d
        for name, allowed in (("placement", PLACEMENTS), ("adapter_kind", KINDS), ("attn_impl", ATTN_IMPLS)):
            _check_choice(name, getattr(self, name), allowed)
        self.r = self.r or max(1, self.d // 128)
        for name in sizes + ("n_heads", "d", "r", "n_experts", "slots_per_expert"):
            value, low = getattr(self, name), 0 if name == "n_classes" else 1  # n_classes 0: no head
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{type(self).__name__}.{name} must be an integer >= {low}, got {value!r}")
        if self.d % self.n_heads:
            raise ValueError(f"d = {self.d} must be divisible by n_heads = {self.n_heads}")


class Block(nn.Module):
    """Pre-norm block via soft_moa.adapted_sublayer: x + attn(norm1(x)) [+ mixture], x + mlp(norm2(x)) [+ mixture]."""

    def __init__(self, cfg: "ASTConfig | WhisperEncoderConfig", qkv_bias: bool = True, k_bias: bool = True):
        super().__init__()
        d = cfg.d
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = SelfAttention(d, cfg.n_heads, qkv_bias, k_bias, cfg.attn_impl)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(d, cfg.d_ff), act=nn.GELU(), fc2=nn.Linear(cfg.d_ff, d)))
        self.adapters = make_block_adapters(cfg.placement, cfg.adapter_kind, d=d, r=cfg.r,
                                            n_experts=cfg.n_experts, slots_per_expert=cfg.slots_per_expert,
                                            normalize=cfg.router_normalize)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, Info]]:
        info = {}
        for key, norm, sub in (("attn", self.norm1, lambda h: self.attn(h, mask)), ("ffn", self.norm2, self.mlp)):
            mixture = self.adapters[key] if key in self.adapters else None
            x, info[key] = adapted_sublayer(x, norm, sub, mixture, mask)  # (b, m, d)
        return x, {k: v for k, v in info.items() if k in self.adapters}


def _encode(blocks: nn.ModuleList, norm: nn.LayerNorm, h: torch.Tensor, mask: Optional[torch.Tensor]):
    """The blocks and the final norm, padded tokens zeroed: (b, m, d) -> (h, mask (b, m), infos per block)."""
    infos = []
    for blk in blocks:
        h, info = blk(h, mask)
        infos.append(info)
    h = norm(h)  # (b, m, d)
    if mask is None:
        return h, torch.ones(h.shape[:2], dtype=torch.bool, device=h.device), infos
    return h.masked_fill(~mask[..., None], 0.0), mask, infos


def _check_input(what: str, x: torch.Tensor, mask, n_mels: int, f_dim: int, t_min: int, t_max: int, why: str):
    """Shapes and dtypes only (no host sync): float log-mel (b, T, F) if f_dim 2 else (b, F, T), bool mask (b, T)."""
    layout = "(b, T, F)" if f_dim == 2 else "(b, F, T)"
    if not x.is_floating_point() or x.dim() != 3 or x.shape[f_dim] != n_mels:
        hint = " (transposed? use x.transpose(1, 2))" if x.dim() == 3 and x.shape[3 - f_dim] == n_mels else ""
        raise ValueError(f"{what} expects a float log-mel {layout}, F = {n_mels}; got {x.dtype} {tuple(x.shape)}{hint}")
    b, T = x.shape[0], x.shape[3 - f_dim]
    if not t_min <= T <= t_max:
        raise ValueError(f"{what} input has {T} frames; expected {t_min} .. {t_max} {why}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, T)):
        raise ValueError(f"mask must be a bool tensor of shape (b, T) = {(b, T)}, True = real frame; got "
                         f"{mask.dtype} {tuple(mask.shape)}")


# --- AST ------------------------------------------------------------------------------------------
@dataclass
class ASTConfig(AdapterConfig):
    """AST sizes (defaults: `tiny()`); max_length: frames of the positional grid. n_classes > 0 adds `head` ([norm],
    Linear) on head_pool: "mean" of all tokens (the Soft-MoA paper's), "cls_dist", mean of [CLS] and dist (AST's), or
    "rows": each frequency row of patch tokens averaged over time, the rows concatenated (Fp d wide, `pooled_rows`)."""
    d: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    num_mel_bins: int = 128
    max_length: int = 512
    patch: int = 16
    freq_stride: int = 10
    time_stride: int = 10
    norm_eps: float = 1e-12  # transformers' layer_norm_eps
    qkv_bias: bool = True
    n_classes: int = 0
    head_pool: str = "mean"
    head_norm: bool = False
    attn_impl: str = "sdpa"

    def __post_init__(self):
        self._check(("n_layers", "d_ff", "num_mel_bins", "max_length", "patch", "freq_stride", "time_stride",
                     "n_classes"))
        if min(self.num_mel_bins, self.max_length) < self.patch:
            raise ValueError(f"num_mel_bins = {self.num_mel_bins} and max_length = {self.max_length} must be >= patch")
        _check_choice("head_pool", self.head_pool, HEAD_POOLS)

    @property
    def grid(self) -> Tuple[int, int]:  # (Fp, Tp) patch grid of a max_length-frame input
        return ((self.num_mel_bins - self.patch) // self.freq_stride + 1,
                (self.max_length - self.patch) // self.time_stride + 1)

    @property
    def n_tokens(self) -> int:  # m = 2 + Fp * Tp
        return 2 + self.grid[0] * self.grid[1]

    @classmethod
    def tiny(cls, **overrides) -> "ASTConfig":  # d 64, 4 layers, 5.12 s (12 x 50 patches): trains on a CPU
        return cls(**overrides)

    @classmethod
    def base(cls, **overrides) -> "ASTConfig":  # AST-Base (MIT/ast-finetuned-audioset-10-10-0.4593), 10.24 s
        return cls(**{**dict(d=768, n_layers=12, n_heads=12, d_ff=3072, max_length=1024), **overrides})


class ASTOutput(NamedTuple):
    tokens: torch.Tensor  # (b, m, d) after the final norm; zero at padded tokens
    mask: torch.Tensor  # (b, m) bool, True = real token ([CLS] and distillation tokens always)
    pooled_cls: torch.Tensor  # (b, d) mean of the [CLS] and distillation outputs (transformers' pooler_output)
    pooled_mean: torch.Tensor  # (b, d) mean of all real output tokens, special ones included (Soft-MoA's head)
    logits: Optional[torch.Tensor]  # (b, n_classes) when the config has a head
    adapter_info: List[Dict[str, Info]]  # per block: {"attn"/"ffn": the mixture's info}


class AST(nn.Module):
    """Audio Spectrogram Transformer (Gong et al. 2021, Sec. 2.1, Fig. 1): x (b, T, F) -> ASTOutput. 16x16 patches of
    the (F, T) image, frequency-major (token 2 + f * Tp + t); [CLS], distillation token; learned positions; pre-norm
    blocks; final norm. mask (b, T): patches reaching into padding are ignored and zeroed, as each item alone."""

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        self.patch_embed = nn.Conv2d(1, d, cfg.patch, stride=(cfg.freq_stride, cfg.time_stride))
        self.cls_token, self.dist_token = nn.Parameter(torch.zeros(1, 1, d)), nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens, d))  # (1, 2 + Fp*Tp, d)
        for prm in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(prm, std=0.02)  # DeiT's init; checkpoints overwrite it
        self.blocks = nn.ModuleList(Block(cfg, cfg.qkv_bias) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        if cfg.n_classes:
            w = d * cfg.grid[0] if cfg.head_pool == "rows" else d
            self.head = nn.Sequential(OrderedDict(norm=nn.LayerNorm(w, eps=cfg.norm_eps) if cfg.head_norm
                                                  else nn.Identity(), fc=nn.Linear(w, cfg.n_classes)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> ASTOutput:
        cfg = self.cfg
        _check_input("AST", x, mask, cfg.num_mel_bins, 2, cfg.patch, cfg.patch + cfg.grid[1] * cfg.time_stride - 1,
                     f"(one patch .. the positional grid of max_length = {cfg.max_length}; hf.load_ast resizes it)")
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)  # padded frames may hold anything
        patches = self.patch_embed(x.transpose(1, 2)[:, None])  # (b, 1, F, T) -> (b, d, Fp, Tp)
        b, _, fp, tp = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)  # (b, Fp*Tp, d), frequency-major
        grid = self.pos_embed[:, 2:].reshape(1, fp, cfg.grid[1], cfg.d)[:, :, :tp].reshape(1, fp * tp, cfg.d)
        special = torch.cat([self.cls_token, self.dist_token], dim=1) + self.pos_embed[:, :2]  # (1, 2, d)
        h = torch.cat([special.expand(b, -1, -1), tokens + grid], dim=1)  # (b, m, d), m = 2 + Fp*Tp
        tmask = None  # (b, m): the two special tokens, then the patches whose time column lies inside the clip
        if mask is not None:
            real_t = torch.arange(tp, device=x.device) < ((mask.sum(1) - cfg.patch) // cfg.time_stride + 1)[:, None]
            tmask = torch.cat([real_t.new_ones(b, 2), real_t.repeat(1, fp)], dim=1)  # real_t (b, Tp) per row f
        h, real, infos = _encode(self.blocks, self.norm, h, tmask)  # (b, m, d)
        pooled_mean = h.mean(1) if tmask is None else h.sum(1) / real.sum(1, keepdim=True).to(h.dtype)  # (b, d)
        pooled_cls = (h[:, 0] + h[:, 1]) / 2  # (b, d)
        logits = None
        if cfg.n_classes:                                 # rows: computed only for a head that reads them
            pool = cfg.head_pool
            pooled = pooled_mean if pool == "mean" else pooled_cls if pool == "cls_dist" else pooled_rows(h, real, fp)
            logits = self.head(pooled)
        return ASTOutput(h, real, pooled_cls, pooled_mean, logits, infos)


def pooled_rows(h: torch.Tensor, real: torch.Tensor, fp: int) -> torch.Tensor:
    """(b, m, d) tokens, (b, m) real -> (b, Fp d): each frequency row's patch tokens averaged over its real time
    columns, the Fp rows concatenated. Deviation: at d = 64 the mean of all tokens loses where in frequency a
    pattern sits, and a head on it falls below a probe on the mean log-mel (README, Result 2)."""
    b, m, d = h.shape
    w = real[:, 2:].reshape(b, fp, -1, 1).to(h.dtype)                        # (b, Fp, Tp, 1)
    rows = (h[:, 2:].reshape(b, fp, -1, d) * w).sum(2) / w.sum(2).clamp_min(1)  # (b, Fp, d)
    return rows.reshape(b, fp * d)


def resize_pos_embed(pos: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int],
                     method: str = "ast") -> torch.Tensor:
    """AST positional embeddings (1, 2 + Fs*Ts, d) -> (1, 2 + Fd*Td, d); the special tokens keep theirs. "ast":
    the AST authors' rule (ast_models.py), per axis: a shrinking axis is cut from the middle, [s//2 - t//2,
    s//2 - t//2 + t), a growing one interpolated; "bilinear": both axes interpolated (bilinear, align_corners=False)."""
    _check_choice("positional-embedding resize method", method, POS_RESIZE)
    (fs, ts), (fd, td), d = src_grid, dst_grid, pos.shape[-1]
    img = pos[:, 2:].reshape(1, fs, ts, d).permute(0, 3, 1, 2)  # (1, d, Fs, Ts)
    if method == "bilinear":
        img = F.interpolate(img, size=(fd, td), mode="bilinear", align_corners=False)
    else:
        for axis, (s, t) in ((3, (ts, td)), (2, (fs, fd))):  # time first, as the authors' code
            if t <= s:
                img = img.narrow(axis, s // 2 - t // 2, t)
            else:
                size = (img.shape[2], t) if axis == 3 else (t, img.shape[3])
                img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    return torch.cat([pos[:, :2], img.permute(0, 2, 3, 1).reshape(1, fd * td, d)], dim=1)


# --- Whisper encoder ------------------------------------------------------------------------------
WHISPER_SIZES = {"tiny": (384, 4, 6, 80), "base": (512, 6, 8, 80), "small": (768, 12, 12, 80),
                 "medium": (1024, 24, 16, 80), "large-v2": (1280, 32, 20, 80), "large-v3": (1280, 32, 20, 128)}


@dataclass
class WhisperEncoderConfig(AdapterConfig):
    """Whisper encoder sizes. Defaults: the scaled-down `tiny()` (CPU-trainable, NOT Whisper-tiny); `whisper(size)`:
    openai/whisper's encoders, WHISPER_SIZES = (d, n_layers, n_heads, n_mels), d_ff = 4 d, 1500 positions."""
    n_mels: int = 80
    d: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_positions: int = 1500  # encoder frames: 30 s at 20 ms
    norm_eps: float = 1e-5
    attn_impl: str = "sdpa"

    def __post_init__(self):
        self._check(("n_mels", "n_layers", "d_ff", "max_positions"))
        if self.d % 2:
            raise ValueError(f"d = {self.d} must be even (sin and cos positions)")

    @classmethod
    def tiny(cls, **overrides) -> "WhisperEncoderConfig":  # d 64, 2 layers, 4 heads, 80 mels: trains on a CPU
        return cls(**overrides)

    @classmethod
    def whisper(cls, size: str, **overrides) -> "WhisperEncoderConfig":  # a released encoder's sizes
        _check_choice("Whisper size", size, tuple(WHISPER_SIZES))
        d, n_layers, n_heads, n_mels = WHISPER_SIZES[size]
        return cls(**{**dict(d=d, n_layers=n_layers, n_heads=n_heads, n_mels=n_mels, d_ff=4 * d), **overrides})


class WhisperOutput(NamedTuple):
    features: torch.Tensor  # (b, T', d) after the final LayerNorm; zero at padded frames
    mask: torch.Tensor  # (b, T') bool, True = real encoder frame
    adapter_info: List[Dict[str, Info]]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's positions (length, channels): [sin(t w_i), cos(t w_i)], w_i = max_timescale^(-i / (c/2 - 1))."""
    inv = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2))  # (c/2,)
    t = torch.arange(length)[:, None] * inv[None, :]  # (length, c/2)
    return torch.cat([t.sin(), t.cos()], dim=1)


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder (Radford et al. 2022, Sec. 2.2): mel (b, F, T) -> WhisperOutput. Two GELU(Conv1d k3),
    the second of stride 2; + sinusoidal positions; pre-norm blocks; final norm. mask (b, T): padding is zeroed and
    ignored. Deviation: Whisper runs on 3000 frames, attending to padding; here 1 .. 2 max_positions and a mask."""

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos_embed", sinusoids(cfg.max_positions, d))  # (max_positions, d)
        self.blocks = nn.ModuleList(Block(cfg, k_bias=False) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)

    def forward(self, mel: torch.Tensor, mask: Optional[torch.Tensor] = None) -> WhisperOutput:
        _check_input("Whisper", mel, mask, self.cfg.n_mels, 1, 1, 2 * self.cfg.max_positions, "(2 x max_positions)")
        pad = (lambda t: t) if mask is None else (lambda t: t.masked_fill(~mask[:, None, :], 0.0))  # (b, *, T)
        h = F.gelu(self.conv1(pad(mel)))  # (b, d, T); both convolutions see zeros past the end, as alone
        h = F.gelu(self.conv2(pad(h))).transpose(1, 2)  # (b, T', d)
        h = h + self.pos_embed[: h.shape[1]].to(h.dtype)
        fmask = None  # (b, T'): (T - 1) // 2 + 1 real encoder frames per clip
        if mask is not None:
            fmask = torch.arange(h.shape[1], device=h.device) < ((mask.sum(1) - 1) // 2 + 1)[:, None]
        return WhisperOutput(*_encode(self.blocks, self.norm, h, fmask))
