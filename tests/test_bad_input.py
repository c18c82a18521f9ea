"""The bad-input matrix (issue 18, item 5): each malformed input a user can hand the project is either valid and
decoded correctly (8/24-bit PCM, float64, 6 channels, 8 / 96 kHz), or refused with an error of a stated type whose
message names the culprit (the file, the column, the option, the shape). CLI errors are one-line SystemExits."""
import os
import re
import struct

import numpy as np
import pytest
import torch

import data
import hf
import loop
import train
import train_moa
from encoder import AST, ASTConfig
from llm import LLM, LLMConfig
from moe_adapter import MoEAdapter, MoEAdapterConfig
from soft_moa import SoftMoA


# --- Audio files ------------------------------------------------------------------------------------------------
def wav_bytes(raw: bytes, tag=1, ch=1, sr=16000, bits=16, data_size=None) -> bytes:
    """A RIFF/WAVE file written by hand (not by data.write_wav): fmt chunk, then a data chunk declaring data_size."""
    align = ch * bits // 8
    fmt = struct.pack("<HHIIHH", tag, ch, sr, sr * align, align, bits)
    body = (b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data"
            + struct.pack("<I", len(raw) if data_size is None else data_size) + raw)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pcm16(x: np.ndarray) -> bytes:
    return np.round(np.asarray(x) * 32768).clip(-32768, 32767).astype("<i2").tobytes()


def sine(f: float, sr: int, n: int) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * f * np.arange(n) / sr)


BAD_WAVS = {   # name: (file bytes, words the ValueError must say besides the file's name)
    "not_riff": (b"OggS\x00\x02" + bytes(40), "not a RIFF/WAVE file"),
    "zero_bytes": (b"", "empty file"),
    "zero_samples": (wav_bytes(b""), "holds no samples"),
    "nan_samples": (wav_bytes(np.array([0.1, np.nan, 0.2], "<f4").tobytes(), tag=3, bits=32), "NaN or inf"),
    "truncated_data": (wav_bytes(pcm16(np.zeros(100)), data_size=400), "truncated: data chunk declares 400 bytes"),
    "half_frame": (wav_bytes(pcm16(np.zeros(5)), ch=2), "not a whole number of 4-byte"),
    "mu_law": (wav_bytes(bytes(100), tag=7, bits=8), "unsupported encoding.*mu-law"),
    "no_data_chunk": (wav_bytes(b"")[:36], "no data chunk"),
}


@pytest.mark.parametrize("name", BAD_WAVS)
def test_bad_wav_is_a_value_error_naming_the_file(tmp_path, name):
    blob, words = BAD_WAVS[name]
    path = tmp_path / f"{name}.wav"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=words) as e:
        data.load_audio(str(path))
    assert f"{name}.wav" in str(e.value)


# Valid encodings decode to values computed by hand from the bytes.
VALID_WAVS = {   # name: (file bytes, read_wav's expected (frames, channels) float32 audio)
    "pcm8": (wav_bytes(bytes([128, 192, 64, 0]), bits=8), [[0.0], [0.5], [-0.5], [-1.0]]),
    "pcm24": (wav_bytes(bytes([0, 0, 0, 0, 0, 0x40, 0, 0, 0xC0, 0xFF, 0xFF, 0x7F]), bits=24),
              [[0.0], [0.5], [-0.5], [1 - 2 ** -23]]),
    "float64": (wav_bytes(np.array([0.25, -0.75, 1.0], "<f8").tobytes(), tag=3, bits=64), [[0.25], [-0.75], [1.0]]),
    "six_channels": (wav_bytes(pcm16(np.arange(12) / 16 - 0.25), ch=6), (np.arange(12) / 16 - 0.25).reshape(2, 6)),
}


