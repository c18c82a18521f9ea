"""Shared test set-up: the repository root on sys.path and a fixed seed for every test."""
import os
import random
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so a failure reproduces exactly."""
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np
        np.random.seed(0)
    except ImportError:  # numpy is not needed by the model files
        pass
    yield


# A microscopic train.py configuration: every stage runs, in seconds, on 2 CPU cores.
MICRO = ["--n_clips=150", "--enc_d=16", "--enc_layers=1", "--enc_heads=2", "--enc_ff=32",
         "--enc_steps=4", "--enc_batch=8", "--llm_d=32", "--llm_layers=1", "--llm_heads=2",
         "--llm_kv_heads=1", "--llm_ff=64", "--llm_steps=6", "--llm_batch=8", "--d_expert=8",
         "--d_shared=16", "--align_steps=4", "--steps=6", "--batch=8", "--eval_every=3", "--log_every=3",
         "--valid_items=16", "--workers=0"]


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One finished microscopic `train.py adapter` run (moe, seed 0): its output folder."""
    import train
    out = str(tmp_path_factory.mktemp("micro"))
    train.main(["adapter", f"--out_dir={out}", *MICRO])
    return out
