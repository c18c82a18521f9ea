"""bench.py's arithmetic and its baselines (no timing assertions: speed is measured by bench.py)."""
import pytest
import torch

import bench
from moe_adapter import MoEAdapter


def test_ratio_paired_median_and_ratio_of_medians_by_hand():
    times = {"a": [2.0, 4.0, 6.0, 9.0], "b": [1.0, 2.0, 2.0, 3.0]}
    r = bench.ratio(times, "a", "b")
    assert r["paired"] == pytest.approx(2.5)             # paired ratios 2, 2, 3, 3
    assert r["of_medians"] == pytest.approx(5.0 / 2.0)   # medians 5 and 2
    assert r["lo"] <= r["paired"] <= r["hi"]


def test_time_paired_alternates_order_every_round():
    calls = []
    fns = {"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}
    bench.time_paired(fns, torch.device("cpu"), rounds=3, warmup=0)
    assert calls == ["x", "y", "y", "x", "x", "y"]


@pytest.mark.parametrize("top_k", [1, 2])
def test_naive_moe_computes_the_same_function(top_k):
    """The naive baseline must do the same math with more work, or the speed ratio means nothing."""
    moe = MoEAdapter(bench.moe_cfg(d=16, n_experts=4, top_k=top_k, d_expert=8)).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(bench.NaiveMoE(moe)(x)[0], moe(x)[0], rtol=0, atol=1e-12)


def test_saved_bytes_counts_what_autograd_keeps():
    x = torch.randn(1000, requires_grad=True)            # x * x saves x (once: same storage)
    assert bench.saved_bytes(lambda: x * x) == 4000


def test_mixtral_peer_runs_and_counts_swiglu_flops():
    pytest.importorskip("transformers")
    peer = bench.MixtralPeer(16, 32, 4, 2)
    y, _ = peer(torch.randn(2, 3, 16))
    assert y.shape == (2, 3, 16)
    assert peer.flops_per_token == 2 * (16 * 4 + 2 * 3 * 16 * 32)


def test_comparisons_run_at_microscopic_size():
    res = bench.compare_moe(64, 4, 2, torch.device("cpu"), rounds=1, d=16, d_expert=8)
    assert set(res["times"]) == {"moe", "dense", "naive"} and all(v > 0 for v in res["gflops"].values())
    res = bench.compare_moa(3, torch.device("cpu"), rounds=1, d=16, r=4, b=2, m=10)
    assert set(res["times"]) == {"soft", "dense", "single"}


def test_ast_comparison_runs_at_microscopic_size():
    t = bench.compare_ast(torch.device("cpu"), rounds=1, frames=64, preset="tiny")
    assert set(t) == {"none", "single", "dense", "soft"}
