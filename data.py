"""Task views over any audio source, WAV I/O, resampling and the real corpora's loaders. A source (SyntheticCorpus,
or AudioFiles read lazily): len, [j] -> Clip, labels(j), split(j), classes(key). B batch."""
import contextlib
import csv
import difflib
import math
import os
import struct
import sys
import zlib
from dataclasses import fields, replace
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

# Re-exported: callers reach the generator as data.SyntheticCorpus, data.CorpusConfig, ...
from synth import (AUDIOSET_TAGS, SAMPLE_RATE, SPLITS, Clip, CorpusConfig, SyntheticCorpus,  # noqa: F401
                   _check, audioset_tags, seed_sequence)


# --- Views and collate ----------------------------------------------------------------------------
def _audio_tensor(clip: Clip, max_seconds: Optional[float]) -> torch.Tensor:
    """The clip's audio as a float32 tensor, centre-cropped to max_seconds (deterministic)."""
    x = clip.audio
    m = len(x) if max_seconds is None else int(round(max_seconds * clip.sample_rate))
    s = max(0, (len(x) - m) // 2)
    return torch.from_numpy(np.ascontiguousarray(x[s:s + m], dtype=np.float32))


class Task(NamedTuple):
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
    "emotion": Task("paralinguistic", "emotion", ("How does the speaker sound?", "Which emotion does the speaker convey?")),
    "rate": Task("paralinguistic", "rate", ("How fast is the speaker talking?",)),
}


class InstructionDataset(torch.utils.data.Dataset):
    """LALM instruction view: item = {"audio", "prompt", "question", "choices", "answer", "answer_index", "task",
    "group", "index"} (`meta(i)`: without audio); per clip one task it has a label for (all_tasks: every one)."""

    def __init__(self, source, seed: int = 0, all_tasks: bool = False):
        self.source, self.choices = source, {}
        for t in TASKS:
            with contextlib.suppress(ValueError):          # the source has no such label
                self.choices[t] = source.classes(TASKS[t].label)
        ask = lambda t, rng: TASKS[t].questions[int(rng.integers(len(TASKS[t].questions)))]
        self.items = []                                    # (j, task, question template)
        for j in range(len(source)):
            ok = [t for t in self.choices if TASKS[t].label in source.labels(j)]
            if all_tasks:                                  # every task, template drawn per (clip, task)
                self.items += [(j, t, ask(t, np.random.default_rng(seed_sequence(seed, f"instruction/{t}", j))))
                               for t in ok]
            elif ok:
                rng = np.random.default_rng(seed_sequence(seed, "instruction", j))
                t = ok[int(rng.integers(len(ok)))]
                self.items.append((j, t, ask(t, rng)))

    def __len__(self) -> int:
        return len(self.items)

    def meta(self, i: int) -> dict:
        j, t, q = self.items[i]
        choices, answer = self.choices[t], self.source.labels(j)[TASKS[t].label]
        return dict(prompt=f"{q} Answer with one of: {', '.join(choices)}.", question=q,
                    choices=list(choices), answer=answer, answer_index=choices.index(answer),
                    task=t, group=TASKS[t].group, index=j)

    def __getitem__(self, i: int) -> dict:
        return dict(audio=_audio_tensor(self.source[self.items[i][0]], None), **self.meta(i))


def collate(items: Sequence[dict]) -> dict:
    """Batch view items: {"audio": (B, N) float32 zero-padded, "lengths": (B,) int64, "mask": (B, N)
    bool (True = real sample)}, other keys: ints -> (B,) int64, anything else a list."""
    lengths = torch.tensor([len(it["audio"]) for it in items], dtype=torch.long)   # (B,)
    N = int(lengths.max())
    audio = torch.nn.utils.rnn.pad_sequence([it["audio"] for it in items], batch_first=True)       # (B, N)
    out = dict(audio=audio, lengths=lengths, mask=torch.arange(N)[None, :] < lengths[:, None])
    for key in [k for k in items[0] if k != "audio"]:
        vals = [it[key] for it in items]
        out[key] = torch.tensor(vals, dtype=torch.long) if all(type(v) is int for v in vals) else vals
    return out


