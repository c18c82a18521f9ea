"""
Audio front-ends and the two pretrained audio encoders the papers start from, exact enough to load
real checkpoints: the Audio Spectrogram Transformer (Soft-MoA's backbone) and Whisper's encoder
(MoE-Adapter's).

    Gong, Chung, Glass, "AST: Audio Spectrogram Transformer", Interspeech 2021, arXiv 2104.01778.
    Radford, Kim, Xu, Brockman, McLeavey, Sutskever, "Robust Speech Recognition via Large-Scale
    Weak Supervision" (Whisper), ICML 2023, arXiv 2212.04356.

Front-ends (raw 16 kHz mono waveform -> features), written from the signal-processing definitions:
    kaldi_fbank      Kaldi-compatible log-mel filterbank (what AST computes with torchaudio's
                     compliance.kaldi.fbank), ast_features adds AST's padding and normalisation
    whisper_log_mel  Whisper's log-mel spectrogram, padded or trimmed to a fixed frame count
Encoders (features -> token / frame features), pre-norm transformer blocks that accept the
soft_moa mixtures (single / Dense-MoA / Soft-MoA adapters, Pfeiffer / Houlsby placement):
    AST              16x16 patches, [CLS] + distillation tokens, learned positions, pooled outputs
    WhisperEncoder   two 1-D convolutions (the second stride 2), sinusoidal positions
Loaders map Hugging Face `transformers` state dicts (`ASTModel`, `ASTForAudioClassification`,
`WhisperModel`, `WhisperForConditionalGeneration`, both the transformers<5 names the Hub files use and
the transformers>=5 names) onto these modules, infer the config from tensor shapes, and report
every tensor that is missing, unexpected or of the wrong shape by name: `load_ast`,
`load_whisper_encoder`, `check_checkpoint`.

Notation (shape comments use these symbols):
    b  batch size                  N  samples per clip (16 kHz)
    T  spectrogram frames (10 ms)  F  mel bins (n_mels)
    Fp, Tp  AST patch grid: frequency x time patches, Fp = (F - 16) // fs + 1, Tp = (T - 16) // ts + 1
    m  tokens per sequence (AST: 2 + Fp * Tp; Whisper: T')
    T' Whisper encoder frames, (T - 1) // 2 + 1 (20 ms each)
    d  model width     h  attention heads     dh = d / h     d_ff  MLP hidden width
Masks are bool, True = real (frame / token), and must be prefix-shaped (real first, then padding).

Imports torch, the standard library and soft_moa.py only; safetensors is imported lazily when a
.safetensors file is read.
"""

import difflib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from soft_moa import KINDS, MODES, PLACEMENTS, SUBLAYERS, adapted_sublayer, make_block_adapters

SAMPLE_RATE = 16000
FLT_EPSILON = 1.1920928955078125e-07  # float32 machine epsilon: Kaldi's log floor ("epsilon")
LOG_FLOOR = math.log(FLT_EPSILON)  # -15.942385..., the log-mel value of silence and of empty filters
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AST's AudioSet statistics of the log-mel fbank
WINDOWS = ("hanning", "povey")
ATTN_IMPLS = ("sdpa", "reference")
HEAD_POOLS = ("mean", "cls_dist")
POS_RESIZE = ("ast", "bilinear")

# Heads cannot be read from weight shapes (q, k, v are d x d for any h). These are the published
# sizes, used when neither an override nor a config.json beside the checkpoint gives the count.
AST_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16}  # DeiT tiny / small / base, ViT-large
WHISPER_HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}  # tiny .. large

Info = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Input checks shared by the front-ends

def _check_waveform(wave, sample_rate: int, min_samples: int, lengths) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (wave (b, N) float, zero past each clip's length; lengths (b,) long). ValueError naming any problem."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"sample_rate is {sample_rate} Hz; expected {SAMPLE_RATE} Hz (resample the audio "
                         f"first, e.g. torchaudio.functional.resample(wave, {sample_rate}, {SAMPLE_RATE}))")
    wave = torch.as_tensor(wave)
    if not wave.is_floating_point():
        raise ValueError(f"audio must hold float samples in [-1, 1], got dtype {wave.dtype} "
                         f"(int16 PCM: divide by 32768)")
    if wave.dim() == 0 or wave.dim() > 2:
        raise ValueError(f"audio must be mono, shape (N,) or a batch (b, N); got shape {tuple(wave.shape)}"
                         + (" (multi-channel? average the channels first)" if wave.dim() == 3 else ""))
    if wave.dim() == 2 and wave.shape[1] <= 8 < wave.shape[0]:
        raise ValueError(f"audio of shape {tuple(wave.shape)} looks like {wave.shape[1]}-channel audio in "
                         f"(N, channels) layout; expected mono (N,) or a batch (b, N): use wave.mean(-1)")
    wave = wave[None] if wave.dim() == 1 else wave  # (b, N)
    n = wave.shape[1]
    if n == 0 or wave.shape[0] == 0:
        raise ValueError(f"empty audio (shape {tuple(wave.shape)}); expected at least {min_samples} samples")
    if lengths is None:
        lengths = torch.full((wave.shape[0],), n, dtype=torch.long)
    else:
        lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
        if lengths.shape != (wave.shape[0],):
            raise ValueError(f"lengths must have shape (b,) = ({wave.shape[0]},), got {tuple(lengths.shape)}")
        if (lengths > n).any():
            raise ValueError(f"lengths {lengths.tolist()} exceed the {n} samples of the batch")
    if (lengths < min_samples).any():
        short = lengths.min().item()
        raise ValueError(f"audio too short: {short} samples; expected at least {min_samples} samples "
                         f"({1000 * min_samples / SAMPLE_RATE:g} ms, one analysis window)")
    real = torch.arange(n)[None, :] < lengths[:, None]  # (b, N)
    bad = ~torch.isfinite(wave) & real.to(wave.device)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"audio holds {int(bad.sum())} NaN/inf sample(s) (first at index {tuple(idx)}); "
                         f"expected finite samples")
    wave = wave.masked_fill(~real.to(wave.device), 0.0)  # padding beyond a clip's length reads as silence
    return wave, lengths


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Features in at least float32; float64 input stays float64 (exact comparisons in the tests).
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Kaldi fbank, as AST uses it

