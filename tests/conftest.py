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
