"""--compile=true trains the same weights as eager mode (slow on CPU: the first compile of each
graph takes minutes; run with `python -m pytest -m slow tests/test_compile.py`)."""
import os

import pytest
import torch

import loop
import train
import train_moa
from conftest import MICRO
from test_moa import MOA_MICRO

pytestmark = pytest.mark.slow


def _weights(path):
    return loop.load(path)


def test_compiled_adapter_training_matches_eager(tmp_path):
    out = str(tmp_path / "out")
    train.main(["adapter", f"--out_dir={out}", *MICRO])
    train.main(["adapter", f"--out_dir={out}", "--seed=1", *MICRO])
    os.rename(os.path.join(out, "moe-s1"), os.path.join(out, "eager-s1"))
    train.main(["adapter", f"--out_dir={out}", "--seed=1", "--compile=true", *MICRO])
    a = _weights(os.path.join(out, "eager-s1", "last.pt"))["model"]["adapter"]
    b = _weights(os.path.join(out, "moe-s1", "last.pt"))["model"]["adapter"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


def test_compiled_soft_moa_fine_tuning_matches_eager(tmp_path):
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    args = ["--benchmarks=esc50", "--methods=soft-pfeiffer", "--seeds=1", "--evaluate=false", *MOA_MICRO]
    train_moa.main([f"--out_dir={eager}", *args])
    os.makedirs(compiled)
    os.symlink(os.path.join(eager, "ast"), os.path.join(compiled, "ast"))
    train_moa.main([f"--out_dir={compiled}", "--compile=true", *args])
    a = _weights(os.path.join(eager, "esc50", "soft-pfeiffer-s0", "last.pt"))["model"]
    b = _weights(os.path.join(compiled, "esc50", "soft-pfeiffer-s0", "last.pt"))["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
