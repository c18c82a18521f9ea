"""The Hugging Face audiofolder layout (data.load_audiofolder): columns -> tasks with their groups and answer sets,
splits by folder / `split` column / crc32 of the file name (recomputed here), errors, and both pipelines end to end."""
import csv
import json
import os
import zlib

import numpy as np
import pytest
import torch

import data
import eval as E
import loop
import train
import train_moa
from conftest import MICRO
from test_moa import MOA_MICRO

SPEAKERS, EMOTIONS, COLOURS = ("alice", "bob", "carol", "dave"), ("angry", "happy", "sad"), ("blue", "green", "red")


@pytest.fixture(autouse=True)
def _own_tasks(monkeypatch):
    """Each test registers its corpus's tasks in a copy of data.TASKS: the other test files see the built-ins."""
    monkeypatch.setattr(data, "TASKS", dict(data.TASKS))


def _corpus(root, n=48, split_column=False, folders=None, columns=("speaker", "emotion", "colour", "take")):
    """n 0.3 s tones (pitch by speaker) under root/clips/; metadata.csv at root, or per split folder."""
    rows = []
    for i in range(n):
        sub = folders[i % len(folders)] if folders else ""
        name = f"clips/c{i:03d}.wav"
        os.makedirs(os.path.join(root, sub, "clips"), exist_ok=True)
        t = np.arange(4800) / 16000
        data.write_wav(os.path.join(root, sub, name), 0.2 * np.sin(2 * np.pi * (200 + 100 * (i % 4)) * t), 16000)
        row = dict(file_name=name, speaker=SPEAKERS[i % 4], emotion=EMOTIONS[i % 3], colour=COLOURS[i // 2 % 3],
                   take=f"t{i}")                         # take: one value per clip, so no task
        row = {k: v for k, v in row.items() if k == "file_name" or k in columns}
        if split_column:
            row["split"] = ("train", "validation", "test")[i % 3]
        rows.append((sub, row))
    for sub in dict.fromkeys(s for s, _ in rows):
        mine = [r for s, r in rows if s == sub]
        with open(os.path.join(root, sub, "metadata.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(mine[0]))
            w.writeheader()
            w.writerows(mine)
    return [r for _, r in rows]


def test_columns_become_tasks_with_groups_and_answer_sets_split_by_file_name_hash(tmp_path):
    rows = _corpus(tmp_path)
    emotion = data.TASKS["emotion"]
    layout, src = data.load_corpus(str(tmp_path), "event")
    assert layout == "audiofolder" and len(src) == 48
    assert data.TASKS["speaker"] == data.Task("paralinguistic", "speaker", ("What is the speaker?",))
    assert data.TASKS["colour"] == data.Task("semantic", "colour", ("What is the colour?",))
    assert data.TASKS["emotion"] == emotion and "take" not in data.TASKS        # the built-in task; no id column
    assert list(data.TASKS)[-2:] == ["speaker", "colour"]                        # appended: built-ins keep their order
    assert src.classes("speaker") == sorted(SPEAKERS) and src.classes("colour") == sorted(COLOURS)
    by_hand = {0: "test", 1: "valid"}
    want = [by_hand.get(zlib.crc32(r["file_name"].encode()) % 10, "train") for r in rows]
    assert [src.split(j) for j in range(len(src))] == want and set(want) == {"train", "valid", "test"}
    ds = data.InstructionDataset(src, all_tasks=True)
    items = [ds.meta(i) for i in range(len(ds))]
    assert len(items) == 3 * 48 and {it["task"] for it in items} == {"emotion", "speaker", "colour"}
    it = next(it for it in items if it["task"] == "speaker" and it["index"] == 5)
    assert it["prompt"] == "What is the speaker? Answer with one of: alice, bob, carol, dave."
    assert (it["answer"], it["group"]) == ("bob", "paralinguistic")
    assert next(it for it in items if it["task"] == "emotion" and it["index"] == 5)["answer"] == "sad"
    data.load_corpus(str(tmp_path), "event", "speaker:semantic,colour:paralinguistic")    # --groups overrides
    assert (data.TASKS["speaker"].group, data.TASKS["colour"].group) == ("semantic", "paralinguistic")


def test_splits_from_split_folders_and_from_a_split_column(tmp_path):
    rows = _corpus(tmp_path / "a", n=30, folders=("train", "validation", "test"))
    _, src = data.load_corpus(str(tmp_path / "a"), "event")
    assert [src.split(j) for j in range(30)] == ["train"] * 10 + ["valid"] * 10 + ["test"] * 10   # folder by folder
    assert src.records[10].source == str(tmp_path / "a" / "validation" / rows[1]["file_name"])
    _corpus(tmp_path / "b", n=30, split_column=True)
    _, src = data.load_corpus(str(tmp_path / "b"), "event")
    assert [src.split(j) for j in range(30)] == [("train", "valid", "test")[i % 3] for i in range(30)]
    assert "split" not in data.TASKS and "split" not in src.labels(0)


def _refused(root, match, groups=""):
    with pytest.raises(SystemExit, match=match):             # as train.py / train_moa.py check it at start-up
        loop.check_inputs(train.TrainConfig(data_dir=str(root)), (), "event")
        train.sources(train.TrainConfig(data_dir=str(root), groups=groups))


def test_bad_metadata_and_options_are_refused_by_name(tmp_path):
    _corpus(tmp_path / "a", n=8)
    meta = tmp_path / "a" / "metadata.csv"
    meta.write_text(meta.read_text().replace("file_name", "path"))
    _refused(tmp_path / "a", f"{meta}: missing column 'file_name'")
    _corpus(tmp_path / "b", n=8)
    meta = tmp_path / "b" / "metadata.csv"
    meta.write_text(meta.read_text().replace("clips/c003.wav", "clips/gone.wav"))
    _refused(tmp_path / "b", f"{meta}: file_name 'clips/gone.wav' not found")
    _corpus(tmp_path / "c", n=8, columns=("take",))
    _refused(tmp_path / "c", f"{tmp_path / 'c' / 'metadata.csv'}: no label column .*columns: take")
    _corpus(tmp_path / "d", n=8)
    _refused(tmp_path / "d", r"--groups=speaker:loud: speaker:loud is not COLUMN:semantic .*\(speaker, colour\)",
             groups="speaker:loud")
    _refused(tmp_path / "d", r"--groups=emotion:semantic: emotion:semantic is not", groups="emotion:semantic")
    with pytest.raises(SystemExit, match=r"--data_label=event: d: no label 'event'; labels: speaker, emotion, colour"):
        train_moa.main([f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'd'}", "--data_label=event"])
    assert not os.path.exists(tmp_path / "out" / "ast")                      # refused before pre-training


def test_train_py_learns_and_evaluates_the_new_tasks(tmp_path):
    _corpus(tmp_path / "corpus")
    out = str(tmp_path / "run")
    micro = [a for a in MICRO if not a.startswith("--n_clips")]
    train.main(["adapter", f"--out_dir={out}", f"--data_dir={tmp_path / 'corpus'}", *micro])
    summary = json.load(open(os.path.join(out, "moe-s0", "summary.json")))
    assert summary["best_step"] > 0
    E.main([out])
    result = json.load(open(os.path.join(out, "moe-s0", "eval.json")))
    assert {t: r["group"] for t, r in result["tasks"].items()} == dict(
        emotion="paralinguistic", speaker="paralinguistic", colour="semantic")
    table = open(os.path.join(out, "comparison.md")).read()
    assert "| speaker | paralinguistic |" in table and "| colour | semantic |" in table


def test_train_moa_classifies_the_column_data_label_names(tmp_path):
    _corpus(tmp_path / "corpus", split_column=True)
    out = str(tmp_path / "moa")
    train_moa.main([f"--out_dir={out}", f"--data_dir={tmp_path / 'corpus'}", "--data_label=speaker",
                    "--methods=linear", "--seeds=1", "--max_seconds=0.3", *MOA_MICRO])
    result = json.load(open(os.path.join(out, "data", "linear-s0", "eval.json")))
    assert result["n_test"] == 16 and set(result["per_class"]) == set(SPEAKERS)
