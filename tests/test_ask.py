"""eval.py --audio / --ask / --export against independent routes: the closed-set choice of training's own feature
caches (mel_cache, feature_cache) and eval.closed_set; greedy answers against a token-by-token loop without KV
cache; an exported adapter reloaded by moe_adapter.py alone in a fresh process."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

import data
import eval as E
import llm as lm
import loop
import train
from conftest import MICRO

CPU = loop.Ctx(torch.device("cpu"))


def write_wav_44k_stereo(path, x16k):
    """A 16 kHz mono clip as a 44.1 kHz stereo 16-bit WAV (stdlib wave): right channel at 80 %."""
    x = data.resample(x16k, data.SAMPLE_RATE, 44100)
    pcm = np.round(np.stack([x, 0.8 * x], 1).clip(-1, 0.99) * 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(44100), w.writeframes(pcm.tobytes())


@pytest.fixture(scope="module")
def setup(micro_run, tmp_path_factory):
    """The run, the training route's parts, and a folder of two 44.1 kHz stereo WAVs: 3 s and 0.6 s."""
    parts = E.load_parts(micro_run)
    folder = tmp_path_factory.mktemp("audio")
    test = train.sources(parts["cfg"])["test"]
    write_wav_44k_stereo(str(folder / "a_long.wav"), np.concatenate([test[j].audio for j in range(3)]))
    write_wav_44k_stereo(str(folder / "b_short.wav"), test[3].audio[:9600])
    return os.path.join(micro_run, "moe-s0"), parts, str(folder)


def table(out):
    """The printed | file | question | answer | choice (p) | rows."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| file")]


def training_route(parts, files, tmp):
    """Features of the files as training makes them: AudioFiles -> train.mel_cache (fp16 mel.pt) -> feature_cache."""
    cfg = dataclasses.replace(parts["cfg"], out_dir=str(tmp),
                              encoder_checkpoint=os.path.join(parts["cfg"].out_dir, "encoder", "encoder.pt"))
    src = data.AudioFiles([data._record(f, {}, "mine", None, "test") for f in files], "mine")
    mels = train.mel_cache(cfg, {"mine": src}, CPU)
    return train.feature_cache(cfg, parts["encoder"], mels, CPU)["mine"], mels["mine"].domain


def test_audio_folder_answers_every_trained_task_as_the_training_pipeline_scores_it(setup, tmp_path, capsys):
    run, parts, folder = setup
    out_dir = os.path.dirname(run)
    before = {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(out_dir) for f in fs}
    E.main([run, f"--audio={folder}"])
    after = {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(out_dir) for f in fs}
    assert after == before                                      # nothing trained again, nothing written
    out = capsys.readouterr().out
    assert f"{os.path.join(folder, 'a_long.wav')}: cropped 3.0 s -> 1.0 s" in out and "b_short.wav: cropped" not in out
    rows = table(out)
    tasks = [t for t in data.TASKS if t in {it["task"] for it in parts["train"].items}]
    assert [(r[0], r[1]) for r in rows] == [(f, data.TASKS[t].questions[0]) for f in ("a_long.wav", "b_short.wav")
                                            for t in tasks]
    choices = {it["task"]: it["choices"] for it in parts["test"].items}
    features, _ = training_route(parts, [os.path.join(folder, f) for f in ("a_long.wav", "b_short.wav")], tmp_path)
    model, tok = E.load_model(run, parts), parts["tok"]
    for i, r in enumerate(rows):                                # one plain LLM call per choice: sum of log p
        t = tasks[i % len(tasks)]
        with torch.no_grad():
            y, aux = model.adapter(*features(torch.tensor([i // len(tasks)]), "cpu"))
            logp = []
            for c in choices[t]:
                b = lm.build_batch([tok.encode(data.TASKS[t].questions[0])], [tok.encode(c)], [int(aux["mask"].sum())],
                                   cfg=model.llm.cfg)
                _, loss = model.llm(b["input_ids"], audio_embeds=y, audio_mask=aux["mask"], labels=b["labels"])
                logp.append(-loss.item() * int((b["labels"] != -100).sum()))      # mean -> sum over answer + EOS
        p = torch.tensor(logp).softmax(0)
        assert r[3] == f"{choices[t][int(p.argmax())]} ({float(p.max()):.2f})"


def test_free_question_greedy_answer_equals_a_loop_without_kv_cache(setup, tmp_path, monkeypatch):
    run, parts, folder = setup
    load = E.load_model

    def eos_muted(*a, **k):                                     # EOS's tied row negated: answers of several words
        m = load(*a, **k)
        m.llm.embed_tokens.weight.data[m.llm.cfg.eos_id] *= -1
        return m
    monkeypatch.setattr(E, "load_model", eos_muted)
    files = [os.path.join(folder, f) for f in ("a_long.wav", "b_short.wav")]
    rows = E.ask(run, E.read_clips(folder), "Describe the audio.")
    assert [r[0] for r in rows] == ["a_long.wav", "b_short.wav"] and all(r[3] is None for r in rows)
    model, tok, cfg = eos_muted(run, parts), parts["tok"], parts["llm"].cfg
    features, _ = training_route(parts, files, tmp_path)
    longest = sum(max(len(tok.encode(c)) for c in it["choices"]) for it in      # ask's room: a caption of every
                  {it["task"]: it for it in parts["train"].items}.values()) + 2    # task's longest answer, + 2
    for j, r in enumerate(rows):
        with torch.no_grad():
            y, aux = model.adapter(*features(torch.tensor([j]), "cpu"))
            ids = [cfg.bos_id] + [cfg.audio_token_id] * int(aux["mask"].sum()) + tok.encode("Describe the audio.")
            new = []
            for _ in range(longest):                            # the whole sequence again for every token
                logits, _ = model.llm(torch.tensor([ids + new]), audio_embeds=y, audio_mask=aux["mask"])
                scores = logits[0, -1].float()
                scores[cfg.audio_token_id] = float("-inf")
                new.append(int(scores.argmax()))
                if new[-1] == cfg.eos_id:
                    break
        assert len(new) > 1 and r[2] == tok.decode(new)


def test_a_template_question_gets_its_task_answer_set(setup):
    run, parts, folder = setup
    q = "How fast is the speaker talking?"
    (f, question, _, choice, p), = E.ask(run, E.read_clips(os.path.join(folder, "b_short.wav")), q)
    assert (f, question) == ("b_short.wav", q) and 0 < p <= 1
    assert choice in next(it["choices"] for it in parts["train"].items if it["task"] == "rate")


def test_bad_paths_and_options_are_refused_before_any_work(setup, tmp_path):
    run, _, folder = setup
    out_dir = os.path.dirname(run)
    (tmp_path / "notes.txt").write_text("no audio here")
    (tmp_path / "bad.wav").write_bytes(b"not a wav at all")
    os.makedirs(tmp_path / "empty")
    eval_json = os.path.join(run, "eval.json")
    stamp = os.stat(eval_json).st_mtime_ns if os.path.exists(eval_json) else None
    for argv, culprit in [([run, "--audio=" + str(tmp_path / "nope.wav")], "nope.wav: no such file or folder"),
                          ([run, "--audio=" + str(tmp_path / "empty")], "no .wav, .flac or .ogg file"),
                          ([run, "--audio=" + str(tmp_path / "bad.wav")], "bad.wav: not a RIFF/WAVE file"),
                          ([run, "--ask=Which word is spoken?"], "--ask"),
                          ([out_dir, "--audio=" + folder], "take one run folder"),
                          ([run, "--export=" + str(tmp_path / "no" / "moe")], "--export="),
                          ([run, str(tmp_path / "nope")], "nope: no such folder"),       # the first is not scored
                          ([out_dir, "--runs=moe-s0,moe-s7"], "moe-s7: no summary.json"),
                          ([run, "--audio", folder], "unknown option --audio")]:
        with pytest.raises(data.UsageError, match=culprit) as e:
            E.main(argv)
        assert "\n" not in str(e.value)
    assert (os.stat(eval_json).st_mtime_ns if os.path.exists(eval_json) else None) == stamp


CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import moe_adapter
adapter = moe_adapter.load_adapter(sys.argv[2])
io = torch.load(sys.argv[3], weights_only=True)
y, aux = adapter(io["x"], io["mask"])
assert torch.equal(y, io["y"]) and torch.equal(aux["expert_index"], io["index"]), (y - io["y"]).abs().max()
project = {"data", "train", "llm", "eval", "loop", "encoder", "pretrain", "synth", "hf"} & set(sys.modules)
assert not project, project
print("ok", type(adapter).__name__)
"""