def kaldi_mel_banks(n_mels: int = 128, n_fft: int = 512, sample_rate: int = SAMPLE_RATE,
                    low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filters, (n_fft // 2 + 1, n_mels) float64.

    Kaldi's mel scale mel(f) = 1127 ln(1 + f / 700). Filter k (0-based) has corners equally spaced
    in mel between mel(low_freq) and mel(high_freq) (high_freq <= 0 means Nyquist + high_freq):
    left = mel_lo + k delta, centre = left + delta, right = left + 2 delta, delta = (mel_hi - mel_lo)
    / (n_mels + 1). The triangle is drawn in mel space over the FFT bin frequencies i * sr / n_fft,
    i < n_fft / 2; the Nyquist bin gets weight 0, as in Kaldi. No area normalisation.
    At 16 kHz, n_fft 512 and 128 filters, the lowest filters are narrower than the 31.25 Hz bin
    spacing and filter 3 (centre 77.8 Hz) contains no FFT bin at all: its energy is 0 and its log
    is the floor log(FLT_EPSILON) for every input (Kaldi itself refuses such a bank; torchaudio
    and transformers accept it, and AST's checkpoints were trained with it).
    """
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"mel band [{low_freq}, {high}] Hz must satisfy 0 <= low < high <= {nyquist} Hz")
    mel = lambda f: 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)  # noqa: E731
    mel_lo, mel_hi = mel(low_freq), mel(high)
    delta = (mel_hi - mel_lo) / (n_mels + 1)
    left = mel_lo + delta * torch.arange(n_mels, dtype=torch.float64)  # (F,)
    centre, right = left + delta, left + 2 * delta
    bins = mel(torch.arange(n_fft // 2, dtype=torch.float64) * sample_rate / n_fft)[:, None]  # (n_fft/2, 1)
    up = (bins - left) / (centre - left)  # (n_fft/2, F)
    down = (right - bins) / (right - centre)
    weights = torch.minimum(up, down).clamp_min(0.0)  # zero outside (left, right)
    return F.pad(weights, (0, 0, 0, 1))  # (n_fft/2 + 1, F): Nyquist row 0


def _frame_window(kind: str, length: int) -> torch.Tensor:
    # Kaldi's windows are symmetric (denominator length - 1).
    n = torch.arange(length, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))
    return hann if kind == "hanning" else hann.pow(0.85)  # povey = hann^0.85


def kaldi_fbank(wave, sample_rate: int = SAMPLE_RATE, *, n_mels: int = 128, window: str = "hanning",
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97,
                remove_dc: bool = True, low_freq: float = 20.0, high_freq: float = 0.0,
                lengths=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kaldi-compatible log-mel filterbank, batched, on the waveform's device.

    wave: (N,) or (b, N) float samples (AST feeds [-1, 1] floats; no int16 scaling); lengths: (b,)
    real samples per clip for a zero-padded batch. Returns (fbank (b, T, F), frames (b,) long).

    Per frame, as Kaldi's ComputeFeatures with dither 0, snip_edges true and use_energy false:
      1. framing: L = 400 samples (25 ms) every S = 160 (10 ms); a clip of n >= L samples has
         T = 1 + (n - L) // S frames, the last partial window is dropped (snip_edges);
      2. DC removal: subtract the frame's mean;
      3. pre-emphasis: x[i] -= 0.97 x[i-1] for i >= 1, x[0] -= 0.97 x[0];
      4. window: AST uses "hanning" (0.5 - 0.5 cos(2 pi n / (L - 1)), torchaudio's window_type=
         'hanning'); "povey" = hanning^0.85 is Kaldi's default. Deviation (from the issue text, which
         says Povey): AST's code and transformers' ASTFeatureExtractor use hanning; the tests show
         hanning matches transformers and povey does not;
      5. power spectrum |rfft(x, 512)|^2 (zero-padded to the next power of two, 257 bins);
      6. mel energies with kaldi_mel_banks (F filters, 20 Hz .. Nyquist);
      7. log(max(energy, FLT_EPSILON)) (the floor log eps = -15.942385 is also what silence gives).
    Frames past a clip's own T are 0 (the value AST's extractor pads with).
    """
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; expected one of {WINDOWS}")
    L = int(round(sample_rate * frame_length_ms / 1000))
    S = int(round(sample_rate * frame_shift_ms / 1000))
    wave, lengths = _check_waveform(wave, sample_rate, L, lengths)
    dt = _compute_dtype(wave.dtype)
    n_fft = 1 << (L - 1).bit_length()  # 400 -> 512 (Kaldi's round_to_power_of_two)
    frames = wave.to(dt).unfold(-1, L, S)  # (b, T, L)
    if remove_dc:
        frames = frames - frames.mean(-1, keepdim=True)
    if preemphasis:
        frames = torch.cat([frames[..., :1] * (1 - preemphasis),
                            frames[..., 1:] - preemphasis * frames[..., :-1]], dim=-1)  # (b, T, L)
    frames = frames * _frame_window(window, L).to(frames)
    spec = torch.fft.rfft(frames, n=n_fft)  # (b, T, n_fft/2 + 1)
    power = spec.real.square() + spec.imag.square()
    banks = kaldi_mel_banks(n_mels, n_fft, sample_rate, low_freq, high_freq).to(power)  # (n_fft/2+1, F)
    fbank = torch.log((power @ banks).clamp_min(FLT_EPSILON))  # (b, T, F)
    n_frames = 1 + (lengths - L) // S  # (b,)
    real = torch.arange(fbank.shape[1])[None, :] < n_frames[:, None]  # (b, T)
    return fbank.masked_fill(~real[..., None].to(fbank.device), 0.0), n_frames


def ast_features(wave, sample_rate: int = SAMPLE_RATE, *, target_frames: int = 1024, n_mels: int = 128,
                 mean: float = AST_MEAN, std: float = AST_STD, window: str = "hanning",
                 lengths=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """AST's input: Kaldi fbank, zero-padded / trimmed to `target_frames`, then (x - mean) / (2 std).

    Returns (x (b, target_frames, F), mask (b, target_frames) bool, True = real frame).
    As in AST's code and transformers' ASTFeatureExtractor, padding is added before normalisation,
    so padded frames hold (0 - mean) / (2 std) = 0.467 (with the defaults), not 0; the mask says
    which frames are real (AST itself attends to the padding; pass the mask to ignore it).
    1024 frames = 10.24 s (AudioSet); Speech Commands uses 128, ESC-50 512.
    """
    if target_frames < 1:
        raise ValueError(f"target_frames must be >= 1, got {target_frames}")
    fbank, n_frames = kaldi_fbank(wave, sample_rate, n_mels=n_mels, window=window, lengths=lengths)
    T = fbank.shape[1]
    fbank = F.pad(fbank, (0, 0, 0, max(target_frames - T, 0)))[:, :target_frames]  # (b, target, F)
    mask = torch.arange(target_frames)[None, :] < n_frames.clamp(max=target_frames)[:, None]
    return (fbank - mean) / (2 * std), mask.to(fbank.device)


# ----------------------------------------------------------------------------------------------
# Whisper log-mel

def slaney_mel_banks(n_mels: int = 80, n_fft: int = 400, sample_rate: int = SAMPLE_RATE,
                     f_min: float = 0.0, f_max: float = 8000.0) -> torch.Tensor:
    """librosa's default (Slaney) mel filters as Whisper uses them, (n_fft // 2 + 1, n_mels) float64.

    Slaney mel scale: linear below 1 kHz (f / (200/3)), logarithmic above (15 + 27 ln(f / 1000) /
    ln 6.4). n_mels + 2 corner frequencies equally spaced in mel over [f_min, f_max]; triangles in
    Hz over the FFT bin frequencies i * sr / n_fft; each filter scaled by 2 / (right - left) so
    it has unit area ("slaney" normalisation).
    """
    def hz_to_mel(f):
        f = torch.as_tensor(f, dtype=torch.float64)
        return torch.where(f < 1000, f * 3 / 200, 15 + torch.log(f.clamp_min(1e-10) / 1000) * 27 / math.log(6.4))

    def mel_to_hz(mm):
        return torch.where(mm < 15, mm * 200 / 3, 1000 * torch.exp((mm - 15) * math.log(6.4) / 27))

    corners = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                       dtype=torch.float64))  # (F + 2,) Hz
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None] * sample_rate / n_fft  # (n_fft/2+1, 1)
    left, centre, right = corners[:-2], corners[1:-1], corners[2:]  # (F,)
    up = (freqs - left) / (centre - left)
    down = (right - freqs) / (right - centre)
    return torch.minimum(up, down).clamp_min(0.0) * (2.0 / (right - left))  # (n_fft/2+1, F)


def whisper_log_mel(wave, sample_rate: int = SAMPLE_RATE, *, n_mels: int = 80, n_frames: int = 3000,
                    lengths=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whisper's log-mel spectrogram, batched. Returns (mel (b, F, n_frames), mask (b, n_frames)).

      1. each clip is zero-padded (or trimmed) to n_frames * 160 samples (3000 frames = 30 s,
         what Whisper was trained on; smaller n_frames for shorter windows);
      2. STFT: reflect-pad 200 samples at both ends (centred frames), 400-sample frames every 160,
         periodic Hann window 0.5 - 0.5 cos(2 pi n / 400), |rfft|^2 over 201 bins; the last
         frame is dropped, leaving n_frames;
      3. mel energies with slaney_mel_banks (80 bins, or 128 for large-v3);
      4. log10(max(energy, 1e-10)); clamp each clip at (its own maximum - 8); (x + 4) / 4.
    mask: frame j is real when it starts inside the clip, j * 160 < length (ceil(length / 160)
    frames, capped at n_frames), as transformers' attention_mask. Silence gives -1.5 everywhere.
    """
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2 (the centred STFT needs 320 samples), got {n_frames}")
    n_fft, hop = 400, 160
    wave, lengths = _check_waveform(wave, sample_rate, n_fft, lengths)
    dt = _compute_dtype(wave.dtype)
    n_samples = n_frames * hop
    wave = F.pad(wave.to(dt), (0, max(n_samples - wave.shape[1], 0)))[:, :n_samples]  # (b, n_frames*hop)
    padded = F.pad(wave[:, None], (n_fft // 2, n_fft // 2), mode="reflect")[:, 0]  # (b, n_samples + n_fft)
    frames = padded.unfold(-1, n_fft, hop)[:, :-1]  # (b, n_frames, n_fft)
    n = torch.arange(n_fft, dtype=torch.float64)
    window = (0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)).to(frames)  # periodic Hann
    spec = torch.fft.rfft(frames * window)  # (b, n_frames, 201)
    power = spec.real.square() + spec.imag.square()
    mel = power @ slaney_mel_banks(n_mels, n_fft, sample_rate).to(power)  # (b, n_frames, F)
    log_mel = mel.clamp_min(1e-10).log10()
    log_mel = torch.maximum(log_mel, log_mel.amax(dim=(1, 2), keepdim=True) - 8.0)
    mask = torch.arange(n_frames)[None, :] < ((lengths + hop - 1) // hop).clamp(max=n_frames)[:, None]
    return ((log_mel + 4.0) / 4.0).transpose(1, 2), mask.to(log_mel.device)  # (b, F, n_frames)


# ----------------------------------------------------------------------------------------------
# Attention and the pre-norm block (shared by both encoders)

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              impl: str = "sdpa") -> torch.Tensor:
    """Multi-head attention, (b, h, m, dh) each -> (b, h, m, dh); mask (b, m) bool, True = real key.

    "sdpa": torch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
    "reference": the plain softmax(Q K^T / sqrt(dh)) V with padded keys at -inf, softmax in >= fp32;
    the tests check the fast path against it.
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (b, h, m, m)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores.to(_compute_dtype(scores.dtype)), dim=-1).to(v.dtype)
    return weights @ v  # (b, h, m, dh)


class SelfAttention(nn.Module):
    """q, k, v, proj linear maps around `attention`. Whisper's key projection has no bias."""

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


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d, d_ff)
        self.fc2 = nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as both checkpoints use


