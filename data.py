"""Synthetic heterogeneous audio with semantic and paralinguistic labels, and loaders for the real
datasets' layouts.

Both papers argue about heterogeneous audio: the MoE-Adapter paper (Lei et al., arXiv 2601.02967)
about speech, music and environmental sound whose semantic attributes (what is said, which sound)
and paralinguistic ones (pitch, emotion, speaker) are entangled in one signal; Soft-MoA
(Cappellazzo et al., arXiv 2402.00828) about four classification benchmarks (ESC-50,
UrbanSound8K, Speech Commands V2, Fluent Speech Commands). Nothing can be downloaded at run time,
so the default data is generated from signal models, deterministically: clip i of a corpus is a
pure function of (seed, corpus name, i), bit-identical in every process and worker (on another
numpy build or CPU: the same labels, audio equal up to floating-point rounding).
Users with the real corpora point the same views at them (`load_*` below); every source yields
the same item, a `Clip`.

Contents, top to bottom:
    Clip ............. the one item type (float32 mono audio at 16 kHz + string labels)
    label tables ..... phonemes, words, FSC-like intents, speaker groups, emotions, rates,
                       instruments, chords, event families
    CorpusConfig ..... dataclass + presets: tiny, esc50_like, us8k_like, speech_commands_like,
                       fsc_like, audioset_like
    signal models .... Klatt formant resonators, Rosenberg glottal source, coloured noise,
                       wavetable oscillators, event textures, mixing
    SyntheticCorpus .. a sequence of Clips for one split
    views ............ AudioClassification, MultiLabelAudio, InstructionDataset (torch Datasets),
                       collate
    real data ........ read_wav / write_wav, resample, load_audio, AudioFiles, load_* loaders,
                       load_corpus (any of their layouts, detected)
    probe ............ log_mel (the probe's own feature), logistic regression, run_probe
    CLI .............. python data.py --preview OUT_DIR | --probe | --bench  [--key=value ...]

Factors: every clip has a domain (speech, music, environment, a mixture of speech over music or
environment at a random SNR, or a multi-source scene) and a semantic label (word or
action/object/location intent, instrument and chord, event). Speech also has paralinguistic
labels: speaker id, pitch group, vocal-tract group, emotion (a prosody pattern) and speaking rate.
All are drawn independently of each other (speaker traits fixed per speaker), so no label can be
read off another; tests/test_data.py checks this with a chi-square test.

Notation: sr sample rate (16000), n samples, F0 fundamental frequency, F1..F5 formant
frequencies, bw bandwidths, alpha vocal-tract scale (every formant x alpha), u normalised
utterance time in [0, 1]; in shape comments B batch, N longest clip in samples.

This file imports numpy, torch, tqdm and the standard library; matplotlib (spectrogram PNG) and
soundfile (FLAC/OGG) are optional and imported where needed.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import functools
import math
import os
import struct
import sys
import time
import warnings
import wave
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

SAMPLE_RATE = 16000
DOMAINS = ("speech", "music", "environment", "mixture")
KINDS = ("mixed", "word", "command", "music", "event", "scene")
SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------------------------
# The item


@dataclass
class Clip:
    """One audio clip, synthetic or read from disk.

    audio: (n,) float32 mono at `sample_rate` (16 kHz from every source here), roughly in [-1, 1].
    labels: task/label name -> class name, all strings (e.g. word="yes", emotion="sad",
        event="siren"); a clip carries only the labels that apply to it.
    domain: "speech" | "music" | "environment" | "mixture" | "scene" (synthetic) or the loader's.
    speaker: speaker id (held out across splits) or None.
    split: "train" | "valid" | "test" or "fold1".."fold10".
    source: "synthetic:<name>:<seed>:<index>" or the file path.
    meta: numbers and free text behind the labels (F0, SNR, MIDI root, transcription, ...).
    """
    audio: np.ndarray
    sample_rate: int
    labels: Dict[str, str]
    domain: str
    speaker: Optional[str] = None
    split: str = "train"
    source: str = ""
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Label tables. Formants are for a reference vocal tract (alpha = 1, between typical adult male
# and female values, after Peterson & Barney 1952 / Hillenbrand et al. 1995).

VOWEL, GLIDE, NASAL, FRIC, VFRIC, PLOS, VPLOS, ASP = (
    "vowel", "glide", "nasal", "fricative", "voiced-fricative", "plosive", "voiced-plosive", "aspirate")

PHONEMES = {
    # vowels and glides: (kind, ms at normal rate, (F1, F2, F3) Hz)
    "iy": (VOWEL, 80, (290, 2450, 3150)), "ih": (VOWEL, 80, (410, 2100, 2800)),
    "eh": (VOWEL, 80, (580, 1900, 2700)), "ae": (VOWEL, 80, (760, 1850, 2600)),
    "aa": (VOWEL, 80, (780, 1180, 2650)), "ao": (VOWEL, 80, (610, 920, 2620)),
    "uh": (VOWEL, 80, (470, 1150, 2550)), "uw": (VOWEL, 80, (330, 950, 2450)),
    "ah": (VOWEL, 80, (680, 1350, 2650)), "er": (VOWEL, 80, (500, 1420, 1750)),
    "w": (GLIDE, 50, (320, 720, 2350)), "y": (GLIDE, 50, (280, 2350, 3050)),
    "l": (GLIDE, 50, (380, 1150, 2750)), "r": (GLIDE, 50, (400, 1180, 1600)),
    # nasals: a low murmur with wide bandwidths
    "m": (NASAL, 55, (280, 1150, 2350)), "n": (NASAL, 55, (280, 1650, 2650)),
    "ng": (NASAL, 55, (280, 2050, 2750)),
    # fricatives: (kind, ms, (noise centre Hz, noise bandwidth Hz, level))
    "s": (FRIC, 80, (5600, 2200, 0.5)), "sh": (FRIC, 80, (3000, 1400, 0.55)),
    "f": (FRIC, 80, (4200, 5000, 0.18)), "th": (FRIC, 80, (5200, 5000, 0.12)),
    "z": (VFRIC, 65, (5600, 2200, 0.3)), "zh": (VFRIC, 65, (3000, 1400, 0.35)),
    "v": (VFRIC, 65, (4200, 5000, 0.12)),
    # plosives: (kind, closure ms, (burst centre Hz, burst bandwidth Hz, level))
    "p": (PLOS, 40, (900, 1500, 0.6)), "t": (PLOS, 40, (4400, 2400, 0.6)),
    "k": (PLOS, 40, (2300, 1200, 0.6)), "b": (VPLOS, 30, (900, 1500, 0.35)),
    "d": (VPLOS, 30, (4400, 2400, 0.35)), "g": (VPLOS, 30, (2300, 1200, 0.35)),
    "h": (ASP, 55, None),
}
DIPHTHONGS = {"ay": ("aa", "iy"), "ey": ("eh", "iy"), "ow": ("ao", "uw"), "aw": ("aa", "uw")}
SCHWA = (500, 1500, 2500)
F45 = (3550.0, 4500.0)                       # F4, F5 of the reference tract
BANDWIDTHS = (70.0, 90.0, 140.0, 200.0, 260.0)

# Speech-Commands-V2-like vocabulary: its 35 words, spelled in the inventory above. The first 10
# are SC's "command" words (the general corpus uses the first n_words).
WORDS = {
    "yes": "y eh s", "no": "n ow", "up": "ah p", "down": "d aw n", "left": "l eh f t",
    "right": "r ay t", "on": "aa n", "off": "ao f", "stop": "s t aa p", "go": "g ow",
    "zero": "z ih r ow", "one": "w ah n", "two": "t uw", "three": "th r iy", "four": "f ao r",
    "five": "f ay v", "six": "s ih k s", "seven": "s eh v ah n", "eight": "ey t", "nine": "n ay n",
    "bed": "b eh d", "bird": "b er d", "cat": "k ae t", "dog": "d ao g", "happy": "h ae p iy",
    "house": "h aw s", "marvin": "m aa r v ih n", "sheila": "sh iy l ah", "tree": "t r iy",
    "wow": "w aw", "backward": "b ae k w er d", "forward": "f ao r w er d",
    "follow": "f aa l ow", "learn": "l er n", "visual": "v ih zh uw ah l",
}
# Fluent-Speech-Commands-like: its 31 (action, object, location) intents, spoken as the action
# word(s), then the object and the location unless "none".
COMMAND_WORDS = {
    "activate": "ae k t ih v ey t", "deactivate": "d iy ae k t ih v ey t", "bring": "b r ih ng",
    "change": "t sh ey n d zh", "language": "l ae ng g w ih d zh", "increase": "ih n k r iy s",
    "decrease": "d iy k r iy s", "lights": "l ay t s", "lamp": "l ae m p",
    "music": "m y uw z ih k", "heat": "h iy t", "volume": "v aa l y uw m",
    "newspaper": "n uw z p ey p er", "juice": "d zh uw s", "socks": "s aa k s",
    "shoes": "sh uw z", "chinese": "t sh ay n iy z", "korean": "k ao r iy ah n",
    "english": "ih ng g l ih sh", "german": "d zh er m ah n", "kitchen": "k ih t sh ah n",
    "bedroom": "b eh d r uw m", "washroom": "w aa sh r uw m",
}
INTENTS = (
    [("activate", o, "none") for o in ("lamp", "lights", "music")]
    + [("activate", "lights", loc) for loc in ("kitchen", "bedroom", "washroom")]
    + [("bring", o, "none") for o in ("juice", "newspaper", "shoes", "socks")]
    + [("change language", o, "none") for o in ("chinese", "english", "german", "korean", "none")]
    + [("deactivate", o, "none") for o in ("lamp", "lights", "music")]
    + [("deactivate", "lights", loc) for loc in ("kitchen", "bedroom", "washroom")]
    + [(a, o, "none") for a in ("decrease", "increase") for o in ("heat", "volume")]
    + [(a, "heat", loc) for a in ("decrease", "increase") for loc in ("kitchen", "bedroom", "washroom")]
)

# Speakers: pitch group x vocal-tract group, 9 cells, assigned by speaker id so that every cell is
# in every split. A speaker's median F0 is drawn from the inner range; the clip's median F0 stays
# inside the label range (emotion contours are mean-zero in log F0, see EMOTIONS).
PITCH_GROUPS = {  # name: (speaker F0 range Hz, clip median F0 range Hz)
    "low": ((95.0, 125.0), (0.0, 135.0)),
    "mid": ((145.0, 185.0), (135.0, 200.0)),
    "high": ((215.0, 275.0), (200.0, 1000.0)),
}
TRACT_GROUPS = {"long": (0.85, 0.91), "medium": (0.96, 1.04), "short": (1.10, 1.18)}  # alpha
# Emotion-like classes as prosody patterns: (F0 contour shape, excursion in octaves, gain dB,
# glottal closing quotient (smaller = sharper closure = brighter, "pressed"), extra breathiness,
# jitter multiplier). Deviation from real emotional speech: emotions do not shift the mean F0,
# so that the pitch group stays a speaker trait and the two labels stay independent.
EMOTIONS = {
    "neutral": ("declination", 0.12, 0.0, 0.16, 0.00, 1.0),
    "happy": ("rise-fall", 0.25, 2.0, 0.13, 0.00, 1.0),
    "sad": ("fall", 0.06, -3.0, 0.28, 0.12, 1.6),
    "angry": ("early-peak", 0.22, 4.0, 0.08, 0.00, 1.3),
}
RATES = {"slow": 1.25, "normal": 1.0, "fast": 0.8}   # phoneme-duration factor


@dataclass(frozen=True)
class Instrument:
    """A harmonic (or, with `ratios`, inharmonic) spectrum and an envelope.

    amps: partial amplitudes, the first (the fundamental) the largest, so a note's spectral peak
    is its pitch. attack: s (linear); decay: time constant in s after the attack (inf =
    sustained) towards `sustain`; bright: time constant in s with which partials above the
    fundamental fade faster (inf = fixed spectrum); vibrato: (rate Hz, depth as a fraction of F0);
    breath: noise level relative to the tone.
    """
    amps: Tuple[float, ...]
    attack: float
    decay: float = math.inf
    sustain: float = 1.0
    bright: float = math.inf
    ratios: Tuple[float, ...] = ()
    vibrato: Tuple[float, float] = (0.0, 0.0)
    breath: float = 0.0


INSTRUMENTS = {
    "piano": Instrument(tuple(n ** -0.9 for n in range(1, 17)), 0.005, 0.6, 0.0, 0.25),
    "organ": Instrument((1, .7, .5, .45, .05, .3, .05, .25, .02, .1), 0.02),
    "flute": Instrument((1, .3, .12, .05, .02), 0.08, math.inf, 0.9, vibrato=(5.0, 0.006), breath=0.05),
    "clarinet": Instrument(tuple(1 / n if n % 2 else 0.03 for n in range(1, 16)), 0.04, math.inf, 0.9),
    "strings": Instrument(tuple(1 / n for n in range(1, 21)), 0.12, math.inf, 0.85, vibrato=(6.0, 0.008)),
    "guitar": Instrument(tuple(abs(math.sin(math.pi * n * 0.2)) / n ** 1.1 / math.sin(math.pi * 0.2)
                               for n in range(1, 17)), 0.002, 0.5, 0.0, 0.15),
    "brass": Instrument((1, .85, .75, .62, .5, .4, .3, .22, .15, .1, .07, .05), 0.05, math.inf, 0.9),
    "mallet": Instrument((1, .45, .2, .1), 0.001, 0.35, 0.0, 0.08, ratios=(1.0, 2.756, 5.404, 8.933)),
}
CHORDS = {"note": (0,), "major": (0, 4, 7), "minor": (0, 3, 7), "diminished": (0, 3, 6),
          "augmented": (0, 4, 8)}
ROOT_MIDI = (48, 67)   # C3 (131 Hz) .. G4 (392 Hz)

# Environmental event families: (key parameter, its 5 variant values, the documented signature
# statistic that tells the family apart; tests/test_data.py checks each). The ESC-50-like set
# uses all 10 x 5 (family, variant) classes, the UrbanSound8K-like set the 10 families.
EVENT_FAMILIES = {
    "hum": ("f0_hz", (55, 80, 115, 165, 240),
            "tonal machine: spectral peak at a harmonic of f0_hz, spectral flatness < 0.1"),
    "engine": ("rate_hz", (7, 10, 14, 20, 28),
               "low-pass noise pulsed at rate_hz: envelope spectrum peaks at rate_hz, centroid < 1 kHz"),
    "drill": ("freq_hz", (700, 950, 1300, 1750, 2400), "whine: spectral peak at freq_hz"),
    "jackhammer": ("rate_hz", (6, 8.5, 12, 17, 24),
                   "broadband clicks at rate_hz: envelope spectrum peaks at rate_hz, centroid > 1.5 kHz"),
    "siren": ("centre_hz", (550, 750, 1000, 1350, 1800),
              "swept tone: the per-frame peak frequency spans a ratio >= 1.4"),
    "alarm": ("freq_hz", (1000, 1400, 2000, 2800, 3900),
              "beeps: loud in 30-70% of frames, spectral peak at freq_hz"),
    "bark": ("f0_hz", (250, 350, 500, 700, 1000), "harmonic bursts of 80-180 ms: loud in <= 60% of frames"),
    "impact": ("mode_hz", (300, 520, 900, 1550, 2700),
               "decaying impulsive events: crest factor (peak / RMS) >= 6"),
    "rain": ("drops_per_s", (25, 50, 100, 200, 400), "pink noise and droplets: spectral centroid >= 2 kHz"),
    "wind": ("cutoff_hz", (150, 230, 350, 540, 820),
             "low-passed gusting noise: spectral centroid < 1 kHz, crest factor < 6"),
}
AUDIOSET_TAGS = (("speech", "speech:low", "speech:mid", "speech:high", "music") + tuple(INSTRUMENTS)
                 + tuple(EVENT_FAMILIES))


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class CorpusConfig:
    seed: int = 0
    name: str = "corpus"          # stream name: corpora with different names share no clip
    kind: str = "mixed"           # mixed | word | command | music | event | scene
    n_clips: int = 4000           # length of the index range 0..n_clips-1 (all splits together)
    clip_seconds: float = 1.0
    # kind="mixed": probability of each domain (speech, music, environment, mixture)
    domain_weights: Tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
    command_prob: float = 0.0     # kind="mixed": share of speech that is an FSC-like command
    n_words: int = 10             # the first n of WORDS (35 = all of Speech Commands V2's)
    n_speakers: int = 45          # multiple of 9 (3 pitch x 3 tract groups), >= 27
    n_instruments: int = 8
    n_event_families: int = 10
    n_event_variants: int = 1     # > 1: the event label is "<family>-<variant>" (ESC-50-like)
    n_folds: int = 0              # 0: train/valid/test by held-out speakers; k: fold1..foldk
    snr_db: Tuple[float, float] = (0.0, 15.0)        # mixtures: speech over the background
    floor_snr_db: Tuple[float, float] = (15.0, 35.0)  # noise floor under every clip
    gain_db: Tuple[float, float] = (-6.0, 6.0)        # random level, so loudness is a weak cue
    tilt_db: float = 3.0          # random spectral tilt in [-tilt, tilt] dB/octave (channel)
    # environmental clips: with this probability a texture of another family plays underneath
    # at background_db relative to the event (real ESC-50 / UrbanSound8K clips have backgrounds)
    background_prob: float = 0.7
    background_db: Tuple[float, float] = (-15.0, -3.0)
    level_dbfs: float = -30.0     # clip RMS before the random gain (and the emotion's effort)

    def __post_init__(self):
        self.domain_weights = tuple(float(w) for w in self.domain_weights)
        ranges = ("snr_db", "floor_snr_db", "gain_db", "background_db")
        for name in ranges:
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"CorpusConfig.{name} must be a (low, high) range, got {getattr(self, name)}")
            setattr(self, name, value)
        if self.seed < 0:
            raise ValueError(f"CorpusConfig.seed must be >= 0, got {self.seed}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.n_clips < 1 or self.clip_seconds <= 0:
            raise ValueError(f"n_clips must be >= 1 and clip_seconds > 0, got {self.n_clips}, "
                             f"{self.clip_seconds}")
        if len(self.domain_weights) != 4 or min(self.domain_weights) < 0 or sum(self.domain_weights) <= 0:
            raise ValueError(f"domain_weights must be 4 non-negative weights for {DOMAINS}, "
                             f"got {self.domain_weights}")
        if not 0.0 <= self.command_prob <= 1.0:
            raise ValueError(f"command_prob must be in [0, 1], got {self.command_prob}")
        for name, hi in (("n_words", len(WORDS)), ("n_instruments", len(INSTRUMENTS)),
                         ("n_event_families", len(EVENT_FAMILIES)), ("n_event_variants", 5)):
            if not 1 <= getattr(self, name) <= hi:
                raise ValueError(f"CorpusConfig.{name} must be in [1, {hi}], got {getattr(self, name)}")
        if self.n_speakers % 9 or self.n_speakers < 27:
            raise ValueError(f"n_speakers must be a multiple of 9 (3 pitch x 3 tract groups) and >= 27 "
                             f"(train, valid and test speakers in every group), got {self.n_speakers}")
        if self.n_folds < 0 or self.n_folds == 1:
            raise ValueError(f"n_folds must be 0 (train/valid/test) or >= 2, got {self.n_folds}")
        if self.n_folds and self.has_speech:
            raise ValueError(f"kind={self.kind!r} has speakers, which are held out by split: use "
                             f"n_folds=0 (folds are for the event/music benchmarks)")
        if not 0.0 <= self.background_prob <= 1.0:
            raise ValueError(f"background_prob must be in [0, 1], got {self.background_prob}")
        need = self.longest_utterance()
        if need > self.clip_seconds - 0.1:
            raise ValueError(f"clip_seconds={self.clip_seconds} is too short for kind={self.kind!r}: the "
                             f"longest utterance at the slow rate takes {need:.2f} s (+0.1 s margin)")

    @property
    def has_speech(self) -> bool:
        return self.kind in ("word", "command", "scene") or (
            self.kind == "mixed" and (self.domain_weights[0] > 0 or self.domain_weights[3] > 0))

    def longest_utterance(self) -> float:
        """Upper bound in seconds of the longest utterance this config can speak (slow rate)."""
        words = []
        if self.kind in ("word", "mixed", "scene"):
            words += [[w] for w in list(WORDS)[:self.n_words]]
        if self.kind == "command" or (self.kind == "mixed" and self.command_prob > 0):
            words += [command_words(i) for i in INTENTS]
        if not words or not self.has_speech:
            return 0.0
        worst = max(sum(_utterance_ms(w)) + _GAP_MS[1] * (len(w) - 1) for w in words)
        return worst * max(RATES.values()) * _RATE_JITTER[1] * _PHONE_JITTER[1] / 1000

    # -- presets -------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **kw) -> "CorpusConfig":
        """The general corpus for the CPU-sized audio-LLM: 1 s clips of all four domains."""
        return cls(**{**dict(n_clips=4000), **kw})

    @classmethod
    def esc50_like(cls, **kw) -> "CorpusConfig":
        """ESC-50-like: 50 event classes (10 families x 5 variants), 5 folds (real: 2000 x 5 s)."""
        return cls(**{**dict(name="esc50", kind="event", n_event_variants=5, n_folds=5,
                             n_clips=1000), **kw})

    @classmethod
    def us8k_like(cls, **kw) -> "CorpusConfig":
        """UrbanSound8K-like: 10 event families, 10 folds (real: 8732 clips <= 4 s)."""
        return cls(**{**dict(name="us8k", kind="event", n_folds=10, n_clips=1000), **kw})

    @classmethod
    def speech_commands_like(cls, **kw) -> "CorpusConfig":
        """Speech-Commands-V2-like: 35 words, 1 s, test speakers held out (real: 105k clips)."""
        return cls(**{**dict(name="speechcommands", kind="word", n_words=35, n_clips=3000), **kw})

    @classmethod
    def fsc_like(cls, **kw) -> "CorpusConfig":
        """Fluent-Speech-Commands-like: 31 action/object/location intents, 2.5 s (real: 30k)."""
        return cls(**{**dict(name="fsc", kind="command", clip_seconds=2.5, n_clips=1500), **kw})

    @classmethod
    def audioset_like(cls, **kw) -> "CorpusConfig":
        """AudioSet-like multi-label pre-training scenes: speech, music, events layered."""
        return cls(**{**dict(name="audioset", kind="scene", n_words=35, n_clips=4000), **kw})


PRESETS = ("tiny", "esc50_like", "us8k_like", "speech_commands_like", "fsc_like", "audioset_like")
_GAP_MS = (40.0, 80.0)          # pause between words of a command
_RATE_JITTER = (0.95, 1.05)     # per-clip factor on top of the rate class
_PHONE_JITTER = (0.9, 1.1)      # per-phoneme duration factor


# ----------------------------------------------------------------------------------------------
# Signal models: small parts


def seed_sequence(seed: int, stream: str, index: int) -> np.random.SeedSequence:
    """The entropy behind clip `index` of stream `stream`: no global RNG, no process state."""
    return np.random.SeedSequence([int(seed), zlib.crc32(stream.encode()), int(index)])


@functools.lru_cache(maxsize=64)
def _delays(n_fft: int):
    """z^-1 and z^-2 on the rfft grid of n_fft points, read-only."""
    z1 = np.exp(-2j * np.pi * np.arange(n_fft // 2 + 1) / n_fft)
    z1.flags.writeable = False
    z2 = z1 * z1
    z2.flags.writeable = False
    return z1, z2


def resonator_response(freqs, bws, n_fft: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Frequency response of a cascade of Klatt (1980) second-order resonators on the rfft grid.

    Each resonator is the IIR filter y[n] = A x[n] + B y[n-1] + C y[n-2] with
    C = -exp(-2 pi bw / sr), B = 2 exp(-pi bw / sr) cos(2 pi f / sr), A = 1 - B - C (unit gain at
    0 Hz), so H(z) = A / (1 - B z^-1 - C z^-2). Multiplying the rfft of a zero-padded input by
    this response and inverting is the IIR filter, up to the impulse-response tail that wraps
    around the FFT length (r^n_pad with r = exp(-pi bw / sr): < 1e-4 for the >= 1024 samples of
    padding used here). Tested against the sample-by-sample recursion.
    """
    z1, z2 = _delays(n_fft)
    f = np.asarray(freqs, dtype=np.float64)[:, None]                    # (K, 1)
    b = np.asarray(bws, dtype=np.float64)[:, None]
    C = -np.exp(-2 * np.pi * b / sr)
    B = 2 * np.exp(-np.pi * b / sr) * np.cos(2 * np.pi * f / sr)
    A = 1 - B - C
    return np.prod(A / (1 - B * z1 - C * z2), axis=0)                   # (n_fft // 2 + 1,)