@pytest.mark.parametrize("name", VALID_WAVS)
def test_valid_wav_encodings_decode_exactly(tmp_path, name):
    blob, want = VALID_WAVS[name]
    (tmp_path / "a.wav").write_bytes(blob)
    x, sr = data.read_wav(str(tmp_path / "a.wav"))
    assert sr == 16000 and x.dtype == np.float32
    np.testing.assert_array_equal(x, np.asarray(want, dtype=np.float32))
    np.testing.assert_array_equal(data.load_audio(str(tmp_path / "a.wav")), x.mean(axis=1))   # mono: channel mean


@pytest.mark.parametrize("sr", [8000, 96000])
def test_other_sample_rates_are_resampled_to_16k(tmp_path, sr):
    """An 8 / 96 kHz 440 Hz sine loads as a 16 kHz one: length scaled, samples those of the sine at 16 kHz."""
    n = sr // 2                                                               # 0.5 s
    (tmp_path / "a.wav").write_bytes(wav_bytes(pcm16(sine(440, sr, n)), sr=sr))
    y = data.load_audio(str(tmp_path / "a.wav"))
    assert len(y) == 8000
    ref = sine(440, 16000, 8000)
    np.testing.assert_allclose(y[400:-400], ref[400:-400], atol=2e-3)        # away from the edges' zero padding


# --- Corpus layouts -----------------------------------------------------------------------------------------------
def write_tone(path, seconds=0.1):
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_wav(str(path), sine(440, 16000, int(16000 * seconds)))


def esc50_missing_column(root):
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_text("filename,fold,target\n1-a.wav,1,0\n")
    write_tone(root / "audio" / "1-a.wav")
    return "missing column 'category'", "esc50.csv"


def class_folder_without_audio(root):
    write_tone(root / "dog" / "a.wav")
    (root / "cat").mkdir()
    (root / "cat" / "notes.txt").write_text("no audio here")
    return "class folder without audio", os.path.join("corpus", "cat")


def split_list_names_missing_file(root):
    write_tone(root / "yes" / "aa11_nohash_0.wav")
    (root / "validation_list.txt").write_text("yes/aa11_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("yes/zz99_nohash_0.wav\n")
    return "missing file", "yes/zz99_nohash_0.wav"


def speech_commands_without_testing_list(root):
    write_tone(root / "yes" / "aa11_nohash_0.wav")
    (root / "validation_list.txt").write_text("")
    return "file not found", "testing_list.txt"


@pytest.mark.parametrize("make", [esc50_missing_column, class_folder_without_audio, split_list_names_missing_file,
                                  speech_commands_without_testing_list])
def test_bad_corpus_layout_is_a_value_error_naming_it(tmp_path, make):
    root = tmp_path / "corpus"
    root.mkdir()
    words, culprit = make(root)
    with pytest.raises(ValueError, match=words) as e:
        data.load_corpus(str(root), "event")
    assert culprit in str(e.value)


def test_missing_data_dir_names_the_option(tmp_path):
    with pytest.raises(SystemExit, match=re.escape(f"--data_dir={tmp_path / 'nope'}: no such folder")):
        data.load_corpus(str(tmp_path / "nope"), "event")


# --- Checkpoints -----------------------------------------------------------------------------------------------
def truncated(path, blob_of):
    blob_of(path)
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])
    return path