@dataclass
class AdapterConfig:
    """Where and which soft_moa mixtures the blocks carry (fields shared by both encoder configs).

    placement "none" (default): plain frozen blocks. "pfeiffer": one mixture per block beside the
    sub-layer `pfeiffer_at` ("attn", the paper's default, or "ffn"); "houlsby": beside both.
    adapter_kind: "single" | "dense" (Dense-MoA) | "soft" (Soft-MoA); r: bottleneck width (0 ->
    d // 128, at least 1: the paper's r = 6 at d = 768); n_experts N, slots_per_expert p;
    mode "parallel" (the paper) or "sequential" (see soft_moa.adapted_sublayer).
    """
    placement: str = "none"
    adapter_kind: str = "soft"
    r: int = 0
    n_experts: int = 7
    slots_per_expert: int = 1
    mode: str = "parallel"
    pfeiffer_at: str = "attn"
    router_normalize: bool = False

    def _check_adapters(self, d: int) -> None:
        for name, allowed in (("placement", PLACEMENTS), ("adapter_kind", KINDS), ("mode", MODES),
                              ("pfeiffer_at", SUBLAYERS)):
            _check_choice(name, getattr(self, name), allowed)
        if self.r == 0:
            self.r = max(1, d // 128)
        for name in ("r", "n_experts", "slots_per_expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Block(nn.Module):
    """Pre-norm transformer block with optional mixtures: x + attn(norm1(x)) [+ mixture], then
    x + mlp(norm2(x)) [+ mixture], wired by soft_moa.adapted_sublayer. Names follow soft_moa's
    conventions (`norm1`, `norm2`, `adapters`) so soft_moa.mark_trainable finds the feeding norms."""

    def __init__(self, d: int, n_heads: int, d_ff: int, eps: float, cfg: AdapterConfig,
                 qkv_bias: bool = True, k_bias: bool = True, impl: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = SelfAttention(d, n_heads, qkv_bias, k_bias, impl)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d, d_ff)
        self.adapters = make_block_adapters(cfg.placement, cfg.adapter_kind, d=d, r=cfg.r,
                                            n_experts=cfg.n_experts, slots_per_expert=cfg.slots_per_expert,
                                            normalize=cfg.router_normalize, pfeiffer_at=cfg.pfeiffer_at)
        self.mode = cfg.mode

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, Info]]:
        info = {}
        for key, norm, sub in (("attn", self.norm1, lambda h: self.attn(h, mask)), ("ffn", self.norm2, self.mlp)):
            mixture = self.adapters[key] if key in self.adapters else None
            x, info[key] = adapted_sublayer(x, norm, sub, mixture, mask, self.mode)  # (b, m, d)
        return x, {k: v for k, v in info.items() if k in self.adapters}