# --- WAV I/O (standard library + numpy) and resampling --------------------------------------------
WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_FORMAT_NAMES = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM", 0x0055: "MPEG layer 3"}


def read_wav(path: str) -> Tuple[np.ndarray, int]:
    """(audio (frames, channels) float32, sample rate). The RIFF chunks are parsed here (`wave` refuses
    IEEE float and, before Python 3.12, WAVE_FORMAT_EXTENSIBLE); a bad file raises a ValueError naming it."""
    with open(path, "rb") as f:
        data = f.read()
    need = lambda ok, problem: _check(ok, f"{path}: {problem}")     # noqa: E731
    need(data[:4] == b"RIFF" and data[8:12] == b"WAVE",
         f"not a RIFF/WAVE file (starts with {data[:12]!r})" if data else "empty file (0 bytes)")
    pos, tag = 12, None
    while pos + 8 <= len(data):
        cid, size, body = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0], pos + 8
        if cid == b"fmt ":
            tag, ch, sr, _, align, bits = struct.unpack("<HHIIHH", data[body:body + 16].ljust(16, b"\0"))
            need(size >= (40 if tag == WAVE_FORMAT_EXTENSIBLE else 16) and body + size <= len(data),
                 f"truncated or malformed fmt chunk ({size} bytes declared)")
            if tag == WAVE_FORMAT_EXTENSIBLE:
                tag = struct.unpack("<H", data[body + 24:body + 26])[0]      # SubFormat GUID head
        elif cid == b"data":
            need(tag is not None, "data chunk before the fmt chunk")
            need(size <= len(data) - body, f"truncated: data chunk declares {size} bytes but only "
                 f"{len(data) - body} follow")
            break
        pos = body + size + (size & 1)                   # chunks are word-aligned
    else:
        need(False, f"truncated or malformed: no {'fmt' if tag is None else 'data'} chunk")
    need((tag == WAVE_FORMAT_PCM and bits in (8, 16, 24, 32)) or (tag == WAVE_FORMAT_IEEE_FLOAT and bits in (32, 64)),
         f"unsupported encoding: format tag 0x{tag:04X} ({_FORMAT_NAMES.get(tag, 'unknown')}), {bits} bits; "
         f"supported: PCM 8/16/24/32-bit, IEEE float 32/64-bit")
    need(ch >= 1 and sr >= 1 and align == ch * bits // 8, f"malformed fmt chunk: {ch} channels, {sr} Hz, "
         f"block_align {align} (expected channels x bytes per sample)")
    need(size % align == 0, f"truncated: data chunk of {size} bytes is not a whole number of {align}-byte frames")
    need(size > 0, "empty: the data chunk holds no samples")
    raw, k = data[body:body + size], bits // 8
    if tag == WAVE_FORMAT_IEEE_FLOAT:
        x = np.frombuffer(raw, dtype=f"<f{k}").astype(np.float32)
    else:      # k-byte little-endian PCM (8-bit: unsigned) -> the top k bytes of an int32, / 2^31
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, k) ^ np.uint8(0x80 if k == 1 else 0)
        word = np.zeros((len(b), 4), dtype=np.uint8)
        word[:, 4 - k:] = b
        x = (word.view("<i4")[:, 0] / 2147483648.0).astype(np.float32)
    need(np.isfinite(x).all(), f"contains NaN or inf samples ({int((~np.isfinite(x)).sum())} of {x.size})")
    return x.reshape(-1, ch), sr


