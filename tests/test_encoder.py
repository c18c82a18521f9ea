"""Tests for encoder.py and its loaders in hf.py. Every numeric check has an independent reference:
hand-derived cases (frame-count formula, silence floor, pure tones, the empty Kaldi filter, mel
centres computed with `math` here), the reference packages where installed (transformers'
ASTFeatureExtractor, WhisperFeatureExtractor, ASTModel / ASTForAudioClassification / Whisper
encoder loaded from saved checkpoints; kaldi-native-fbank), a naive per-head attention loop, and
each item of a padded batch run alone.

Asserted tolerances, float32: front-ends vs transformers and kaldi-native-fbank 1e-4 .. 2e-3 (the
low-energy Kaldi filters carry float32 FFT rounding), models vs transformers 1e-5."""
import math
import os
import re
import sys
from dataclasses import replace

import pytest
import torch

from importscan import imported_packages
import encoder as E
from encoder import AST, ASTConfig, WhisperEncoder, WhisperEncoderConfig
from hf import load_ast, load_whisper_encoder
from soft_moa import Adapter, mark_trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000
# transformers warns that AST's 128-filter bank has an empty filter: a documented fact (filter 3), tested below.
EMPTY_FILTER_WARNING = "ignore:At least one mel filter has all zero values"