def _check_choice(name: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def _check_positive(obj, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be an integer >= 1, got {value!r}")


def _check_frame_mask(mask: Optional[torch.Tensor], b: int, T: int, min_len: int, what: str) -> Optional[torch.Tensor]:
    """-> lengths (b,) for a prefix-shaped bool (b, T) mask, or None."""
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != (b, T):
        got = f"{mask.dtype} {tuple(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape (b, T) = {(b, T)}, True = real frame; got {got}")
    lengths = mask.sum(1)  # (b,)
    if not torch.equal(mask, torch.arange(T, device=mask.device)[None, :] < lengths[:, None]):
        raise ValueError("mask must be prefix-shaped (real frames first, then padding) for every item")
    if (lengths < min_len).any():
        raise ValueError(f"each item needs at least {min_len} real frames for {what}; mask gives lengths "
                         f"{lengths.tolist()}")
    return lengths


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds {int((~torch.isfinite(x)).sum())} NaN/inf value(s); expected finite features")


# ----------------------------------------------------------------------------------------------
# AST

@dataclass
class ASTConfig(AdapterConfig):
    """AST sizes. Defaults: the scaled-down `tiny` encoder (CPU-trainable); `base()` is AST-Base.

    max_length: spectrogram frames the positional grid is laid out for (Tp = (max_length - 16)
    // time_stride + 1 time patches); shorter inputs use the first time columns of that grid.
    norm_eps: 1e-12 is transformers' ASTConfig.layer_norm_eps (the authors' timm blocks use 1e-6;
    the difference is far below float32 resolution for unit-scale activations).
    n_classes > 0 adds `head`: [LayerNorm if head_norm] -> Linear on the `head_pool` output:
    "mean" (mean of all output tokens: the Soft-MoA paper's head) or "cls_dist" (mean of the [CLS]
    and distillation outputs: AST's own head and transformers' pooler_output).
    """
    d: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    num_mel_bins: int = 128
    max_length: int = 512
    patch: int = 16
    freq_stride: int = 10
    time_stride: int = 10
    norm_eps: float = 1e-12
    qkv_bias: bool = True
    n_classes: int = 0
    head_pool: str = "mean"
    head_norm: bool = False
    attn_impl: str = "sdpa"

    def __post_init__(self):
        _check_positive(self, ("d", "n_layers", "n_heads", "d_ff", "num_mel_bins", "max_length", "patch",
                               "freq_stride", "time_stride"))
        if self.d % self.n_heads:
            raise ValueError(f"d = {self.d} must be divisible by n_heads = {self.n_heads}")
        if self.num_mel_bins < self.patch or self.max_length < self.patch:
            raise ValueError(f"num_mel_bins ({self.num_mel_bins}) and max_length ({self.max_length}) must be "
                             f">= patch = {self.patch}")
        if self.n_classes < 0:
            raise ValueError(f"n_classes must be >= 0 (0 = no head), got {self.n_classes}")
        _check_choice("head_pool", self.head_pool, HEAD_POOLS)
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        self._check_adapters(self.d)

    @property
    def grid(self) -> Tuple[int, int]:
        """(Fp, Tp) patch grid of a max_length-frame input."""
        return ((self.num_mel_bins - self.patch) // self.freq_stride + 1,
                (self.max_length - self.patch) // self.time_stride + 1)

    @property
    def n_tokens(self) -> int:
        fp, tp = self.grid
        return 2 + fp * tp

    @classmethod
    def tiny(cls, **overrides) -> "ASTConfig":
        """d 64, 4 layers, 4 heads, 5.12 s inputs (12 x 50 patches + 2 = 602 tokens): trains in minutes on a CPU."""
        return cls(**overrides)

    @classmethod
    def base(cls, **overrides) -> "ASTConfig":
        """AST-Base as in the paper and MIT/ast-finetuned-audioset-10-10-0.4593: d 768, 12 layers,
        12 heads, 128 mel bins, 1024 frames, patches 16x16 at stride 10/10 (12 x 101 + 2 = 1214 tokens)."""
        return cls(**{**dict(d=768, n_layers=12, n_heads=12, d_ff=3072, max_length=1024), **overrides})


class ASTOutput(NamedTuple):
    tokens: torch.Tensor  # (b, m, d) after the final norm; zero at padded tokens
    mask: torch.Tensor  # (b, m) bool, True = real token ([CLS] and distillation tokens always)
    pooled_cls: torch.Tensor  # (b, d) mean of the [CLS] and distillation outputs (transformers' pooler_output)
    pooled_mean: torch.Tensor  # (b, d) mean of all real output tokens, special ones included (Soft-MoA's head)
    logits: Optional[torch.Tensor]  # (b, n_classes) when the config has a head
    adapter_info: List[Dict[str, Info]]  # per block: {"attn"/"ffn": the mixture's info}


class ASTHead(nn.Module):
    def __init__(self, d: int, n_classes: int, eps: float, use_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps) if use_norm else nn.Identity()
        self.fc = nn.Linear(d, n_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))  # (b, n_classes)


class AST(nn.Module):
    """Audio Spectrogram Transformer (Gong et al. 2021, Sec. 2.1, Fig. 1).

    x (b, T, F) normalised fbank (time, mel), as `ast_features` returns -> ASTOutput.
      1. patches: Conv2d(1 -> d, 16x16, stride (fs, ts)) on the (F, T) image: Fp x Tp patches,
         flattened frequency-major (token 2 + f * Tp + t), as AST's and transformers' code;
      2. prepend [CLS] and distillation tokens (AST inherits DeiT's two tokens);
      3. add learned positions: the (Fp, Tp_grid) grid of `pos_embed`, first Tp time columns;
      4. pre-norm blocks (with the configured mixtures), final LayerNorm;
      5. pooled_cls = ([CLS] + distillation) / 2, pooled_mean = mean of all real tokens; `head`.
    mask (b, T) bool marks real frames of a padded batch: patches reaching into padding (t >=
    (len - 16) // ts + 1) are padded tokens, ignored as attention keys, by the mixtures and by
    pooled_mean, and zero in `tokens`; each item gets exactly what it gets alone.
    """

    def __init__(self, cfg: ASTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        self.patch_embed = nn.Conv2d(1, d, cfg.patch, stride=(cfg.freq_stride, cfg.time_stride))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens, d))  # (1, 2 + Fp*Tp, d)
        for prm in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(prm, std=0.02)  # DeiT's init; checkpoints overwrite it
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.d_ff, cfg.norm_eps, cfg, cfg.qkv_bias, True,
                                          cfg.attn_impl) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        if cfg.n_classes:
            self.head = ASTHead(d, cfg.n_classes, cfg.norm_eps, cfg.head_norm)

    def _check(self, x: torch.Tensor) -> None:
        cfg, F_ = self.cfg, self.cfg.num_mel_bins
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 3:
            got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"AST input must be a float spectrogram (b, T, F) with F = {F_} mel bins; got {got}")
        if x.shape[2] != F_:
            hint = " (that is (b, F, T), Whisper's layout: use x.transpose(1, 2))" if x.shape[1] == F_ else ""
            raise ValueError(f"AST input has {x.shape[2]} mel bins in its last dimension, expected F = {F_}{hint}")
        if x.shape[1] < cfg.patch:
            raise ValueError(f"AST input has {x.shape[1]} frames; expected at least one patch, {cfg.patch} frames")
        tp = (x.shape[1] - cfg.patch) // cfg.time_stride + 1
        if tp > cfg.grid[1]:
            raise ValueError(f"AST input has {x.shape[1]} frames ({tp} time patches); this model's positional grid "
                             f"holds {cfg.grid[1]} (max_length = {cfg.max_length} frames): trim the input or "
                             f"load the checkpoint with max_length={x.shape[1]} (positions are then resized)")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> ASTOutput:
        self._check(x)
        cfg = self.cfg
        b, T, _ = x.shape
        lengths = _check_frame_mask(mask, b, T, cfg.patch, "one AST patch")
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)  # padded frames may hold anything
        _check_finite(x, "AST input spectrogram")
        fp, tp_grid = cfg.grid
        patches = self.patch_embed(x.transpose(1, 2)[:, None])  # (b, 1, F, T) -> (b, d, Fp, Tp)
        tp = patches.shape[-1]
        tokens = patches.flatten(2).transpose(1, 2)  # (b, Fp*Tp, d), frequency-major
        grid = self.pos_embed[:, 2:].reshape(1, fp, tp_grid, cfg.d)[:, :, :tp].reshape(1, fp * tp, cfg.d)
        special = torch.cat([self.cls_token, self.dist_token], dim=1) + self.pos_embed[:, :2]  # (1, 2, d)
        h = torch.cat([special.expand(b, -1, -1), tokens + grid], dim=1)  # (b, m, d), m = 2 + Fp*Tp
        if lengths is None:
            tmask = None
        else:
            n_real = (lengths - cfg.patch) // cfg.time_stride + 1  # (b,) time patches inside each clip
            real_t = torch.arange(tp, device=x.device)[None, :] < n_real[:, None]  # (b, Tp)
            tmask = torch.cat([torch.ones(b, 2, dtype=torch.bool, device=x.device),
                               real_t[:, None, :].expand(b, fp, tp).reshape(b, fp * tp)], dim=1)  # (b, m)
        infos = []
        for blk in self.blocks:
            h, info = blk(h, tmask)
            infos.append(info)
        h = self.norm(h)  # (b, m, d)
        if tmask is None:
            tmask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            pooled_mean = h.mean(1)
        else:
            h = h.masked_fill(~tmask[..., None], 0.0)
            pooled_mean = h.sum(1) / tmask.sum(1, keepdim=True).to(h.dtype)  # (b, d)
        pooled_cls = (h[:, 0] + h[:, 1]) / 2  # (b, d)
        logits = None
        if cfg.n_classes:
            logits = self.head(pooled_mean if cfg.head_pool == "mean" else pooled_cls)
        return ASTOutput(h, tmask, pooled_cls, pooled_mean, logits, infos)