def bad_checkpoint(tmp_path, kind):
    """(path to read, the file its error must name)."""
    p = tmp_path / "w.pt"
    if kind == "truncated_pt":
        truncated(p, lambda q: torch.save({"w": torch.ones(64)}, q))
    elif kind == "non_dict_pt":
        torch.save([torch.ones(2)], p)
    elif kind == "text_as_pt":
        p.write_text("not a checkpoint")
    elif kind == "truncated_safetensors":
        st = pytest.importorskip("safetensors.torch")
        p = truncated(tmp_path / "model.safetensors", lambda q: st.save_file({"w": torch.ones(64)}, str(q)))
    elif kind == "config_not_json":
        (tmp_path / "ck").mkdir()
        torch.save({"w": torch.ones(2)}, tmp_path / "ck" / "pytorch_model.bin")
        (tmp_path / "ck" / "config.json").write_text("{'model_type': 'llama'}")      # Python, not JSON
        return tmp_path / "ck", "config.json"
    elif kind == "index_not_json":
        (tmp_path / "ck").mkdir()
        (tmp_path / "ck" / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-0')   # cut short
        return tmp_path / "ck", "model.safetensors.index.json"
    return p, p.name


@pytest.mark.parametrize("kind, words", [
    ("truncated_pt", "unreadable weight file"), ("non_dict_pt", "does not hold a flat state dict"),
    ("text_as_pt", "unreadable weight file"), ("truncated_safetensors", "unreadable weight file"),
    ("config_not_json", "not valid JSON"), ("index_not_json", "not valid JSON")])
def test_hf_read_checkpoint_refuses_bad_files_by_name(tmp_path, kind, words):
    path, culprit = bad_checkpoint(tmp_path, kind)
    with pytest.raises(ValueError, match=words) as e:
        hf.read_checkpoint(str(path))
    assert culprit in str(e.value)


@pytest.mark.parametrize("kind, words", [("truncated_pt", "not a checkpoint of this project"),
                                         ("non_dict_pt", "holds a list, not a dict"),
                                         ("text_as_pt", "not a checkpoint of this project")])
def test_loop_load_refuses_bad_files_by_name(tmp_path, kind, words):
    path, culprit = bad_checkpoint(tmp_path, kind)
    with pytest.raises(ValueError, match=words) as e:
        loop.load(str(path))
    assert culprit in str(e.value)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        hf.read_checkpoint(str(tmp_path / "nope.pt"))


# --- Command lines --------------------------------------------------------------------------------------------
CLI_CASES = [   # (parser, argv, pattern its one-line SystemExit must match)
    (train.parse_args, ["--top_k=9"], "top_k must be in \\[1, n_experts=8\\]"),
    (train.parse_args, ["--lr=-1"], "^lr must be > 0, got -1.0$"),
    (train.parse_args, ["--lr=nan"], "^lr must be > 0"),
    (train.parse_args, ["--enc_lr=0"], "^enc_lr must be > 0"),
    (train.parse_args, ["--clip_seconds=0"], "^clip_seconds must be > 0, got 0.0$"),
    (train.parse_args, ["--steps=0"], "^steps must be > 0, got 0$"),
    (train.parse_args, ["--stepz=3"], "unknown option --stepz; did you mean --steps\\?"),
    (train.parse_args, ["--compile=maybe"], "--compile takes a value of type bool, got 'maybe'"),
    (train.parse_args, ["--batch=two"], "--batch takes a value of type int, got 'two'"),
    (train.parse_args, ["--config=nope"], "unknown config 'nope'; allowed: tiny, small, paper"),
    (train.parse_args, ["train"], "unknown command 'train'"),
    (train_moa.parse_args, ["--lr=-1"], "^lr must be > 0, got -1.0$"),
    (train_moa.parse_args, ["--full_lr=0"], "^full_lr must be > 0"),
    (train_moa.parse_args, ["--pre_seconds=0"], "^pre_seconds must be > 0"),
    (train_moa.parse_args, ["--n_experts=0"], "^n_experts must be > 0, got 0$"),
    (train_moa.parse_args, ["--slotz=2"], "unknown option --slotz; did you mean --slots\\?"),
    (train_moa.parse_args, ["--evaluate=maybe"], "--evaluate takes a value of type bool"),
    (train_moa.parse_args, ["--config=nope"], "unknown config 'nope'; allowed: tiny, paper"),
    (train_moa.parse_args, ["--max_seconds=-1"], "^max_seconds must be >= 0"),
]


@pytest.mark.parametrize("parse, argv, words", CLI_CASES, ids=[f"{p.__module__}{a}" for p, a, _ in CLI_CASES])
def test_cli_refuses_bad_options_in_one_line_naming_them(parse, argv, words):
    with pytest.raises(data.UsageError) as e:                 # data.cli: one line on stderr, exit code 2
        parse(argv)
    message = str(e.value.code)
    assert re.search(words, message), message
    assert "\n" not in message


def start_up_cases(tmp_path):
    """(script and arguments, what the one-line error names): each found at start-up, before any work."""
    bad_pt, _ = bad_checkpoint(tmp_path, "truncated_pt")
    index, _ = bad_checkpoint(tmp_path, "index_not_json")
    return [(["train.py", "--top_k=9"], "top_k must be in"),
            (["train.py", "--out_dir=/proc/x"], "--out_dir=/proc/x: cannot write there"),
            (["train.py", f"--out_dir={tmp_path / 'o'}", f"--encoder_checkpoint={bad_pt}"],
             f"--encoder_checkpoint={bad_pt}: .*unreadable weight file|not a checkpoint"),
            (["train.py", f"--out_dir={tmp_path / 'o'}", f"--llm_checkpoint={index}"], "index.json: not valid JSON"),
            (["train.py", f"--data_dir={tmp_path / 'none'}"], "--data_dir=.*none: no such folder"),
            (["train.py", "--device=cuda"] if not torch.cuda.is_available() else ["train.py", "--device=tpu"],
             "--device"),
            (["train_moa.py", "--max_seconds=-1"], "max_seconds must be >= 0"),
            (["train_moa.py", f"--out_dir={tmp_path / 'o'}", f"--ast_checkpoint={tmp_path / 'no.pt'}"],
             "--ast_checkpoint=.*no.pt: no such file or folder"),
            (["eval.py", str(tmp_path / "none")], "none: no such folder"),
            (["eval_moa.py", str(tmp_path)], "not a train_moa.py folder"),
            (["bench.py", "--rounds=0"], "--rounds must be >= 1")]


def test_start_up_errors_are_one_line_and_exit_code_2_in_a_real_process(tmp_path):
    from conftest import ROOT
    import subprocess
    import sys
    for argv, words in start_up_cases(tmp_path):
        out = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        assert out.returncode == 2 and "Traceback" not in out.stderr and re.search(words, last), (argv, out.stderr)
        assert argv[0] == "bench.py" or out.stderr.count("\n") == 1, out.stderr      # argparse adds its usage line
    assert not os.path.exists(tmp_path / "o")                 # nothing was made, not even the out_dir


# --- Module calls ------------------------------------------------------------------------------------------------
def moe_wrong_width():
    cfg = MoEAdapterConfig(d_in=8, d_out=4, stack=2, n_experts=4, top_k=2, d_expert=6, d_shared=8)
    MoEAdapter(cfg)(torch.randn(2, 6, 7))


def soft_moa_float_mask():
    SoftMoA(8, n_experts=3, slots_per_expert=1, r=2)(torch.randn(2, 5, 8), torch.ones(2, 5))


def llm_float_attention_mask():
    model = LLM(LLMConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16))
    model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5))


def ast_transposed_spectrogram():
    cfg = ASTConfig(d=32, n_layers=1, n_heads=4, d_ff=64, num_mel_bins=32, max_length=96)
    AST(cfg)(torch.randn(2, 32, 60))                                           # (b, F, T); AST takes (b, T, F)


@pytest.mark.parametrize("call, words", [
    (moe_wrong_width, r"\(B, T, d_in=8\) tensor, got torch.float32 \(2, 6, 7\)"),
    (soft_moa_float_mask, r"mask must be a bool tensor of shape \(b, m\) = \(2, 5\), got torch.float32"),
    (llm_float_attention_mask, r"attention_mask must be a bool tensor \(B, T\) = \(2, 5\), got .*float32"),
    (ast_transposed_spectrogram, r"F = 32; got torch.float32 \(2, 32, 60\) \(transposed\?"),
])
def test_module_call_refuses_bad_input_naming_the_shape(call, words):
    with pytest.raises(ValueError, match=words):
        call()