def tone(freq, seconds=1.0, amp=0.5):
    t = torch.arange(int(SR * seconds), dtype=torch.float64) / SR
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def randomize_adapters(model, std=0.3):
    """Fresh adapters output zero; random up-projections make them do something."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Adapter):
                mod.up.weight.normal_(0, std)
                mod.up.bias.normal_(0, std)
    return model


def small_ast(**kw):
    base = dict(d=32, n_layers=2, n_heads=4, d_ff=64, num_mel_bins=32, max_length=96)
    return ASTConfig(**{**base, **kw})


def small_whisper(**kw):
    base = dict(n_mels=16, d=32, n_layers=2, n_heads=4, d_ff=64, max_positions=30)
    return WhisperEncoderConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------
# Front-ends: hand-derivable cases

@pytest.mark.parametrize("n", [400, 559, 560, 16000, 16159, 16160])
def test_kaldi_frame_count_formula(n):
    fbank, frames = E.kaldi_fbank(torch.randn(n) * 0.1)
    expected = 1 + (n - 400) // 160  # snip_edges: whole 25 ms windows every 10 ms
    assert fbank.shape == (1, expected, 128) and frames.tolist() == [expected]


def test_kaldi_batch_with_lengths_equals_each_clip_alone():
    clips = [torch.randn(n) * 0.1 for n in (16000, 9000, 400)]
    batch = torch.zeros(3, 16000)
    batch[1, 9000:] = 7.0  # junk past a clip's end must not matter
    for i, c in enumerate(clips):
        batch[i, :len(c)] = c
    fb, frames = E.kaldi_fbank(batch, lengths=[16000, 9000, 400])
    assert frames.tolist() == [98, 54, 1]
    for i, c in enumerate(clips):
        alone, _ = E.kaldi_fbank(c)
        n = alone.shape[1]
        torch.testing.assert_close(fb[i, :n], alone[0], rtol=0, atol=1e-5)
        assert (fb[i, n:] == 0).all()  # padding frames are 0, what AST's extractor pads with


def test_silence_gives_the_documented_floor():
    fb, _ = E.kaldi_fbank(torch.zeros(4000))
    assert (fb == E.LOG_FLOOR).all() and abs(E.LOG_FLOOR - math.log(2.0 ** -23)) < 1e-12
    x, mask = E.ast_features(torch.zeros(4000), target_frames=30)
    floor = (math.log(2.0 ** -23) + 4.2677393) / (2 * 4.5689974)  # -1.2776
    torch.testing.assert_close(x[0, :23], torch.full((23, 128), floor), rtol=0, atol=1e-6)
    pad = (0 + 4.2677393) / (2 * 4.5689974)  # padded frames: 0 before normalisation, 0.467 after
    torch.testing.assert_close(x[0, 23:], torch.full((7, 128), pad), rtol=0, atol=1e-6)
    assert mask[0].tolist() == [True] * 23 + [False] * 7
    mel, wmask = E.whisper_log_mel(torch.zeros(4000), n_frames=50)
    assert torch.equal(mel, torch.full((1, 80, 50), -1.5))  # (log10(1e-10) + 4) / 4
    assert wmask.sum().item() == 25  # ceil(4000 / 160)


def test_the_empty_kaldi_filter_is_constant_log_eps():
    """At 16 kHz, 512-point FFT, 128 filters from 20 Hz: count the FFT bins strictly inside each
    triangle by hand; exactly one filter (index 3) has none, and its log energy is log(eps) always."""
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20), mel(8000)
    delta = (hi - lo) / 129
    empty = [k for k in range(128)
             if not any(lo + k * delta < mel(i * 16000 / 512) < lo + (k + 2) * delta for i in range(256))]
    assert empty == [3]
    fb, _ = E.kaldi_fbank(torch.randn(16000) * 0.3)
    assert (fb[0, :, 3] == E.LOG_FLOOR).all()
    others = torch.cat([fb[0, :, :3], fb[0, :, 4:]], dim=1)
    assert (others > E.LOG_FLOOR + 1).all()


@pytest.mark.parametrize("k", [40, 64, 100, 127])
def test_pure_tone_lands_in_its_kaldi_mel_bin(k):
    """A tone at filter k's centre (Kaldi mel scale, computed here) peaks in bin k. Tones are taken
    where filters are wider than the Hann window's main lobe (+-2 FFT bins, 62.5 Hz); below ~500 Hz
    the filters are narrower and leakage can move the peak to a neighbour."""
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20), mel(8000)
    centre = 700 * (math.exp((lo + (k + 1) * (hi - lo) / 129) / 1127) - 1)
    fb, _ = E.kaldi_fbank(tone(centre))
    assert fb[0].mean(0).argmax().item() == k


@pytest.mark.parametrize("n_mels,k", [(80, 0), (80, 10), (80, 40), (80, 79), (128, 60), (128, 127)])
def test_pure_tone_lands_in_its_whisper_mel_bin(n_mels, k):
    """Slaney mel centres computed here: linear to 1 kHz (3 f / 200), logarithmic above."""
    to_mel = lambda f: f * 3 / 200 if f < 1000 else 15 + math.log(f / 1000) * 27 / math.log(6.4)  # noqa: E731
    to_hz = lambda m: m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)  # noqa: E731
    centre = to_hz((k + 1) * to_mel(8000) / (n_mels + 1))
    mel, _ = E.whisper_log_mel(tone(centre), n_mels=n_mels, n_frames=100)
    assert mel[0].mean(1).argmax().item() == k


def test_whisper_log_mel_pads_and_trims_to_n_frames():
    x = torch.randn(SR) * 0.1
    mel, mask = E.whisper_log_mel(x, n_frames=40)  # trimmed to 40 * 160 samples
    mel_t, _ = E.whisper_log_mel(x[:40 * 160], n_frames=40)
    assert mel.shape == (1, 80, 40) and mask.all()
    torch.testing.assert_close(mel, mel_t, rtol=0, atol=0)
    mel_p, mask_p = E.whisper_log_mel(x[:1000], n_frames=40)
    assert mask_p.sum().item() == 7  # ceil(1000 / 160)


def test_float64_input_is_computed_in_float64():
    x = torch.randn(8000, dtype=torch.float64) * 0.1
    assert E.kaldi_fbank(x)[0].dtype == torch.float64
    assert E.whisper_log_mel(x, n_frames=60)[0].dtype == torch.float64
    torch.testing.assert_close(E.kaldi_fbank(x)[0].float(), E.kaldi_fbank(x.float())[0], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Front-ends against the reference packages

def _test_signals():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(20000, generator=g) * 0.1
    mix = tone(440.0, 1.3) + tone(3000.0, 1.3, 0.2) + torch.randn(20800, generator=g) * 0.01
    long = torch.randn(12 * SR, generator=g) * 0.05  # 1198 frames: AST trims to 1024
    return {"noise": noise, "tones": mix, "long": long}


@pytest.mark.filterwarnings(EMPTY_FILTER_WARNING)
@pytest.mark.parametrize("name", ["noise", "tones", "long"])
def test_ast_features_match_transformers(name):
    """transformers' ASTFeatureExtractor (its numpy path, float64; torchaudio not installed): to 1e-3
    from float32 audio (the largest errors, ~2e-4, sit in the lowest filters, whose energies are
    ~1e-7 of the frame's and so carry float32 FFT rounding) and to 1e-5 from float64 audio."""
    transformers = pytest.importorskip("transformers")
    import numpy as np
    wave = _test_signals()[name]
    fe = transformers.ASTFeatureExtractor()
    if fe.__dict__.get("mel_filters") is None:
        pytest.skip("torchaudio is installed, so ASTFeatureExtractor does not take its numpy path")
    ref = fe(wave.numpy(), sampling_rate=SR, return_tensors="np")["input_values"][0]  # (1024, 128)
    ours, mask = E.ast_features(wave)
    assert np.abs(ours[0].numpy() - ref).max() < 1e-3  # measured <= 2.1e-4
    ours64, _ = E.ast_features(wave.double())
    assert np.abs(ours64[0].numpy() - ref).max() < 1e-5  # measured <= 1.4e-7
    assert mask.sum().item() == min(1024, 1 + (len(wave) - 400) // 160)
    # AST's window is Hanning, not Kaldi's default Povey: Povey is far off.
    povey, _ = E.ast_features(wave, window="povey")
    assert np.abs(povey[0].numpy() - ref).max() > 0.05


@pytest.mark.filterwarnings(EMPTY_FILTER_WARNING)
def test_ast_features_batch_matches_transformers_per_clip():
    transformers = pytest.importorskip("transformers")
    import numpy as np
    sig = _test_signals()
    fe = transformers.ASTFeatureExtractor(max_length=128)
    clips = [sig["noise"][:5000], sig["tones"][:12000]]
    batch = torch.zeros(2, 12000)
    batch[0, :5000], batch[1] = clips[0], clips[1]
    ours, mask = E.ast_features(batch, target_frames=128, lengths=[5000, 12000])
    for i, c in enumerate(clips):
        ref = fe(c.numpy(), sampling_rate=SR, return_tensors="np")["input_values"][0]
        assert np.abs(ours[i].numpy() - ref).max() < 1e-3
    assert mask.sum(1).tolist() == [1 + (5000 - 400) // 160, 1 + (12000 - 400) // 160]


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("name", ["noise", "tones"])
def test_whisper_log_mel_matches_transformers(n_mels, name):
    """WhisperFeatureExtractor: its torch path (__call__) and its numpy path, to 1e-4."""
    transformers = pytest.importorskip("transformers")
    import numpy as np
    wave = _test_signals()[name]
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    out = fe(wave.numpy(), sampling_rate=SR, return_tensors="np", return_attention_mask=True)
    ours, mask = E.whisper_log_mel(wave, n_mels=n_mels)
    assert np.abs(ours[0].numpy() - out["input_features"][0]).max() < 1e-4  # measured <= 4.0e-5
    assert mask[0].tolist() == out["attention_mask"][0].astype(bool).tolist()
    padded = np.pad(wave.numpy(), (0, 30 * SR - len(wave)))[None]
    ref_np = fe._np_extract_fbank_features(padded, "cpu")[0]
    assert np.abs(ours[0].numpy() - ref_np).max() < 1e-4


@pytest.mark.parametrize("window", ["povey", "hanning"])
@pytest.mark.parametrize("n_mels", [23, 80])
def test_kaldi_fbank_matches_kaldi_native_fbank(window, n_mels):
    knf = pytest.importorskip("kaldi_native_fbank")
    import numpy as np
    wave = _test_signals()["tones"]
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0  # its default dithers
    opts.frame_opts.window_type = window
    opts.mel_opts.num_bins = n_mels
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(SR, wave.tolist())
    fb.input_finished()
    ref = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    ours, _ = E.kaldi_fbank(wave, n_mels=n_mels, window=window)
    assert ours.shape[1] == ref.shape[0]
    err = np.abs(ours[0].numpy() - ref).max()
    # kaldi-native-fbank computes in float32: the low-energy filters of the tone mix carry its
    # rounding (our float64 path differs from it by as much as our float32 path).
    assert err < 2e-3, err  # measured <= 9.2e-4 (tones, 80 bins), <= 1.3e-4 on noise


def test_kaldi_native_fbank_refuses_128_bins_at_16k():
    """Why the comparison above uses other bin counts: Kaldi rejects a bank with an empty filter."""
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 128
    with pytest.raises(Exception, match="num_mel_bins too large"):
        knf.OnlineFbank(opts).accept_waveform(SR, [0.0] * 1600)


# ----------------------------------------------------------------------------------------------
# Bad input

BAD_AUDIO = [
    (dict(wave=torch.zeros(SR), sample_rate=44100), r"44100 Hz; expected 16000 Hz"),
    (dict(wave=torch.zeros(SR, 2)), r"mono .* wave.mean\(-1\).* got torch.float32 \(16000, 2\)"),
    (dict(wave=torch.zeros(1, 2, SR)), r"mono \(N,\) or a batch \(b, N\) .* got torch.float32 \(1, 2, 16000\)"),
    (dict(wave=torch.zeros(0)), r"not empty; got torch.float32 \(0,\)"),
    (dict(wave=torch.zeros(399)), r"too short: 399 samples; expected at least 400"),
    (dict(wave=torch.tensor([0.0] * 500 + [float("nan")] + [0.0] * 500)), r"NaN/inf .* expected finite"),
    (dict(wave=torch.tensor([0.0] * 500 + [float("inf")] + [0.0] * 500)), r"NaN/inf"),
    (dict(wave=torch.zeros(1000, dtype=torch.int16)), r"float samples .* divide by 32768"),
    (dict(wave=torch.zeros(2, 1000), lengths=[1000, 200]), r"too short: 200 samples"),
]


@pytest.mark.parametrize("frontend", ["ast", "whisper"])
@pytest.mark.parametrize("kwargs,match", BAD_AUDIO)
def test_bad_audio_raises_value_error_naming_the_problem(frontend, kwargs, match):
    kwargs = dict(kwargs)
    wave = kwargs.pop("wave")
    fn = E.ast_features if frontend == "ast" else E.whisper_log_mel
    with pytest.raises(ValueError, match=match):
        fn(wave, **kwargs)


def test_nan_in_padding_past_lengths_is_allowed():
    wave = torch.zeros(2, 2000)
    wave[1, 1000:] = float("nan")
    x, mask = E.ast_features(wave, lengths=[2000, 1000], target_frames=20)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("x,mask,match", [
    (torch.randn(2, 48, 16), None, r"AST expects a float log-mel \(b, T, F\), F = 32; got torch.float32 \(2, 48, 16\)$"),
    (torch.randn(2, 32, 48), None, r"\(b, T, F\), F = 32; got torch.float32 \(2, 32, 48\) \(transposed\?"),
    (torch.randn(48, 32), None, r"float log-mel \(b, T, F\), F = 32; got torch.float32 \(48, 32\)"),
    (torch.randn(2, 10, 32), None, r"10 frames; expected 16 \.\. 105 \(one patch"),
    (torch.randn(2, 106, 32), None, r"106 frames; expected 16 \.\. 105 .*max_length = 96"),  # 10 time patches > 9
    (torch.randn(2, 48, 32), torch.ones(2, 48), r"bool tensor of shape \(b, T\) = \(2, 48\)"),
    (torch.randn(2, 48, 32), torch.ones(2, 40, dtype=torch.bool), r"bool tensor of shape .* got torch.bool \(2, 40\)"),
])
def test_ast_rejects_bad_spectrograms(x, mask, match):
    with pytest.raises(ValueError, match=match):
        AST(small_ast())(x, mask)


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 80, 40), r"Whisper expects a float log-mel \(b, F, T\), F = 16; got torch.float32 \(2, 80, 40\)$"),
    (torch.randn(2, 40, 16), r"\(b, F, T\), F = 16; got torch.float32 \(2, 40, 16\) \(transposed\?"),
    (torch.randn(2, 16, 61), r"61 frames; expected 1 \.\. 60"),
    (torch.randn(16, 40), r"\(b, F, T\), F = 16; got torch.float32 \(16, 40\)"),
])
def test_whisper_rejects_bad_spectrograms(x, match):
    with pytest.raises(ValueError, match=match):
        WhisperEncoder(small_whisper())(x)


