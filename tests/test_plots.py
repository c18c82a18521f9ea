"""plots.py through its hooks (eval.compare, eval_moa.moa_compare) on small fake run folders with known numbers:
each PNG is a real, non-blank image, and what it draws equals means computed by hand."""
import json
import os
import sys

import numpy as np
import pytest

import eval as E
import eval_moa
import plots

mpimg = pytest.importorskip("matplotlib.image")


def _write(path, obj, lines=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in obj) if lines else json.dumps(obj))


def _image(path):
    img = mpimg.imread(path)                                            # (H, W, 3) floats in [0, 1]
    assert os.path.getsize(path) < 80_000 and img.shape[0] > 100 and img.shape[1] > 300
    assert img.std() > 0.05 and len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 8   # not blank
    return img


def _train_run(root, kind, seed, cos, usage):
    """A finished train.py run as eval.compare reads it: eval.json and both phases' metrics.jsonl."""
    run = os.path.join(root, f"{kind}-s{seed}")
    conflict = dict(task=dict(mean=0.0, pairs={}), domain=dict(mean=float(np.mean(cos)), pairs=dict(zip(
        ("environment|music", "environment|speech", "music|speech"), cos))))
    _write(os.path.join(run, "eval.json"), dict(
        kind=kind, seed=seed, params=dict(total=10, active=5, flops_per_token=2e6), semantic_closed=0.5,
        paralinguistic_closed=0.5, all_closed=0.5, all_exact=0.5, ms_per_step=1.0, gradient_conflict=conflict,
        tasks=dict(word=dict(closed=0.5)), expert_usage=usage and dict(
            domain=dict(music=usage[0], speech=usage[1]), task=dict(word=usage[1], chord=usage[0]))))
    for phase, scale in (("align", 2.0), ("", 1.0)):                    # loss = scale * (seed + 1) / step
        _write(os.path.join(run, phase, "metrics.jsonl"), [
            dict(step=s, ce=scale * (seed + 1) / s, **({"valid_loss": scale * (seed + 1) / s} if s % 20 == 0 else {}))
            for s in range(1, 61)], lines=True)
    return run


def test_train_figures_through_compare_equal_hand_computed_means(tmp_path):
    u = [[[0.5, 0.25, 0.25], [0.0, 0.5, 0.5]], [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]]
    runs = [_train_run(tmp_path, "moe", 0, (0.2, -0.4, 0.1), u[0]), _train_run(tmp_path, "moe", 1, (0.4, 0.0, -0.3), u[1]),
            _train_run(tmp_path, "dense-flops", 0, (-0.1, 0.3, 0.5), None)]
    E.compare(str(tmp_path), runs)
    for name in ("expert_usage_domain", "expert_usage_task", "domain_cosines", "curves"):
        _image(tmp_path / "figures" / f"{name}.png")
    drawn = plots.train_figures(str(tmp_path), runs)
    np.testing.assert_allclose(drawn["cosine/moe"], [0.3, -0.2, -0.1])          # mean over the two seeds by hand
    np.testing.assert_allclose(drawn["cosine/dense-flops"], [-0.1, 0.3, 0.5])
    np.testing.assert_allclose(drawn["domain/moe-s1"], u[1])                    # per run, rows music, speech
    np.testing.assert_allclose(drawn["task/moe-s0"], u[0])                      # chord (semantic: music), word
    # valid loss at steps 20, 40, 60: mean over seeds of (s + 1) / step = 1.5 / step; align doubles it.
    np.testing.assert_allclose(drawn["curves/tune/moe/valid_loss"], [1.5 / 20, 1.5 / 40, 1.5 / 60])
    np.testing.assert_allclose(drawn["curves/align/moe/valid_loss"], [3 / 20, 3 / 40, 3 / 60])
    ce = drawn["curves/tune/dense-flops/ce"]                                    # running mean over w = 60 // 30 = 2
    np.testing.assert_allclose(ce[:2], [(1 / 1 + 1 / 2) / 2, (1 / 2 + 1 / 3) / 2])
    assert "expert_usage/dense" not in " ".join(drawn)


def _moa_run(root, method, seed, contribution):
    _write(os.path.join(root, "esc50", f"{method}-s{seed}", "eval.json"), dict(
        bench="esc50", method=method, seed=seed, r=4, n_experts=2, slots=1, accuracy=0.5, params=20, head_params=10,
        macs_per_token=100, ms_per_step=1.0, classes=["dog", "rain", "wind"], contribution=contribution,
        usage_by_class={n: [[0.9, 0.1], [float("nan")] * 2, [0.3, 0.7]] for n in contribution}))
    return os.path.join(root, "esc50", f"{method}-s{seed}")


def test_moa_figures_through_moa_compare(tmp_path):
    runs = [_moa_run(tmp_path, "soft-pfeiffer", 0, {"block10.attn": [3.0, 1.0], "block2.attn": [1.0, 1.0]}),
            _moa_run(tmp_path, "soft-pfeiffer", 1, {"block10.attn": [0.0, 1.0]}),        # seed 1: not drawn
            _moa_run(tmp_path, "linear", 0, {})]
    eval_moa.moa_compare(str(tmp_path), runs)
    for name in ("moa_contribution", "moa_usage"):
        _image(tmp_path / "figures" / f"{name}.png")
    drawn = plots.moa_figures(str(tmp_path), runs)
    np.testing.assert_allclose(drawn["contribution/soft-pfeiffer"], [[0.5, 0.5], [0.75, 0.25]])   # block2, block10
    np.testing.assert_allclose(drawn["usage/esc50"], [[0.9, 0.1], [np.nan] * 2, [0.3, 0.7]])     # the last block
    assert set(drawn) == {"contribution/soft-pfeiffer", "usage/esc50"}


def test_without_matplotlib_the_figures_are_skipped_and_said_once(tmp_path, monkeypatch, capsys):
    run = _train_run(tmp_path, "moe", 0, (0.1, 0.2, 0.3), [[1.0, 0.0], [0.0, 1.0]])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)              # import raises ImportError
    monkeypatch.setattr(plots, "_said", [])
    assert plots.train_figures(str(tmp_path), [run]) == {}
    E.compare(str(tmp_path), [run])
    assert capsys.readouterr().out.count("pip install matplotlib for figures") == 1
    assert not os.path.exists(tmp_path / "figures")