def _fft_len(n: int) -> int:
    """Smallest 2^a 3^b >= n: fast for numpy's pocketfft."""
    best = 1 << max(0, (n - 1).bit_length())
    p3 = 1
    while p3 < best:
        p2 = p3
        while p2 < n:
            p2 *= 2
        best = min(best, p2)
        p3 *= 3
    return best


def coloured_noise(rng: np.random.Generator, n: int, slope_db_per_octave: float = 0.0,
                   lo_hz: float = 20.0, hi_hz: float = 8000.0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Gaussian noise with power spectrum ~ f^(slope/3.01): 0 white, -3 pink, -6 brown, unit RMS.

    Band-limited to [lo_hz, hi_hz] by a smooth (raised-cosine, half an octave) edge.
    """
    N = _fft_len(n)
    spec = np.fft.rfft(rng.standard_normal(N))
    f = np.fft.rfftfreq(N, 1.0 / sr)
    f[0] = f[1]
    gain = (f / 1000.0) ** (slope_db_per_octave / (20 * math.log10(2)))
    octaves_lo = np.log2(f / lo_hz)                      # < 0 below the band
    octaves_hi = np.log2(hi_hz / f)
    gain *= _edge(octaves_lo) * _edge(octaves_hi)
    x = np.fft.irfft(spec * gain, N)[:n]
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def _edge(octaves: np.ndarray, width: float = 0.5) -> np.ndarray:
    """0 below 0, a raised-cosine ramp over `width` octaves, 1 above."""
    t = np.clip(octaves / width, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def glottal_source(f0: np.ndarray, rng: np.random.Generator, jitter: float = 0.01,
                   shimmer: float = 0.05, closing: float = 0.16, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Glottal flow derivative: a Rosenberg (1971) pulse per period, following f0 (Hz per sample).

    One pulse per glottal cycle: epochs t_k where the phase cumsum(f0)/sr crosses k, perturbed by
    jitter (t_k += jitter * T_k * N(0, 1)) and scaled by shimmer (a_k = 1 + shimmer * N(0, 1)).
    The flow rises as 0.5 (1 - cos(pi tau / Tp)) over the opening phase Tp = 0.4 T and falls as
    cos(pi (tau - Tp) / (2 Tn)) over the closing phase Tn = closing * T; its derivative (the lips'
    radiation folded in) is what drives the vocal tract. The sharp closure is the main excitation:
    a smaller `closing` gives a brighter, "pressed" voice. The flow is sampled at each pulse's exact
    (fractional) epoch and differenced, scaled to a negative peak of about -a_k.
    """
    n = len(f0)
    phase = np.cumsum(f0) / sr                                           # (n,) cycles
    k = np.arange(1, int(phase[-1]) + 1)
    if len(k) == 0:
        return np.zeros(n)
    t = np.interp(k, phase, np.arange(n, dtype=np.float64))             # (K,) epochs in samples
    T = sr / np.interp(t, np.arange(n), f0)                              # (K,) local period
    t = t + jitter * T * rng.standard_normal(len(k))
    amp = np.clip(1.0 + shimmer * rng.standard_normal(len(k)), 0.3, None)
    Tp, Tn = 0.4 * T, closing * T
    L = int(np.ceil((Tp + Tn).max())) + 2
    idx = np.floor(t).astype(np.int64)[:, None] + np.arange(-1, L)      # (K, L + 1)
    tau = idx - t[:, None]
    Tp_, Tn_ = Tp[:, None], Tn[:, None]
    flow = np.where((tau >= 0) & (tau < Tp_), 0.5 * (1 - np.cos(np.pi * tau / Tp_)), 0.0)
    closing_ = (tau >= Tp_) & (tau < Tp_ + Tn_)
    flow = np.where(closing_, np.cos(np.pi * (tau - Tp_) / (2 * Tn_)), flow)
    # First difference of the sampled flow: the pulse's samples sum to exactly 0 (no DC), and
    # its negative peak is ~ -pi / (2 Tn), which the scaling maps to -a_k.
    g = np.diff(flow, axis=1) * (amp * 2 * Tn / np.pi)[:, None]          # (K, L)
    idx = idx[:, 1:]
    ok = (idx >= 0) & (idx < n)
    return np.bincount(idx[ok], weights=g[ok], minlength=n)[:n]


def _oscillator(amps: np.ndarray, f_inst: np.ndarray, phase0: float = 0.0,
                sr: int = SAMPLE_RATE, table_size: int = 2048) -> np.ndarray:
    """Wavetable oscillator: one period with harmonic amplitudes `amps` (random-free phases),
    read at the phase of the instantaneous frequency f_inst (Hz per sample), linear interpolation.

    The table holds harmonics 1..len(amps); the caller drops those above its band limit. Cost is
    O(n) whatever the number of harmonics, which keeps music and machines cheap.
    """
    spec = np.zeros(table_size // 2 + 1, dtype=np.complex128)
    spec[1:len(amps) + 1] = -1j * np.asarray(amps) * table_size / 2     # sum of a_h sin(h theta)
    table = np.fft.irfft(spec, table_size)
    table = np.append(table, table[0])
    pos = (phase0 + np.cumsum(f_inst) / sr) % 1.0 * table_size
    i = pos.astype(np.int64)
    frac = pos - i
    return table[i] * (1 - frac) + table[i + 1] * frac


def _filter(x: np.ndarray, response_fn, pad: int = 1024) -> np.ndarray:
    """Filter x by a frequency response given as response_fn(n_fft), with `pad` samples of tail."""
    N = _fft_len(len(x) + pad)
    return np.fft.irfft(np.fft.rfft(x, N) * response_fn(N), N)[:len(x) + pad]


def _tilt(x: np.ndarray, db_per_octave: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A spectral tilt of db_per_octave around 1 kHz (flat below 50 Hz): a channel / microphone."""
    if db_per_octave == 0:
        return x
    N = _fft_len(len(x))
    f = np.maximum(np.fft.rfftfreq(N, 1.0 / sr), 50.0)
    gain = (f / 1000.0) ** (db_per_octave / (20 * math.log10(2)))
    return np.fft.irfft(np.fft.rfft(x, N) * gain, N)[:len(x)]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)) + 1e-20))


# ----------------------------------------------------------------------------------------------
# Speech: source-filter synthesis


@dataclass(frozen=True)
class Speaker:
    """Traits fixed per speaker id: drawn from seed_sequence(seed, "speaker", id)."""
    id: str
    pitch_group: str
    tract_group: str
    f0: float                     # median F0, Hz
    alpha: float                  # vocal-tract scale: every formant x alpha (shorter tract > 1)
    formant_skew: Tuple[float, float, float]  # idiosyncratic F1..F3 factors
    breathiness: float            # aspiration noise relative to the glottal pulses
    jitter: float
    shimmer: float
    split: str


def make_speaker(seed: int, s: int, n_speakers: int) -> Speaker:
    """Speaker s: cell s % 9 of (pitch group x tract group); its rank s // 9 picks the split.

    The last rank of every cell is a test speaker, the one before a validation speaker, the rest
    train, so every split holds every (pitch, tract) cell and no speaker is in two splits.
    """
    rng = np.random.default_rng(seed_sequence(seed, "speaker", s))
    cell, rank, ranks = s % 9, s // 9, n_speakers // 9
    pitch, tract = list(PITCH_GROUPS)[cell % 3], list(TRACT_GROUPS)[cell // 3]
    lo, hi = PITCH_GROUPS[pitch][0]
    split = "test" if rank == ranks - 1 else "valid" if rank == ranks - 2 else "train"
    return Speaker(
        id=f"spk{s:03d}", pitch_group=pitch, tract_group=tract,
        f0=float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
        alpha=float(rng.uniform(*TRACT_GROUPS[tract])),
        formant_skew=tuple(float(v) for v in 1 + 0.03 * rng.standard_normal(3)),
        breathiness=float(rng.uniform(0.02, 0.2)), jitter=float(rng.uniform(0.005, 0.015)),
        shimmer=float(rng.uniform(0.03, 0.08)), split=split)


def _phones(words: Sequence[str]) -> List[List[str]]:
    """Words (WORDS or COMMAND_WORDS keys) -> phoneme lists, diphthongs expanded to two targets."""
    out = []
    for w in words:
        spelled = WORDS.get(w) or COMMAND_WORDS.get(w)
        if spelled is None:
            raise ValueError(f"unknown word {w!r}")
        ph = []
        for p in spelled.split():
            ph += [p + ":1", p + ":2"] if p in DIPHTHONGS else [p]
        out.append(ph)
    return out


def _phone_ms(p: str) -> List[float]:
    """Durations (ms, normal rate) of the segments phoneme p becomes (see _segments)."""
    if ":" in p:
        return [60.0] if p.endswith(":1") else [45.0]
    kind, ms, _ = PHONEMES[p]
    if kind == PLOS:
        return [ms, 8.0, 25.0]                # closure, burst, aspiration
    if kind == VPLOS:
        return [ms, 8.0]                      # closure (voice bar), burst
    return [float(ms)]


def _utterance_ms(words: Sequence[str]) -> List[float]:
    return [sum(ms for p in ph for ms in _phone_ms(p)) for ph in _phones(words)]


def command_words(intent: Tuple[str, str, str]) -> List[str]:
    """The words spoken for an (action, object, location) intent."""
    action, obj, loc = intent
    return action.split() + [w for w in (obj, loc) if w != "none"]


def _segments(words: Sequence[str], spk: Speaker, rate: float, rng: np.random.Generator, sr: int):
    """Phonemes -> segments (n_samples, voicing, aspiration, frication, formants, frication band).

    Vowels, glides and nasals are voiced through their formants; fricatives are noise through a
    resonance at their noise centre (voiced ones add weak voicing); plosives are a closure
    (silent, or a low 'voice bar' for b/d/g), a burst of noise at the burst centre and, for
    p/t/k, aspiration noise through the next vowel's formants; h is aspiration. Consonants take
    the formants of the next voiced phoneme (co-articulation). Pauses between words are silent.
    """
    a = spk.alpha
    skew = np.array(spk.formant_skew)
    segs = []
    phones = _phones(words)
    for wi, ph in enumerate(phones):
        targets = []                                       # formants of each phoneme (or None)
        for p in ph:
            base = p.split(":")[0]
            if base in DIPHTHONGS:
                base = DIPHTHONGS[base][0 if p.endswith(":1") else 1]
            kind, _, params = PHONEMES[base]
            targets.append(params if kind in (VOWEL, GLIDE, NASAL) else None)
        for j, p in enumerate(ph):
            base = p.split(":")[0]
            vowel = DIPHTHONGS[base][0 if p.endswith(":1") else 1] if base in DIPHTHONGS else base
            kind, _, params = PHONEMES[vowel]
            nxt = next((t for t in targets[j:] if t is not None), None) or \
                next((t for t in reversed(targets[:j]) if t is not None), SCHWA)
            fm = np.array(params if kind in (VOWEL, GLIDE, NASAL) else nxt, dtype=np.float64)
            fm = np.concatenate([fm * skew, F45]) * a                           # (5,) F1..F5
            bw = np.array(BANDWIDTHS) * (2.0 if kind == NASAL else 1.0)
            durs = [ms * rate * rng.uniform(*_PHONE_JITTER) * sr / 1000 for ms in _phone_ms(p)]
            band = None if kind not in (FRIC, VFRIC, PLOS, VPLOS) else (params[0] * a, params[1], params[2])
            if kind in (VOWEL, GLIDE, NASAL):
                av = {VOWEL: 1.0, GLIDE: 0.6, NASAL: 0.3}[kind]
                segs.append((durs[0], av, 0.0, 0.0, fm, bw, None))
            elif kind in (FRIC, VFRIC):
                segs.append((durs[0], 0.25 if kind == VFRIC else 0.0, 0.0, band[2], fm, bw, band))
            elif kind == ASP:
                segs.append((durs[0], 0.0, 0.6, 0.0, fm, bw, None))
            else:                                                               # plosives
                voice_bar = np.array([250.0, 900, 2300, *F45]) * a
                segs.append((durs[0], 0.06 if kind == VPLOS else 0.0, 0.0, 0.0, voice_bar, bw, None))
                segs.append((durs[1], 0.0, 0.0, band[2], fm, bw, band))
                if kind == PLOS:
                    segs.append((durs[2], 0.0, 0.5, 0.0, fm, bw, None))
        if wi < len(phones) - 1:
            gap = rng.uniform(*_GAP_MS) * rate * sr / 1000
            segs.append((gap, 0.0, 0.0, 0.0, fm, bw, None))
    return segs


def crossfade(bounds: np.ndarray, ramp: float) -> List[Tuple[int, int, np.ndarray]]:
    """Weights that cross-fade consecutive segments [bounds[s], bounds[s+1]) (in samples).

    Segment s gets (lo, hi, w): weight w over samples lo..hi-1, 1 inside the segment and linear
    ramps over +-R around each inner boundary, R = min(ramp, half of either neighbour), so ramps
    of consecutive boundaries never overlap and the weights sum to exactly 1 everywhere.
    """
    durs = np.diff(bounds)
    n = int(math.ceil(bounds[-1]))
    R = np.minimum(ramp, 0.5 * np.minimum(np.r_[np.inf, durs], np.r_[durs, np.inf]))    # (S + 1,)
    t = np.arange(n, dtype=np.float64)
    out = []
    for s in range(len(durs)):
        a, b, Ra, Rb = bounds[s], bounds[s + 1], R[s], R[s + 1]
        lo, hi = int(max(0, a - Ra)), int(min(n, math.ceil(b + Rb)))
        tt = t[lo:hi]
        rise = np.ones_like(tt) if s == 0 else np.clip((tt - (a - Ra)) / (2 * Ra), 0, 1)
        fall = np.ones_like(tt) if s == len(durs) - 1 else np.clip(((b + Rb) - tt) / (2 * Rb), 0, 1)
        out.append((lo, hi, rise * fall))
    return out


def f0_contour(u: np.ndarray, shape: str, excursion: float) -> np.ndarray:
    """Emotion's F0 contour in octaves over normalised time u in [0, 1]; mean zero over u.

    declination: e (0.5 - u); rise-fall: e (sin(pi u) - 2/pi); fall: e (0.5 - u);
    early-peak: e ((1 - u)^3 - 1/4). Mean zero keeps the speaker's median F0 (pitch group) intact.
    """
    if shape in ("declination", "fall"):
        return excursion * (0.5 - u)
    if shape == "rise-fall":
        return excursion * (np.sin(np.pi * u) - 2 / np.pi)
    if shape == "early-peak":
        return excursion * ((1 - u) ** 3 - 0.25)
    raise ValueError(f"unknown contour shape {shape!r}")


def render_speech(words: Sequence[str], spk: Speaker, emotion: str, rate: str,
                  rng: np.random.Generator, sr: int = SAMPLE_RATE) -> Tuple[np.ndarray, dict]:
    """Source-filter speech for `words`: returns (utterance (n,) unit RMS, facts).

    source:  glottal pulses at F0(t) = spk.f0 * 2^(contour(u) + wobble) with the speaker's jitter
             and shimmer (x the emotion's), plus aspiration noise (breathiness) while voiced;
    filter:  per segment, a cascade of 5 Klatt resonators at F1..F5 (x alpha) for voicing and
             aspiration, one wide resonator at the noise centre for frication and bursts;
    time:    segments are cross-faded by linear ramps of up to +-12 ms around each boundary (never
             more than half of either neighbour, so the weights sum to exactly 1); the weights
             are applied to the excitation, so each segment's resonances ring into the next.
    """
    shape, excursion, _, closing, breath_add, jit = EMOTIONS[emotion]
    r = RATES[rate] * rng.uniform(*_RATE_JITTER)
    segs = _segments(words, spk, r, rng, sr)
    bounds = np.concatenate([[0.0], np.cumsum([s[0] for s in segs])])
    n = int(math.ceil(bounds[-1]))
    u = np.arange(n) / max(n - 1, 1)
    wobble = 0.02 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * u + rng.uniform(0, 2 * np.pi))
    f0 = spk.f0 * 2.0 ** (f0_contour(u, shape, excursion) + wobble)           # (n,) Hz
    pulses = glottal_source(f0, rng, spk.jitter * jit, spk.shimmer * jit, closing, sr)
    breath = spk.breathiness + breath_add
    noise_v, noise_f = rng.standard_normal(n), rng.standard_normal(n)
    out = np.zeros(n + 1024)
    voiced_time = np.zeros(n, dtype=bool)
    weights = crossfade(bounds, 0.012 * sr)
    for s, ((_, av, an, af, fm, bw, band), (lo, hi, w)) in enumerate(zip(segs, weights)):
        if av == 0 and an == 0 and af == 0:
            continue                                                   # silence: closure, pause
        voice = av * (pulses[lo:hi] + breath * 0.3 * noise_v[lo:hi])
        exc = w * (voice + an * 0.12 * noise_v[lo:hi])
        if av > 0.5:
            voiced_time[int(bounds[s]):int(bounds[s + 1])] = True
        if av > 0 or an > 0:
            H = functools.partial(resonator_response, fm, bw, sr=sr)
            peak = np.abs(H(2048)).max()
            out[lo:hi + 1024] += _filter(exc, lambda N: H(N) / peak)
        if af > 0:
            fc, fbw, _ = band
            fc = min(fc, 0.45 * sr)
            Hf = functools.partial(resonator_response, [fc], [fbw], sr=sr)
            peak = np.abs(Hf(2048)).max()
            out[lo:hi + 1024] += af * 0.07 * _filter(w * noise_f[lo:hi], lambda N: Hf(N) / peak)
    y = out[:n + int(0.03 * sr)]
    y = y - y.mean()
    f0_med = float(np.median(f0[voiced_time])) if voiced_time.any() else float(spk.f0)
    facts = dict(f0_median_hz=f0_med, rate_factor=float(r), speech_seconds=n / sr)
    return y / _rms(y[:n]), facts


# ----------------------------------------------------------------------------------------------
# Music: notes and chords


def midi_hz(m: float) -> float:
    return 440.0 * 2.0 ** ((m - 69) / 12)


def render_music(instrument: str, midis: Sequence[int], n: int, rng: np.random.Generator,
                 sr: int = SAMPLE_RATE, band_hz: float = 7000.0) -> np.ndarray:
    """Notes `midis` played together (a chord, or one note) on `instrument`, 1-2 strikes; unit RMS.

    Each note: partials a_h at h * F0 (or ratios_h * F0 for the inharmonic mallet) below band_hz,
    vibrato on F0, an attack-decay-sustain envelope per strike with a 30 ms release before the
    next, and the upper partials fading with time constant `bright` (a bright attack, a duller
    tail). Harmonic notes are wavetable oscillators (bright and dull tables cross-faded).
    """
    ins = INSTRUMENTS[instrument]
    t = np.arange(n) / sr
    starts = [rng.uniform(0.0, 0.08)]
    if rng.random() < 0.5 and n / sr > 0.6:
        starts.append(rng.uniform(0.45, 0.75) * n / sr)
    ends = starts[1:] + [n / sr + 1.0]
    amps = np.asarray(ins.amps, dtype=np.float64)
    y = np.zeros(n)
    for m in midis:
        f0 = midi_hz(m) * 2 ** (rng.normal(0, 0.003))                    # slight detuning
        vib_hz, vib_depth = ins.vibrato
        f_inst = f0 * (1 + vib_depth * np.sin(2 * np.pi * vib_hz * t + rng.uniform(0, 2 * np.pi)))
        gain = 10 ** (rng.normal(0, 1.0) / 20)
        if ins.ratios:                                  # inharmonic partials, summed directly
            ratios = np.asarray(ins.ratios)
            keep = ratios * f0 < band_hz
            phase = np.cumsum(f_inst) / sr
            parts = np.sin(2 * np.pi * ratios[keep][:, None] * phase
                           + rng.uniform(0, 2 * np.pi, int(keep.sum()))[:, None])   # (P, n)
            bright = (amps[keep][:, None] * parts).sum(0)
            dull = amps[0] * parts[0]
        else:
            H = int(min(len(amps), band_hz // (f0 * (1 + vib_depth))))
            phase0 = rng.uniform()
            bright = _oscillator(amps[:H], f_inst, phase0, sr)
            dull = _oscillator(amps[:1], f_inst, phase0, sr) if math.isfinite(ins.bright) else bright
        for s0, s1 in zip(starts, ends):
            tt = t - s0
            env = np.clip(tt / ins.attack, 0, 1)
            if math.isfinite(ins.decay):
                after = np.clip(tt - ins.attack, 0, None)
                env = env * (ins.sustain + (1 - ins.sustain) * np.exp(-after / ins.decay))
            env *= np.clip((s1 - t) / 0.03, 0, 1)                           # release before next
            if math.isfinite(ins.bright):
                mix = np.exp(-np.clip(tt, 0, None) / ins.bright)
                y += gain * env * (mix * bright + (1 - mix) * dull)
            else:
                y += gain * env * bright
    if ins.breath:
        y += ins.breath * _rms(y) * coloured_noise(rng, n, -3.0, 800, 6000, sr)
    return y / _rms(y)


# ----------------------------------------------------------------------------------------------
# Environmental events


def _pulse_envelope(n: int, rate: float, rng, sharp: float, sr: int) -> np.ndarray:
    """Periodic pulses at `rate` Hz (1.5% rate wobble): ((1 + cos phase)/2)^sharp."""
    t = np.arange(n) / sr
    f = rate * (1 + 0.015 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * (np.cumsum(f) / sr + rng.uniform())
    return ((1 + np.cos(phase)) / 2) ** sharp


def _decaying_impulses(n: int, times: np.ndarray, amps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sum of amps_k * kernel placed at integer sample times_k (one FFT convolution)."""
    x = np.bincount(np.clip(times, 0, n - 1), weights=amps, minlength=n)[:n]
    N = _fft_len(n + len(kernel))
    return np.fft.irfft(np.fft.rfft(x, N) * np.fft.rfft(kernel, N), N)[:n]


def render_event(family: str, key: float, n: int, rng: np.random.Generator,
                 sr: int = SAMPLE_RATE) -> np.ndarray:
    """An environmental texture of `family` with key parameter `key` (EVENT_FAMILIES); unit RMS."""
    t = np.arange(n) / sr
    dur = n / sr
    if family == "hum":                      # harmonic stack, slow 10% AM, weak brown noise
        amps = np.arange(1, 13, dtype=np.float64) ** -1.2 * rng.uniform(0.6, 1.0, 12)
        amps[0] = 1.0
        H = int(min(12, 7000 // key))
        f = np.full(n, key * (1 + 0.002 * rng.standard_normal()))
        y = _oscillator(amps[:H], f, rng.uniform(), sr)
        y *= 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * t)
        y += 0.03 * coloured_noise(rng, n, -6.0, 20, 4000, sr)
    elif family == "engine":                 # low-pass noise, pulsed at the firing rate
        env = _pulse_envelope(n, key, rng, 4.0, sr)
        y = coloured_noise(rng, n, -4.0, 30, 900, sr) * (0.15 + env)
    elif family == "drill":                  # high whine with fast AM over band noise
        am = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(30, 60) * t)
        f = np.full(n, key * (1 + 0.003 * rng.standard_normal()))
        y = _oscillator(np.array([1.0, 0.35, 0.15]), f, rng.uniform(), sr) * am
        y += 0.15 * coloured_noise(rng, n, 0.0, key, min(4 * key, 7900), sr)
    elif family == "jackhammer":             # broadband decaying clicks at the hit rate
        period = sr / key
        times = np.arange(rng.uniform(0, period), n, period)
        times = (times + 0.02 * period * rng.standard_normal(len(times))).astype(np.int64)
        L = int(0.012 * sr)
        kernel = rng.standard_normal(L) * np.exp(-np.arange(L) / (0.003 * sr))   # 3 ms decay
        y = _decaying_impulses(n, times, rng.uniform(0.7, 1.0, len(times)), kernel)
        y += 0.05 * _rms(y) * coloured_noise(rng, n, 0.0, 200, 7000, sr)
    elif family == "siren":                  # harmonic tone swept +-0.35 octave
        sweep = 0.35 * np.sin(2 * np.pi * rng.uniform(0.6, 1.5) * t + rng.uniform(0, 6.3))
        y = _oscillator(np.array([1.0, 0.5, 0.3, 0.15]), key * 2.0 ** sweep, rng.uniform(), sr)
    elif family == "alarm":                  # beeps: a tone gated on/off at 3-5 Hz, duty 0.5
        gate = (np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6.3)) > 0).astype(np.float64)
        gate = np.convolve(gate, np.ones(80) / 80, mode="same")          # 5 ms ramps
        y = _oscillator(np.array([1.0, 0.2]), np.full(n, key), rng.uniform(), sr) * gate
    elif family == "bark":                   # harmonic bursts with a falling pitch and a formant
        y = np.zeros(n)
        n_slots = max(1, int(dur / 0.33))                 # 1-3 barks a second, in 0.33 s slots
        n_barks = min(n_slots, max(1, int(round(rng.uniform(1, 3) * dur))))
        for k in np.sort(rng.choice(n_slots, size=n_barks, replace=False)):
            L = min(n, int(rng.uniform(0.08, 0.18) * sr))
            s0 = min(n - L, int((k * 0.33 + rng.uniform(0, 0.1)) * sr))
            f0 = key * np.linspace(1.0, 0.7, L) * rng.uniform(0.97, 1.03)
            src = glottal_source(f0, rng, 0.02, 0.1, 0.12, sr) + 0.3 * rng.standard_normal(L)
            fm = np.array([1.6 * key + 400, 2.5 * key + 1200, 3500.0])
            H = functools.partial(resonator_response, fm, [200.0, 250, 300], sr=sr)
            seg = _filter(src * np.hanning(L), lambda N: H(N), pad=256)
            y[s0:s0 + len(seg)] += seg[:n - s0]
    elif family == "impact":                 # 1-2 knocks: a click exciting decaying modes
        y = np.zeros(n)
        for _ in range(int(rng.integers(1, 3))):
            s0 = int(rng.uniform(0.0, 0.7) * n)
            L = min(n - s0, int(0.3 * sr))
            tt = np.arange(L) / sr
            tau = rng.uniform(0.04, 0.12)
            modes = sum(a * np.sin(2 * np.pi * key * r * tt) * np.exp(-tt * r / tau)
                        for r, a in ((1.0, 1.0), (1.59, 0.6), (2.14, 0.4), (2.65, 0.3)))
            click = rng.standard_normal(L) * np.exp(-tt / 0.002)
            y[s0:s0 + L] += rng.uniform(0.5, 1.0) * (modes + 0.5 * click)
    elif family == "rain":                   # pink noise + droplets (decaying 2-6 kHz blips)
        y = coloured_noise(rng, n, -3.0, 500, 7900, sr)
        n_drops = rng.poisson(key * dur)
        L = int(0.008 * sr)
        tt = np.arange(L) / sr
        for fd in rng.uniform(2000, 6000, 4):                               # 4 drop timbres
            kernel = np.sin(2 * np.pi * fd * tt) * np.exp(-tt / 0.0015)
            times = rng.integers(0, n, max(1, n_drops // 4))
            y += 3.0 * _decaying_impulses(n, times, np.exp(rng.normal(0, 0.7, len(times))), kernel)
    elif family == "wind":                   # pink noise low-passed at the cut-off, slow gusts
        gust = coloured_noise(rng, n + sr, -12.0, 0.3, 3.0, sr)[:n]
        env = 0.35 + 0.65 / (1 + np.exp(-1.5 * gust))
        y = coloured_noise(rng, n, -3.0, 40, key, sr) * env
    else:
        raise ValueError(f"unknown event family {family!r}; allowed: {', '.join(EVENT_FAMILIES)}")
    return y / _rms(y)


# ----------------------------------------------------------------------------------------------
# The corpus


class SyntheticCorpus:
    """The clips of one split of a synthetic corpus: `corpus[j]` is a `Clip`.

    Index i in 0..cfg.n_clips-1 belongs to one split: with n_folds = k, fold (i % k) + 1; else
    train for i % 10 in 0..7, valid for 8, test for 9. Speech in a split is spoken only by that
    split's speakers (make_speaker). Clip i is a pure function of (cfg, i): labels come from
    SeedSequence child 0 of seed_sequence(seed, name, i) and the audio from child 1, so
    `labels(j)` is cheap (no audio) and no result depends on order, process or worker count.

    Single-kind corpora (word, command, music, event) assign the semantic class by index,
    (i // k) % n_classes with k = 10 or n_folds, so every split is class-balanced; everything
    else (speaker, emotion, rate, the mixed corpus' classes) is drawn independently.
    """

    def __init__(self, cfg: Optional[CorpusConfig] = None, split=None):
        self.cfg = cfg = cfg or CorpusConfig()
        self.n = int(round(cfg.clip_seconds * SAMPLE_RATE))
        self.splits = tuple(self.all_splits()) if split is None else (
            (split,) if isinstance(split, str) else tuple(split))
        bad = [s for s in self.splits if s not in self.all_splits()]
        if bad:
            raise ValueError(f"unknown split {bad[0]!r} for corpus {cfg.name!r}; allowed: "
                             f"{', '.join(self.all_splits())}")
        self.indices = [i for i in range(cfg.n_clips) if self.split_of(i) in self.splits]
        self.speakers = [make_speaker(cfg.seed, s, cfg.n_speakers) for s in range(cfg.n_speakers)]
        self._by_split = {sp: [s for s in self.speakers if s.split == sp] for sp in SPLITS}
        self._labels: Dict[int, Dict[str, str]] = {}      # labels(j) cache: views ask often

    def all_splits(self) -> List[str]:
        k = self.cfg.n_folds
        return [f"fold{f}" for f in range(1, k + 1)] if k else list(SPLITS)

    def split_of(self, index: int) -> str:
        k = self.cfg.n_folds
        if k:
            return f"fold{index % k + 1}"
        r = index % 10
        return "train" if r < 8 else "valid" if r == 8 else "test"

    def select(self, split) -> "SyntheticCorpus":
        return SyntheticCorpus(self.cfg, split)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Clip:
        return self.make(self.indices[j])

    def labels(self, j: int) -> Dict[str, str]:
        """The labels of clip j without rendering it."""
        if j not in self._labels:
            self._labels[j] = self.spec(self.indices[j])["labels"]
        return self._labels[j]

    def split(self, j: int) -> str:
        return self.split_of(self.indices[j])

    # -- class lists -----------------------------------------------------------------------------

    def classes(self, key: str) -> List[str]:
        """Every class label `key` can take in this corpus, in a fixed order."""
        cfg = self.cfg
        fams = list(EVENT_FAMILIES)[:cfg.n_event_families]
        table = {
            "domain": list(DOMAINS) + ["scene"],
            "word": list(WORDS)[:cfg.n_words],
            "intent": ["|".join(i) for i in INTENTS],
            "action": sorted({i[0] for i in INTENTS}), "object": sorted({i[1] for i in INTENTS}),
            "location": sorted({i[2] for i in INTENTS}),
            "instrument": list(INSTRUMENTS)[:cfg.n_instruments], "chord": list(CHORDS),
            "event": fams if cfg.n_event_variants == 1 else
            [f"{f}-{v + 1}" for f in fams for v in range(cfg.n_event_variants)],
            "pitch_group": list(PITCH_GROUPS), "tract_group": list(TRACT_GROUPS),
            "emotion": list(EMOTIONS), "rate": list(RATES),
            "speaker": [s.id for s in self.speakers], "background": ["music", "environment"],
        }
        if key not in table:
            raise ValueError(f"unknown label {key!r}; allowed: {', '.join(table)}")
        return table[key]

    # -- stage 1: labels ---------------------------------------------------------------------------

    def spec(self, index: int) -> dict:
        """Everything about clip `index` that is drawn before rendering (cheap)."""
        cfg = self.cfg
        lab_ss, _ = seed_sequence(cfg.seed, cfg.name, index).spawn(2)
        rng = np.random.default_rng(lab_ss)
        split = self.split_of(index)
        k = cfg.n_folds or 10
        forced = index // k                                                # balanced class index
        parts = []                                                         # (domain, labels, params)
        if cfg.kind == "mixed":
            w = np.array(cfg.domain_weights) / sum(cfg.domain_weights)
            domain = DOMAINS[rng.choice(4, p=w)]
            if domain in ("speech", "mixture"):
                command = rng.random() < cfg.command_prob
                parts.append(self._speech(rng, split, None, command))
            if domain == "music" or (domain == "mixture" and rng.random() < 0.5):
                parts.append(self._music(rng, None))
            elif domain in ("environment", "mixture"):
                parts.append(self._event(rng, None))
        elif cfg.kind in ("word", "command"):
            domain = "speech"
            parts.append(self._speech(rng, split, forced, cfg.kind == "command"))
        elif cfg.kind == "music":
            domain = "music"
            parts.append(self._music(rng, forced))
        elif cfg.kind == "event":
            domain = "environment"
            parts.append(self._event(rng, forced))
        else:                                                              # scene
            domain = "scene"
            if rng.random() < 0.5:
                parts.append(self._speech(rng, split, None, False))
            if rng.random() < 0.4:
                parts.append(self._music(rng, None))
            for _ in range(int(rng.choice(3, p=[0.3, 0.45, 0.25]))):
                parts.append(self._event(rng, None))
            if not parts:
                parts.append(self._event(rng, None))
        labels = {"domain": domain}
        for p in parts:
            for key, v in p[1].items():
                labels.setdefault(key, v)              # a scene's first event names "event"
        if domain == "mixture":
            labels["background"] = parts[1][0]
        if domain == "scene":
            labels["tags"] = ",".join(sorted({t for p in parts for t in _tags(p[0], p[1])},
                                             key=AUDIOSET_TAGS.index))
        texture = None                                     # a texture under an event-only clip
        if domain == "environment" and rng.random() < cfg.background_prob:
            fam = parts[0][2]["family"]
            others = [f for f in EVENT_FAMILIES if f != fam]
            other = others[int(rng.integers(len(others)))]
            v = int(rng.integers(5))
            key = float(EVENT_FAMILIES[other][1][v] * rng.uniform(0.93, 1.07))
            texture = dict(family=other, key=key, db=float(rng.uniform(*cfg.background_db)))
        return dict(index=index, split=split, domain=domain, labels=labels, parts=parts, texture=texture,
                    snr_db=float(rng.uniform(*cfg.snr_db)),
                    floor_snr_db=float(rng.uniform(*cfg.floor_snr_db)),
                    gain_db=float(rng.uniform(*cfg.gain_db)),
                    tilt=float(rng.uniform(-cfg.tilt_db, cfg.tilt_db)),
                    levels_db=[float(v) for v in rng.uniform(-10, 0, len(parts))])

    def _speech(self, rng, split, forced, command):
        cfg = self.cfg
        pool = self._by_split[split]                       # held-out speakers per split
        spk = pool[int(rng.integers(len(pool)))]
        emotion = list(EMOTIONS)[int(rng.integers(len(EMOTIONS)))]
        rate = list(RATES)[int(rng.integers(len(RATES)))]
        labels = dict(speaker=spk.id, pitch_group=spk.pitch_group, tract_group=spk.tract_group,
                      emotion=emotion, rate=rate)
        if command:
            c = int(rng.integers(len(INTENTS))) if forced is None else forced % len(INTENTS)
            action, obj, loc = INTENTS[c]
            labels.update(intent="|".join(INTENTS[c]), action=action, object=obj, location=loc)
            words = command_words(INTENTS[c])
        else:
            c = int(rng.integers(cfg.n_words)) if forced is None else forced % cfg.n_words
            labels["word"] = list(WORDS)[c]
            words = [labels["word"]]
        return ("speech", labels, dict(words=words, speaker=spk, emotion=emotion, rate=rate))

    def _music(self, rng, forced):
        cfg = self.cfg
        n_cls = cfg.n_instruments * len(CHORDS)
        c = int(rng.integers(n_cls)) if forced is None else forced % n_cls
        instrument, chord = list(INSTRUMENTS)[c // len(CHORDS)], list(CHORDS)[c % len(CHORDS)]
        root = int(rng.integers(ROOT_MIDI[0], ROOT_MIDI[1] + 1))
        return ("music", dict(instrument=instrument, chord=chord),
                dict(instrument=instrument, midis=[root + i for i in CHORDS[chord]], root=root))

    def _event(self, rng, forced):
        cfg = self.cfg
        n_cls = cfg.n_event_families * cfg.n_event_variants
        c = int(rng.integers(n_cls)) if forced is None else forced % n_cls
        family, variant = list(EVENT_FAMILIES)[c // cfg.n_event_variants], c % cfg.n_event_variants
        if cfg.n_event_variants == 1:
            variant = int(rng.integers(5))                  # any of the 5: within-class variety
            name = family
        else:
            name = f"{family}-{variant + 1}"
        key = EVENT_FAMILIES[family][1][variant] * rng.uniform(0.93, 1.07)
        return ("environment", dict(event=name), dict(family=family, variant=variant, key=float(key)))

    # -- stage 2: audio ----------------------------------------------------------------------------

    def make(self, index: int) -> Clip:
        """Render clip `index`: sources at unit RMS, mixed, noise floor, channel tilt, level."""
        cfg, n, sr = self.cfg, self.n, SAMPLE_RATE
        spec = self.spec(index)
        _, aud_ss = seed_sequence(cfg.seed, cfg.name, index).spawn(2)
        rng = np.random.default_rng(aud_ss)
        meta = dict(snr_db=None, floor_snr_db=spec["floor_snr_db"], gain_db=spec["gain_db"],
                    tilt_db_per_octave=spec["tilt"])
        sources = []
        for domain, _, p in spec["parts"]:
            if domain == "speech":
                utt, facts = render_speech(p["words"], p["speaker"], p["emotion"], p["rate"], rng, sr)
                if len(utt) > n:
                    raise RuntimeError(f"utterance of {len(utt) / sr:.2f} s exceeds "
                                       f"clip_seconds={cfg.clip_seconds}")
                x = np.zeros(n)
                start = int(rng.uniform(0.3, 0.7) * (n - len(utt)))
                x[start:start + len(utt)] = utt
                meta.update(facts, speech_start_s=start / sr)
                meta["emotion_gain_db"] = EMOTIONS[p["emotion"]][2]
            elif domain == "music":
                x = render_music(p["instrument"], p["midis"], n, rng, sr)
                meta.update(root_midi=p["root"], f0_hz=[midi_hz(m) for m in p["midis"]])
            else:
                x = render_event(p["family"], p["key"], n, rng, sr)
                meta.setdefault("event_key", p["key"])
                meta.setdefault("event_family", p["family"])
            sources.append((domain, x))
        if spec["texture"] is not None:
            tx = spec["texture"]
            under = render_event(tx["family"], tx["key"], n, rng, sr)
            sources[0] = (sources[0][0], sources[0][1] + 10 ** (tx["db"] / 20) * under)
            meta.update(background_event=tx["family"], background_db=tx["db"])
        if spec["domain"] == "mixture":            # speech at snr_db over its background
            speech, bg = sources[0][1], sources[1][1]
            active = speech != 0
            y = speech + bg * _rms(speech[active]) / _rms(bg[active]) * 10 ** (-spec["snr_db"] / 20)
            meta["snr_db"] = spec["snr_db"]
        elif spec["domain"] == "scene":
            y = sum(x * 10 ** (lv / 20) for (_, x), lv in zip(sources, spec["levels_db"]))
        else:
            y = sources[0][1]
        level = _rms(y)
        y = y + level * 10 ** (-spec["floor_snr_db"] / 20) * coloured_noise(rng, n, -3.0, 20, 8000, sr)
        y = _tilt(y, spec["tilt"], sr)
        # Final RMS: level_dbfs + the random gain (+ the emotion's vocal effort for speech), so
        # loudness is an emotion cue, blurred by the random gain.
        first = spec["parts"][0]
        effort = EMOTIONS[first[2]["emotion"]][2] if first[0] == "speech" else 0.0
        y *= 10 ** ((cfg.level_dbfs + spec["gain_db"] + effort) / 20) / _rms(y)
        meta["level_dbfs"] = cfg.level_dbfs + spec["gain_db"] + effort
        peak = np.abs(y).max()
        if peak > 0.99:                 # scale (never clip) into range: ~2% of clips at the defaults
            y *= 0.99 / peak
        meta["limited"] = bool(peak > 0.99)
        return Clip(audio=y.astype(np.float32), sample_rate=sr, labels=dict(spec["labels"]),
                    domain=spec["domain"], speaker=first[1].get("speaker"), split=spec["split"],
                    source=f"synthetic:{cfg.name}:{cfg.seed}:{index}", meta=meta)


def _tags(domain: str, labels: dict) -> List[str]:
    """AudioSet-like tags of one source."""
    if domain == "speech":
        return ["speech", "speech:" + labels["pitch_group"]]
    if domain == "music":
        return ["music", labels["instrument"]]
    return [labels["event"].split("-")[0]]


def audioset_tags(labels: Dict[str, str]) -> List[str]:
    """The AudioSet-like tags (AUDIOSET_TAGS) of any clip's labels."""
    if "tags" in labels:
        return labels["tags"].split(",") if labels["tags"] else []
    tags = []
    if "pitch_group" in labels:
        tags += _tags("speech", labels)
    if "instrument" in labels:
        tags += _tags("music", labels)
    if "event" in labels and labels["event"].split("-")[0] in EVENT_FAMILIES:
        tags += _tags("environment", labels)
    return tags


# ----------------------------------------------------------------------------------------------
# Views: torch Datasets over any source (SyntheticCorpus or AudioFiles) and one collate


def _audio_tensor(clip: Clip, max_seconds: Optional[float]) -> torch.Tensor:
    x = clip.audio
    if max_seconds is not None:
        m = int(round(max_seconds * clip.sample_rate))
        if len(x) > m:                                   # centre crop, deterministic
            s = (len(x) - m) // 2
            x = x[s:s + m]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


class AudioClassification(torch.utils.data.Dataset):
    """Single-label classification view: item = {"audio": (n,) float32, "target": int, "index": j}.

    source: a SyntheticCorpus or AudioFiles; task: the label key (word, event, intent, ...).
    Items without that label are left out. `classes` fixes the label order (default: the
    source's full class list, the same for every split). max_seconds centre-crops long clips.
    """

    def __init__(self, source, task: str, classes: Optional[Sequence[str]] = None,
                 max_seconds: Optional[float] = None):
        self.source, self.task, self.max_seconds = source, task, max_seconds
        self.classes = list(classes) if classes is not None else source.classes(task)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.items = [j for j in range(len(source)) if task in source.labels(j)]
        for j in self.items:
            if source.labels(j)[task] not in self.class_index:
                raise ValueError(f"label {task}={source.labels(j)[task]!r} of item {j} is not in "
                                 f"the class list ({len(self.classes)} classes)")

    def __len__(self) -> int:
        return len(self.items)

    def targets(self) -> List[int]:
        return [self.class_index[self.source.labels(j)[self.task]] for j in self.items]

    def __getitem__(self, i: int) -> dict:
        j = self.items[i]
        clip = self.source[j]
        return dict(audio=_audio_tensor(clip, self.max_seconds),
                    target=self.class_index[clip.labels[self.task]], index=j)


class MultiLabelAudio(torch.utils.data.Dataset):
    """AudioSet-like multi-label view: item = {"audio", "target": (C,) float32 multi-hot, "index"}.

    Tags come from audioset_tags(labels) over the vocabulary `tags` (default AUDIOSET_TAGS).
    """

    def __init__(self, source, tags: Sequence[str] = AUDIOSET_TAGS, max_seconds: Optional[float] = None):
        self.source, self.classes, self.max_seconds = source, list(tags), max_seconds
        self.tag_index = {t: i for i, t in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.source)

    def multi_hot(self, labels) -> torch.Tensor:
        y = torch.zeros(len(self.classes))
        for t in audioset_tags(labels):
            if t in self.tag_index:
                y[self.tag_index[t]] = 1.0
        return y

    def __getitem__(self, j: int) -> dict:
        clip = self.source[j]
        return dict(audio=_audio_tensor(clip, self.max_seconds), target=self.multi_hot(clip.labels), index=j)


@dataclass(frozen=True)
class Task:
    """An LALM instruction task: a label key asked with question templates, closed answer set."""
    group: str                    # "semantic" (what is said / which sound) | "paralinguistic"
    label: str
    questions: Tuple[str, ...]


TASKS = {
    "word": Task("semantic", "word", ("Which word is spoken?", "What word does the speaker say?")),
    "action": Task("semantic", "action", ("Which action does the speaker ask for?",)),
    "object": Task("semantic", "object", ("Which object is the command about?",)),
    "location": Task("semantic", "location", ("Which room is the command about?",)),
    "sound": Task("semantic", "event", ("Which sound can you hear?", "What is making this sound?")),
    "instrument": Task("semantic", "instrument", ("Which instrument is playing?",)),
    "chord": Task("semantic", "chord", ("Is this a single note, or which kind of chord?",)),
    "pitch_group": Task("paralinguistic", "pitch_group", ("Is the speaker's voice low, mid or high pitched?",)),
    "tract_group": Task("paralinguistic", "tract_group",
                        ("Which speaker group is this, by vocal-tract length (long, medium, short)?",)),
    "emotion": Task("paralinguistic", "emotion",
                    ("How does the speaker sound?", "Which emotion does the speaker convey?")),
    "rate": Task("paralinguistic", "rate", ("How fast is the speaker talking?",)),
}


class InstructionDataset(torch.utils.data.Dataset):
    """LALM instruction view: one closed-set question per clip.

    Item = {"audio", "prompt", "question", "choices" (list), "answer", "answer_index", "task",
    "group" ("semantic" | "paralinguistic"), "index"}; prompt = question + the answer set.
    The task is drawn uniformly among those of `tasks` (default: all of TASKS) whose label the
    clip carries, and the question template likewise, from seed_sequence(seed, "instruction", j):
    deterministic. Clips with no applicable task are left out. all_tasks=True asks every
    applicable task of every clip instead (one item per (clip, task) pair, clip-major): more
    questions from the same audio, and a per-task test set as large as the clips allow.
    `meta(i)` is an item without its audio (no clip is rendered or read).
    """

    def __init__(self, source, tasks: Optional[Sequence[str]] = None, seed: int = 0,
                 max_seconds: Optional[float] = None, all_tasks: bool = False):
        names = list(TASKS) if tasks is None else list(tasks)
        for t in names:
            if t not in TASKS:
                close = difflib.get_close_matches(t, TASKS, n=1)
                raise ValueError(f"unknown task {t!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                 + f" (tasks: {', '.join(TASKS)})")
        self.source, self.max_seconds = source, max_seconds
        self.choices = {}
        for t in names:
            try:
                self.choices[t] = source.classes(TASKS[t].label)
            except ValueError:
                continue                                   # the source has no such label
        self.items = []                                    # (j, task, template)
        for j in range(len(source)):
            labels = source.labels(j)
            ok = [t for t in self.choices if TASKS[t].label in labels]
            if ok:
                rng = np.random.default_rng(seed_sequence(seed, "instruction", j))
                t = ok[int(rng.integers(len(ok)))]
                if not all_tasks:
                    self.items.append((j, t, TASKS[t].questions[int(rng.integers(len(TASKS[t].questions)))]))
                    continue
                for t in ok:                                # template drawn per (clip, task)
                    rng_t = np.random.default_rng(seed_sequence(seed, f"instruction/{t}", j))
                    self.items.append((j, t, TASKS[t].questions[int(rng_t.integers(len(TASKS[t].questions)))]))

    def __len__(self) -> int:
        return len(self.items)

    def meta(self, i: int) -> dict:
        j, t, q = self.items[i]
        choices = self.choices[t]
        answer = self.source.labels(j)[TASKS[t].label]
        return dict(prompt=f"{q} Answer with one of: {', '.join(choices)}.", question=q,
                    choices=list(choices), answer=answer, answer_index=choices.index(answer),
                    task=t, group=TASKS[t].group, index=j)

    def __getitem__(self, i: int) -> dict:
        return dict(audio=_audio_tensor(self.source[self.items[i][0]], self.max_seconds), **self.meta(i))


def collate(items: Sequence[dict]) -> dict:
    """Batch view items: audio zero-padded to the longest clip.

    Returns {"audio": (B, N) float32, "lengths": (B,) int64, "mask": (B, N) bool (True = real
    sample)} plus every other key batched: ints -> (B,) int64, tensors -> stacked (B, ...),
    anything else (strings, choice lists) -> a list of length B.
    """
    lengths = torch.tensor([len(it["audio"]) for it in items], dtype=torch.long)   # (B,)
    N = int(lengths.max())
    audio = torch.zeros(len(items), N)                                              # (B, N)
    for b, it in enumerate(items):
        audio[b, :len(it["audio"])] = it["audio"]
    out = dict(audio=audio, lengths=lengths, mask=torch.arange(N)[None, :] < lengths[:, None])
    for key in items[0]:
        if key == "audio":
            continue
        vals = [it[key] for it in items]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            out[key] = torch.tensor(vals, dtype=torch.long)
        elif all(isinstance(v, torch.Tensor) for v in vals):
            out[key] = torch.stack(vals)
        else:
            out[key] = vals
    return out


# ----------------------------------------------------------------------------------------------
# Real data: WAV I/O (standard library + numpy), resampling, loaders

WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_FORMAT_NAMES = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM",
                 0x0055: "MPEG layer 3"}
ENCODINGS = ("pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64")   # write_wav
SUPPORTED_ENCODINGS = "PCM 8/16/24/32-bit, IEEE float 32/64-bit (plain or WAVE_FORMAT_EXTENSIBLE)"


def _wav_layout(path: str, data: bytes) -> dict:
    """Walk the RIFF chunks; return the format and where the samples are, or ValueError."""
    if len(data) == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file (starts with {data[:12]!r})")
    pos, fmt, found = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + size > len(data):
                raise ValueError(f"{path}: truncated or malformed fmt chunk ({size} bytes declared)")
            tag, ch, sr, _, align, bits = struct.unpack("<HHIIHH", data[body:body + 16])
            if tag == WAVE_FORMAT_EXTENSIBLE:
                if size < 40:
                    raise ValueError(f"{path}: WAVE_FORMAT_EXTENSIBLE fmt chunk too short "
                                     f"({size} bytes, need 40)")
                tag = struct.unpack("<H", data[body + 24:body + 26])[0]      # SubFormat GUID head
            fmt = dict(tag=tag, channels=ch, sample_rate=sr, block_align=align, bits=bits)
        elif cid == b"data":
            if fmt is None:
                raise ValueError(f"{path}: data chunk before the fmt chunk")
            available = len(data) - body
            if size > available:
                raise ValueError(f"{path}: truncated: data chunk declares {size} bytes but only "
                                 f"{available} follow")
            found = (body, size)
            break
        pos = body + size + (size & 1)                   # chunks are word-aligned
    if fmt is None:
        raise ValueError(f"{path}: truncated or malformed: no fmt chunk")
    if found is None:
        raise ValueError(f"{path}: truncated or malformed: no data chunk")
    tag, bits = fmt["tag"], fmt["bits"]
    ok = ((tag == WAVE_FORMAT_PCM and bits in (8, 16, 24, 32))
          or (tag == WAVE_FORMAT_IEEE_FLOAT and bits in (32, 64)))
    if not ok:
        name = _FORMAT_NAMES.get(tag, "PCM" if tag == 1 else "IEEE float" if tag == 3 else "unknown")
        raise ValueError(f"{path}: unsupported encoding: format tag 0x{tag:04X} ({name}), {bits} bits; "
                         f"supported: {SUPPORTED_ENCODINGS}")
    if fmt["channels"] < 1 or fmt["sample_rate"] < 1 or fmt["block_align"] != fmt["channels"] * bits // 8:
        raise ValueError(f"{path}: malformed fmt chunk: {fmt['channels']} channels, {fmt['sample_rate']} Hz, "
                         f"block_align {fmt['block_align']} (expected channels x bytes per sample)")
    body, size = found
    if size % fmt["block_align"]:
        raise ValueError(f"{path}: truncated: data chunk of {size} bytes is not a whole number of "
                         f"{fmt['block_align']}-byte frames")
    if size == 0:
        raise ValueError(f"{path}: empty: the data chunk holds no samples")
    return dict(fmt, offset=body, size=size)


def _decode(raw: bytes, bits: int, is_float: bool) -> np.ndarray:
    """Little-endian sample bytes -> float32 in [-1, 1)."""
    if is_float:
        return np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    if bits == 8:                                        # unsigned, offset 128
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if bits == 16:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = (v ^ 0x800000) - 0x800000                    # sign-extend 24 -> 32 bits
        return v.astype(np.float32) / 8388608.0
    return (np.frombuffer(raw, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)


def read_wav(path: str) -> Tuple[np.ndarray, int]:
    """Read a WAV file: returns (audio (frames, channels) float32, sample rate).

    The RIFF chunks are parsed here (to report bad files precisely and because `wave` refuses
    IEEE float and, before Python 3.12, WAVE_FORMAT_EXTENSIBLE); plain PCM is then read with the
    standard library's `wave`. Raises ValueError naming the file and the problem: not RIFF/WAVE,
    unsupported encoding, truncated, empty, NaN/inf samples.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    lay = _wav_layout(path, data)
    ch, bits = lay["channels"], lay["bits"]
    if lay["tag"] == WAVE_FORMAT_PCM and data[20:22] == b"\x01\x00":     # plain PCM: `wave` reads it
        with wave.open(path, "rb") as w:
            raw = w.readframes(w.getnframes())
    else:
        raw = data[lay["offset"]:lay["offset"] + lay["size"]]
    x = _decode(raw, bits, lay["tag"] == WAVE_FORMAT_IEEE_FLOAT)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: contains NaN or inf samples ({int((~np.isfinite(x)).sum())} of {x.size})")
    return x.reshape(-1, ch), lay["sample_rate"]


def write_wav(path: str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE, encoding: str = "pcm16") -> None:
    """Write (n,) or (n, channels) float audio as WAV. encoding: pcm8 | pcm16 | pcm24 | pcm32 |
    float32 | float64. PCM goes through `wave` (values clipped to [-1, 1), rounded); float writes
    a WAVE_FORMAT_IEEE_FLOAT header (fmt of 18 bytes + fact chunk) itself."""
    x = np.asarray(audio, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    n, ch = x.shape
    if encoding.startswith("pcm"):
        bits = int(encoding[3:])
        if bits not in (8, 16, 24, 32):
            raise ValueError(f"unknown encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")
        scale = 2.0 ** (bits - 1)
        q = np.clip(np.round(x * scale), -scale, scale - 1).astype(np.int64)
        if bits == 8:
            raw = (q + 128).astype(np.uint8).tobytes()
        elif bits == 24:
            u = (q & 0xFFFFFF).astype(np.uint32).reshape(-1)
            raw = np.stack([u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF], -1).astype(np.uint8).tobytes()
        else:
            raw = q.astype("<i2" if bits == 16 else "<i4").tobytes()
        with wave.open(os.fspath(path), "wb") as w:
            w.setnchannels(ch)
            w.setsampwidth(bits // 8)
            w.setframerate(sample_rate)
            w.writeframes(raw)
        return
    if encoding not in ("float32", "float64"):
        raise ValueError(f"unknown encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")
    bits = int(encoding[5:])
    raw = x.astype("<f4" if bits == 32 else "<f8").tobytes()
    align = ch * bits // 8
    fmt = struct.pack("<HHIIHHH", WAVE_FORMAT_IEEE_FLOAT, ch, sample_rate, sample_rate * align, align, bits, 0)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, n) \
        + b"data" + struct.pack("<I", len(raw)) + raw + (b"\x00" if len(raw) & 1 else b"")
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


@functools.lru_cache(maxsize=16)
def _resample_table(up: int, down: int, zeros: int, rolloff: float, beta: float):
    """Polyphase table (up, 2K) of the windowed-sinc kernel, and K; see resample."""
    fc = 0.5 * min(1.0, up / down) * rolloff                  # cut-off, cycles per input sample
    half = zeros / (2 * fc)                                   # kernel half-width, input samples
    K = int(math.ceil(half))
    j = np.arange(-K + 1, K + 1)                               # taps relative to floor(t)
    tau = (np.arange(up) / up)[:, None] - j[None, :]          # (up, 2K) time to each tap
    u = np.clip(tau / half, -1.0, 1.0)
    window = np.i0(beta * np.sqrt(1 - u * u)) / np.i0(beta) * (np.abs(tau) <= half)
    table = 2 * fc * np.sinc(2 * fc * tau) * window            # (up, 2K)
    return table, K


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE, zeros: int = 32,
             rolloff: float = 0.94, beta: float = 9.0) -> np.ndarray:
    """Band-limited resampling along axis 0 with a Kaiser-windowed sinc, in polyphase form.

    With up/down = sr_out/sr_in reduced by their gcd, output sample m sits at input time
    t = m * down / up = base + p/up (base integer, phase p). It is sum_j h(p/up - j) x[base + j]
    over 2K taps, where h(tau) = 2 fc sinc(2 fc tau) w(tau / half) is an ideal low-pass at
    fc = rolloff * min(sr_in, sr_out) / 2 (in cycles per input sample: 0.5 * min(1, up/down) *
    rolloff), truncated to `zeros` zero crossings each side by a Kaiser window (beta 9: ~90 dB
    stop band). The `up` phases are tabulated once. Tested on sines: passband error and alias
    suppression.
    """
    if sr_in == sr_out:
        return np.asarray(x, dtype=np.float32)
    if sr_in < 1 or sr_out < 1:
        raise ValueError(f"sample rates must be >= 1, got {sr_in} -> {sr_out}")
    x = np.asarray(x, dtype=np.float64)
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = sr_out // g, sr_in // g
    table, K = _resample_table(up, down, zeros, rolloff, beta)
    n_out = int(math.ceil(len(x) * up / down))
    xp = np.concatenate([np.zeros((K,) + x.shape[1:]), x, np.zeros((K + 1,) + x.shape[1:])])
    out = np.empty((n_out,) + x.shape[1:])
    taps = np.arange(-K + 1, K + 1) + K                          # offsets into the padded input
    step = max(1, 2 ** 20 // (2 * K))                            # outputs per chunk (~8 MB)
    for a in range(0, n_out, step):
        m = np.arange(a, min(n_out, a + step))
        base, phase = np.divmod(m * down, up)
        frames = xp[base[:, None] + taps[None, :]]                # (M, 2K, ...)
        out[a:a + len(m)] = np.einsum("mj,mj...->m...", table[phase], frames)
    return out.astype(np.float32)


def load_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any supported file -> (n,) float32 mono at `sample_rate` (mean of the channels, resampled).

    .wav is read here; other formats (FLAC, OGG, ...) need the optional `soundfile` package.
    """
    path = os.fspath(path)
    if path.lower().endswith(".wav"):
        x, sr = read_wav(path)
    else:
        try:
            import soundfile
        except ImportError:
            ext = os.path.splitext(path)[1] or "this format"
            raise ImportError(f"{path}: reading {ext} needs the optional package soundfile "
                              f"(pip install soundfile); WAV needs nothing") from None
        try:
            x, sr = soundfile.read(path, dtype="float32", always_2d=True)
        except Exception as e:                            # soundfile raises its own error types
            raise ValueError(f"{path}: unreadable by soundfile: {e}") from None
        if x.size == 0:
            raise ValueError(f"{path}: empty: no audio samples")
        if not np.isfinite(x).all():
            raise ValueError(f"{path}: contains NaN or inf samples")
    mono = x.mean(axis=1)                                                 # (n,)
    return resample(mono, sr, sample_rate)


@dataclass
class FileRecord:
    path: str
    labels: Dict[str, str]
    domain: str
    speaker: Optional[str] = None
    split: str = "train"
    meta: dict = field(default_factory=dict)


class AudioFiles:
    """A real corpus as a sequence of Clips, read lazily (`files[j]` reads one file).

    Same interface as SyntheticCorpus: len, [j] -> Clip, labels(j), split(j), classes(key),
    select(split). on_error="raise" (default): a bad file raises ValueError naming the file and
    the problem when it is read. on_error="skip": every file is read once at construction, bad
    ones are dropped with a warning each and a final count (so a training run never meets one).
    """

    def __init__(self, records: List[FileRecord], on_error: str = "raise", name: str = "files"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.name, self.on_error = name, on_error
        classes: Dict[str, set] = {}                  # from every record, before any skipping
        for r in records:
            for k, v in r.labels.items():
                classes.setdefault(k, set()).add(v)
        self._classes = {k: sorted(v) for k, v in classes.items()}
        if on_error == "skip":                           # read every file once, drop bad ones
            good = []
            for r in records:
                try:
                    load_audio(r.path)
                    good.append(r)
                except (ValueError, OSError) as e:
                    warnings.warn(f"skipping bad file: {e}")
            if len(good) < len(records):
                warnings.warn(f"{name}: skipped {len(records) - len(good)} of {len(records)} files "
                              f"(on_error='skip')")
            records = good
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, j: int) -> Clip:
        r = self.records[j]
        return Clip(audio=load_audio(r.path), sample_rate=SAMPLE_RATE, labels=dict(r.labels),
                    domain=r.domain, speaker=r.speaker, split=r.split, source=r.path, meta=dict(r.meta))

    def labels(self, j: int) -> Dict[str, str]:
        return self.records[j].labels

    def split(self, j: int) -> str:
        return self.records[j].split

    def classes(self, key: str) -> List[str]:
        if key not in self._classes:
            raise ValueError(f"{self.name}: no label {key!r}; labels: {', '.join(self._classes)}")
        return list(self._classes[key])

    def select(self, split) -> "AudioFiles":
        """The records of one split or of several (a list), keeping the full class lists."""
        want = (split,) if isinstance(split, str) else tuple(split)
        have = sorted({r.split for r in self.records})
        bad = [s for s in want if s not in have]
        if bad:
            raise ValueError(f"{self.name}: no split {bad[0]!r}; splits: {', '.join(have)}")
        out = AudioFiles.__new__(AudioFiles)
        out.name, out.on_error, out._classes = self.name, self.on_error, self._classes
        out.records = [r for r in self.records if r.split in want]
        return out


def _need_dir(path: str, layout: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"{path}: folder not found; expected the {layout}")
    return path


def _read_csv(path: str, columns: Sequence[str], layout: str) -> List[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found; expected the {layout}")
    with open(path, newline="", encoding="utf-8-sig") as f:     # -sig: tolerate a BOM
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    for c in columns:
        if c not in header:
            raise ValueError(f"{path}: missing column {c!r} (columns found: {', '.join(header) or 'none'})")
    return rows


def _audio_files(folder: str) -> List[str]:
    exts = (".wav", ".flac", ".ogg")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(exts) and not f.startswith("."))


def load_speech_commands(root: str, on_error: str = "raise") -> AudioFiles:
    """Speech Commands (v1/v2) layout: <root>/<word>/<speaker>_nohash_<n>.wav,
    validation_list.txt and testing_list.txt (paths relative to root) define valid/test, the
    rest is train. Labels: word. `_background_noise_/` is not a word (see speech_commands_noise).
    """
    layout = "Speech Commands layout: <word>/<speaker>_nohash_<n>.wav, validation_list.txt, testing_list.txt"
    _need_dir(root, layout)
    lists = {}
    for split, fname in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        p = os.path.join(root, fname)
        if not os.path.isfile(p):
            raise ValueError(f"{p}: file not found; expected the {layout}")
        with open(p) as f:
            lists.update({line.strip().replace("\\", "/"): split for line in f if line.strip()})
    words = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("_")
                   and not d.startswith("."))
    if not words:
        raise ValueError(f"{root}: no word folders found; expected the {layout}")
    records = []
    for w in words:
        for fn in _audio_files(os.path.join(root, w)):
            speaker = fn.split("_nohash_")[0] if "_nohash_" in fn else None
            records.append(FileRecord(os.path.join(root, w, fn), dict(word=w), "speech", speaker,
                                      lists.get(f"{w}/{fn}", "train")))
    return AudioFiles(records, on_error, "speech_commands")


def speech_commands_noise(root: str, on_error: str = "raise") -> AudioFiles:
    """The long noise recordings in <root>/_background_noise_/ (labels: event = file stem)."""
    folder = _need_dir(os.path.join(root, "_background_noise_"),
                       "Speech Commands layout with _background_noise_/")
    records = [FileRecord(os.path.join(folder, fn), dict(event=os.path.splitext(fn)[0]), "environment")
               for fn in _audio_files(folder)]
    return AudioFiles(records, on_error, "speech_commands_noise")


def load_esc50(root: str, on_error: str = "raise") -> AudioFiles:
    """ESC-50 layout: <root>/meta/esc50.csv (filename, fold, target, category, ...) and
    <root>/audio/<filename>. Splits: fold1..fold5. Labels: event = category."""
    layout = "ESC-50 layout: meta/esc50.csv and audio/*.wav"
    rows = _read_csv(os.path.join(root, "meta", "esc50.csv"), ("filename", "fold", "category"), layout)
    audio = _need_dir(os.path.join(root, "audio"), layout)
    records = [FileRecord(os.path.join(audio, r["filename"]), dict(event=r["category"]), "environment",
                          None, f"fold{int(r['fold'])}", dict(target=r.get("target"), esc10=r.get("esc10")))
               for r in rows]
    return AudioFiles(records, on_error, "esc50")


def load_urbansound8k(root: str, on_error: str = "raise") -> AudioFiles:
    """UrbanSound8K layout: <root>/metadata/UrbanSound8K.csv (slice_file_name, fsID, ..., fold,
    classID, class) and <root>/audio/fold<k>/<slice_file_name>. Splits: fold1..fold10.
    Labels: event = class; meta: fsID (source recording), salience."""
    layout = "UrbanSound8K layout: metadata/UrbanSound8K.csv and audio/fold1..fold10/*.wav"
    rows = _read_csv(os.path.join(root, "metadata", "UrbanSound8K.csv"),
                     ("slice_file_name", "fold", "class"), layout)
    audio = _need_dir(os.path.join(root, "audio"), layout)
    records = []
    for r in rows:
        fold = int(r["fold"])
        _need_dir(os.path.join(audio, f"fold{fold}"), layout)
        path = os.path.join(audio, f"fold{fold}", r["slice_file_name"])
        records.append(FileRecord(path, dict(event=r["class"]), "environment", None, f"fold{fold}",
                                  dict(fsID=r.get("fsID"), salience=r.get("salience"))))
    return AudioFiles(records, on_error, "urbansound8k")


def load_fluent_speech_commands(root: str, on_error: str = "raise") -> AudioFiles:
    """Fluent Speech Commands layout: <root>/data/{train,valid,test}_data.csv with columns path
    (relative to root), speakerId, transcription, action, object, location. Labels: action,
    object, location and intent = "action|object|location" (31 in the real corpus)."""
    layout = "Fluent Speech Commands layout: data/{train,valid,test}_data.csv and the wavs they list"
    records = []
    for split in SPLITS:
        rows = _read_csv(os.path.join(root, "data", f"{split}_data.csv"),
                         ("path", "speakerId", "action", "object", "location"), layout)
        for r in rows:
            labels = dict(action=r["action"], object=r["object"], location=r["location"],
                          intent=f"{r['action']}|{r['object']}|{r['location']}")
            records.append(FileRecord(os.path.join(root, r["path"]), labels, "speech", r["speakerId"], split,
                                      dict(transcription=r.get("transcription"))))
    return AudioFiles(records, on_error, "fluent_speech_commands")


def load_folder_per_class(root: str, label: str = "label", split: str = "train",
                          on_error: str = "raise") -> AudioFiles:
    """Generic layout <root>/<class>/*.{wav,flac,ogg}: labels {label: class folder name}."""
    _need_dir(root, "folder-per-class layout: <class>/*.wav")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders found; expected the folder-per-class layout: <class>/*.wav")
    records = [FileRecord(os.path.join(root, c, fn), {label: c}, "unknown", None, split)
               for c in classes for fn in _audio_files(os.path.join(root, c))]
    return AudioFiles(records, on_error, os.path.basename(os.path.normpath(root)))


BENCHMARKS = {   # name: (synthetic preset, task label, real-data loader)
    "esc50": ("esc50_like", "event", load_esc50),
    "us8k": ("us8k_like", "event", load_urbansound8k),
    "speechcommands": ("speech_commands_like", "word", load_speech_commands),
    "fsc": ("fsc_like", "intent", load_fluent_speech_commands),
}

# The file that marks each benchmark's layout under a corpus root.
LAYOUT_MARKERS = {"esc50": ("meta", "esc50.csv"), "us8k": ("metadata", "UrbanSound8K.csv"),
                  "speechcommands": ("validation_list.txt",), "fsc": ("data", "train_data.csv")}


def load_corpus(root: str, label: str) -> Tuple[str, AudioFiles]:
    """(layout, every clip) of the real corpus at root, its layout detected from its files: a
    BENCHMARKS name (its loader's folds or train / valid / test splits), or "folder" for one
    folder per class, labelled {label: folder name} (label must be a TASKS label) and split
    80/10/10 by a hash of the file name. Errors name the --data_dir / --data_label option."""
    for name, (_, _, loader) in BENCHMARKS.items():
        if os.path.exists(os.path.join(root, *LAYOUT_MARKERS[name])):
            return name, loader(root)
    if not os.path.isdir(root):
        raise SystemExit(f"--data_dir={root}: no such folder")
    if label not in {t.label for t in TASKS.values()}:
        raise SystemExit(f"--data_label={label!r} names no task label; allowed: "
                         f"{', '.join(sorted({t.label for t in TASKS.values()}))}")
    full = load_folder_per_class(root, label=label)
    # No split files: 80/10/10 by a hash of the file name, stable across runs and machines.
    for r in full.records:
        h = zlib.crc32(os.path.basename(r.path).encode()) % 10
        r.split = "test" if h == 0 else "valid" if h == 1 else "train"
    return "folder", full


def benchmark(name: str, split, root: Optional[str] = None, cfg: Optional[CorpusConfig] = None,
              max_seconds: Optional[float] = None, **loader_kw) -> AudioClassification:
    """One split of a Soft-MoA benchmark as an AudioClassification view.

    name: esc50 | us8k | speechcommands | fsc. split: "train"/"valid"/"test" (speechcommands,
    fsc) or a fold name / list of fold names ("fold1".."fold5" esc50, .."fold10" us8k). With
    root=None the synthetic preset (or `cfg`) is used, else the real corpus at root (loader_kw,
    e.g. on_error="skip", go to its loader). The class list is the whole corpus', so train and
    test views agree on target indices.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
    preset, task, loader = BENCHMARKS[name]
    if root is None:
        source = SyntheticCorpus(cfg or getattr(CorpusConfig, preset)(), split)
        return AudioClassification(source, task, max_seconds=max_seconds)
    full = loader(root, **loader_kw)
    return AudioClassification(full.select(split), task, classes=full.classes(task),
                               max_seconds=max_seconds)


# ----------------------------------------------------------------------------------------------
# Linear probe: how much a linear model on mean log-mel features gets (README headroom table)


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_fft: int = 400, n_mels: int = 64, sr: int = SAMPLE_RATE,
                   fmin: float = 20.0, fmax: Optional[float] = None) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters, equally spaced on the HTK mel scale."""
    fmax = fmax or sr / 2
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))            # (n_mels + 2,)
    f = np.fft.rfftfreq(n_fft, 1.0 / sr)[:, None]                        # (F, 1)
    lo, mid, hi = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    fb = np.maximum(0.0, np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
    return torch.tensor(fb, dtype=torch.float32)


def log_mel(audio: torch.Tensor, sr: int = SAMPLE_RATE, n_mels: int = 64, n_fft: int = 400,
            hop: int = 160) -> torch.Tensor:
    """Log-mel spectrogram, the linear probe's feature: (..., n) -> (..., frames, n_mels).

    25 ms Hann window, 10 ms hop, power spectrum, HTK mel triangles, natural log with a 1e-6
    floor. This is the probe's (and the preview's) own feature, independent of encoder.py.
    """
    shape = audio.shape
    x = audio.reshape(-1, shape[-1]).float()
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=True, return_complex=True)
    power = spec.abs().pow(2).transpose(1, 2)                            # (B, frames, F)
    mel = power @ mel_filterbank(n_fft, n_mels, sr)                      # (B, frames, n_mels)
    return torch.log(mel + 1e-6).reshape(*shape[:-1], mel.shape[1], n_mels)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3,
                 steps: int = 200) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS: returns (W (D, C), b (C,)), float64.

    Minimises mean cross-entropy(x W + b, y) + l2 * |W|^2 / 2; standardise x first.
    """
    x = x.double()
    W = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W + b, y) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def features(dataset, workers: int = 0, batch: int = 64,
             desc: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean log-mel (over real frames) of every item of a view: (M, 64) and the targets (M,)."""
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate)
    feats, ys = [], []
    for bt in tqdm(loader, desc=desc, leave=False, disable=None if desc else True):
        lm = log_mel(bt["audio"])                                       # (B, T, 64)
        frames = (bt["lengths"] // 160 + 1).clamp(max=lm.shape[1])
        m = (torch.arange(lm.shape[1])[None, :] < frames[:, None]).float()
        feats.append((lm * m[..., None]).sum(1) / m.sum(1, keepdim=True))
        ys.append(bt["target"])
    return torch.cat(feats), torch.cat(ys)


def probe_accuracy(train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                   n_classes: int, l2: float = 1e-3, steps: int = 200) -> float:
    """Held-out accuracy of a logistic regression on standardised features."""
    mu, sd = train[0].mean(0), train[0].std(0) + 1e-6
    W, b = fit_logistic((train[0] - mu) / sd, train[1], n_classes, l2, steps)
    pred = (((test[0] - mu) / sd).double() @ W + b).argmax(1)
    return float((pred == test[1]).double().mean())


PROBE_TASKS = (  # (corpus preset, task label, group, train split(s), test split)
    ("tiny", "word", "semantic", "train", "test"),
    ("tiny", "event", "semantic", "train", "test"),
    ("tiny", "instrument", "semantic", "train", "test"),
    ("tiny", "chord", "semantic", "train", "test"),
    ("tiny", "pitch_group", "paralinguistic", "train", "test"),
    ("tiny", "tract_group", "paralinguistic", "train", "test"),
    ("tiny", "emotion", "paralinguistic", "train", "test"),
    ("tiny", "rate", "paralinguistic", "train", "test"),
    ("esc50_like", "event", "semantic", ("fold1", "fold2", "fold3", "fold4"), "fold5"),
    ("us8k_like", "event", "semantic", tuple(f"fold{k}" for k in range(1, 10)), "fold10"),
    ("speech_commands_like", "word", "semantic", "train", "test"),
    ("fsc_like", "intent", "semantic", "train", "test"),
)


def run_probe(overrides: Optional[dict] = None, workers: int = 2, tasks=PROBE_TASKS,
              verbose: bool = True) -> List[dict]:
    """Linear probe on mean log-mel per task: held-out accuracy vs chance (majority class).

    Every corpus is built from its preset with `overrides` applied (e.g. dict(seed=1)). The test
    split holds out speakers (or a fold). Returns one row per task.
    """
    overrides = overrides or {}
    cache, rows = {}, []                       # (preset, splits) -> (source, features), once each
    for preset, task, group, train_split, test_split in tasks:
        cfg = getattr(CorpusConfig, preset)(**overrides)
        got = []
        for split in (train_split, test_split):
            splits = (split,) if isinstance(split, str) else tuple(split)
            if (preset, splits) not in cache:
                src = SyntheticCorpus(cfg, splits)
                cache[preset, splits] = (src, _ClipFeatures(src, workers, f"{preset} {'+'.join(splits)}"
                                                            if verbose else ""))
            got.append(cache[preset, splits])
        (src_tr, f_tr), (_, f_te) = got
        classes = src_tr.classes(task)
        idx = {c: i for i, c in enumerate(classes)}
        xtr, ytr = f_tr.select(task, idx)
        xte, yte = f_te.select(task, idx)
        acc = probe_accuracy((xtr, ytr), (xte, yte), len(classes))
        chance = float(torch.bincount(yte, minlength=len(classes)).max()) / len(yte)
        rows.append(dict(corpus=preset, task=task, group=group, classes=len(classes), n_train=len(ytr),
                         n_test=len(yte), accuracy=acc, chance=chance))
        if verbose:
            r = rows[-1]
            print(f"{preset:>22} {task:>12} {group:>15} C={r['classes']:<3} train {r['n_train']:>5} "
                  f"test {r['n_test']:>4}  acc {acc:.3f}  chance {chance:.3f}", flush=True)
    return rows


class _ClipFeatures:
    """Mean log-mel of every clip of a source, computed once; select(task) picks labelled ones."""

    def __init__(self, source, workers, desc):
        self.source = source
        view = _AllClips(source)
        self.x, _ = features(view, workers, desc=desc)

    def select(self, task, idx):
        keep = [j for j in range(len(self.source)) if task in self.source.labels(j)]
        y = torch.tensor([idx[self.source.labels(j)[task]] for j in keep], dtype=torch.long)
        return self.x[keep], y


class _AllClips(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, j):
        return dict(audio=torch.from_numpy(self.source[j].audio), target=j)


# ----------------------------------------------------------------------------------------------
# CLI: preview, probe, bench


def preview(out_dir: str, cfg: Optional[CorpusConfig] = None, n: int = 12) -> List[str]:
    """Write n labelled WAVs (the first clips of each domain, then commands and scenes), a
    labels.tsv, and, if matplotlib is installed, spectrograms.png. Returns the WAV paths."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = cfg or CorpusConfig.tiny()
    corpus = SyntheticCorpus(cfg)
    picks, seen = [], {}
    for j in range(len(corpus)):
        d = corpus.spec(corpus.indices[j])["domain"]
        if seen.get(d, 0) < max(1, (n - 4) // 4):
            seen[d] = seen.get(d, 0) + 1
            picks.append((corpus, j))
        if len(picks) >= n - 4:
            break
    for other in (SyntheticCorpus(CorpusConfig.fsc_like(seed=cfg.seed, n_clips=20)),
                  SyntheticCorpus(CorpusConfig.audioset_like(seed=cfg.seed, n_clips=20))):
        picks += [(other, 0), (other, 1)]
    paths, clips = [], []
    for k, (src, j) in enumerate(picks):
        clip = src[j]
        keys = [key for key in ("word", "intent", "instrument", "chord", "event", "pitch_group",
                                "emotion", "rate", "tags") if key in clip.labels]
        name = "_".join([f"{k:02d}", clip.domain] + [clip.labels[key] for key in keys])
        name = "".join(ch if ch.isalnum() or ch in "_-" else "-" for ch in name)   # portable
        path = os.path.join(out_dir, name[:120] + ".wav")
        write_wav(path, clip.audio, clip.sample_rate)
        paths.append(path)
        clips.append(clip)
    with open(os.path.join(out_dir, "labels.tsv"), "w") as f:
        f.write("file\tdomain\tsplit\tlabels\n")
        for p, c in zip(paths, clips):
            f.write(f"{os.path.basename(p)}\t{c.domain}\t{c.split}\t"
                    + ";".join(f"{k}={v}" for k, v in c.labels.items()) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipped spectrograms.png (pip install matplotlib)")
        return paths
    cols = 4
    rows = math.ceil(len(clips) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, p, c in zip(axes.flat, paths, clips):
        lm = log_mel(torch.from_numpy(c.audio)).T.numpy()
        ax.imshow(lm, origin="lower", aspect="auto", cmap="magma",
                  extent=(0, len(c.audio) / c.sample_rate, 0, lm.shape[0]))
        ax.set_title(os.path.basename(p)[3:60], fontsize=7)
        ax.set_xlabel("s", fontsize=7)
        ax.set_ylabel("mel bin", fontsize=7)
    for ax in list(axes.flat)[len(clips):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "spectrograms.png"), dpi=110)
    plt.close(fig)
    return paths


def bench(overrides: Optional[dict] = None, n: int = 200, repeats: int = 3) -> List[dict]:
    """Clips per second rendering each preset on one thread: median of `repeats`, warm-up excluded."""
    torch.set_num_threads(1)
    rows = []
    for preset in PRESETS:
        cfg = getattr(CorpusConfig, preset)(**{**(overrides or {}), "n_clips": max(n, 20)})
        corpus = SyntheticCorpus(cfg)
        for j in range(5):
            corpus[j]                                                   # warm-up: caches, imports
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for j in range(n):
                corpus[j % len(corpus)]
            times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        rows.append(dict(preset=preset, clip_seconds=cfg.clip_seconds, clips_per_s=n / sec,
                         realtime=n * cfg.clip_seconds / sec))
        print(f"{preset:>22}: {n / sec:7.1f} clips/s of {cfg.clip_seconds:.1f} s "
              f"({n * cfg.clip_seconds / sec:6.0f}x real time), 1 thread", flush=True)
    return rows


def parse_overrides(defaults, argv: Sequence[str]) -> dict:
    """--key=value for the fields of the dataclass instance `defaults`, type-checked against the
    defaults' types (bool: true/false/1/0; tuple: comma-separated floats); unknown keys get a
    did-you-mean. Returns {field: value}, for `dataclasses.replace(defaults, **overrides)`."""
    fields = [f.name for f in dataclasses.fields(defaults)]
    out = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise SystemExit(f"unknown option --{key}{hint} (options: {', '.join(fields)})")
        kind = type(getattr(defaults, key))
        try:
            if kind is tuple:
                out[key] = tuple(float(v) for v in value.split(","))
            elif kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            raise SystemExit(f"--{key} takes a value of type {kind.__name__}, got {value!r}") from None
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Any CorpusConfig field as --key=value (tuples comma-separated) "
                                       "overrides every corpus the command builds.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preview", metavar="OUT_DIR", help="write labelled WAVs (+ spectrograms.png)")
    g.add_argument("--probe", action="store_true", help="linear-probe accuracy per task (README table)")
    g.add_argument("--bench", action="store_true", help="clips/s per preset on one thread")
    p.add_argument("--workers", type=int, default=2, help="--probe: DataLoader workers")
    known, rest = p.parse_known_args(argv)
    overrides = parse_overrides(CorpusConfig(), rest)
    if known.preview:
        paths = preview(known.preview, CorpusConfig.tiny(**overrides))
        print(f"wrote {len(paths)} WAVs and labels.tsv to {known.preview}")
    elif known.probe:
        t0 = time.time()
        torch.set_num_threads(1)
        rows = run_probe(overrides, known.workers)
        print("\n| corpus | task | group | classes | train / test clips | linear probe (± s.e.) | chance |")
        print("|---|---|---|---:|---:|---:|---:|")
        for r in rows:
            se = math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / r["n_test"])
            print(f"| {r['corpus']} | {r['task']} | {r['group']} | {r['classes']} | {r['n_train']} / "
                  f"{r['n_test']} | {r['accuracy']:.2f} ± {se:.2f} | {r['chance']:.2f} |")
        print(f"\n{time.time() - t0:.0f} s, {known.workers} workers, torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs")
    else:
        bench(overrides)


if __name__ == "__main__":
    main()