def test_forward_checks_shapes_only_no_host_sync():
    """On the meta device every value-dependent check (.item(), bool(tensor), torch.equal) raises, so
    a forward pass that runs there never syncs with the host (the cause of torch.compile graph breaks)."""
    with torch.device("meta"):
        out = AST(small_ast(n_classes=3))(torch.empty(2, 96, 32), torch.ones(2, 96, dtype=torch.bool))
        wout = WhisperEncoder(small_whisper())(torch.empty(2, 16, 60), torch.ones(2, 60, dtype=torch.bool))
    assert out.tokens.shape == (2, 2 + 2 * 9, 32) and out.logits.shape == (2, 3)
    assert wout.features.shape == (2, 30, 32) and wout.mask.shape == (2, 30)


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ASTConfig(d=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown placement 'middle'"):
        ASTConfig(placement="middle")
    with pytest.raises(ValueError, match="unknown attn_impl"):
        WhisperEncoderConfig(attn_impl="flash")
    with pytest.raises(ValueError, match="unknown Whisper size 'huge'"):
        WhisperEncoderConfig.whisper("huge")
    with pytest.raises(ValueError, match="n_classes must be an integer >= 0"):
        ASTConfig(n_classes=-1)
    with pytest.raises(ValueError, match="d = 33 must be even"):
        WhisperEncoderConfig(d=33, n_heads=3)


# ----------------------------------------------------------------------------------------------
# Attention, masks, adapters

def naive_attention(q, k, v, mask):
    """One query at a time, float64, padded keys dropped from the list."""
    b, h, m, dh = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    for bi in range(b):
        keys = [j for j in range(m) if mask is None or bool(mask[bi, j])]
        for hi in range(h):
            for i in range(m):
                s = [float(q[bi, hi, i].double() @ k[bi, hi, j].double()) / math.sqrt(dh) for j in keys]
                w = [math.exp(x - max(s)) for x in s]
                out[bi, hi, i] = sum(wj / sum(w) * v[bi, hi, j].double() for wj, j in zip(w, keys))
    return out


@pytest.mark.parametrize("impl", E.ATTN_IMPLS)
def test_attention_matches_naive_loop(impl):
    q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    for msk in (None, mask):
        torch.testing.assert_close(E.attention(q, k, v, msk, impl).double(), naive_attention(q, k, v, msk),
                                   rtol=0, atol=1e-5)


def _twin(model_cls, cfg, **changes):
    """The same weights under another config (e.g. the reference attention path)."""
    a = model_cls(cfg)
    b = model_cls(replace(cfg, **changes))
    b.load_state_dict(a.state_dict())
    return a.eval(), b.eval()


def test_sdpa_path_matches_reference_path():
    cfg = small_ast(placement="houlsby", adapter_kind="soft", n_experts=3)
    fast, ref = _twin(AST, cfg, attn_impl="reference")
    ref.load_state_dict(randomize_adapters(fast).state_dict())
    x = torch.randn(2, 96, 32)
    mask = torch.arange(96)[None] < torch.tensor([[96], [40]])
    for msk in (None, mask):
        torch.testing.assert_close(fast(x, msk).tokens, ref(x, msk).tokens, rtol=0, atol=1e-5)
    wfast, wref = _twin(WhisperEncoder, small_whisper(), attn_impl="reference")
    mel = torch.randn(2, 16, 50)
    wmask = torch.arange(50)[None] < torch.tensor([[50], [21]])
    for msk in (None, wmask):
        torch.testing.assert_close(wfast(mel, msk).features, wref(mel, msk).features, rtol=0, atol=1e-5)


def test_ast_padded_batch_equals_each_item_alone():
    cfg = small_ast(placement="houlsby", adapter_kind="soft", n_experts=3, slots_per_expert=2, n_classes=5)
    model = randomize_adapters(AST(cfg)).eval()
    lengths = [96, 57, 26, 16]  # 9, 5, 2 and 1 time patches
    items = [torch.randn(1, n, 32) for n in lengths]
    batch = torch.randn(4, 96, 32) * 50  # junk in the padding
    for i, it in enumerate(items):
        batch[i, :lengths[i]] = it[0]
    mask = torch.arange(96)[None] < torch.tensor(lengths)[:, None]
    out = model(batch, mask)
    assert out.mask.sum(1).tolist() == [2 + 2 * ((n - 16) // 10 + 1) for n in lengths]  # Fp = (32-16)//10+1 = 2
    for i, it in enumerate(items):
        alone = model(it)
        tp = (lengths[i] - 16) // 10 + 1
        tokens = out.tokens[i][out.mask[i]]
        torch.testing.assert_close(tokens, alone.tokens[0], rtol=0, atol=1e-5)
        for name in ("pooled_cls", "pooled_mean", "logits"):
            torch.testing.assert_close(getattr(out, name)[i], getattr(alone, name)[0], rtol=0, atol=1e-5)
        assert (out.tokens[i][~out.mask[i]] == 0).all()
        assert alone.tokens.shape[1] == 2 + 2 * tp
    # and the mask matters: without it the padding changes the real tokens
    assert not torch.allclose(model(batch).tokens[1, :2], out.tokens[1, :2], atol=1e-3)


def test_whisper_padded_batch_equals_each_item_alone():
    cfg = small_whisper(placement="pfeiffer", adapter_kind="dense", n_experts=3)
    model = randomize_adapters(WhisperEncoder(cfg)).eval()
    lengths = [60, 33, 8, 1]
    items = [torch.randn(1, 16, n) for n in lengths]
    batch = torch.randn(4, 16, 60) * 50
    for i, it in enumerate(items):
        batch[i, :, :lengths[i]] = it[0]
    mask = torch.arange(60)[None] < torch.tensor(lengths)[:, None]
    out = model(batch, mask)
    assert out.mask.sum(1).tolist() == [(n - 1) // 2 + 1 for n in lengths]
    for i, it in enumerate(items):
        alone = model(it).features[0]
        torch.testing.assert_close(out.features[i, :alone.shape[0]], alone, rtol=0, atol=1e-5)
        assert (out.features[i, alone.shape[0]:] == 0).all()
    assert not torch.allclose(model(batch).features[1, :5], out.features[1, :5], atol=1e-3)


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("kind", ["single", "dense", "soft"])
def test_fresh_adapters_leave_the_encoders_unchanged(kind, placement):
    adapters = dict(placement=placement, adapter_kind=kind, n_experts=3)
    cfg = small_ast(n_layers=1, max_length=48)
    base = AST(cfg).eval()
    adapted = AST(replace(cfg, **adapters)).eval()
    missing, unexpected = adapted.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".adapters." in k for k in missing)
    x = torch.randn(2, 48, 32)
    mask = torch.arange(48)[None] < torch.tensor([[48], [30]])
    assert torch.equal(adapted(x, mask).tokens, base(x, mask).tokens)
    randomize_adapters(adapted)  # and the check can fail: trained adapters change the output
    assert not torch.allclose(adapted(x, mask).tokens, base(x, mask).tokens)
    wcfg = small_whisper(n_layers=1)
    wbase = WhisperEncoder(wcfg).eval()
    wadapted = WhisperEncoder(replace(wcfg, **adapters)).eval()
    wadapted.load_state_dict(wbase.state_dict(), strict=False)
    mel = torch.randn(2, 16, 20)
    assert torch.equal(wadapted(mel).features, wbase(mel).features)


def test_mark_trainable_finds_norms_head_and_mixtures():
    model = AST(small_ast(placement="pfeiffer", adapter_kind="soft", n_classes=3))
    names = mark_trainable(model)
    expected = {k for k, _ in model.named_parameters()
                if ".adapters." in k or re.fullmatch(r"blocks\.\d\.norm1\..*|norm\..*|head\..*", k)}
    assert set(names) == expected
    assert "blocks.0.norm2.weight" not in names and "pos_embed" not in names


def test_adapter_info_is_returned_per_block():
    model = AST(small_ast(placement="houlsby", adapter_kind="soft", n_experts=3))
    info = model(torch.randn(1, 48, 32)).adapter_info
    assert len(info) == 2 and set(info[0]) == {"attn", "ffn"}
    assert info[0]["attn"]["dispatch"].shape == (1, 2 + 2 * 4, 3)  # m = 2 + Fp*Tp tokens, n*p = 3 slots


def test_presets_have_the_published_sizes():
    base = ASTConfig.base()
    assert base.grid == (12, 101) and base.n_tokens == 1214
    with torch.device("meta"):
        n = sum(p.numel() for p in AST(base).parameters())
    # 12 blocks x (4 d^2 + 2 d d_ff + 9 d + d_ff) + patch conv 256 d + d + 2 d + 1214 d + final norm 2 d
    d, ff = 768, 3072
    assert n == 12 * (4 * d * d + 2 * d * ff + 9 * d + ff) + 257 * d + 2 * d + 1214 * d + 2 * d
    assert ASTConfig.base(placement="pfeiffer").r == 6  # the paper's r = d / 128
    v3 = WhisperEncoderConfig.whisper("large-v3")
    assert (v3.d, v3.n_layers, v3.n_heads, v3.n_mels, v3.d_ff) == (1280, 32, 20, 128, 5120)
    assert WhisperEncoderConfig.whisper("tiny").d == 384 and WhisperEncoderConfig.tiny().d == 64


def test_sinusoids_match_transformers():
    pytest.importorskip("transformers")
    from transformers.models.whisper.modeling_whisper import sinusoids
    torch.testing.assert_close(E.sinusoids(1500, 384), sinusoids(1500, 384), rtol=0, atol=0)


def test_resize_pos_embed_by_hand():
    pos = torch.arange(2 + 2 * 6, dtype=torch.float32).view(1, -1, 1)  # grid values 2..13
    crop = E.resize_pos_embed(pos, (2, 6), (2, 3))  # middle columns 6//2 - 3//2 = 2 .. 4
    assert crop.flatten().tolist() == [0, 1, 4, 5, 6, 10, 11, 12]
    grow = E.resize_pos_embed(pos, (2, 6), (2, 12))
    assert grow[0, :2].flatten().tolist() == [0, 1] and grow.shape == (1, 26, 1)
    # bilinear, align_corners=False, doubling: out[j] samples src at (j + 0.5) / 2 - 0.5
    row = [2 + min(max((j + 0.5) / 2 - 0.5, 0), 5) for j in range(12)]
    torch.testing.assert_close(grow[0, 2:14, 0], torch.tensor(row), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Against transformers' models: random small checkpoints saved to files, loaded with our loaders

def _hf_ast(max_length=64, classifier=False, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 max_length=max_length, num_mel_bins=32, num_labels=5)
    model = (transformers.ASTForAudioClassification if classifier else transformers.ASTModel)(cfg).eval()
    with torch.no_grad():  # transformers initialises these to zero; random values test their wiring
        emb = (model.audio_spectrogram_transformer if classifier else model).embeddings
        for prm in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            prm.normal_()
    return model


@pytest.mark.parametrize("impl", E.ATTN_IMPLS)
def test_ast_matches_transformers_in_both_key_formats(tmp_path, impl):
    """state_dict() (transformers>=5 names) saved with torch.save, and save_pretrained (the Hub's
    transformers<5 names, safetensors + config.json): same outputs to 1e-5 in float32."""
    pytest.importorskip("safetensors")
    hf = _hf_ast()
    torch.save(hf.state_dict(), tmp_path / "ast.pt")
    hf.save_pretrained(tmp_path / "hub")
    x = torch.randn(3, 64, 32)
    with torch.no_grad():
        ref = hf(x)
    ours_pt, rep_pt = load_ast(tmp_path / "ast.pt", n_heads=4, num_mel_bins=32, max_length=64, attn_impl=impl)
    ours_hub, rep_hub = load_ast(tmp_path / "hub", attn_impl=impl)  # everything else from config.json
    assert "transformers>=5" in rep_pt.key_format and "transformers<5" in rep_hub.key_format
    assert rep_pt.n_loaded == rep_hub.n_loaded == len(hf.state_dict())
    for model in (ours_pt, ours_hub):
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out.tokens, ref.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.pooled_cls, ref.pooler_output, rtol=0, atol=1e-5)


def test_ast_classifier_logits_match_transformers(tmp_path):
    pytest.importorskip("safetensors")
    hf = _hf_ast(classifier=True)
    hf.save_pretrained(tmp_path / "hub")
    model, report = load_ast(tmp_path / "hub")
    assert (model.cfg.n_classes, model.cfg.head_pool, model.cfg.head_norm) == (5, "cls_dist", True)
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, rtol=0, atol=1e-5)
    fresh, report = load_ast(tmp_path / "hub", n_classes=3)  # a new task: the classifier is skipped, counted
    assert list(report.skipped.values()) == [4] and len(report.fresh) == 2 and fresh.cfg.n_classes == 3


@pytest.mark.parametrize("method,target_len,ref_grid", [
    ("ast", 100, "interpolate"),  # 5 -> 9 time patches: bilinear
    ("ast", 40, "crop"),  # 5 -> 3: the middle columns 1..3
    ("bilinear", 40, "interpolate"),
])
def test_ast_position_resize_matches_transformers(tmp_path, method, target_len, ref_grid):
    """transformers has no positional resizing: ASTModel builds its grid from config.max_length.
    The independent comparison is therefore: checkpoint A made with max_length 64 (2 x 5 patches),
    loaded by us with max_length=target_len; reference B = a transformers ASTModel with
    max_length=target_len holding A's weights, with position embeddings resized here by the
    AST authors' rule (cut the middle when shrinking, torch bilinear interpolation when growing),
    written independently of encoder.resize_pos_embed. Same outputs on target_len-frame input."""
    transformers = pytest.importorskip("transformers")
    F = torch.nn.functional
    a = _hf_ast(max_length=64)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b = _hf_ast(max_length=target_len, seed=1)
    tp = (target_len - 16) // 10 + 1
    sd = dict(a.state_dict())
    pos = sd["embeddings.position_embeddings"]  # (1, 2 + 2*5, 32)
    img = pos[0, 2:].T.reshape(1, 32, 2, 5)  # (1, d, Fp, Tp), token 2 + f*Tp + t
    if ref_grid == "crop":
        img = img[..., 5 // 2 - tp // 2: 5 // 2 - tp // 2 + tp]
    else:
        img = F.interpolate(img, size=(2, tp), mode="bilinear", align_corners=False)
    sd["embeddings.position_embeddings"] = torch.cat([pos[:, :2], img.reshape(32, 2 * tp).T[None]], dim=1)
    b.load_state_dict(sd)
    ours, report = load_ast(tmp_path / "a.pt", n_heads=4, num_mel_bins=32, max_length=target_len, pos_resize=method)
    assert "resized from the checkpoint's 2 x 5 patch grid to 2 x %d" % tp in str(report)
    x = torch.randn(2, target_len, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).tokens, b(x).last_hidden_state, rtol=0, atol=1e-5)
        # and the check can fail: the other rule (bilinear for a crop, nearest for an interpolation) differs
        alt = pos[0, 2:].T.reshape(1, 32, 2, 5)
        alt = F.interpolate(alt, size=(2, tp), mode="bilinear" if ref_grid == "crop" else "nearest")
        sd["embeddings.position_embeddings"] = torch.cat([pos[:, :2], alt.reshape(32, 2 * tp).T[None]], dim=1)
        b.load_state_dict(sd)
        assert (ours(x).tokens - b(x).last_hidden_state).abs().max() > 1e-3


def _hf_whisper(full=True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=20,
                                     max_target_positions=20, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1)
    return (transformers.WhisperForConditionalGeneration if full else transformers.WhisperModel)(cfg).eval()


@pytest.mark.parametrize("impl", E.ATTN_IMPLS)
def test_whisper_encoder_matches_transformers(tmp_path, impl):
    pytest.importorskip("safetensors")
    hf = _hf_whisper()
    sd = hf.state_dict()
    torch.save(sd, tmp_path / "whisper.bin")
    hf.save_pretrained(tmp_path / "hub")
    mel = torch.randn(2, 16, 40)  # transformers requires 2 x max_source_positions frames
    with torch.no_grad():
        ref = hf.model.encoder(mel).last_hidden_state
    n_decoder = sum(k.startswith("model.decoder.") for k in sd)
    bare = {k[len("model.encoder."):]: v for k, v in sd.items() if k.startswith("model.encoder.")}
    for src, kw in ((tmp_path / "whisper.bin", dict(n_heads=4)), (tmp_path / "hub", {}), (bare, dict(n_heads=4))):
        model, report = load_whisper_encoder(src, attn_impl=impl, **kw)
        assert report.n_loaded == len(bare)
        if src is not bare:
            assert report.skipped["decoder"] == n_decoder  # recognised and counted, not silently dropped
        with torch.no_grad():
            out = model(mel)
        torch.testing.assert_close(out.features, ref, rtol=0, atol=1e-5)


def test_whisper_model_state_dict_matches_transformers(tmp_path):
    hf = _hf_whisper(full=False)  # WhisperModel: "encoder." / "decoder."
    model, report = load_whisper_encoder(hf.state_dict(), n_heads=4)
    assert report.skipped == {"decoder": sum(k.startswith("decoder.") for k in hf.state_dict())}
    mel = torch.randn(1, 16, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(mel).features, hf.encoder(mel).last_hidden_state, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Loader errors: nothing silently ignored

def _ast_sd():
    return dict(_hf_ast().state_dict())


def test_loader_reports_missing_unexpected_and_wrong_shape_by_name():
    sd = _ast_sd()
    del sd["layers.1.mlp.fc2.bias"]
    sd["layers.0.attention.extra.weight"] = torch.zeros(3)
    sd["layers.1.mlp.fc1.weight"] = torch.zeros(65, 32)  # (d_ff is read from layer 0)
    with pytest.raises(ValueError) as err:
        load_ast(sd, n_heads=4, num_mel_bins=32)
    msg = str(err.value)
    assert "(transformers>=5 names" in msg and "1 missing from the checkpoint:\n    blocks.1.mlp.fc2.bias\n" in msg
    assert "1 unexpected in the checkpoint" in msg and "layers.0.attention.extra.weight" in msg
    assert "wrong shape" in msg and "layers.1.mlp.fc1.weight: checkpoint (65, 32) vs model (64, 32)" in msg


def test_whisper_loader_rejects_unknown_groups_and_biased_keys():
    sd = dict(_hf_whisper().state_dict())
    sd["some_other_head.weight"] = torch.zeros(2)
    sd["model.encoder.layers.0.self_attn.k_proj.bias"] = torch.zeros(32)  # Whisper's k has no bias
    with pytest.raises(ValueError, match="2 unexpected in the checkpoint") as err:
        load_whisper_encoder(sd, n_heads=4)
    msg = str(err.value)
    assert "some_other_head.weight" in msg and "model.encoder.layers.0.self_attn.k_proj.bias" in msg


@pytest.mark.parametrize("kwargs,match", [
    (dict(), r"cannot infer the number of attention heads for width d = 32 .* pass n_heads="),
    (dict(n_heads=4, d=64), r"override d=64 conflicts with the checkpoint's d=32"),
    (dict(n_heads=4, num_mel_bin=32), r"unknown override 'num_mel_bin' .* did you mean 'num_mel_bins'"),
    (dict(n_heads=4), r"not a multiple of 12 frequency patches .*128 mel bins"),
])
def test_loader_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_ast(_ast_sd(), **kwargs)


def test_loading_the_wrong_kind_says_which_loader():
    with pytest.raises(ValueError, match="look like Whisper tensors: use load_whisper_encoder"):
        load_ast(_hf_whisper().state_dict())
    with pytest.raises(ValueError, match="look like AST tensors: use load_ast"):
        load_whisper_encoder(_ast_sd())


def test_safetensors_missing_gives_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    _hf_ast().save_pretrained(tmp_path / "hub")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_ast(tmp_path / "hub")


def test_report_says_what_was_loaded(tmp_path):
    torch.save(_hf_whisper().state_dict(), tmp_path / "w.pt")
    _, report = load_whisper_encoder(str(tmp_path / "w.pt"), n_heads=4)
    out = str(report)
    assert "WhisperEncoder loaded from" in out and "37 loaded" in out
    assert f"{report.skipped['decoder']} tensors of the decoder" in out
    assert "skipped    : 1 tensors of the proj_out" in out


def test_report_of_a_saved_ast_folder(tmp_path):
    """A save_pretrained AST classifier folder: config.json gives the heads, the head is kept."""
    pytest.importorskip("safetensors")
    _hf_ast(classifier=True).save_pretrained(tmp_path / "hub")
    model, report = load_ast(tmp_path / "hub")
    assert report.model == "AST" and report.config.n_classes == 5
    assert report.n_loaded == 2 * 16 + 5 + 2 + 4  # per layer 8 attention + 4 MLP + 4 norm; embeddings; norm; head
    assert "AST loaded from" in str(report) and "n_heads = 4 from config.json" in str(report)
    assert model(torch.zeros(1, 16, 32))[0].shape == (1, 4, 32)  # 16 frames: 2 + 2 x 1 patches


# ----------------------------------------------------------------------------------------------
# The file's dependencies

def test_imports_only_torch_stdlib_and_soft_moa():
    """Copyable alone: no hf.py, no optional packages, not even lazily."""
    path = os.path.join(ROOT, "encoder.py")
    assert imported_packages(path) == {"torch", "soft_moa"}
