"""Synthetic heterogeneous audio: speech, music and environmental sound from signal models, with
semantic labels (word, intent, instrument, chord, event) and paralinguistic ones (speaker, pitch,
vocal tract, emotion, rate), drawn independently; presets mimic Soft-MoA's benchmarks (arXiv 2402.00828).
Clip i is a pure function of (seed, corpus name, i). Notation: SR sample rate, n samples, F0
fundamental, F1..F5 formants, bw bandwidths, alpha vocal-tract scale, u utterance time in [0, 1].
"""
import math
import zlib
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

SAMPLE_RATE = SR = 16000
DOMAINS = ("speech", "music", "environment", "mixture")
KINDS = ("mixed", "word", "command", "music", "event", "scene")
SPLITS = ("train", "valid", "test")


@dataclass
class Clip:
    """One clip: audio (n,) float32 mono in about [-1, 1] and the labels that apply (word="yes", ...)."""
    audio: np.ndarray
    sample_rate: int
    labels: Dict[str, str]
    domain: str
    speaker: Optional[str] = None
    split: str = "train"          # train | valid | test | fold<k>
    source: str = ""              # synthetic:<name>:<seed>:<index>, or a path


# --- Label tables; formants of a reference tract (alpha = 1; Peterson & Barney 1952) --------------
VOWEL, GLIDE, NASAL, FRIC, VFRIC, PLOS, VPLOS, ASP = (
    "vowel", "glide", "nasal", "fricative", "voiced-fricative", "plosive", "voiced-plosive", "aspirate")
SONORANTS = (VOWEL, GLIDE, NASAL)

PHONEMES = {
    # vowels, glides and nasals (a low murmur, wide bandwidths): (kind, ms at normal rate, (F1, F2, F3) Hz)
    "iy": (VOWEL, 80, (290, 2450, 3150)), "ih": (VOWEL, 80, (410, 2100, 2800)), "eh": (VOWEL, 80, (580, 1900, 2700)),
    "ae": (VOWEL, 80, (760, 1850, 2600)), "aa": (VOWEL, 80, (780, 1180, 2650)), "ao": (VOWEL, 80, (610, 920, 2620)),
    "uh": (VOWEL, 80, (470, 1150, 2550)), "uw": (VOWEL, 80, (330, 950, 2450)), "ah": (VOWEL, 80, (680, 1350, 2650)),
    "er": (VOWEL, 80, (500, 1420, 1750)), "w": (GLIDE, 50, (320, 720, 2350)), "y": (GLIDE, 50, (280, 2350, 3050)),
    "l": (GLIDE, 50, (380, 1150, 2750)), "r": (GLIDE, 50, (400, 1180, 1600)), "m": (NASAL, 55, (280, 1150, 2350)),
    "n": (NASAL, 55, (280, 1650, 2650)), "ng": (NASAL, 55, (280, 2050, 2750)),
    # fricatives: (kind, ms, (noise centre Hz, noise bandwidth Hz, level)); plosives: closure ms, burst
    "s": (FRIC, 80, (5600, 2200, 0.5)), "sh": (FRIC, 80, (3000, 1400, 0.55)), "f": (FRIC, 80, (4200, 5000, 0.18)),
    "th": (FRIC, 80, (5200, 5000, 0.12)), "z": (VFRIC, 65, (5600, 2200, 0.3)), "zh": (VFRIC, 65, (3000, 1400, 0.35)),
    "v": (VFRIC, 65, (4200, 5000, 0.12)), "p": (PLOS, 40, (900, 1500, 0.6)), "t": (PLOS, 40, (4400, 2400, 0.6)),
    "k": (PLOS, 40, (2300, 1200, 0.6)), "b": (VPLOS, 30, (900, 1500, 0.35)), "d": (VPLOS, 30, (4400, 2400, 0.35)),
    "g": (VPLOS, 30, (2300, 1200, 0.35)), "h": (ASP, 55, None),
}
DIPHTHONGS = {"ay": ("aa", "iy"), "ey": ("eh", "iy"), "ow": ("ao", "uw"), "aw": ("aa", "uw")}
SCHWA = (500, 1500, 2500)
F45 = (3550.0, 4500.0)                       # F4, F5 of the reference tract
BANDWIDTHS = (70.0, 90.0, 140.0, 200.0, 260.0)

_lexicon = lambda text: dict(entry.split(": ") for entry in text.split(", "))  # noqa: E731
# Speech Commands V2's 35 words (a corpus uses the first n_words), as "word: phonemes".
WORDS = _lexicon("yes: y eh s, no: n ow, up: ah p, down: d aw n, left: l eh f t, right: r ay t, on: aa n, off: ao f, "
    "stop: s t aa p, go: g ow, zero: z ih r ow, one: w ah n, two: t uw, three: th r iy, four: f ao r, five: f ay v, "
    "six: s ih k s, seven: s eh v ah n, eight: ey t, nine: n ay n, bed: b eh d, bird: b er d, cat: k ae t, "
    "dog: d ao g, happy: h ae p iy, house: h aw s, marvin: m aa r v ih n, sheila: sh iy l ah, tree: t r iy, "
    "wow: w aw, backward: b ae k w er d, forward: f ao r w er d, follow: f aa l ow, learn: l er n, "
    "visual: v ih zh uw ah l")
# Fluent Speech Commands' 31 (action, object, location) intents; "none" is not spoken.
COMMAND_WORDS = _lexicon("activate: ae k t ih v ey t, deactivate: d iy ae k t ih v ey t, bring: b r ih ng, "
    "change: t sh ey n d zh, language: l ae ng g w ih d zh, increase: ih n k r iy s, decrease: d iy k r iy s, "
    "lights: l ay t s, lamp: l ae m p, music: m y uw z ih k, heat: h iy t, volume: v aa l y uw m, "
    "newspaper: n uw z p ey p er, juice: d zh uw s, socks: s aa k s, shoes: sh uw z, chinese: t sh ay n iy z, "
    "korean: k ao r iy ah n, english: ih ng g l ih sh, german: d zh er m ah n, kitchen: k ih t sh ah n, "
    "bedroom: b eh d r uw m, washroom: w aa sh r uw m")