def write_wav(path: str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write (n,) or (n, channels) float audio as 16-bit PCM WAV (clipped to [-1, 1), rounded)."""
    x = np.asarray(audio, dtype=np.float64)
    ch = 1 if x.ndim == 1 else x.shape[1]
    raw = np.clip(np.round(x * 32768.0), -32768.0, 32767.0).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", WAVE_FORMAT_PCM, ch, sample_rate, sample_rate * 2 * ch, 2 * ch, 16)
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling along axis 0 -> float32: y[m] = sum_j h(p/up - j) x[base + j], m down / up = base +
    p/up, h a sinc low-pass at 0.94 min(sr_in, sr_out) / 2, 32 zero crossings a side, Kaiser window (beta 9)."""
    if sr_in == sr_out:
        return np.asarray(x, dtype=np.float32)
    _check(sr_in >= 1 and sr_out >= 1, f"sample rates must be >= 1, got {sr_in} -> {sr_out}")
    x = np.asarray(x, dtype=np.float64)
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = sr_out // g, sr_in // g
    fc = 0.5 * min(1.0, up / down) * 0.94                     # cut-off, cycles per input sample
    half = 32 / (2 * fc)                                      # kernel half-width, input samples
    K = int(math.ceil(half))
    tau = (np.arange(up) / up)[:, None] - np.arange(-K + 1, K + 1)[None, :]   # (up, 2K) time to each tap
    u = np.clip(tau / half, -1.0, 1.0)
    window = np.i0(9.0 * np.sqrt(1 - u * u)) / np.i0(9.0) * (np.abs(tau) <= half)     # Kaiser, beta 9
    table = 2 * fc * np.sinc(2 * fc * tau) * window                                 # (up, 2K)
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


def load_audio(path: str) -> np.ndarray:
    """A file -> (n,) float32 mono (channel mean) at 16 kHz; non-WAV formats need soundfile."""
    if str(path).lower().endswith(".wav"):
        x, sr = read_wav(path)
    else:
        try:
            import soundfile
        except ImportError:
            raise ImportError(f"{path}: reading non-WAV audio needs the optional package soundfile") from None
        x, sr = soundfile.read(path, dtype="float32", always_2d=True)
    return resample(x.mean(axis=1), sr, SAMPLE_RATE)


# --- Real corpora ---------------------------------------------------------------------------------
def _record(path: str, labels: Dict[str, str], domain: str, speaker: Optional[str], split: str) -> Clip:
    return Clip(None, SAMPLE_RATE, labels, domain, speaker, split, source=path)     # audio read when indexed


class AudioFiles:
    """A real corpus as a source of Clips; its records are Clips without audio, each file read when indexed."""

    def __init__(self, records: List[Clip], name: str, classes: Optional[Dict[str, List[str]]] = None):
        self.records, self.name = records, name
        self._classes = classes or {k: sorted({r.labels[k] for r in records if k in r.labels})
                                    for k in dict.fromkeys(k for r in records for k in r.labels)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, j: int) -> Clip:
        r = self.records[j]
        return replace(r, audio=load_audio(r.source), labels=dict(r.labels))

    def labels(self, j: int) -> Dict[str, str]:
        return self.records[j].labels

    def split(self, j: int) -> str:
        return self.records[j].split

    def classes(self, key: str) -> List[str]:
        _check(key in self._classes, f"{self.name}: no label {key!r}; labels: {', '.join(self._classes)}")
        return list(self._classes[key])

    def select(self, split) -> "AudioFiles":
        """The records of one split or of several (a list), with the full class lists."""
        want = (split,) if isinstance(split, str) else tuple(split)
        have = sorted({r.split for r in self.records})
        for s in want:
            _check(s in have, f"{self.name}: no split {s!r}; splits: {', '.join(have)}")
        return AudioFiles([r for r in self.records if r.split in want], self.name, self._classes)


def _need(path: str, layout: str, folder: bool = True) -> str:
    _check((os.path.isdir if folder else os.path.isfile)(path),
           f"{path}: {'folder' if folder else 'file'} not found; expected the {layout}")
    return path


def _read_csv(path: str, columns: Sequence[str], layout: str) -> List[dict]:
    with open(_need(path, layout, folder=False), newline="", encoding="utf-8-sig") as f:   # -sig: a BOM
        reader = csv.DictReader(f)
        rows, header = list(reader), reader.fieldnames or []
    for c in columns:
        _check(c in header, f"{path}: missing column {c!r} (columns found: {', '.join(header) or 'none'})")
    return rows


def _class_files(root: str, layout: str, hidden: Tuple[str, ...] = (".",)) -> List[Tuple[str, str]]:
    """(class folder, audio file name) of every <root>/<class>/*.{wav,flac,ogg}."""
    classes = sorted(d for d in os.listdir(_need(root, layout))
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith(hidden))
    _check(bool(classes), f"{root}: no class folders found; expected the {layout}")
    out = [(c, f) for c in classes for f in sorted(os.listdir(os.path.join(root, c)))
           if f.lower().endswith((".wav", ".flac", ".ogg")) and not f.startswith(".")]
    _check(not (e := sorted(set(classes) - {c for c, _ in out})), f"{os.path.join(root, *e[:1])}: class folder without audio")
    return out


def load_speech_commands(root: str) -> AudioFiles:
    """Speech Commands v1/v2; validation_list.txt and testing_list.txt name valid and test clips."""
    layout = "Speech Commands layout: <word>/<speaker>_nohash_<n>.wav, validation_list.txt, testing_list.txt"
    lists = {}
    for split, fname in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        with open(_need(os.path.join(_need(root, layout), fname), layout, folder=False)) as f:
            lists.update({line.strip().replace("\\", "/"): split for line in f if line.strip()})
    missing = [name for name in lists if not os.path.isfile(os.path.join(root, name))]
    _check(not missing, f"{root}: validation_list.txt / testing_list.txt name {len(missing)} missing file(s): {missing[:3]}")
    records = [_record(os.path.join(root, w, fn), dict(word=w), "speech",   # _background_noise_/: no word
                       fn.split("_nohash_")[0] if "_nohash_" in fn else None, lists.get(f"{w}/{fn}", "train"))
               for w, fn in _class_files(root, layout, (".", "_"))]
    return AudioFiles(records, "speech_commands")


def load_esc50(root: str) -> AudioFiles:
    """ESC-50: fold1..fold5, event = category."""
    layout = "ESC-50 layout: meta/esc50.csv and audio/*.wav"
    rows = _read_csv(os.path.join(root, "meta", "esc50.csv"), ("filename", "fold", "category"), layout)
    audio = _need(os.path.join(root, "audio"), layout)
    return AudioFiles([_record(os.path.join(audio, r["filename"]), dict(event=r["category"]), "environment",
                               None, f"fold{int(r['fold'])}") for r in rows], "esc50")


def load_urbansound8k(root: str) -> AudioFiles:
    """UrbanSound8K: fold1..fold10, event = class."""
    layout = "UrbanSound8K layout: metadata/UrbanSound8K.csv and audio/fold1..fold10/*.wav"
    rows = _read_csv(os.path.join(root, "metadata", "UrbanSound8K.csv"), ("slice_file_name", "fold", "class"), layout)
    audio = _need(os.path.join(root, "audio"), layout)
    folds = {r["fold"]: _need(os.path.join(audio, f"fold{int(r['fold'])}"), layout) for r in rows}
    return AudioFiles([_record(os.path.join(folds[r["fold"]], r["slice_file_name"]), dict(event=r["class"]),
                               "environment", None, f"fold{int(r['fold'])}") for r in rows], "urbansound8k")


def load_fluent_speech_commands(root: str) -> AudioFiles:
    """Fluent Speech Commands: train/valid/test by its CSVs; intent = "action|object|location"."""
    layout = "Fluent Speech Commands layout: data/{train,valid,test}_data.csv and the wavs they list"
    records = []
    for split in SPLITS:
        for r in _read_csv(os.path.join(root, "data", f"{split}_data.csv"),
                           ("path", "speakerId", "action", "object", "location"), layout):
            labels = dict(action=r["action"], object=r["object"], location=r["location"],
                          intent=f"{r['action']}|{r['object']}|{r['location']}")
            records.append(_record(os.path.join(root, r["path"]), labels, "speech", r["speakerId"], split))
    return AudioFiles(records, "fluent_speech_commands")


BENCHMARKS = {   # name: (synthetic preset, task label, real-data loader)
    "esc50": ("esc50_like", "event", load_esc50),
    "us8k": ("us8k_like", "event", load_urbansound8k),
    "speechcommands": ("speech_commands_like", "word", load_speech_commands),
    "fsc": ("fsc_like", "intent", load_fluent_speech_commands),
}
LAYOUT_MARKERS = {"esc50": ("meta", "esc50.csv"), "us8k": ("metadata", "UrbanSound8K.csv"),
                  "speechcommands": ("validation_list.txt",), "fsc": ("data", "train_data.csv")}


LABEL_OF = {**{k: t.label for k, t in TASKS.items()}, **{t.label: t.label for t in TASKS.values()}}   # built-ins
PARALINGUISTIC = ("speaker", "gender", "age", "emotion", "pitch", "rate", "accent")   # new tasks; others: semantic
AUDIOFOLDER_SPLITS = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}   # HF names: ours


