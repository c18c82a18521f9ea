"""synth.py and data.py against signal facts and independent references: determinism across
processes, split and speaker hold-out, label independence (chi-square, checked against table
quantiles), F0 / pitch / event statistics measured by estimators written here, the Klatt recursion,
WAV bytes built by hand and by Python's `wave`, sines through the resampler, each real-data layout
on a tiny fixture, and each bad-file case."""
import hashlib
import math
import os
import struct
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

import data as D
import synth as S
from importscan import imported_packages
from synth import CorpusConfig, SyntheticCorpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


def digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Determinism


HASH_SNIPPET = """
import hashlib, synth
c = synth.SyntheticCorpus(synth.CorpusConfig.tiny(n_clips=40))
for j in (7, 3, 0, 12):
    print(hashlib.sha256(c[j].audio.tobytes()).hexdigest())
"""


def test_clip_is_a_pure_function_of_seed_and_index_across_processes():
    c = SyntheticCorpus(CorpusConfig.tiny(n_clips=40))
    here = [digest(c[j].audio) for j in (7, 3, 0, 12)]
    # order of generation and a fresh corpus object change nothing
    c2 = SyntheticCorpus(CorpusConfig.tiny(n_clips=40))
    assert [digest(c2[j].audio) for j in (12, 0, 3, 7)][::-1] == here
    # a fresh interpreter (other process, other global RNG state) gives the same bytes
    np.random.seed(123)
    torch.manual_seed(123)
    out = subprocess.run([sys.executable, "-c", HASH_SNIPPET], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "7"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == here
    # the clips differ from each other and from another seed's
    assert len(set(here)) == 4
    other = SyntheticCorpus(CorpusConfig.tiny(n_clips=40, seed=1))
    assert digest(other[0].audio) != here[2]


def test_dataloader_workers_do_not_change_the_data():
    view = D.InstructionDataset(SyntheticCorpus(CorpusConfig.speech_commands_like(n_clips=60), "train"))
    batches = {}
    for w in (0, 2):
        loader = torch.utils.data.DataLoader(view, batch_size=8, num_workers=w, collate_fn=D.collate)
        batches[w] = [(b["audio"], b["answer_index"]) for b in loader]
    assert len(batches[0]) == len(batches[2]) > 1
    for (a0, t0), (a2, t2) in zip(batches[0], batches[2]):
        assert torch.equal(a0, a2) and torch.equal(t0, t2)


# ----------------------------------------------------------------------------------------------
# Splits and speakers


def test_splits_are_disjoint_and_test_speakers_held_out():
    cfg = CorpusConfig.tiny(n_clips=600)
    parts = {s: SyntheticCorpus(cfg, s) for s in D.SPLITS}
    idx = {s: set(p.indices) for s, p in parts.items()}
    assert not (idx["train"] & idx["valid"] or idx["train"] & idx["test"] or idx["valid"] & idx["test"])
    assert set.union(*idx.values()) == set(range(600))
    speakers, cells = {}, {}
    for s, p in parts.items():
        labs = [p.labels(j) for j in range(len(p))]
        speakers[s] = {l["speaker"] for l in labs if "speaker" in l}
        cells[s] = {(l["pitch_group"], l["tract_group"]) for l in labs if "speaker" in l}
    assert not (speakers["train"] & speakers["test"] or speakers["train"] & speakers["valid"]
                or speakers["valid"] & speakers["test"])
    for s in D.SPLITS:                           # every pitch x tract cell is in every split
        assert len(cells[s]) == 9, (s, cells[s])
    # the clips themselves differ across splits (sampled)
    hashes = {s: {digest(parts[s][j].audio) for j in range(12)} for s in D.SPLITS}
    assert not (hashes["train"] & hashes["test"] or hashes["train"] & hashes["valid"])


def test_folds_partition_the_benchmark_and_are_class_balanced():
    cfg = CorpusConfig.esc50_like(n_clips=500)
    folds = [SyntheticCorpus(cfg, f"fold{k}") for k in range(1, 6)]
    assert sorted(i for f in folds for i in f.indices) == list(range(500))
    for f in folds:
        counts = np.unique([f.labels(j)["event"] for j in range(len(f))], return_counts=True)[1]
        assert len(counts) == 50 and counts.min() == counts.max() == 2
    with pytest.raises(ValueError, match="unknown split 'test'.*fold1"):
        SyntheticCorpus(cfg, "test")


# ----------------------------------------------------------------------------------------------
# Label independence: chi-square test of independence, p-value by Wilson-Hilferty


def chi2_statistic(a, b):
    """Pearson's chi-square statistic of the contingency table of two label lists, and its df."""
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    table = np.zeros((len(ua), len(ub)))
    np.add.at(table, (ia, ib), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum()), (len(ua) - 1) * (len(ub) - 1)


def chi2_sf(x, k):
    """P(chi2_k > x) by the Wilson-Hilferty cube-root normal approximation."""
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi2_pvalue(a, b):
    return chi2_sf(*chi2_statistic(a, b))


def test_chi2_helpers_match_tables_and_a_hand_computed_table():
    # upper quantiles of chi-square from standard tables: (df, x, P(chi2_df > x))
    for k, q, p in ((1, 3.841, 0.05), (10, 18.307, 0.05), (30, 43.773, 0.05), (1, 6.635, 0.01),
                    (10, 23.209, 0.01), (30, 50.892, 0.01), (10, 29.588, 0.001), (30, 59.703, 0.001)):
        assert abs(chi2_sf(q, k) / p - 1) < 0.2, (k, q, chi2_sf(q, k))
    # 2 x 2 table [[10, 20], [30, 40]]: n (ad - bc)^2 / (row and column sums) = 100 * 200^2 / (30 * 70 * 40 * 60)
    a = ["x"] * 30 + ["y"] * 70
    b = ["u"] * 10 + ["v"] * 20 + ["u"] * 30 + ["v"] * 40
    x, k = chi2_statistic(a, b)
    assert k == 1 and abs(x - 100 * 200 ** 2 / (30 * 70 * 40 * 60)) < 1e-12


def test_semantic_and_paralinguistic_labels_are_independent():
    src = SyntheticCorpus(CorpusConfig.tiny(n_clips=6000, command_prob=0.5, clip_seconds=2.5))
    labs = [src.labels(j) for j in range(len(src))]
    speech = [l for l in labs if "speaker" in l]
    words = [l for l in speech if "word" in l]
    cmds = [l for l in speech if "intent" in l]
    assert len(words) > 1000 and len(cmds) > 1000
    para = ("pitch_group", "tract_group", "emotion", "rate", "speaker")
    for group, sem in ((words, "word"), (cmds, "intent"), (cmds, "action")):
        for p in para:
            pv = chi2_pvalue([l[sem] for l in group], [l[p] for l in group])
            assert pv > 1e-3, (sem, p, pv)
    for p, q in (("pitch_group", "emotion"), ("tract_group", "rate"), ("emotion", "rate")):
        assert chi2_pvalue([l[p] for l in speech], [l[q] for l in speech]) > 1e-3
    # the test has power: dependent pairs are caught
    assert chi2_pvalue([l["speaker"] for l in speech], [l["pitch_group"] for l in speech]) < 1e-12
    rng = np.random.default_rng(0)
    leaky = [l["word"] if rng.random() < 0.15 else "x" for l in words]   # 15% leak of the word
    assert chi2_pvalue([l["word"] for l in words], leaky) < 1e-6


# ----------------------------------------------------------------------------------------------
# Acoustic sanity against signal facts, with estimators written here


def yin_f0(x, sr=SR, fmin=70, fmax=450, frame=0.04, hop=0.01, thresh=0.3):
    """Per-frame F0 (Hz) of loud periodic frames: lag of the minimum of YIN's cumulative-mean-
    normalised difference (de Cheveigne & Kawahara 2002), preferring half that lag when nearly
    as good (octave check), kept when the minimum is below `thresh`."""
    L, H, tmax = int(frame * sr), int(hop * sr), int(sr / fmin)
    starts = range(0, len(x) - L - tmax, H)
    energy = np.array([np.sum(x[i:i + L] ** 2) for i in starts])
    out = []
    for e, i in zip(energy, starts):
        if e < 0.1 * energy.max():
            continue
        a = x[i:i + L + tmax]
        d = np.array([np.sum((a[:L] - a[t:t + L]) ** 2) for t in range(1, tmax + 1)])
        cmnd = d * np.arange(1, tmax + 1) / np.maximum(np.cumsum(d), 1e-12)   # index t = lag t+1
        lo = int(sr / fmax) - 1
        t = lo + int(np.argmin(cmnd[lo:]))
        half = (t + 1) // 2 - 1
        if half - 2 >= lo:
            th = half - 2 + int(np.argmin(cmnd[half - 2:half + 3]))
            if cmnd[th] < cmnd[t] + 0.1:
                t = th
        if cmnd[t] < thresh:
            out.append(sr / (t + 1))
    return np.array(out)


SONORANT_WORDS = {"no", "one", "nine", "wow", "learn", "marvin", "follow", "zero", "down", "right",
                  "yes", "go", "four", "seven", "bird"}


def test_estimated_f0_of_speech_lies_in_its_pitch_group_range():
    # words with >= 2 voiced phonemes, so a frame-based F0 estimate has frames to work with
    src = SyntheticCorpus(CorpusConfig.speech_commands_like(n_clips=400, floor_snr_db=(30.0, 30.0)))
    seen, groups = 0, set()
    for j in range(len(src)):
        lab = src.labels(j)
        if lab["word"] not in SONORANT_WORDS:
            continue
        f0 = np.median(yin_f0(src[j].audio.astype(np.float64)))
        lo, hi = S.PITCH_GROUPS[lab["pitch_group"]][1]
        assert lo <= f0 < hi, (j, lab, f0)
        seen += 1
        groups.add((lab["pitch_group"], lab["emotion"]))
        if seen == 30:
            break
    assert seen == 30 and len({g for g, _ in groups}) == 3 and len({e for _, e in groups}) == 4


def test_segment_crossfade_is_a_partition_of_unity():
    rng = np.random.default_rng(0)
    for _ in range(50):
        durs = rng.uniform(3, 400, rng.integers(1, 12))             # bursts shorter than the ramp
        bounds = np.concatenate([[0.0], np.cumsum(durs)])
        total = np.zeros(int(math.ceil(bounds[-1])))
        weights = S.crossfade(bounds, 192.0)
        for (lo, hi, w), a, b in zip(weights, bounds[:-1], bounds[1:]):
            total[lo:hi] += w
            mid = int((a + b) / 2)
            assert lo <= mid < hi and w[mid - lo] > 0.49              # each segment owns its middle
        assert np.allclose(total, 1.0)


def test_glottal_source_has_one_pulse_per_period():
    x = S.glottal_source(np.full(8000, 200.0), np.random.default_rng(0), jitter=0.0, shimmer=0.0)
    minima = np.nonzero((x < -0.5) & (x <= np.roll(x, 1)) & (x <= np.roll(x, -1)))[0]
    assert len(minima) == 100 - 1 or len(minima) == 100          # 0.5 s at 200 Hz
    assert np.allclose(np.diff(minima), 80, atol=1)                # period 80 samples
    assert abs(x.mean()) < 1e-3                                    # flow derivative: no DC


def klatt_reference(x, f, bw, sr=SR):
    """Sample-by-sample Klatt resonator y[n] = A x[n] + B y[n-1] + C y[n-2]."""
    C = -math.exp(-2 * math.pi * bw / sr)
    B = 2 * math.exp(-math.pi * bw / sr) * math.cos(2 * math.pi * f / sr)
    A = 1 - B - C
    y, y1, y2 = np.zeros(len(x)), 0.0, 0.0
    for n, v in enumerate(x):
        y[n] = A * v + B * y1 + C * y2
        y1, y2 = y[n], y1
    return y


def test_formant_cascade_equals_the_resonator_recursion():
    fm, bw = [500.0, 1500.0, 2500.0, 3550.0, 4500.0], [60.0, 90.0, 140.0, 200.0, 260.0]
    x = np.random.default_rng(0).standard_normal(600)
    ref = x
    for f, b in zip(fm, bw):
        ref = klatt_reference(ref, f, b)
    fast = S._filter(x, lambda N: S.resonator_response(fm, bw, N), pad=1024)[:600]
    assert np.abs(fast - ref).max() < 1e-4 * np.abs(ref).max()


def test_fft_length_is_the_smallest_2_3_smooth_number():
    smooth = sorted(2 ** a * 3 ** b for a in range(20) for b in range(13) if 2 ** a * 3 ** b < 2 ** 20)
    for n in list(range(1, 3000)) + [44100, 160000, 500001]:
        assert S._fft_len(n) == next(m for m in smooth if m >= n), n


def spectrum(x):
    X = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    return np.fft.rfftfreq(len(x), 1 / SR), X


def peak_hz(x, lo=20.0):
    f, X = spectrum(x)
    X[f < lo] = 0
    return float(f[np.argmax(X)])


def centroid(x):
    f, X = spectrum(x)
    return float((f * X).sum() / X.sum())


def flatness(x):
    f, X = spectrum(x)
    X = X[(f > 30) & (f < 7500)] + 1e-20
    return float(np.exp(np.mean(np.log(X))) / np.mean(X))


def crest(x):
    return float(np.abs(x).max() / np.sqrt(np.mean(x ** 2)))


def frame_energy(x, frame):
    n = len(x) // frame
    return (x[:n * frame].reshape(n, frame) ** 2).mean(1)


def envelope_rate(x, lo=3.0, hi=60.0):
    """Frequency of the strongest modulation of the 2.5 ms energy envelope in [lo, hi] Hz."""
    e = frame_energy(x, 40)
    e = e - e.mean()
    E = np.abs(np.fft.rfft(e * np.hanning(len(e)), 8 * len(e)))
    f = np.fft.rfftfreq(8 * len(e), 40 / SR)
    m = (f >= lo) & (f <= hi)
    return float(f[m][np.argmax(E[m])])


def loud_fraction(x):
    e = frame_energy(x, 160)
    return float((e > 0.5 * e.max()).mean())


def peak_track_ratio(x):
    """95th / 5th percentile of the per-frame (32 ms) spectral peak frequency."""
    pk = [np.argmax(np.abs(np.fft.rfft(x[i:i + 512] * np.hanning(512)))[2:]) + 2
          for i in range(0, len(x) - 512, 256)]
    return float(np.percentile(pk, 95) / np.percentile(pk, 5))


@pytest.mark.parametrize("instrument", list(S.INSTRUMENTS))
def test_a_notes_spectral_peak_is_its_pitch(instrument):
    for m in (48, 57, 66, 75):
        x = S.render_music(instrument, [m], SR, np.random.default_rng(m))
        assert abs(peak_hz(x) / (440 * 2 ** ((m - 69) / 12)) - 1) < 0.015, (instrument, m, peak_hz(x))


def test_music_clips_in_the_corpus_carry_their_pitch():
    src = SyntheticCorpus(CorpusConfig(kind="music", n_clips=200, tilt_db=0.0))
    n = 0
    for j in range(len(src)):
        if src.labels(j)["chord"] != "note":
            continue
        clip = src[j]
        root = src.spec(src.indices[j])["parts"][0][2]["root"]
        assert abs(peak_hz(clip.audio) / (440 * 2 ** ((root - 69) / 12)) - 1) < 0.015
        n += 1
    assert n >= 8


def test_event_families_differ_in_their_documented_statistic():
    stats = {}
    for fam, (_, grid) in S.EVENT_FAMILIES.items():
        for v in (0, 4):
            key = grid[v]
            x = S.render_event(fam, key, SR, np.random.default_rng(10 * v + 1))
            stats[fam, v] = x
            if fam == "hum":
                h = peak_hz(x) / key
                assert abs(h - round(h)) < 0.02 and flatness(x) < 0.1
            elif fam in ("engine", "jackhammer"):
                assert abs(envelope_rate(x) / key - 1) < 0.1, (fam, key, envelope_rate(x))
                assert (centroid(x) < 1000) if fam == "engine" else (centroid(x) > 1500)
            elif fam == "drill":
                assert abs(peak_hz(x) / key - 1) < 0.03
            elif fam == "siren":
                assert peak_track_ratio(x) >= 1.4
            elif fam == "alarm":
                assert 0.3 <= loud_fraction(x) <= 0.7 and abs(peak_hz(x) / key - 1) < 0.02
            elif fam == "bark":
                assert loud_fraction(x) <= 0.6
            elif fam == "impact":
                assert crest(x) >= 6
            elif fam == "rain":
                assert centroid(x) >= 2000
            elif fam == "wind":
                assert centroid(x) < 1000 and crest(x) < 6
    # the statistics separate families that another family would fail
    assert peak_track_ratio(stats["hum", 0]) < 1.1 < 1.4 <= peak_track_ratio(stats["siren", 0])
    assert crest(stats["wind", 4]) < 6 <= crest(stats["impact", 0])
    assert centroid(stats["wind", 4]) < 1000 < 2000 <= centroid(stats["rain", 0])


# ----------------------------------------------------------------------------------------------
# Views, collate, instructions


def test_views_collate_to_padded_tensors_with_lengths_and_masks():
    items = [dict(audio=torch.ones(5), target=1, name="a"), dict(audio=torch.ones(3) * 2, target=0, name="b")]
    b = D.collate(items)
    assert b["audio"].shape == (2, 5) and b["audio"].dtype == torch.float32
    assert b["lengths"].tolist() == [5, 3] and b["target"].tolist() == [1, 0] and b["name"] == ["a", "b"]
    assert b["mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert b["audio"][1, 3:].eq(0).all() and b["audio"][1, :3].eq(2).all()
    src = SyntheticCorpus(CorpusConfig.speech_commands_like(n_clips=100, clip_seconds=1.5), "test")
    ds = D.InstructionDataset(src, all_tasks=True)
    it = ds[[t for _, t, _ in ds.items].index("word")]
    assert it["audio"].shape == (24000,) and it["choices"][it["answer_index"]] == src[it["index"]].labels["word"]
    assert len(it["choices"]) == 35


def test_instruction_tasks_have_closed_answer_sets_and_groups():
    src = SyntheticCorpus(CorpusConfig.tiny(n_clips=300, command_prob=0.3, clip_seconds=2.5), "train")
    ds = D.InstructionDataset(src)
    assert len(ds) == len(src)                        # every synthetic clip has some task
    seen = {}
    for i in range(len(ds)):
        j, t, q = ds.items[i]
        labels = src.labels(j)
        task = seen[t] = D.TASKS[t]
        assert task.group in ("semantic", "paralinguistic") and q in task.questions
        assert labels[task.label] in ds.choices[t]
    assert set(seen) == set(D.TASKS)                  # all 11 tasks occur
    it = ds[0]
    assert it["answer"] == it["choices"][it["answer_index"]]
    assert all(c in it["prompt"] for c in it["choices"]) and it["question"] in it["prompt"]
    assert {D.TASKS[t].group for t in D.TASKS if D.TASKS[t].label in ("pitch_group", "emotion", "rate", "tract_group")} \
        == {"paralinguistic"}
    again = D.InstructionDataset(src)
    assert again.items == ds.items                    # deterministic task and template choice
    every = D.InstructionDataset(src, all_tasks=True)  # each task a clip has a label for, clip-major
    assert [(j, t) for j, t, _ in every.items] == [(j, t) for j in range(len(src)) for t in D.TASKS
                                                   if D.TASKS[t].label in src.labels(j)]


def test_audioset_like_multilabel_targets_follow_the_sources():
    src = SyntheticCorpus(CorpusConfig.audioset_like(n_clips=60))
    multi = 0
    for j in range(30):
        labels = src.labels(j)
        tags = labels["tags"].split(",")
        assert D.audioset_tags(labels) == tags and set(tags) <= set(D.AUDIOSET_TAGS)
        assert ("speech" in tags) == ("word" in labels) and ("music" in tags) == ("instrument" in labels)
        multi += len(tags) > 2
    assert multi > 3


def test_mixtures_hold_speech_and_background_labels_and_clip_length_is_configurable():
    src = SyntheticCorpus(CorpusConfig.tiny(n_clips=80, clip_seconds=1.5, domain_weights=(0, 0, 0, 1)))
    for j in range(4):
        clip = src[j]
        assert clip.domain == "mixture" and clip.audio.shape == (24000,) and clip.audio.dtype == np.float32
        assert "word" in clip.labels and clip.labels["background"] in ("music", "environment")
        assert ("instrument" in clip.labels) == (clip.labels["background"] == "music")
        assert np.abs(clip.audio).max() <= 0.99


def test_clip_level_is_the_configured_level_plus_gain_and_vocal_effort():
    src = SyntheticCorpus(CorpusConfig.speech_commands_like(n_clips=200), "train")
    by_emotion = {}
    for j in range(60):
        clip, gain_db = src[j], src.spec(src.indices[j])["gain_db"]
        if np.abs(clip.audio).max() >= np.float32(0.99):       # scaled down into range
            continue
        effort = S.EMOTIONS[clip.labels["emotion"]][2]
        expect = src.cfg.level_dbfs + gain_db + effort
        got = 20 * math.log10(np.sqrt(np.mean(clip.audio.astype(np.float64) ** 2)))
        assert abs(got - expect) < 0.01, (clip.labels, got, expect)
        by_emotion.setdefault(clip.labels["emotion"], []).append(got - gain_db)
    assert np.mean(by_emotion["angry"]) - np.mean(by_emotion["sad"]) > 6     # +4 dB vs -3 dB


# ----------------------------------------------------------------------------------------------
# WAV I/O


def test_wav_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = np.clip(rng.uniform(-1, 1, (301, 2)), -1, 1 - 2 ** -7).astype(np.float32)
    x[0] = [-1.0, 0.5]
    p = tmp_path / "x.wav"
    D.write_wav(p, x, 22050)
    y, sr = D.read_wav(p)
    assert sr == 22050 and y.shape == (301, 2) and y.dtype == np.float32
    assert np.abs(y - x).max() <= 2 ** -16 + 1e-7                # half an LSB of 16-bit PCM
    mono = D.load_audio(p)                                    # mono mix-down + resample to 16 kHz
    assert mono.ndim == 1 and len(mono) == math.ceil(301 * 16000 / 22050)
    D.write_wav(p, x, SR)                                     # at 16 kHz: mix-down alone
    assert np.abs(D.load_audio(p) - x.mean(1)).max() <= 2 ** -15


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_written_by_the_wave_module_reads_back(tmp_path, width):
    # random sample bytes (extremes included), 2 channels, decoded here with int.from_bytes
    raw = bytearray(np.random.default_rng(width).integers(0, 256, 2 * 7 * width, dtype=np.uint8).tobytes())
    top, bottom = (b"\xff", b"\x00") if width == 1 else (b"\xff" * (width - 1) + b"\x7f", b"\x00" * (width - 1) + b"\x80")
    raw[:width], raw[width:2 * width] = top, bottom              # the largest and the smallest sample
    p = str(tmp_path / "w.wav")
    with wave.open(p, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(width)
        w.setframerate(8000)
        w.writeframes(bytes(raw))
    ints = [int.from_bytes(raw[i:i + width], "little", signed=width > 1) - (128 if width == 1 else 0)
            for i in range(0, len(raw), width)]
    y, sr = D.read_wav(p)
    assert sr == 8000 and y.shape == (7, 2)
    expect = (np.array(ints, dtype=np.float64) / 2 ** (8 * width - 1)).astype(np.float32)
    assert np.array_equal(y.reshape(-1), expect) and y[0, 0] == np.float32(1 - 2 ** (1 - 8 * width)) and y[0, 1] == -1


def test_pcm_we_write_is_read_by_the_wave_module(tmp_path):
    x = np.array([[0.0, -1.0], [0.5, 0.25], [-0.5, 1.0 - 2 ** -7], [1.5, -1.5]])   # the last clipped
    for audio in (x, x[:, 0]):
        p = tmp_path / "w16.wav"
        D.write_wav(p, audio, 11025)
        with wave.open(str(p), "rb") as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (audio.ndim, 2, 11025, 4)
            raw = w.readframes(4)
        ints = [int.from_bytes(raw[i:i + 2], "little", signed=True) for i in range(0, len(raw), 2)]
        assert ints == [round(v * 32768) if -1 <= v < 1 else (32767 if v > 0 else -32768) for v in audio.reshape(-1)]


def riff(chunks):
    body = b"WAVE" + b"".join(cid + struct.pack("<I", len(c)) + c + (b"\0" if len(c) % 2 else b"") for cid, c in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def extensible_fmt(ch, sr, bits, sub_tag):
    guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    align = ch * bits // 8
    return struct.pack("<HHIIHHHHI", 0xFFFE, ch, sr, sr * align, align, bits, 22, bits, 0) \
        + struct.pack("<H", sub_tag) + guid_tail


def test_wave_format_extensible_pcm24_and_float(tmp_path):
    # 24-bit PCM, stereo, written byte by byte
    vals = np.array([[0, -8388608], [8388607, 4194304]])
    raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in vals.flatten())
    p = tmp_path / "ext24.wav"
    p.write_bytes(riff([(b"fmt ", extensible_fmt(2, 48000, 24, 1)), (b"LIST", b"INFOjunk"), (b"data", raw)]))
    y, sr = D.read_wav(p)
    assert sr == 48000 and np.allclose(y, vals / 8388608.0, atol=0)
    # IEEE float 32 inside WAVE_FORMAT_EXTENSIBLE
    f = np.array([0.25, -0.5, 1.0], dtype="<f4")
    p = tmp_path / "extf.wav"
    p.write_bytes(riff([(b"fmt ", extensible_fmt(1, 16000, 32, 3)), (b"data", f.tobytes())]))
    assert np.array_equal(D.read_wav(p)[0][:, 0], f)


@pytest.mark.parametrize("bits", [32, 64])
def test_ieee_float_wav_with_a_fact_chunk(tmp_path, bits):
    x = np.array([[0.25, -0.5], [1.0, 1e-3], [-1.0, 0.0]], dtype=f"<f{bits // 8}")
    fmt = struct.pack("<HHIIHHH", 3, 2, 8000, 8000 * bits // 4, bits // 4, bits, 0)
    p = tmp_path / "f.wav"
    p.write_bytes(riff([(b"fmt ", fmt), (b"fact", struct.pack("<I", 3)), (b"data", x.tobytes())]))
    y, sr = D.read_wav(p)
    assert sr == 8000 and y.dtype == np.float32 and np.array_equal(y, x.astype(np.float32))


def bad_files(tmp_path):
    pcm = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    cases = {
        "text.wav": (b"this is not audio at all", "not a RIFF/WAVE"),
        "empty.wav": (b"", "empty"),
        "adpcm.wav": (riff([(b"fmt ", struct.pack("<HHIIHH", 2, 1, 16000, 8000, 256, 4)), (b"data", b"\0" * 256)]),
                      "unsupported encoding.*ADPCM"),
        "pcm12.wav": (riff([(b"fmt ", struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 12)), (b"data", b"\0" * 8)]),
                      "unsupported encoding"),
        "truncated.wav": (riff([(b"fmt ", pcm)]) + b"data" + struct.pack("<I", 1000) + b"\0" * 100, "truncated"),
        "halfframe.wav": (riff([(b"fmt ", pcm), (b"data", b"\0" * 5)]), "truncated"),
        "nodata.wav": (riff([(b"fmt ", pcm)]), "no data chunk"),
        "zero.wav": (riff([(b"fmt ", pcm), (b"data", b"")]), "empty"),
        "nan.wav": (riff([(b"fmt ", struct.pack("<HHIIHHH", 3, 1, 16000, 64000, 4, 32, 0)),
                          (b"data", np.array([0.1, np.nan, np.inf, 0.0], dtype="<f4").tobytes())]), "NaN or inf"),
    }
    paths = {}
    for name, (content, _) in cases.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(content)
    return cases, paths


def test_each_bad_file_gets_a_clear_error(tmp_path):
    cases, paths = bad_files(tmp_path)
    for name, (_, problem) in cases.items():
        with pytest.raises(ValueError, match=problem) as e:
            D.read_wav(paths[name])
        assert name in str(e.value), str(e.value)


def test_a_bad_file_raises_naming_it_when_read(tmp_path):
    root = tmp_path / "folders"
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    D.write_wav(root / "dog" / "good.wav", np.zeros(1600) + 0.1, 16000)
    (root / "cat" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    _, files = D.load_corpus(str(root), "event")
    assert len(files) == 2 and files[1].labels == {"event": "dog"}       # lazy: listing reads nothing
    with pytest.raises(ValueError, match="broken.wav"):
        files[0]


def test_optional_soundfile_path(tmp_path):
    try:
        import soundfile
    except ImportError:
        with pytest.raises(ImportError, match="soundfile"):
            D.load_audio(tmp_path / "x.flac")
        pytest.skip("soundfile not installed: only its clear ImportError is checked")
    x = np.sin(np.arange(8000) / 5.0) * 0.5
    soundfile.write(str(tmp_path / "x.flac"), x, 8000)
    y = D.load_audio(tmp_path / "x.flac")
    assert len(y) == 16000 and np.abs(y).max() < 0.52


# ----------------------------------------------------------------------------------------------
# Resampling on sines


def sine(f, sr, n, phase=0.3):
    return np.sin(2 * np.pi * f * np.arange(n) / sr + phase)


@pytest.mark.parametrize("sr_in", [44100, 48000, 22050, 11025, 8000])
def test_resampling_passband_error_and_alias_suppression(sr_in):
    n = sr_in // 2
    for f in (100.0, 1000.0, 3000.0, 6000.0):
        if f >= 0.4 * sr_in:
            continue
        y = D.resample(sine(f, sr_in, n), sr_in, SR)
        assert len(y) == math.ceil(n * SR / sr_in)
        ref = sine(f, SR, len(y))
        m = slice(400, len(y) - 400)                         # away from the zero-padded edges
        assert np.abs(y[m] - ref[m]).max() < 1e-4, (sr_in, f)    # passband error < -80 dB
    for f in (8600.0, 12000.0, 20000.0):                     # above the new Nyquist: must vanish
        if f >= sr_in / 2:
            continue
        y = D.resample(sine(f, sr_in, n), sr_in, SR)
        rms = np.sqrt(np.mean(y[400:-400] ** 2)) / math.sqrt(0.5)
        assert 20 * math.log10(rms + 1e-30) < -80, (sr_in, f)


def test_upsampling_suppresses_images_and_equal_rates_are_identity():
    y = D.resample(sine(3000, 8000, 8000), 8000, SR)
    f, X = spectrum(y[800:-800])
    image = X[np.argmin(np.abs(f - 5000))]                     # 8 kHz - 3 kHz
    assert 10 * math.log10(image / X.max()) < -80
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    assert np.array_equal(D.resample(x, SR, SR), x)


# ----------------------------------------------------------------------------------------------
# Real-data layouts on tiny fixtures


def tone(seconds=0.25, sr=16000, f=440.0, ch=1):
    x = 0.3 * sine(f, sr, int(seconds * sr))
    return np.stack([x] * ch, 1) if ch > 1 else x


def test_speech_commands_layout(tmp_path):
    root = tmp_path / "sc"
    for w, spk, k in (("yes", "aa11", 0), ("yes", "bb22", 0), ("no", "aa11", 1), ("no", "cc33", 0)):
        (root / w).mkdir(parents=True, exist_ok=True)
        D.write_wav(root / w / f"{spk}_nohash_{k}.wav", tone(sr=8000), 8000)
    (root / "_background_noise_").mkdir()
    D.write_wav(root / "_background_noise_" / "white_noise.wav", tone(1.0), 16000)
    (root / "validation_list.txt").write_text("no/cc33_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/bb22_nohash_0.wav\n")
    full = D.load_speech_commands(str(root))
    assert len(full) == 4 and full.classes("word") == ["no", "yes"]
    split = {os.path.basename(r.source): r.split for r in full.records}
    assert split == {"aa11_nohash_0.wav": "train", "bb22_nohash_0.wav": "test",
                     "aa11_nohash_1.wav": "train", "cc33_nohash_0.wav": "valid"}
    clip = full.select("test")[0]
    assert isinstance(clip, D.Clip) and clip.sample_rate == SR and len(clip.audio) == 4000
    assert clip.labels == {"word": "yes"} and clip.speaker == "bb22"
    train = full.select("train")
    assert len(train) == 2 and train.classes("word") == ["no", "yes"]        # the whole corpus' classes
    assert D.load_corpus(str(root), "word")[0] == "speechcommands"
    (root / "testing_list.txt").unlink()
    with pytest.raises(ValueError, match="testing_list.txt"):
        D.load_speech_commands(str(root))


def test_esc50_layout(tmp_path):
    root = tmp_path / "ESC-50"
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    rows = [("1-100-A-0.wav", 1, 0, "dog"), ("2-200-A-5.wav", 2, 5, "cat"), ("5-300-B-0.wav", 5, 0, "dog")]
    for fn, *_ in rows:
        D.write_wav(root / "audio" / fn, tone(sr=44100, ch=2), 44100)
    header = "filename,fold,target,category,esc10,src_file,take\n"
    (root / "meta" / "esc50.csv").write_text(header + "".join(f"{fn},{fo},{t},{c},True,100,A\n" for fn, fo, t, c in rows))
    full = D.load_esc50(str(root))
    assert [r.split for r in full.records] == ["fold1", "fold2", "fold5"]
    test, train = full.select("fold5"), full.select(["fold1", "fold2"])
    assert len(test) == 1 and len(train) == 2 and train.classes("event") == test.classes("event") == ["cat", "dog"]
    clip = test[0]
    assert clip.labels == {"event": "dog"} and clip.audio.shape == (4000,)      # stereo 44.1k -> mono 16k
    with pytest.raises(ValueError, match="no split 'fold3'"):
        full.select("fold3")
    (root / "meta" / "esc50.csv").write_text("filename,target,category\nx.wav,0,dog\n")
    with pytest.raises(ValueError, match=r"esc50.csv: missing column 'fold'"):
        D.load_esc50(str(root))


def test_urbansound8k_layout(tmp_path):
    root = tmp_path / "UrbanSound8K"
    (root / "metadata").mkdir(parents=True)
    rows = [("100032-3-0-0.wav", 100032, 5, 3, "dog_bark"), ("100263-2-0-117.wav", 100263, 10, 2, "children_playing")]
    for fn, fs, fold, cid, cls in rows:
        (root / "audio" / f"fold{fold}").mkdir(parents=True, exist_ok=True)
        D.write_wav(root / "audio" / f"fold{fold}" / fn, tone(sr=22050), 22050)
    header = "slice_file_name,fsID,start,end,salience,fold,classID,class\n"
    (root / "metadata" / "UrbanSound8K.csv").write_text(
        header + "".join(f"{fn},{fs},0.0,0.25,1,{fold},{cid},{cls}\n" for fn, fs, fold, cid, cls in rows))
    full = D.load_urbansound8k(str(root))
    assert [r.split for r in full.records] == ["fold5", "fold10"]
    clip = full.select("fold10")[0]
    assert clip.labels == {"event": "children_playing"} and clip.split == "fold10"
    assert len(clip.audio) == math.ceil(int(0.25 * 22050) * 16000 / 22050)
    import shutil
    shutil.rmtree(root / "audio" / "fold10")
    with pytest.raises(ValueError, match="fold10: folder not found"):
        D.load_urbansound8k(str(root))


def test_fluent_speech_commands_layout(tmp_path):
    root = tmp_path / "fluent_speech_commands_dataset"
    (root / "data").mkdir(parents=True)
    header = ",path,speakerId,transcription,action,object,location\n"
    for k, split in enumerate(D.SPLITS):
        rel = f"wavs/speakers/spk{k}/utt{k}.wav"
        (root / rel).parent.mkdir(parents=True)
        D.write_wav(root / rel, tone(), 16000)
        (root / "data" / f"{split}_data.csv").write_text(
            header + f"{k},{rel},spk{k},Turn on the lights,activate,lights,{['none', 'kitchen', 'none'][k]}\n")
    full = D.load_fluent_speech_commands(str(root))
    assert [r.split for r in full.records] == ["train", "valid", "test"]
    clip = full.select("valid")[0]
    assert clip.labels["intent"] == "activate|lights|kitchen" and clip.speaker == "spk1"
    assert full.select("test").classes("intent") == ["activate|lights|kitchen", "activate|lights|none"]
    ds = D.InstructionDataset(full, all_tasks=True)           # real data, same views
    assert [it["task"] for it in map(ds.meta, range(len(ds)))] == ["action", "object", "location"] * 3
    assert ds[5]["answer"] == "kitchen" and ds[5]["audio"].shape == (4000,)
    (root / "data" / "valid_data.csv").write_text(",path,speakerId,action,object\n")
    with pytest.raises(ValueError, match="valid_data.csv: missing column 'location'"):
        D.load_fluent_speech_commands(str(root))


def test_folder_per_class_layout_and_missing_folder(tmp_path):
    root = tmp_path / "mine"
    names = [f"a{i}.wav" for i in range(40)]
    for c in ("rain", "siren"):
        (root / c).mkdir(parents=True)
        for fn in names:
            D.write_wav(root / c / fn, tone(0.01), 16000)
    layout, files = D.load_corpus(str(root), "event")
    assert layout == "folder" and len(files) == 80
    assert [files[j].labels for j in (0, 40)] == [{"event": "rain"}, {"event": "siren"}]
    split = [files.split(j) for j in range(80)]         # about 80/10/10, by the file name alone
    assert split[:40] == split[40:] and set(split) == {"train", "valid", "test"} and split.count("train") > 24
    with pytest.raises(SystemExit, match="no such folder"):
        D.load_corpus(str(tmp_path / "nowhere"), "event")
    with pytest.raises(SystemExit, match="--data_label='colour'"):
        D.load_corpus(str(root), "colour")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        D.load_corpus(str(tmp_path / "empty"), "event")
    with pytest.raises(ValueError, match="audio: folder not found"):
        (tmp_path / "esc" / "meta").mkdir(parents=True)
        (tmp_path / "esc" / "meta" / "esc50.csv").write_text("filename,fold,category\n")
        D.load_esc50(str(tmp_path / "esc"))


# ----------------------------------------------------------------------------------------------
# Probe, config, overrides, import direction


def test_logistic_regression_probe_separates_what_is_separable():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g) * 3
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 6, generator=g)
    acc = D.probe_accuracy((x[:300], y[:300]), (x[300:], y[300:]), 4)
    assert acc > 0.9
    assert D.probe_accuracy((x[:300], y[:300][torch.randperm(300, generator=g)]), (x[300:], y[300:]), 4) < 0.5
    # 1-D, two classes mirrored about 0: by symmetry the boundary is at 0, so points just either side of it
    # are told apart (and swapping the labels swaps the answers)
    x1, y1 = torch.tensor([[-2.0], [-1.5], [-1.0], [1.0], [1.5], [2.0]]), torch.tensor([0, 0, 0, 1, 1, 1])
    near = (torch.tensor([[-0.01], [0.01]]), torch.tensor([0, 1]))
    assert D.probe_accuracy((x1, y1), near, 2) == 1.0 and D.probe_accuracy((x1, 1 - y1), near, 2) == 0.0


def test_config_rejects_bad_values_with_the_expected_value():
    with pytest.raises(ValueError, match="multiple of 9"):
        CorpusConfig(n_speakers=30)
    with pytest.raises(ValueError, match=r"clip_seconds=1.0 is too short for kind='command'.*\d\.\d\d s"):
        CorpusConfig(kind="command")
    with pytest.raises(ValueError, match="use n_folds=0"):
        CorpusConfig(kind="word", n_folds=5)
    with pytest.raises(ValueError, match="unknown kind 'speach'"):
        CorpusConfig(kind="speach")
    with pytest.raises(ValueError, match=r"n_words must be in \[1, 35\]"):
        CorpusConfig(n_words=40)
    cfg = CorpusConfig.fsc_like()
    assert cfg.longest_utterance() < cfg.clip_seconds - 0.1


def test_overrides_are_strict():
    with pytest.raises(SystemExit, match="did you mean --snr_db"):
        D.parse_overrides(CorpusConfig(), ["--snr=1"])
    with pytest.raises(SystemExit, match="--n_clips takes a value of type int"):
        D.parse_overrides(CorpusConfig(), ["--n_clips=lots"])
    with pytest.raises(SystemExit, match="expected --key=value"):
        D.parse_overrides(CorpusConfig(), ["--seed"])
    assert D.parse_overrides(CorpusConfig(), ["--snr_db=0,10", "--seed=3", "--kind=word"]) == \
        {"snr_db": (0.0, 10.0), "seed": 3, "kind": "word"}


def test_the_generator_stands_alone_and_data_reexports_it():
    assert imported_packages(os.path.join(ROOT, "synth.py")) == {"numpy"}       # never data.py
    assert "synth" in imported_packages(os.path.join(ROOT, "data.py"))
    for name in ("SyntheticCorpus", "CorpusConfig", "SAMPLE_RATE", "AUDIOSET_TAGS", "Clip"):
        assert getattr(D, name) is getattr(S, name)