_ROOMS = ("kitchen", "bedroom", "washroom")
INTENTS = (
    [("activate", o, "none") for o in ("lamp", "lights", "music")] + [("activate", "lights", r) for r in _ROOMS]
    + [("bring", o, "none") for o in ("juice", "newspaper", "shoes", "socks")]
    + [("change language", o, "none") for o in ("chinese", "english", "german", "korean", "none")]
    + [("deactivate", o, "none") for o in ("lamp", "lights", "music")] + [("deactivate", "lights", r) for r in _ROOMS]
    + [(a, o, "none") for a in ("decrease", "increase") for o in ("heat", "volume")]
    + [(a, "heat", r) for a in ("decrease", "increase") for r in _ROOMS])

# Speakers: 3 pitch x 3 vocal-tract groups. Pitch: (speaker F0, clip median F0) ranges in Hz.
PITCH_GROUPS = {"low": ((95.0, 125.0), (0.0, 135.0)), "mid": ((145.0, 185.0), (135.0, 200.0)),
                "high": ((215.0, 275.0), (200.0, 1000.0))}
TRACT_GROUPS = {"long": (0.85, 0.91), "medium": (0.96, 1.04), "short": (1.10, 1.18)}  # alpha
# Emotions as prosody: (F0 contour, excursion octaves, gain dB, glottal closing quotient, extra
# breathiness, jitter factor). Deviation: no mean-F0 shift, so the pitch group stays independent.
EMOTIONS = {
    "neutral": ("declination", 0.12, 0.0, 0.16, 0.00, 1.0), "happy": ("rise-fall", 0.25, 2.0, 0.13, 0.00, 1.0),
    "sad": ("fall", 0.06, -3.0, 0.28, 0.12, 1.6), "angry": ("early-peak", 0.22, 4.0, 0.08, 0.00, 1.3)}
CONTOURS = {  # an emotion's F0 contour in octaves over u in [0, 1], excursion e; mean zero
    "declination": lambda u, e: e * (0.5 - u), "fall": lambda u, e: e * (0.5 - u),
    "rise-fall": lambda u, e: e * (np.sin(np.pi * u) - 2 / np.pi), "early-peak": lambda u, e: e * ((1 - u) ** 3 - 0.25)}
RATES = {"slow": 1.25, "normal": 1.0, "fast": 0.8}   # phoneme-duration factor
_GAP_MS = (40.0, 80.0)          # pause between words of a command
_RATE_JITTER = (0.95, 1.05)     # per-clip factor on top of the rate class
_PHONE_JITTER = (0.9, 1.1)      # per-phoneme duration factor
_BACKGROUND = (0.7, (-15.0, -3.0))   # event-only clips: P(another family's texture underneath), its level dB


class Instrument(NamedTuple):
    """Partials (fundamental largest) and an attack / decay-to-sustain envelope, times in s."""
    amps: Tuple[float, ...]
    attack: float
    decay: float = math.inf       # time constant; inf = sustained
    sustain: float = 1.0
    bright: float = math.inf      # time constant of the partials above the fundamental
    ratios: Tuple[float, ...] = ()                # inharmonic partial ratios (else 1, 2, 3, ...)
    vibrato: Tuple[float, float] = (0.0, 0.0)     # rate Hz, depth as a fraction of F0
    breath: float = 0.0           # breath noise relative to the tone


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
CHORDS = {"note": (0,), "major": (0, 4, 7), "minor": (0, 3, 7), "diminished": (0, 3, 6), "augmented": (0, 4, 8)}
ROOT_MIDI = (48, 67)   # C3 (131 Hz) .. G4 (392 Hz)

# Event families: (key parameter, its 5 variant values); render_event says what each one is.
EVENT_FAMILIES = {
    "hum": ("f0_hz", (55, 80, 115, 165, 240)), "engine": ("rate_hz", (7, 10, 14, 20, 28)),
    "drill": ("freq_hz", (700, 950, 1300, 1750, 2400)), "jackhammer": ("rate_hz", (6, 8.5, 12, 17, 24)),
    "siren": ("centre_hz", (550, 750, 1000, 1350, 1800)), "alarm": ("freq_hz", (1000, 1400, 2000, 2800, 3900)),
    "bark": ("f0_hz", (250, 350, 500, 700, 1000)), "impact": ("mode_hz", (300, 520, 900, 1550, 2700)),
    "rain": ("drops_per_s", (25, 50, 100, 200, 400)), "wind": ("cutoff_hz", (150, 230, 350, 540, 820))}
AUDIOSET_TAGS = ("speech", "speech:low", "speech:mid", "speech:high", "music", *INSTRUMENTS, *EVENT_FAMILIES)