def exported_in_a_fresh_process(run, parts, tmp_path):
    """Export the run, reload it in `python -I` with only a copy of moe_adapter.py on the path: the same outputs."""
    E.main([run, f"--export={tmp_path / 'moe.pt'}"])
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(os.path.dirname(E.__file__), "moe_adapter.py"), alone)
    model = E.load_model(run, parts)
    d_in = model.adapter.cfg.d_in if hasattr(model.adapter, "cfg") else model.adapter.d_in
    x, mask = torch.randn(2, 13, d_in), torch.arange(13)[None, :] < torch.tensor([[13], [6]])
    with torch.no_grad():
        y, aux = model.adapter(x, mask)
    torch.save(dict(x=x, mask=mask, y=y, index=aux["expert_index"]), tmp_path / "io.pt")
    child = subprocess.run([sys.executable, "-I", "-c", CHILD, str(alone), str(tmp_path / "moe"),
                            str(tmp_path / "io.pt")], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.startswith("ok MoEAdapter"), child.stderr[-2000:]
    flat = torch.load(tmp_path / "moe.pt", weights_only=True)
    from safetensors.torch import load_file
    st = load_file(str(tmp_path / "moe.safetensors"))
    assert st.keys() == flat.keys() and all(torch.equal(st[k], flat[k]) for k in flat)
    assert json.load(open(tmp_path / "moe.json"))["kind"] == "moe"
    return flat, model


def test_export_full_llm_reloads_alone_in_a_fresh_process(setup, tmp_path):
    run, parts, _ = setup
    flat, model = exported_in_a_fresh_process(run, parts, tmp_path)
    llm = {k[4:]: v for k, v in flat.items() if k.startswith("llm.")}       # tune_llm=full: the tuned LLM too
    tuned = model.llm.state_dict()
    assert llm.keys() == tuned.keys() and all(torch.equal(v, tuned[k]) for k, v in llm.items())


def test_export_lora_run_holds_the_lora_weights(micro_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(micro_run, out, ignore=shutil.ignore_patterns("moe-s*", ".lock"))
    train.main(["adapter", f"--out_dir={out}", *MICRO, "--tune_llm=lora"])
    parts = E.load_parts(str(out))
    flat, _ = exported_in_a_fresh_process(str(out / "moe-s0"), parts, tmp_path)
    ref = lm.LLM(parts["llm"].cfg)
    lm.add_lora(ref, rank=train.TrainConfig().lora_rank)
    assert not any(k.startswith("llm.") for k in flat)       # the frozen LLM is the out_dir's: not exported
    assert {k[5:] for k in flat if k.startswith("lora.")} == {n for n in ref.state_dict() if "lora_" in n}