def resize_pos_embed(pos: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int],
                     method: str = "ast") -> torch.Tensor:
    """Resize AST positional embeddings (1, 2 + Fs*Ts, d) -> (1, 2 + Fd*Td, d).

    The two special tokens keep theirs. The patch part is a (d, Fs, Ts) image, resized per axis:
      "ast" (default): the AST authors' rule for reusing a checkpoint at another input size
         (ast_models.py): an axis that shrinks is cut from the middle, [s//2 - t//2, s//2 - t//2 + t);
         an axis that grows is bilinearly interpolated (align_corners=False). E.g. AudioSet's
         101 time columns -> 50 for 5 s clips keeps columns 25..74.
      "bilinear": bilinear interpolation (align_corners=False) on both axes, growing or shrinking.
    transformers has no resizing: its ASTModel builds the grid from config.max_length.
    """
    _check_choice("positional-embedding resize method", method, POS_RESIZE)
    (fs, ts), (fd, td) = src_grid, dst_grid
    d = pos.shape[-1]
    if pos.shape[1] != 2 + fs * ts:
        raise ValueError(f"pos has {pos.shape[1]} tokens, expected 2 + {fs} x {ts} = {2 + fs * ts}")
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


# ----------------------------------------------------------------------------------------------
# Whisper encoder

WHISPER_SIZES = {  # openai/whisper ModelDimensions of the encoders (d_ff = 4 d, 1500 positions)
    "tiny": dict(d=384, n_layers=4, n_heads=6, n_mels=80),
    "base": dict(d=512, n_layers=6, n_heads=8, n_mels=80),
    "small": dict(d=768, n_layers=12, n_heads=12, n_mels=80),
    "medium": dict(d=1024, n_layers=24, n_heads=16, n_mels=80),
    "large-v2": dict(d=1280, n_layers=32, n_heads=20, n_mels=80),
    "large-v3": dict(d=1280, n_layers=32, n_heads=20, n_mels=128),
}


@dataclass
class WhisperEncoderConfig(AdapterConfig):
    """Whisper encoder sizes. Defaults: the scaled-down `tiny()` (CPU-trainable, NOT Whisper-tiny);
    `whisper("tiny" | "base" | "small" | "medium" | "large-v2" | "large-v3")` gives the real ones."""
    n_mels: int = 80
    d: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_positions: int = 1500  # encoder frames: 30 s at 20 ms
    norm_eps: float = 1e-5
    attn_impl: str = "sdpa"

    def __post_init__(self):
        _check_positive(self, ("n_mels", "d", "n_layers", "n_heads", "d_ff", "max_positions"))
        if self.d % self.n_heads or self.d % 2:
            raise ValueError(f"d = {self.d} must be even and divisible by n_heads = {self.n_heads}")
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        self._check_adapters(self.d)

    @classmethod
    def tiny(cls, **overrides) -> "WhisperEncoderConfig":
        """d 64, 2 layers, 4 heads, 80 mel bins: a scaled-down encoder that trains in minutes on a CPU."""
        return cls(**overrides)

    @classmethod
    def whisper(cls, size: str, **overrides) -> "WhisperEncoderConfig":
        """A released Whisper encoder's sizes (WHISPER_SIZES)."""
        if size not in WHISPER_SIZES:
            raise ValueError(f"unknown Whisper size {size!r}; expected one of {tuple(WHISPER_SIZES)}")
        dims = WHISPER_SIZES[size]
        return cls(**{**dims, "d_ff": 4 * dims["d"], **overrides})