# --- Config ---------------------------------------------------------------------------------------
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class CorpusConfig:
    seed: int = 0
    name: str = "corpus"          # stream name: corpora with different names share no clip
    kind: str = "mixed"           # mixed | word | command | music | event | scene
    n_clips: int = 4000           # length of the index range 0..n_clips-1 (all splits together)
    clip_seconds: float = 1.0
    domain_weights: Tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)   # kind="mixed": P(speech, music, env., mixture)
    command_prob: float = 0.0     # kind="mixed": share of speech that is an FSC-like command
    n_words: int = 10             # the first n of WORDS (35 = all of Speech Commands V2's)
    n_speakers: int = 45          # multiple of 9 (3 pitch x 3 tract groups), >= 27
    n_event_variants: int = 1     # > 1: the event label is "<family>-<variant>" (ESC-50-like)
    n_folds: int = 0              # 0: train/valid/test by held-out speakers; k: fold1..foldk
    snr_db: Tuple[float, float] = (0.0, 15.0)        # mixtures: speech over the background
    floor_snr_db: Tuple[float, float] = (15.0, 35.0)  # noise floor under every clip
    gain_db: Tuple[float, float] = (-6.0, 6.0)        # random level, so loudness is a weak cue
    tilt_db: float = 3.0          # random spectral tilt in [-tilt, tilt] dB/octave (channel)
    level_dbfs: float = -30.0     # clip RMS before the random gain (and the emotion's effort)

    def __post_init__(self):
        self.domain_weights = tuple(float(w) for w in self.domain_weights)
        for name in ("snr_db", "floor_snr_db", "gain_db"):
            value = tuple(float(v) for v in getattr(self, name))
            _check(len(value) == 2 and value[0] <= value[1], f"CorpusConfig.{name} must be (low, high), got {value}")
            setattr(self, name, value)
        _check(self.kind in KINDS, f"unknown kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        _check(len(self.domain_weights) == 4 and min(self.domain_weights) >= 0 and sum(self.domain_weights) > 0,
               f"domain_weights must be 4 non-negative weights for {DOMAINS}, got {self.domain_weights}")
        for name, lo, hi in (("seed", 0, math.inf), ("n_clips", 1, math.inf), ("command_prob", 0, 1),
                             ("n_words", 1, len(WORDS)), ("n_event_variants", 1, 5)):
            value = getattr(self, name)
            _check(lo <= value <= hi, f"CorpusConfig.{name} must be in [{lo}, {hi}], got {value}")
        _check(self.n_speakers % 9 == 0 and self.n_speakers >= 27, f"n_speakers must be a multiple of 9 (3 pitch x "
               f"3 tract groups) and >= 27 (train, valid and test speakers per group), got {self.n_speakers}")
        _check(self.n_folds == 0 or self.n_folds >= 2, f"n_folds must be 0 (train/valid/test) or >= 2: {self.n_folds}")
        need = self.longest_utterance()                 # 0 without speech: every clip is >= 0.1 s
        _check(not (self.n_folds and need > 0), f"kind={self.kind!r} has speakers, which are held out by "
               f"split: use n_folds=0 (folds are for the event/music benchmarks)")
        _check(need <= self.clip_seconds - 0.1, f"clip_seconds={self.clip_seconds} is too short for kind="
               f"{self.kind!r}: it needs 0.1 s more than the longest utterance, {need:.2f} s at the slow rate")

    def longest_utterance(self) -> float:
        """Upper bound in seconds of the longest utterance this config can speak (slow rate); 0 without speech."""
        speech_weight = self.domain_weights[0] + self.domain_weights[3]        # kind="mixed": speech, mixture
        if self.kind in ("music", "event") or (self.kind == "mixed" and speech_weight == 0):
            return 0.0
        words = [[w] for w in list(WORDS)[:self.n_words]] if self.kind != "command" else []
        if self.kind == "command" or (self.kind == "mixed" and self.command_prob > 0):
            words += [command_words(i) for i in INTENTS]
        worst = max(sum(ms for ph in _phones(w) for p in ph for ms in _phone_ms(p)) + _GAP_MS[1] * (len(w) - 1)
                    for w in words)
        return worst * max(RATES.values()) * _RATE_JITTER[1] * _PHONE_JITTER[1] / 1000


PRESETS = {   # CorpusConfig.<name>(**overrides); the real corpora's sizes in the comments
    "tiny": dict(n_clips=4000),                                   # the audio-LLM's corpus, all domains
    "esc50_like": dict(name="esc50", kind="event", n_event_variants=5, n_folds=5, n_clips=1000),  # 2000 x 5 s
    "us8k_like": dict(name="us8k", kind="event", n_folds=10, n_clips=1000),          # 8732 clips <= 4 s
    "speech_commands_like": dict(name="speechcommands", kind="word", n_words=35, n_clips=3000),  # 105k x 1 s
    "fsc_like": dict(name="fsc", kind="command", clip_seconds=2.5, n_clips=1500),    # 31 intents, 30k clips
    "audioset_like": dict(name="audioset", kind="scene", n_words=35, n_clips=4000),  # layered scenes
}
for _name, _preset in PRESETS.items():
    setattr(CorpusConfig, _name, classmethod(lambda cls, _p=_preset, **kw: cls(**{**_p, **kw})))


# --- Signal models: small parts -------------------------------------------------------------------
def seed_sequence(seed: int, stream: str, index: int) -> np.random.SeedSequence:
    """The entropy behind item `index` of stream `stream`: no global RNG, no process state."""
    return np.random.SeedSequence([int(seed), zlib.crc32(stream.encode()), int(index)])