def _hash_split(name: str) -> str:
    return {0: "test", 1: "valid"}.get(zlib.crc32(name.encode()) % 10, "train")    # 80/10/10, same on any machine


def load_audiofolder(root: str, groups: str = "") -> AudioFiles:
    """Hugging Face audiofolder: metadata.csv (file_name relative to it, label columns) at root or per split folder,
    else a `split` column, else _hash_split. LABEL_OF's columns are those tasks; others of 2 .. min(50, clips / 2)
    values join TASKS as "What is the <column>?" (group: PARALINGUISTIC, or as `groups` says: "column:group,...")."""
    folders = [(s, os.path.join(root, d)) for d, s in AUDIOFOLDER_SPLITS.items()
               if os.path.isfile(os.path.join(root, d, "metadata.csv"))] or [("", root)]
    records = []
    for split, folder in folders:
        meta = os.path.join(folder, "metadata.csv")
        for r in _read_csv(meta, ("file_name",), "audiofolder layout"):
            name, given = r.pop("file_name"), r.pop("split", "") or ""
            _check(os.path.isfile(path := os.path.join(folder, name)), f"{meta}: file_name {name!r} not found")
            labels = {LABEL_OF.get(c, c): v.strip() for c, v in r.items() if c and v and v.strip()}
            records.append(_record(path, labels, "unknown", labels.get("speaker"),
                                   split or AUDIOFOLDER_SPLITS.get(given, given) or _hash_split(name)))
    corpus = AudioFiles(records, os.path.basename(os.path.normpath(root)))
    new = [c for c, v in corpus._classes.items()
           if c not in LABEL_OF.values() and 2 <= len(v) <= min(50, len(records) // 2)]
    _check(bool(new) or not set(corpus._classes).isdisjoint(LABEL_OF.values()), f"{meta}: no label column (a task "
           f"label, or 2 .. 50 values, each used twice on average); columns: {', '.join(corpus._classes) or 'none'}")
    group = {c: "paralinguistic" if c in PARALINGUISTIC else "semantic" for c in new}
    group.update(asked := dict(item.partition(":")[::2] for item in groups.split(",") if item))
    if bad := [f"{c}:{g}" for c, g in asked.items() if c not in new or g not in ("semantic", "paralinguistic")]:
        raise UsageError(f"--groups={groups}: {bad[0]} is not COLUMN:semantic or COLUMN:paralinguistic, COLUMN one of "
                         f"{root}'s new tasks ({', '.join(new) or 'none'})")
    TASKS.update({c: Task(group[c], c, (f"What is the {c}?",)) for c in new})      # InstructionDataset, eval see them
    return corpus


def load_corpus(root: str, label: str, groups: str = "") -> Tuple[str, AudioFiles]:
    """(layout, every clip) at root: a BENCHMARKS layout detected from its files, "audiofolder" (metadata.csv at root or
    in train/), else "folder" (one folder per class, {label: folder}, _hash_split). Errors name the CLI options."""
    for name, (_, _, loader) in BENCHMARKS.items():
        if os.path.exists(os.path.join(root, *LAYOUT_MARKERS[name])):
            return name, loader(root)
    if any(os.path.isfile(os.path.join(root, *d, "metadata.csv")) for d in ((), ("train",))):
        return "audiofolder", load_audiofolder(root, groups)
    if not os.path.isdir(root):
        raise UsageError(f"--data_dir={root}: no such folder")
    labels = sorted(set(LABEL_OF.values()))
    if label not in labels:
        raise UsageError(f"--data_label={label!r} names no task label; allowed: {', '.join(labels)}")
    records = [_record(os.path.join(root, c, fn), {label: c}, "unknown", None, _hash_split(fn))
               for c, fn in _class_files(root, "folder-per-class layout: <class>/*.wav")]
    return "folder", AudioFiles(records, os.path.basename(os.path.normpath(root)))


# --- Linear probe (eval.py); the command line: --key=value overrides, usage errors ----------------
def frame_mean(x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """(N, T, D) -> (N, D): each item averaged over its first frames[i] frames (the probes' pooling)."""
    m = (torch.arange(x.shape[1], device=x.device)[None, :] < frames[:, None]).float()[..., None]   # (N, T, 1)
    return (x.float() * m).sum(1) / m.sum(1).clamp(min=1)


def probe_accuracy(train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                   n_classes: int, l2: float = 1e-3) -> float:
    """Held-out accuracy of `probe_fit`."""
    return float((probe_fit(train, n_classes, l2)(test[0]) == test[1]).double().mean())


def probe_fit(train: Tuple[torch.Tensor, torch.Tensor], n_classes: int, l2: float = 1e-3):
    """An L-BFGS multinomial logistic regression (float64, mean cross-entropy + l2 |W|^2 / 2) on features
    standardised by the train split; returns its classifier, features (N, D) -> classes (N,)."""
    mu, sd = train[0].mean(0), train[0].std(0) + 1e-6
    x, y = ((train[0] - mu) / sd).double(), train[1]
    W = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)   # (D, C)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=200, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W + b, y) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lambda x: (((x - mu) / sd).double() @ W.detach() + b.detach()).argmax(1)


class UsageError(SystemExit):
    """A bad option, path or file found before any work: `cli` prints it as one line and exits with code 2."""


def cli(main) -> None:
    try:
        main()
    except UsageError as e:                 # no traceback: the message names the option, value and what is allowed
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_overrides(defaults, argv: Sequence[str]) -> dict:
    """--key=value args -> {field: value}, typed as defaults' (bool: true/false/1/0; tuple: a,b floats); did-you-mean."""
    names = [f.name for f in fields(defaults)]
    out = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UsageError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise UsageError(f"unknown option --{key}{f'; did you mean --{close[0]}?' if close else ''} "
                             f"(options: {', '.join(names)})")
        kind = type(getattr(defaults, key))
        try:
            if kind is bool and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            out[key] = (tuple(float(v) for v in value.split(",")) if kind is tuple
                        else value.lower() in ("true", "1") if kind is bool else kind(value))
        except ValueError:
            raise UsageError(f"--{key} takes a value of type {kind.__name__}, got {value!r}") from None
    return out