class WhisperOutput(NamedTuple):
    features: torch.Tensor  # (b, T', d) after the final LayerNorm; zero at padded frames
    mask: torch.Tensor  # (b, T') bool, True = real encoder frame
    adapter_info: List[Dict[str, Info]]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's positional table (length, channels): [sin(t w_i), cos(t w_i)], w_i = max_timescale^(-i / (c/2 - 1))."""
    inv = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2))  # (c/2,)
    t = torch.arange(length)[:, None] * inv[None, :]  # (length, c/2)
    return torch.cat([t.sin(), t.cos()], dim=1)


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder (Radford et al. 2022, Sec. 2.2, Fig. 1).

    mel (b, F, T) from `whisper_log_mel` -> WhisperOutput:
      GELU(Conv1d(F -> d, k 3, pad 1)), GELU(Conv1d(d -> d, k 3, stride 2, pad 1)): T' = (T-1)//2+1;
      + sinusoidal positions (a buffer, overwritten by the checkpoint's table); pre-norm blocks
      (key projection without bias); final LayerNorm.
    mask (b, T) bool marks real mel frames. Padded frames are zeroed before each convolution, so a
    real frame next to padding sees the zeros an item alone sees at its edge; encoder frame j is
    real when j < (len - 1) // 2 + 1. Padded frames are ignored as keys and by the mixtures.
    Deviation: Whisper (and transformers, which requires exactly 3000 frames) always runs on 30 s
    windows and attends to the silence padding; T < 2 * max_positions is accepted here (positions
    0..T'-1), and a mask makes attention skip padding. For transformers' numbers, feed 3000 frames
    and no mask.
    """

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos_embed", sinusoids(cfg.max_positions, d))  # (max_positions, d)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.d_ff, cfg.norm_eps, cfg, True, False, cfg.attn_impl)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)

    def _check(self, mel: torch.Tensor) -> None:
        n_mels, max_t = self.cfg.n_mels, 2 * self.cfg.max_positions
        if not torch.is_tensor(mel) or not mel.is_floating_point() or mel.dim() != 3:
            got = f"{mel.dtype} {tuple(mel.shape)}" if torch.is_tensor(mel) else type(mel).__name__
            raise ValueError(f"Whisper input must be a float log-mel (b, F, T) with F = {n_mels}; got {got}")
        if mel.shape[1] != n_mels:
            hint = " (that is (b, T, F): use mel.transpose(1, 2))" if mel.shape[2] == n_mels else ""
            raise ValueError(f"Whisper input has {mel.shape[1]} mel bins in dimension 1, expected F = {n_mels}{hint}")
        if not 1 <= mel.shape[2] <= max_t:
            raise ValueError(f"Whisper input has {mel.shape[2]} frames; expected 1 .. {max_t} "
                             f"(2 x max_positions = {self.cfg.max_positions})")

    def forward(self, mel: torch.Tensor, mask: Optional[torch.Tensor] = None) -> WhisperOutput:
        self._check(mel)
        b, _, T = mel.shape
        lengths = _check_frame_mask(mask, b, T, 1, "the Whisper encoder")
        if mask is not None:
            mel = mel.masked_fill(~mask[:, None, :], 0.0)
        _check_finite(mel, "Whisper input log-mel")
        h = F.gelu(self.conv1(mel))  # (b, d, T)
        if mask is not None:
            h = h.masked_fill(~mask[:, None, :], 0.0)  # conv2 must see zeros past the end, as alone
        h = F.gelu(self.conv2(h)).transpose(1, 2)  # (b, T', d)
        h = h + self.pos_embed[: h.shape[1]].to(h.dtype)
        fmask = None
        if lengths is not None:
            fmask = torch.arange(h.shape[1], device=h.device)[None, :] < ((lengths - 1) // 2 + 1)[:, None]  # (b, T')
        infos = []
        for blk in self.blocks:
            h, info = blk(h, fmask)
            infos.append(info)
        h = self.norm(h)
        if fmask is None:
            fmask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        else:
            h = h.masked_fill(~fmask[..., None], 0.0)
        return WhisperOutput(h, fmask, infos)


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints

def _name_rules(table: Mapping[str, str]) -> List[Tuple["re.Pattern", str, str]]:
    # "{i}" = layer index, "{p}" = weight | bias. -> [(regex over HF names, our template, HF template)]
    rules = []
    for hf, ours in table.items():
        pattern = re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        rules.append((re.compile(pattern), ours, hf))
    return rules


_AST_COMMON = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.{p}": "patch_embed.{p}",
    "layernorm.{p}": "norm.{p}",
    "classifier.layernorm.{p}": "head.norm.{p}",
    "classifier.dense.{p}": "head.fc.{p}",
}
_AST_FORMATS = {
    # What the Hub's AST files hold and transformers' save_pretrained still writes.
    "transformers<5 names (encoder.layer.N.attention.attention.query)": _name_rules({**_AST_COMMON, **{
        "encoder.layer.{i}.attention.attention.query.{p}": "blocks.{i}.attn.q.{p}",
        "encoder.layer.{i}.attention.attention.key.{p}": "blocks.{i}.attn.k.{p}",
        "encoder.layer.{i}.attention.attention.value.{p}": "blocks.{i}.attn.v.{p}",
        "encoder.layer.{i}.attention.output.dense.{p}": "blocks.{i}.attn.proj.{p}",
        "encoder.layer.{i}.intermediate.dense.{p}": "blocks.{i}.mlp.fc1.{p}",
        "encoder.layer.{i}.output.dense.{p}": "blocks.{i}.mlp.fc2.{p}",
        "encoder.layer.{i}.layernorm_before.{p}": "blocks.{i}.norm1.{p}",
        "encoder.layer.{i}.layernorm_after.{p}": "blocks.{i}.norm2.{p}"}}),
    # transformers >= 5 in memory (model.state_dict()).
    "transformers>=5 names (layers.N.attention.q_proj)": _name_rules({**_AST_COMMON, **{
        "layers.{i}.attention.q_proj.{p}": "blocks.{i}.attn.q.{p}",
        "layers.{i}.attention.k_proj.{p}": "blocks.{i}.attn.k.{p}",
        "layers.{i}.attention.v_proj.{p}": "blocks.{i}.attn.v.{p}",
        "layers.{i}.attention.o_proj.{p}": "blocks.{i}.attn.proj.{p}",
        "layers.{i}.mlp.fc1.{p}": "blocks.{i}.mlp.fc1.{p}",
        "layers.{i}.mlp.fc2.{p}": "blocks.{i}.mlp.fc2.{p}",
        "layers.{i}.layernorm_before.{p}": "blocks.{i}.norm1.{p}",
        "layers.{i}.layernorm_after.{p}": "blocks.{i}.norm2.{p}"}}),
}
_WHISPER_FORMATS = {
    "transformers Whisper names (layers.N.self_attn.q_proj)": _name_rules({
        "conv1.{p}": "conv1.{p}",
        "conv2.{p}": "conv2.{p}",
        "embed_positions.weight": "pos_embed",
        "layers.{i}.self_attn.q_proj.{p}": "blocks.{i}.attn.q.{p}",
        "layers.{i}.self_attn.k_proj.{p}": "blocks.{i}.attn.k.{p}",
        "layers.{i}.self_attn.v_proj.{p}": "blocks.{i}.attn.v.{p}",
        "layers.{i}.self_attn.out_proj.{p}": "blocks.{i}.attn.proj.{p}",
        "layers.{i}.self_attn_layer_norm.{p}": "blocks.{i}.norm1.{p}",
        "layers.{i}.final_layer_norm.{p}": "blocks.{i}.norm2.{p}",
        "layers.{i}.fc1.{p}": "blocks.{i}.mlp.fc1.{p}",
        "layers.{i}.fc2.{p}": "blocks.{i}.mlp.fc2.{p}",
        "layer_norm.{p}": "norm.{p}"}),
}
# Groups of a full Whisper checkpoint that are not the encoder: recognised, counted, not loaded.
_WHISPER_SKIP = (("decoder", re.compile(r"(model\.)?decoder\..*")),
                 ("proj_out (the LM head, tied to the decoder's token embeddings)", re.compile(r"proj_out\..*")),
                 ("audio-classification head (projector, classifier, layer_weights)",
                  re.compile(r"(projector\..*|classifier\..*|layer_weights)")))


@dataclass
class LoadReport:
    """What a loader did. `print(report)` gives the summary check_checkpoint prints."""
    model: str
    source: str
    key_format: str
    config: Any
    n_loaded: int  # checkpoint tensors copied into the model
    n_params: int  # parameters of the model (including fresh adapters)
    fresh: List[str] = field(default_factory=list)  # model tensors not from the checkpoint (the mixtures)
    skipped: Dict[str, int] = field(default_factory=dict)  # recognised groups deliberately not loaded
    notes: List[str] = field(default_factory=list)  # where non-inferable settings came from, resizes

    def __str__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
        lines = [f"{self.model} loaded from {self.source}", f"  key format : {self.key_format}",
                 f"  config     : {type(self.config).__name__}({cfg})",
                 f"  tensors    : {self.n_loaded} loaded, {self.n_params:,} parameters in the model"]
        if self.fresh:
            lines.append(f"  fresh      : {len(self.fresh)} tensors initialised here, not in the checkpoint "
                         f"(adapters / new head)")
        for group, count in self.skipped.items():
            lines.append(f"  skipped    : {count} tensors of the {group}")
        lines += [f"  note       : {note}" for note in self.notes]
        return "\n".join(lines)


def _read_state_dict(src) -> Tuple[Dict[str, torch.Tensor], str, Optional[dict]]:
    """-> (state dict, source description, config.json beside the weights or None)."""
    if isinstance(src, Mapping):
        bad = [k for k, v in src.items() if not torch.is_tensor(v)]
        if bad:
            raise ValueError(f"state dict values must be tensors; key(s) {bad[:5]} are not (a training checkpoint? "
                             f"pass its model state dict)")
        return dict(src), "<state dict>", None
    path = os.fspath(src)
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json"):
            if os.path.exists(os.path.join(path, name)):
                weights = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin (or sharded index) in {path}")
    elif os.path.isfile(path):
        weights = path
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    folder = os.path.dirname(weights)
    config_path = os.path.join(folder, "config.json")
    hf_cfg = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            hf_cfg = json.load(f)
    if weights.endswith(".index.json"):
        with open(weights) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(_read_file(os.path.join(folder, name)))
    else:
        sd = _read_file(weights)
    return sd, path, hf_cfg


def _read_file(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"reading {path} needs the optional package safetensors (pip install safetensors), "
                              f"or a .bin/.pt copy of the weights") from err
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    return dict(obj)


def _map_names(sd: Mapping[str, torch.Tensor], formats: Mapping[str, list]):
    """HF names -> ours. Returns (ours -> tensor, ours -> HF name, format name, unmatched HF names)."""
    mapped, origin, used, unmatched = {}, {}, set(), []
    for key, tensor in sd.items():
        for fmt, rules in formats.items():
            hit = next(((rx, ours) for rx, ours, _ in rules if rx.fullmatch(key)), None)
            if hit:
                ours = hit[1].format(**hit[0].fullmatch(key).groupdict())
                if ours in mapped:
                    raise ValueError(f"checkpoint keys {origin[ours]!r} and {key!r} both map to {ours!r}")
                mapped[ours], origin[ours] = tensor, key
                if ours.startswith("blocks."):
                    used.add(fmt)  # the shared names (embeddings, norms) do not tell the formats apart
                break
        else:
            unmatched.append(key)
    fmt = " + ".join(sorted(used)) if used else next(iter(formats))
    return mapped, origin, fmt, unmatched


def _resolve_heads(d: int, overrides: dict, hf_cfg: Optional[dict], hf_key: str, table: Mapping[int, int],
                   notes: List[str]) -> int:
    if "n_heads" in overrides:
        notes.append(f"n_heads = {overrides['n_heads']} from the override")
        return overrides["n_heads"]
    if hf_cfg and hf_key in hf_cfg:
        notes.append(f"n_heads = {hf_cfg[hf_key]} from config.json ({hf_key})")
        return int(hf_cfg[hf_key])
    if d in table:
        notes.append(f"n_heads = {table[d]} from the published size for width {d} (heads are not in the shapes)")
        return table[d]
    raise ValueError(f"cannot infer the number of attention heads for width d = {d} (not a published size "
                     f"{sorted(table)} and no config.json beside the checkpoint); pass n_heads=... to the loader")


def _check_overrides(cls, overrides: dict, inferred: dict, extra: Tuple[str, ...] = ()) -> None:
    known = {f.name for f in fields(cls)} | set(extra)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"unknown override {key!r} for {cls.__name__}"
                             + (f"; did you mean {close[0]!r}?" if close else f"; expected one of {sorted(known)}"))
    for key, value in inferred.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(f"override {key}={overrides[key]!r} conflicts with the checkpoint, whose tensors give "
                             f"{key}={value!r}")


def _hf_namer(rules, prefix: str = ""):
    """ours -> the checkpoint name it is loaded from in the detected format (for error messages)."""
    def name(ours: str) -> str:
        for _, our_t, hf_t in rules:
            rx = re.escape(our_t).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
            hit = re.fullmatch(rx, ours)
            if hit:
                return ("" if hf_t.startswith("classifier.") else prefix) + hf_t.format(**hit.groupdict())
        return ours
    return name


def _load_into(model: nn.Module, mapped: Dict[str, torch.Tensor], origin: Dict[str, str], unmatched: List[str],
               source: str, hf_name, fresh_prefixes: Tuple[str, ...] = ()) -> Tuple[int, List[str], List[str]]:
    """Strict comparison of names and shapes (every problem reported by name), then the copy.
    Fresh tensors (the mixtures, a new head) are the only model tensors allowed to be absent."""
    expected = model.state_dict()
    fresh = [k for k in expected if ".adapters." in k or k.startswith(fresh_prefixes)]
    missing = [f"{hf_name(k)} (ours: {k})" for k in expected if k not in mapped and k not in fresh]
    unexpected = unmatched + [origin[k] for k in mapped if k not in expected]
    wrong = [f"{origin[k]}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)} ({k})"
             for k in mapped if k in expected and mapped[k].shape != expected[k].shape]
    problems = []
    for title, names in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                         ("wrong shape", wrong)):
        if names:
            shown = "\n    ".join(names[:25]) + (f"\n    ... and {len(names) - 25} more" if len(names) > 25 else "")
            problems.append(f"{len(names)} {title}:\n    {shown}")
    if problems:
        raise ValueError(f"{type(model).__name__} checkpoint {source} does not match the model built from its "
                         f"shapes ({type(model.cfg).__name__} d={model.cfg.d}, n_layers={model.cfg.n_layers}); nothing "
                         f"was loaded:\n  " + "\n  ".join(problems))
    todo = {k: v for k, v in mapped.items() if k in expected}
    result = model.load_state_dict(todo, strict=False)  # copies into the model's float32 tensors
    assert not result.unexpected_keys and set(result.missing_keys) == set(fresh), result
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in todo.values()} - {"float32"})
    return len(todo), fresh, dtypes


def load_ast(path_or_state_dict, *, pos_resize: str = "ast", **overrides) -> Tuple[AST, LoadReport]:
    """Load a transformers AST checkpoint (ASTModel or ASTForAudioClassification) into `AST`.

    path_or_state_dict: a directory (save_pretrained / Hub snapshot: model.safetensors or
    pytorch_model.bin, sharded or not, plus config.json), a .safetensors / .bin / .pt file, or a
    state dict. Both the transformers<5 names (Hub files, save_pretrained output) and the
    transformers>=5 in-memory names are understood; a leading "audio_spectrogram_transformer." is
    stripped.
    Inferred from tensor shapes: d, n_layers (from the keys), d_ff, patch, qkv_bias, and the
    classifier of ASTForAudioClassification, loaded into `head` (n_classes from its shape,
    head_pool="cls_dist", head_norm=True: its logits are reproduced). Override n_classes=0 to drop
    it, or another count for a fresh head; the checkpoint's classifier is then skipped and counted.
    Not in the shapes, taken from overrides, else config.json beside the weights, else AST-Base's
    values: n_heads (else the published size for the width, AST_HEADS_BY_WIDTH), num_mel_bins 128,
    freq_stride / time_stride 10, norm_eps 1e-12, max_length (else the checkpoint's own grid:
    (Tp - 1) * time_stride + 16 frames).
    The checkpoint's patch grid is (Fp, Tp) = (frequency patches of its num_mel_bins, the rest of
    its position table). A max_length override (or a num_mel_bins override, when a config.json
    gives the checkpoint's own) that changes the grid resizes the positional embeddings with
    `resize_pos_embed(method=pos_resize)`, noted in the report. Other config fields (adapters,
    attn_impl) may be overridden; overrides that contradict the tensors are errors.
    Returns (model in eval mode, LoadReport). The ValueError for a mismatch lists every missing,
    unexpected and wrong-shaped tensor by name; nothing is silently ignored.
    """
    sd, source, hf_cfg = _read_state_dict(path_or_state_dict)
    return _load_ast(sd, source, hf_cfg, pos_resize, overrides)


def _load_ast(sd, source, hf_cfg, pos_resize, overrides) -> Tuple[AST, LoadReport]:
    _check_choice("pos_resize", pos_resize, POS_RESIZE)
    prefix = "audio_spectrogram_transformer."
    had_prefix = any(k.startswith(prefix) for k in sd)
    sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    mapped, origin, fmt, unmatched = _map_names(sd, _AST_FORMATS)
    if "pos_embed" not in mapped or "patch_embed.weight" not in mapped:
        looks = " (these look like Whisper tensors: use load_whisper_encoder)" if any("conv1" in k for k in sd) else ""
        raise ValueError(f"{source} holds no AST patch / position embeddings (expected "
                         f"embeddings.position_embeddings and embeddings.patch_embeddings.projection.weight){looks}")
    notes: List[str] = []
    hf = hf_cfg or {}
    if hf and hf.get("model_type", "audio-spectrogram-transformer") != "audio-spectrogram-transformer":
        raise ValueError(f"config.json beside {source} says model_type {hf['model_type']!r}, expected "
                         f"'audio-spectrogram-transformer'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json has hidden_act {hf['hidden_act']!r}; this AST implements 'gelu' only")
    w = mapped["patch_embed.weight"]  # (d, 1, patch, patch)
    layers = {int(k.split(".")[1]) for k in mapped if k.startswith("blocks.")}
    inferred = dict(d=w.shape[0], patch=w.shape[-1], n_layers=max(layers) + 1 if layers else 0,
                    qkv_bias="blocks.0.attn.q.bias" in mapped)
    if "blocks.0.mlp.fc1.weight" in mapped:
        inferred["d_ff"] = mapped["blocks.0.mlp.fc1.weight"].shape[0]
    ckpt_classes = mapped["head.fc.weight"].shape[0] if "head.fc.weight" in mapped else 0
    n_classes = overrides.get("n_classes", ckpt_classes)
    keep_head = ckpt_classes > 0 and n_classes == ckpt_classes
    if keep_head:  # ASTForAudioClassification's head: LayerNorm + Linear on the [CLS]/distillation mean
        inferred.update(n_classes=ckpt_classes, head_pool="cls_dist", head_norm="head.norm.weight" in mapped)
    _check_overrides(ASTConfig, overrides, inferred)
    settings = {}
    for name, hf_key, default in (("num_mel_bins", "num_mel_bins", 128), ("freq_stride", "frequency_stride", 10),
                                  ("time_stride", "time_stride", 10), ("norm_eps", "layer_norm_eps", 1e-12)):
        settings[name] = hf.get(hf_key, default)
    n_heads = _resolve_heads(inferred["d"], overrides, hf_cfg, "num_attention_heads", AST_HEADS_BY_WIDTH, notes)
    # The checkpoint's own grid: frequency patches from its mel bins, time patches from the table.
    src_mels = settings["num_mel_bins"] if hf_cfg else overrides.get("num_mel_bins", 128)
    strides = tuple(overrides.get(k, settings[k]) for k in ("freq_stride", "time_stride"))
    fs = (src_mels - inferred["patch"]) // strides[0] + 1
    n_patch = mapped["pos_embed"].shape[1] - 2
    if fs < 1 or n_patch % fs:
        raise ValueError(f"position embeddings hold {n_patch} patches, not a multiple of {fs} frequency patches "
                         f"({src_mels} mel bins, patch {inferred['patch']}, frequency stride {strides[0]}); pass "
                         f"the checkpoint's num_mel_bins / freq_stride as overrides")
    ts = n_patch // fs
    src_len = hf.get("max_length", (ts - 1) * strides[1] + inferred["patch"])
    if (src_len - inferred["patch"]) // strides[1] + 1 != ts:
        src_len = (ts - 1) * strides[1] + inferred["patch"]
    cfg = ASTConfig(**{**settings, "max_length": src_len, "n_heads": n_heads, **inferred, **overrides})
    if cfg.grid != (fs, ts):
        mapped["pos_embed"] = resize_pos_embed(mapped["pos_embed"], (fs, ts), cfg.grid, pos_resize)
        notes.append(f"positional embeddings resized from the checkpoint's {fs} x {ts} patch grid to "
                     f"{cfg.grid[0]} x {cfg.grid[1]} (max_length {cfg.max_length}) with method {pos_resize!r}")
    skipped = {}
    if ckpt_classes and not keep_head:
        head_keys = [k for k in mapped if k.startswith("head.")]
        skipped[f"classifier head ({ckpt_classes} classes; n_classes={n_classes} asked)"] = len(head_keys)
        for k in head_keys:
            del mapped[k]
    if cfg.n_classes and not keep_head:
        notes.append(f"head: a fresh {cfg.n_classes}-class head on the {cfg.head_pool!r} pooled output")
    model = AST(cfg)
    rules = _AST_FORMATS[fmt] if fmt in _AST_FORMATS else next(iter(_AST_FORMATS.values()))
    n_loaded, fresh, dtypes = _load_into(model, mapped, origin, unmatched, source,
                                         _hf_namer(rules, prefix if had_prefix else ""),
                                         fresh_prefixes=("head.",) if cfg.n_classes and not keep_head else ())
    notes += [f"checkpoint tensors in {', '.join(dtypes)} were copied into float32 parameters"] if dtypes else []
    report = LoadReport("AST", source, fmt, cfg, n_loaded, sum(p.numel() for p in model.parameters()),
                        fresh, skipped, notes)
    return model.eval(), report


def load_whisper_encoder(path_or_state_dict, **overrides) -> Tuple[WhisperEncoder, LoadReport]:
    """Load the encoder of a transformers Whisper checkpoint into `WhisperEncoder`.

    Accepts WhisperModel / WhisperForConditionalGeneration ("model.encoder." prefix),
    WhisperForAudioClassification / WhisperModel.state_dict() ("encoder.") and a bare WhisperEncoder
    state dict, as a directory, file or state dict (see load_ast). The decoder, proj_out and
    audio-classification heads are recognised and skipped, with their tensor counts in the report;
    anything else unrecognised is an error.
    Inferred from shapes: n_mels, d, n_layers, d_ff, max_positions. n_heads: override, else
    config.json (encoder_attention_heads), else the published size for the width
    (WHISPER_HEADS_BY_WIDTH). Adapter / attn_impl fields may be overridden.
    """
    sd, source, hf_cfg = _read_state_dict(path_or_state_dict)
    return _load_whisper(sd, source, hf_cfg, overrides)


def _load_whisper(sd, source, hf_cfg, overrides) -> Tuple[WhisperEncoder, LoadReport]:
    prefixes = [p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in sd)]
    prefix = prefixes[0] if prefixes else ""
    if prefix == "" and "conv1.weight" not in sd:
        looks = " (these look like AST tensors: use load_ast)" if any("position_embeddings" in k for k in sd) else ""
        raise ValueError(f"{source} holds no Whisper encoder (expected conv1.weight, encoder.conv1.weight or "
                         f"model.encoder.conv1.weight){looks}")
    skipped: Dict[str, int] = {}
    encoder_sd, other = {}, []
    for k, v in sd.items():
        if k.startswith(prefix):
            encoder_sd[k[len(prefix):]] = v
            continue
        group = next((name for name, rx in _WHISPER_SKIP if rx.fullmatch(k)), None)
        if group is None:
            other.append(k)
        else:
            skipped[group] = skipped.get(group, 0) + 1
    mapped, origin, fmt, unmatched = _map_names(encoder_sd, _WHISPER_FORMATS)
    origin = {k: prefix + v for k, v in origin.items()}
    unmatched = [prefix + k for k in unmatched] + other
    hf = hf_cfg or {}
    if hf.get("activation_function", "gelu") != "gelu":
        raise ValueError(f"config.json has activation_function {hf['activation_function']!r}; expected 'gelu'")
    notes: List[str] = []
    if "conv1.weight" not in mapped or "pos_embed" not in mapped:
        raise ValueError(f"{source}: the Whisper encoder needs {prefix}conv1.weight and {prefix}embed_positions.weight")
    w = mapped["conv1.weight"]  # (d, n_mels, 3)
    layers = {int(k.split(".")[1]) for k in mapped if k.startswith("blocks.")}
    inferred = dict(d=w.shape[0], n_mels=w.shape[1], n_layers=max(layers) + 1 if layers else 0,
                    max_positions=mapped["pos_embed"].shape[0])
    if "blocks.0.mlp.fc1.weight" in mapped:
        inferred["d_ff"] = mapped["blocks.0.mlp.fc1.weight"].shape[0]
    _check_overrides(WhisperEncoderConfig, overrides, inferred)
    n_heads = _resolve_heads(inferred["d"], overrides, hf_cfg, "encoder_attention_heads", WHISPER_HEADS_BY_WIDTH, notes)
    cfg = WhisperEncoderConfig(**{"n_heads": n_heads, **inferred, **overrides})
    model = WhisperEncoder(cfg)
    rules = next(iter(_WHISPER_FORMATS.values()))
    n_loaded, fresh, dtypes = _load_into(model, mapped, origin, unmatched, source, _hf_namer(rules, prefix))
    notes += [f"checkpoint tensors in {', '.join(dtypes)} were copied into float32 parameters"] if dtypes else []
    report = LoadReport("WhisperEncoder", source, fmt + (f", prefix {prefix!r}" if prefix else ""), cfg, n_loaded,
                        sum(p.numel() for p in model.parameters()), fresh, skipped, notes)
    return model.eval(), report


def check_checkpoint(path_or_state_dict, **overrides) -> LoadReport:
    """Load an AST or Whisper checkpoint (kind detected from its tensor names), print what was loaded,
    run one tiny forward pass to show it works, and return the LoadReport.

        python -c "import encoder; encoder.check_checkpoint('PATH')"
    """
    sd, source, hf_cfg = _read_state_dict(path_or_state_dict)
    if any(k.endswith("embeddings.position_embeddings") for k in sd):
        model, report = _load_ast(sd, source, hf_cfg, overrides.pop("pos_resize", "ast"), overrides)
        x = torch.zeros(1, model.cfg.patch, model.cfg.num_mel_bins)  # the shortest input: one time patch
        out = model(x)
        shape, ok = tuple(out.tokens.shape), bool(torch.isfinite(out.tokens).all())
    elif any(k.endswith("conv1.weight") for k in sd):
        model, report = _load_whisper(sd, source, hf_cfg, overrides)
        out = model(torch.zeros(1, model.cfg.n_mels, 2))
        shape, ok = tuple(out.features.shape), bool(torch.isfinite(out.features).all())
    else:
        raise ValueError(f"{source} looks like neither an AST nor a Whisper checkpoint (no "
                         f"embeddings.position_embeddings or conv1.weight tensor)")
    print(report)
    print(f"  forward    : a minimal input gives output {shape}, all finite: {ok}")
    return report