def resonator_response(freqs, bws, n_fft: int) -> np.ndarray:
    """Frequency response (n_fft // 2 + 1,) of a cascade of Klatt (1980) resonators y[n] = A x[n] +
    B y[n-1] + C y[n-2]: C = -exp(-2 pi bw / SR), B = 2 exp(-pi bw / SR) cos(2 pi f / SR), A = 1 - B - C."""
    z1 = np.exp(-2j * np.pi * np.arange(n_fft // 2 + 1) / n_fft)        # z^-1 on the rfft grid
    f = np.asarray(freqs, dtype=np.float64)[:, None]                    # (K, 1)
    b = np.asarray(bws, dtype=np.float64)[:, None]
    C = -np.exp(-2 * np.pi * b / SR)
    B = 2 * np.exp(-np.pi * b / SR) * np.cos(2 * np.pi * f / SR)
    A = 1 - B - C
    return np.prod(A / (1 - B * z1 - C * (z1 * z1)), axis=0)                   # (n_fft // 2 + 1,)


def _fft_len(n: int) -> int:
    """Smallest 2^a 3^b >= n: fast for numpy's pocketfft."""
    best, p3 = 1 << max(0, (n - 1).bit_length()), 1
    while p3 < best:
        best = min(best, p3 << (-(-n // p3) - 1).bit_length())     # p3 2^a >= n, a smallest
        p3 *= 3
    return best


def _filter(x: np.ndarray, response_fn, pad: int = 1024) -> np.ndarray:
    """x filtered by the frequency response response_fn(n_fft), keeping `pad` samples of tail."""
    N = _fft_len(len(x) + pad)
    return np.fft.irfft(np.fft.rfft(x, N) * response_fn(N), N)[:len(x) + pad]


def _octave_gain(f: np.ndarray, db_per_octave: float) -> np.ndarray:
    """Amplitude of a spectral slope of db_per_octave, 1 at 1 kHz."""
    return (f / 1000.0) ** (db_per_octave / (20 * math.log10(2)))


def coloured_noise(rng: np.random.Generator, n: int, slope_db_per_octave: float, lo_hz: float, hi_hz: float):
    """Unit-RMS Gaussian noise, power ~ f^(slope / 3.01 dB) (-3: pink), in [lo_hz, hi_hz] with half-octave edges."""
    edge = lambda octaves: 0.5 - 0.5 * np.cos(np.pi * np.clip(octaves / 0.5, 0.0, 1.0))   # 0 -> 1 over 0.5 oct

    def response(N):
        f = np.fft.rfftfreq(N, 1.0 / SR)
        f[0] = f[1]
        return _octave_gain(f, slope_db_per_octave) * (edge(np.log2(f / lo_hz)) * edge(np.log2(hi_hz / f)))
    x = _filter(rng.standard_normal(_fft_len(n)), response, pad=0)[:n]
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)) + 1e-20))


def glottal_source(f0: np.ndarray, rng: np.random.Generator, jitter=0.01, shimmer=0.05, closing=0.16) -> np.ndarray:
    """Glottal flow derivative, one Rosenberg (1971) pulse per period of f0 (Hz per sample): flow
    0.5 (1 - cos(pi tau / Tp)) over Tp = 0.4 T, then cos(pi (tau - Tp) / (2 Tn)) over Tn = closing T."""
    n = len(f0)
    phase = np.cumsum(f0) / SR                                           # (n,) cycles
    k = np.arange(1, int(phase[-1]) + 1)
    if len(k) == 0:
        return np.zeros(n)
    t = np.interp(k, phase, np.arange(n, dtype=np.float64))             # (K,) epochs in samples
    T = SR / np.interp(t, np.arange(n), f0)                              # (K,) local period
    t = t + jitter * T * rng.standard_normal(len(k))
    amp = np.clip(1.0 + shimmer * rng.standard_normal(len(k)), 0.3, None)
    Tp, Tn = 0.4 * T[:, None], closing * T[:, None]                       # (K, 1)
    L = int(np.ceil((Tp + Tn).max())) + 2
    idx = np.floor(t).astype(np.int64)[:, None] + np.arange(-1, L)      # (K, L + 1)
    tau = idx - t[:, None]
    flow = np.where((tau >= 0) & (tau < Tp), 0.5 * (1 - np.cos(np.pi * tau / Tp)), 0.0)
    flow = np.where((tau >= Tp) & (tau < Tp + Tn), np.cos(np.pi * (tau - Tp) / (2 * Tn)), flow)
    # The difference sums to 0 (no DC); its negative peak ~ -pi / (2 Tn) is scaled to -a_k.
    g = np.diff(flow, axis=1) * (amp[:, None] * 2 * Tn / np.pi)          # (K, L)
    idx = idx[:, 1:]
    ok = (idx >= 0) & (idx < n)
    return np.bincount(idx[ok], weights=g[ok], minlength=n)[:n]


def _oscillator(amps: np.ndarray, f_inst: np.ndarray, phase0: float = 0.0, table_size: int = 2048) -> np.ndarray:
    """Wavetable of sum_h amps[h-1] sin(h theta), read by linear interpolation at the phase of f_inst (Hz)."""
    spec = np.zeros(table_size // 2 + 1, dtype=np.complex128)
    spec[1:len(amps) + 1] = -1j * np.asarray(amps) * table_size / 2
    table = np.fft.irfft(spec, table_size)
    table = np.append(table, table[0])
    pos = (phase0 + np.cumsum(f_inst) / SR) % 1.0 * table_size
    i = pos.astype(np.int64)
    frac = pos - i
    return table[i] * (1 - frac) + table[i + 1] * frac


# --- Speech: source-filter synthesis --------------------------------------------------------------
class Speaker(NamedTuple):
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
    """Speaker s: cell s % 9 of (pitch x tract group); per cell rank s // 9 last: test, next: valid, else train."""
    rng = np.random.default_rng(seed_sequence(seed, "speaker", s))
    cell, rank, ranks = s % 9, s // 9, n_speakers // 9
    pitch, tract = list(PITCH_GROUPS)[cell % 3], list(TRACT_GROUPS)[cell // 3]
    lo, hi = PITCH_GROUPS[pitch][0]
    split = "test" if rank == ranks - 1 else "valid" if rank == ranks - 2 else "train"
    return Speaker(id=f"spk{s:03d}", pitch_group=pitch, tract_group=tract,
                   f0=float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
                   alpha=float(rng.uniform(*TRACT_GROUPS[tract])),
                   formant_skew=tuple(float(v) for v in 1 + 0.03 * rng.standard_normal(3)),
                   breathiness=float(rng.uniform(0.02, 0.2)), jitter=float(rng.uniform(0.005, 0.015)),
                   shimmer=float(rng.uniform(0.03, 0.08)), split=split)


def command_words(intent: Tuple[str, str, str]) -> List[str]:
    """The words spoken for an (action, object, location) intent."""
    return intent[0].split() + [w for w in intent[1:] if w != "none"]


def _phones(words: Sequence[str]) -> List[List[str]]:
    """Words -> phoneme lists, a diphthong "ay" as its two targets "ay:1", "ay:2"."""
    return [[q for p in (WORDS.get(w) or COMMAND_WORDS[w]).split()
             for q in ([p + ":1", p + ":2"] if p in DIPHTHONGS else [p])] for w in words]


def _phone_ms(p: str) -> List[float]:
    """Durations (ms, normal rate) of the segments phone p becomes (see _segments)."""
    if ":" in p:
        return [60.0] if p.endswith(":1") else [45.0]
    kind, ms, _ = PHONEMES[p]                 # plosives: closure, burst (and aspiration for p/t/k)
    return [float(ms)] + {PLOS: [8.0, 25.0], VPLOS: [8.0]}.get(kind, [])


def _segments(words: Sequence[str], spk: Speaker, rate: float, rng: np.random.Generator):
    """Phones -> segments (n_samples, voicing, aspiration, formants, bandwidths, frication band or None);
    consonants take the formants of the next sonorant (else the previous, else schwa)."""
    a, skew = spk.alpha, np.array(spk.formant_skew)
    segs, phones = [], _phones(words)
    for wi, ph in enumerate(phones):
        entries = [PHONEMES[DIPHTHONGS[p[:-2]][p.endswith(":2")] if ":" in p else p] for p in ph]  # ay:1 -> aa
        targets = [params if kind in SONORANTS else None for kind, _, params in entries]
        for j, (p, (kind, _, params)) in enumerate(zip(ph, entries)):
            target = next((t for t in targets[j:] + targets[:j][::-1] if t is not None), SCHWA)   # own if sonorant
            fm = np.concatenate([np.array(target, dtype=np.float64) * skew, F45]) * a     # (5,) F1..F5
            bw = np.array(BANDWIDTHS) * (2.0 if kind == NASAL else 1.0)
            durs = [ms * rate * rng.uniform(*_PHONE_JITTER) * SR / 1000 for ms in _phone_ms(p)]
            band = None if kind in SONORANTS + (ASP,) else (params[0] * a, params[1], params[2])
            if kind in (PLOS, VPLOS):         # closure (a voice bar for b/d/g), burst, aspiration (p/t/k only)
                bar = np.array([250.0, 900, 2300, *F45]) * a                 # voice-bar formants
                parts = [(0.06 if kind == VPLOS else 0.0, 0.0, bar, None), (0.0, 0.0, fm, band), (0.0, 0.5, fm, None)]
            else:                             # (voicing, aspiration, formants, band)
                parts = [({VOWEL: 1.0, GLIDE: 0.6, NASAL: 0.3, VFRIC: 0.25}.get(kind, 0.0), 0.6 if kind == ASP else 0.0,
                          fm, band)]
            segs += [(d, av, an, f, bw, b) for d, (av, an, f, b) in zip(durs, parts)]
        if wi < len(phones) - 1:                                                # a pause between words
            segs.append((rng.uniform(*_GAP_MS) * rate * SR / 1000, 0.0, 0.0, fm, bw, None))
    return segs


def crossfade(bounds: np.ndarray, ramp: float) -> List[Tuple[int, int, np.ndarray]]:
    """(lo, hi, w) per segment [bounds[s], bounds[s+1]): linear ramps over +-min(ramp, half of either
    neighbour) around each inner boundary, so the weights sum to 1 everywhere."""
    durs = np.diff(bounds)
    n = int(math.ceil(bounds[-1]))
    R = np.minimum(ramp, 0.5 * np.minimum(np.r_[np.inf, durs], np.r_[durs, np.inf]))    # (S + 1,)
    out = []
    for s in range(len(durs)):
        a, b, Ra, Rb = bounds[s], bounds[s + 1], R[s], R[s + 1]
        lo, hi = int(max(0, a - Ra)), int(min(n, math.ceil(b + Rb)))
        tt = np.arange(lo, hi, dtype=np.float64)
        rise = np.ones_like(tt) if s == 0 else np.clip((tt - (a - Ra)) / (2 * Ra), 0, 1)
        fall = np.ones_like(tt) if s == len(durs) - 1 else np.clip(((b + Rb) - tt) / (2 * Rb), 0, 1)
        out.append((lo, hi, rise * fall))
    return out


def _resonate(x: np.ndarray, freqs, bws) -> np.ndarray:
    """x through a resonator cascade scaled to unit peak gain, with 1024 samples of tail."""
    peak = np.abs(resonator_response(freqs, bws, 2048)).max()
    return _filter(x, lambda N: resonator_response(freqs, bws, N) / peak)


def render_speech(words: Sequence[str], spk: Speaker, emotion: str, rate: str, rng: np.random.Generator) -> np.ndarray:
    """Source-filter speech, (n,) unit RMS: glottal pulses at F0 = spk.f0 2^(contour(u) + wobble) plus
    noise, cross-faded (+-12 ms) per segment through its resonators."""
    shape, excursion, _, closing, breath_add, jit = EMOTIONS[emotion]
    segs = _segments(words, spk, RATES[rate] * rng.uniform(*_RATE_JITTER), rng)
    bounds = np.concatenate([[0.0], np.cumsum([s[0] for s in segs])])
    n = int(math.ceil(bounds[-1]))
    u = np.arange(n) / max(n - 1, 1)
    wobble = 0.02 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * u + rng.uniform(0, 2 * np.pi))
    f0 = spk.f0 * 2.0 ** (CONTOURS[shape](u, excursion) + wobble)           # (n,) Hz
    pulses = glottal_source(f0, rng, spk.jitter * jit, spk.shimmer * jit, closing)
    noise_v, noise_f = rng.standard_normal(n), rng.standard_normal(n)
    out = np.zeros(n + 1024)
    for (_, av, an, fm, bw, band), (lo, hi, w) in zip(segs, crossfade(bounds, 0.012 * SR)):
        if av > 0 or an > 0:                                           # voicing and aspiration: the formants
            voice = av * (pulses[lo:hi] + (spk.breathiness + breath_add) * 0.3 * noise_v[lo:hi])
            out[lo:hi + 1024] += _resonate(w * (voice + an * 0.12 * noise_v[lo:hi]), fm, bw)
        if band is not None:                                           # frication: noise through its band
            fc, fbw, level = band
            out[lo:hi + 1024] += level * 0.07 * _resonate(w * noise_f[lo:hi], [min(fc, 0.45 * SR)], [fbw])
    y = out[:n + int(0.03 * SR)]
    y = y - y.mean()
    return y / _rms(y[:n])


# --- Music: notes and chords ----------------------------------------------------------------------
def render_music(instrument: str, midis: Sequence[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Notes `midis` played together on `instrument`, 1-2 strikes, partials below 7 kHz; unit RMS."""
    ins, t = INSTRUMENTS[instrument], np.arange(n) / SR
    starts = [rng.uniform(0.0, 0.08)]
    if rng.random() < 0.5 and n / SR > 0.6:
        starts.append(rng.uniform(0.45, 0.75) * n / SR)
    ends = starts[1:] + [n / SR + 1.0]
    amps, y = np.asarray(ins.amps, dtype=np.float64), np.zeros(n)
    for m in midis:
        f0 = 440.0 * 2.0 ** ((m - 69) / 12) * 2 ** (rng.normal(0, 0.003))   # MIDI note m, slightly detuned
        vib_hz, vib_depth = ins.vibrato
        f_inst = f0 * (1 + vib_depth * np.sin(2 * np.pi * vib_hz * t + rng.uniform(0, 2 * np.pi)))
        gain = 10 ** (rng.normal(0, 1.0) / 20)
        if ins.ratios:                                  # inharmonic partials, summed directly
            ratios = np.asarray(ins.ratios)
            keep = ratios * f0 < 7000.0
            phase = np.cumsum(f_inst) / SR
            parts = np.sin(2 * np.pi * ratios[keep][:, None] * phase
                           + rng.uniform(0, 2 * np.pi, int(keep.sum()))[:, None])   # (P, n)
            bright = (amps[keep][:, None] * parts).sum(0)
            dull = amps[0] * parts[0]
        else:
            H = int(min(len(amps), 7000.0 // (f0 * (1 + vib_depth))))
            phase0 = rng.uniform()
            bright = _oscillator(amps[:H], f_inst, phase0)
            dull = _oscillator(amps[:1], f_inst, phase0) if math.isfinite(ins.bright) else bright
        for s0, s1 in zip(starts, ends):
            tt = t - s0
            env = np.clip(tt / ins.attack, 0, 1)
            if math.isfinite(ins.decay):
                env = env * (ins.sustain + (1 - ins.sustain) * np.exp(-np.clip(tt - ins.attack, 0, None) / ins.decay))
            env *= np.clip((s1 - t) / 0.03, 0, 1)                           # release before next
            if math.isfinite(ins.bright):
                mix = np.exp(-np.clip(tt, 0, None) / ins.bright)
                y += gain * env * (mix * bright + (1 - mix) * dull)
            else:
                y += gain * env * bright
    if ins.breath:
        y += ins.breath * _rms(y) * coloured_noise(rng, n, -3.0, 800, 6000)
    return y / _rms(y)


# --- Environmental events -------------------------------------------------------------------------
def _decaying_impulses(n: int, times: np.ndarray, amps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sum of amps_k * kernel placed at integer sample times_k (one FFT convolution)."""
    x = np.bincount(np.clip(times, 0, n - 1), weights=amps, minlength=n)[:n]
    return _filter(x, lambda N: np.fft.rfft(kernel, N), pad=len(kernel))[:n]


def render_event(family: str, key: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """An environmental texture of `family` with key parameter `key` (EVENT_FAMILIES); unit RMS."""
    t, dur = np.arange(n) / SR, n / SR
    if family == "hum":                      # harmonic stack, slow 10% AM, weak brown noise
        amps = np.arange(1, 13, dtype=np.float64) ** -1.2 * rng.uniform(0.6, 1.0, 12)
        amps[0] = 1.0
        f = np.full(n, key * (1 + 0.002 * rng.standard_normal()))
        y = _oscillator(amps[:int(min(12, 7000 // key))], f, rng.uniform())      # partials below 7 kHz
        y *= 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * t)
        y += 0.03 * coloured_noise(rng, n, -6.0, 20, 4000)
    elif family == "engine":                 # low-pass noise, pulsed ((1 + cos)/2)^4 at the firing rate
        f = key * (1 + 0.015 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6.3)))
        env = ((1 + np.cos(2 * np.pi * (np.cumsum(f) / SR + rng.uniform()))) / 2) ** 4.0
        y = coloured_noise(rng, n, -4.0, 30, 900) * (0.15 + env)
    elif family == "drill":                  # high whine with fast AM over band noise
        am = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(30, 60) * t)
        f = np.full(n, key * (1 + 0.003 * rng.standard_normal()))
        y = _oscillator(np.array([1.0, 0.35, 0.15]), f, rng.uniform()) * am
        y += 0.15 * coloured_noise(rng, n, 0.0, key, min(4 * key, 7900))
    elif family == "jackhammer":             # broadband decaying clicks at the hit rate
        period = SR / key
        times = np.arange(rng.uniform(0, period), n, period)
        times = (times + 0.02 * period * rng.standard_normal(len(times))).astype(np.int64)
        L = int(0.012 * SR)
        kernel = rng.standard_normal(L) * np.exp(-np.arange(L) / (0.003 * SR))   # 3 ms decay
        y = _decaying_impulses(n, times, rng.uniform(0.7, 1.0, len(times)), kernel)
        y += 0.05 * _rms(y) * coloured_noise(rng, n, 0.0, 200, 7000)
    elif family == "siren":                  # harmonic tone swept +-0.35 octave
        sweep = 0.35 * np.sin(2 * np.pi * rng.uniform(0.6, 1.5) * t + rng.uniform(0, 6.3))
        y = _oscillator(np.array([1.0, 0.5, 0.3, 0.15]), key * 2.0 ** sweep, rng.uniform())
    elif family == "alarm":                  # beeps: a tone gated on/off at 3-5 Hz, duty 0.5
        gate = (np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6.3)) > 0).astype(np.float64)
        gate = np.convolve(gate, np.ones(80) / 80, mode="same")          # 5 ms ramps
        y = _oscillator(np.array([1.0, 0.2]), np.full(n, key), rng.uniform()) * gate
    elif family == "bark":                   # harmonic bursts with a falling pitch and a formant
        y = np.zeros(n)
        n_slots = max(1, int(dur / 0.33))                 # 1-3 barks a second, in 0.33 s slots
        n_barks = min(n_slots, max(1, int(round(rng.uniform(1, 3) * dur))))
        for k in np.sort(rng.choice(n_slots, size=n_barks, replace=False)):
            L = min(n, int(rng.uniform(0.08, 0.18) * SR))
            s0 = min(n - L, int((k * 0.33 + rng.uniform(0, 0.1)) * SR))
            f0 = key * np.linspace(1.0, 0.7, L) * rng.uniform(0.97, 1.03)
            src = glottal_source(f0, rng, 0.02, 0.1, 0.12) + 0.3 * rng.standard_normal(L)
            formants = [1.6 * key + 400, 2.5 * key + 1200, 3500.0]
            seg = _filter(src * np.hanning(L), lambda N: resonator_response(formants, [200.0, 250, 300], N), pad=256)
            y[s0:s0 + len(seg)] += seg[:n - s0]
    elif family == "impact":                 # 1-2 knocks: a click exciting decaying modes
        y = np.zeros(n)
        for _ in range(int(rng.integers(1, 3))):
            s0 = int(rng.uniform(0.0, 0.7) * n)
            L = min(n - s0, int(0.3 * SR))
            tt = np.arange(L) / SR
            tau = rng.uniform(0.04, 0.12)
            modes = sum(a * np.sin(2 * np.pi * key * r * tt) * np.exp(-tt * r / tau)
                        for r, a in ((1.0, 1.0), (1.59, 0.6), (2.14, 0.4), (2.65, 0.3)))
            click = rng.standard_normal(L) * np.exp(-tt / 0.002)
            y[s0:s0 + L] += rng.uniform(0.5, 1.0) * (modes + 0.5 * click)
    elif family == "rain":                   # pink noise + droplets (decaying 2-6 kHz blips)
        y = coloured_noise(rng, n, -3.0, 500, 7900)
        n_drops = rng.poisson(key * dur)
        tt = np.arange(int(0.008 * SR)) / SR
        for fd in rng.uniform(2000, 6000, 4):                               # 4 drop timbres
            kernel = np.sin(2 * np.pi * fd * tt) * np.exp(-tt / 0.0015)
            times = rng.integers(0, n, max(1, n_drops // 4))
            y += 3.0 * _decaying_impulses(n, times, np.exp(rng.normal(0, 0.7, len(times))), kernel)
    elif family == "wind":                   # pink noise low-passed at the cut-off, slow gusts
        gust = coloured_noise(rng, n + SR, -12.0, 0.3, 3.0)[:n]
        env = 0.35 + 0.65 / (1 + np.exp(-1.5 * gust))
        y = coloured_noise(rng, n, -3.0, 40, key) * env
    else:
        raise ValueError(f"unknown event family {family!r}; allowed: {', '.join(EVENT_FAMILIES)}")
    return y / _rms(y)


# --- The corpus -----------------------------------------------------------------------------------
class SyntheticCorpus:
    """The clips of one split (or several) of a synthetic corpus: `corpus[j]` is a `Clip`. Index i is in fold
    i % k + 1, else train / valid / test for i % 10 < 8 / = 8 / = 9; single-kind corpora are class-balanced."""

    def __init__(self, cfg: Optional[CorpusConfig] = None, split=None):
        self.cfg = cfg = cfg or CorpusConfig()
        self.n = int(round(cfg.clip_seconds * SAMPLE_RATE))
        self.all_splits = [f"fold{f}" for f in range(1, cfg.n_folds + 1)] if cfg.n_folds else list(SPLITS)
        self.splits = tuple(self.all_splits) if split is None else (split,) if isinstance(split, str) else tuple(split)
        for s in self.splits:
            _check(s in self.all_splits, f"unknown split {s!r} of {cfg.name!r}; allowed: {', '.join(self.all_splits)}")
        self.indices = [i for i in range(cfg.n_clips) if self.split_of(i) in self.splits]
        self.speakers = [make_speaker(cfg.seed, s, cfg.n_speakers) for s in range(cfg.n_speakers)]
        self._by_split = {sp: [s for s in self.speakers if s.split == sp] for sp in SPLITS}
        self._labels: Dict[int, Dict[str, str]] = {}      # labels(j) cache: views ask often

    def split_of(self, index: int) -> str:
        k, r = self.cfg.n_folds, index % 10
        return f"fold{index % k + 1}" if k else "train" if r < 8 else "valid" if r == 8 else "test"

    def __len__(self) -> int:
        return len(self.indices)

    def labels(self, j: int) -> Dict[str, str]:
        """The labels of clip j without rendering it."""
        if j not in self._labels:
            self._labels[j] = self.spec(self.indices[j])["labels"]
        return self._labels[j]

    def split(self, j: int) -> str:
        return self.split_of(self.indices[j])

    def classes(self, key: str) -> List[str]:
        """Every class label `key` can take in this corpus, in a fixed order."""
        v = self.cfg.n_event_variants
        events = list(EVENT_FAMILIES) if v == 1 else [f"{f}-{k + 1}" for f in EVENT_FAMILIES for k in range(v)]
        table = dict(domain=list(DOMAINS) + ["scene"], word=list(WORDS)[:self.cfg.n_words],
                     intent=["|".join(i) for i in INTENTS], action=sorted({i[0] for i in INTENTS}),
                     object=sorted({i[1] for i in INTENTS}), location=sorted({i[2] for i in INTENTS}),
                     instrument=list(INSTRUMENTS), chord=list(CHORDS), event=events, pitch_group=list(PITCH_GROUPS),
                     tract_group=list(TRACT_GROUPS), emotion=list(EMOTIONS), rate=list(RATES),
                     speaker=[s.id for s in self.speakers], background=["music", "environment"])
        _check(key in table, f"unknown label {key!r}; allowed: {', '.join(table)}")
        return table[key]

    def spec(self, index: int) -> dict:
        """Stage 1 (cheap): clip `index`'s labels and every other draw made before rendering."""
        cfg = self.cfg
        rng = np.random.default_rng(seed_sequence(cfg.seed, cfg.name, index).spawn(2)[0])   # child 0: labels
        split = self.split_of(index)
        forced = index // (cfg.n_folds or 10)                              # balanced class index
        parts = []                                                         # (domain, labels, params)
        if cfg.kind == "mixed":
            w = np.array(cfg.domain_weights) / sum(cfg.domain_weights)
            domain = DOMAINS[rng.choice(4, p=w)]
            if domain in ("speech", "mixture"):
                parts.append(self._speech(rng, split, None, rng.random() < cfg.command_prob))
            if domain == "music" or (domain == "mixture" and rng.random() < 0.5):
                parts.append(self._music(rng, None))
            elif domain in ("environment", "mixture"):
                parts.append(self._event(rng, None))
        elif cfg.kind in ("word", "command"):
            domain, parts = "speech", [self._speech(rng, split, forced, cfg.kind == "command")]
        elif cfg.kind == "music":
            domain, parts = "music", [self._music(rng, forced)]
        elif cfg.kind == "event":
            domain, parts = "environment", [self._event(rng, forced)]
        else:                                                              # scene
            domain = "scene"
            if rng.random() < 0.5:
                parts.append(self._speech(rng, split, None, False))
            if rng.random() < 0.4:
                parts.append(self._music(rng, None))
            parts += [self._event(rng, None) for _ in range(int(rng.choice(3, p=[0.3, 0.45, 0.25])))]
            if not parts:
                parts.append(self._event(rng, None))
        labels = {"domain": domain}
        for p in parts:
            for key, v in p[1].items():
                labels.setdefault(key, v)              # a scene's first event names "event"
        if domain == "mixture":
            labels["background"] = parts[1][0]
        if domain == "scene":
            labels["tags"] = ",".join(sorted({t for p in parts for t in audioset_tags(p[1])}, key=AUDIOSET_TAGS.index))
        texture = None                                     # a texture under an event-only clip
        if domain == "environment" and rng.random() < _BACKGROUND[0]:
            others = [f for f in EVENT_FAMILIES if f != parts[0][2]["family"]]
            other = others[int(rng.integers(len(others)))]
            v = int(rng.integers(5))
            key = float(EVENT_FAMILIES[other][1][v] * rng.uniform(0.93, 1.07))
            texture = dict(family=other, key=key, db=float(rng.uniform(*_BACKGROUND[1])))
        return dict(index=index, split=split, domain=domain, labels=labels, parts=parts, texture=texture,
                    snr_db=float(rng.uniform(*cfg.snr_db)), floor_snr_db=float(rng.uniform(*cfg.floor_snr_db)),
                    gain_db=float(rng.uniform(*cfg.gain_db)), tilt=float(rng.uniform(-cfg.tilt_db, cfg.tilt_db)),
                    levels_db=[float(v) for v in rng.uniform(-10, 0, len(parts))])

    def _speech(self, rng, split, forced, command):
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
            c = int(rng.integers(self.cfg.n_words)) if forced is None else forced % self.cfg.n_words
            labels["word"] = list(WORDS)[c]
            words = [labels["word"]]
        return ("speech", labels, dict(words=words, speaker=spk, emotion=emotion, rate=rate))

    def _music(self, rng, forced):
        n_cls = len(INSTRUMENTS) * len(CHORDS)
        c = int(rng.integers(n_cls)) if forced is None else forced % n_cls
        instrument, chord = list(INSTRUMENTS)[c // len(CHORDS)], list(CHORDS)[c % len(CHORDS)]
        root = int(rng.integers(ROOT_MIDI[0], ROOT_MIDI[1] + 1))
        return ("music", dict(instrument=instrument, chord=chord),
                dict(instrument=instrument, midis=[root + i for i in CHORDS[chord]], root=root))

    def _event(self, rng, forced):
        cfg = self.cfg
        n_cls = len(EVENT_FAMILIES) * cfg.n_event_variants
        c = int(rng.integers(n_cls)) if forced is None else forced % n_cls
        family, variant = list(EVENT_FAMILIES)[c // cfg.n_event_variants], c % cfg.n_event_variants
        if cfg.n_event_variants == 1:
            variant = int(rng.integers(5))                  # any of the 5: within-class variety
        name = family if cfg.n_event_variants == 1 else f"{family}-{variant + 1}"
        key = EVENT_FAMILIES[family][1][variant] * rng.uniform(0.93, 1.07)
        return ("environment", dict(event=name), dict(family=family, variant=variant, key=float(key)))

    def __getitem__(self, j: int) -> Clip:
        """Stage 2, audio: clip j's sources at unit RMS, mixed, noise floor, channel tilt, level."""
        cfg, n, index = self.cfg, self.n, self.indices[j]
        spec = self.spec(index)
        rng = np.random.default_rng(seed_sequence(cfg.seed, cfg.name, index).spawn(2)[1])   # child 1: audio
        sources = []
        for domain, _, p in spec["parts"]:
            if domain == "speech":
                utt = render_speech(p["words"], p["speaker"], p["emotion"], p["rate"], rng)
                x = np.zeros(n)                   # fits: CorpusConfig checks the longest utterance
                start = int(rng.uniform(0.3, 0.7) * (n - len(utt)))
                x[start:start + len(utt)] = utt
            elif domain == "music":
                x = render_music(p["instrument"], p["midis"], n, rng)
            else:
                x = render_event(p["family"], p["key"], n, rng)
            sources.append(x)
        if (tx := spec["texture"]) is not None:    # another family's texture under the event
            sources[0] = sources[0] + 10 ** (tx["db"] / 20) * render_event(tx["family"], tx["key"], n, rng)
        if spec["domain"] == "mixture":            # speech at snr_db over its background
            speech, bg = sources
            y = speech + bg * _rms(speech[speech != 0]) / _rms(bg[speech != 0]) * 10 ** (-spec["snr_db"] / 20)
        elif spec["domain"] == "scene":
            y = sum(x * 10 ** (lv / 20) for x, lv in zip(sources, spec["levels_db"]))
        else:
            y = sources[0]
        y = y + _rms(y) * 10 ** (-spec["floor_snr_db"] / 20) * coloured_noise(rng, n, -3.0, 20, 8000)
        if spec["tilt"] != 0:             # channel: a tilt in dB/octave around 1 kHz, flat below 50 Hz
            y = _filter(y, lambda N: _octave_gain(np.maximum(np.fft.rfftfreq(N, 1.0 / SR), 50.0), spec["tilt"]), 0)
        first = spec["parts"][0]          # final RMS: level + random gain + the emotion's vocal effort
        effort = EMOTIONS[first[2]["emotion"]][2] if first[0] == "speech" else 0.0
        y *= 10 ** ((cfg.level_dbfs + spec["gain_db"] + effort) / 20) / _rms(y)
        y *= min(1.0, 0.99 / np.abs(y).max())    # scale (never clip) into range: ~2% of clips at the defaults
        return Clip(audio=y.astype(np.float32), sample_rate=SR, labels=dict(spec["labels"]),
                    domain=spec["domain"], speaker=first[1].get("speaker"), split=spec["split"],
                    source=f"synthetic:{cfg.name}:{cfg.seed}:{index}")


def audioset_tags(labels: Dict[str, str]) -> List[str]:
    """The AudioSet-like tags (AUDIOSET_TAGS) of a clip's (or one source's) labels."""
    if "tags" in labels:
        return labels["tags"].split(",") if labels["tags"] else []
    tags = ["speech", "speech:" + labels["pitch_group"]] if "pitch_group" in labels else []
    tags += ["music", labels["instrument"]] if "instrument" in labels else []
    family = labels.get("event", "").split("-")[0]             # "<family>-<variant>" in ESC-50-like corpora
    return tags + [family] if family in EVENT_FAMILIES else tags
