"""train.py --compile=true trains the same adapter weights as eager mode (slow on CPU: the first compile of each
graph takes minutes; run with `python -m pytest -m slow tests/test_compile.py`)."""
import os

import pytest
import torch

import loop
import train
from conftest import MICRO

pytestmark = pytest.mark.slow


def test_compiled_adapter_training_matches_eager(tmp_path):
    out = str(tmp_path / "out")
    train.main(["adapter", f"--out_dir={out}", *MICRO])
    train.main(["adapter", f"--out_dir={out}", "--seed=1", *MICRO])
    os.rename(os.path.join(out, "moe-s1"), os.path.join(out, "eager-s1"))
    train.main(["adapter", f"--out_dir={out}", "--seed=1", "--compile=true", *MICRO])
    a = loop.load(os.path.join(out, "eager-s1", "last.pt"))["model"]["adapter"]
    b = loop.load(os.path.join(out, "moe-s1", "last.pt"))["model"]["adapter"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)

