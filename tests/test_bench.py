"""bench.py's arithmetic and its baselines (no timing assertions: speed is measured by bench.py)."""
import functools
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
from moe_adapter import DenseAdapter, MoEAdapter, MoEAdapterConfig

CPU = torch.device("cpu")


def moe_cfg(d, n_experts, top_k, d_expert, n_shared=0):     # as bench.compare_moe builds it (n_shared=0)
    return MoEAdapterConfig(d_in=d, d_out=d, stack=1, n_experts=n_experts, top_k=top_k, d_expert=d_expert,
                            n_shared=n_shared, d_shared=8)


def test_ratio_paired_median_and_quartiles_by_hand():
    times = {"a": [1.0, 4.0, 9.0, 8.0, 10.0], "b": [1.0, 2.0, 3.0, 2.0, 2.0]}
    # paired ratios 1, 2, 3, 4, 5 (the ratio of medians would be 4); quartiles at ranks 1.5 and 4.5 (n+1 rule)
    assert bench.ratio(times, "a", "b") == "3.00x (1.50-4.50)"
    assert bench.ratio(times, "a", "b", scale=2.0) == "6.00x (3.00-9.00)"


def test_time_paired_alternates_order_every_round():
    calls = []
    fns = {"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}
    times = bench.time_paired(fns, CPU, rounds=3, warmup=0)
    assert calls == ["x", "y", "y", "x", "x", "y"] and [len(v) for v in times.values()] == [3, 3]
    calls.clear()
    bench.time_paired(fns, CPU, rounds=1, warmup=2)      # warm-up calls are made but not timed
    assert len(calls) == 6


@pytest.mark.parametrize("top_k, n_shared", [(1, 0), (2, 0), (2, 1)])
def test_naive_moe_computes_the_same_function(top_k, n_shared):
    """The naive baseline must do the same math with more work, or the speed ratio means nothing."""
    moe = MoEAdapter(moe_cfg(d=16, n_experts=4, top_k=top_k, d_expert=8, n_shared=n_shared)).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(bench.NaiveMoE(moe)(x)[0], moe(x)[0], rtol=0, atol=1e-12)


def test_saved_bytes_counts_what_autograd_keeps():
    x = torch.randn(1000, requires_grad=True)            # x * x saves x (once: same storage)
    assert bench.saved_bytes(lambda: x * x) == 4000


def matmul_flops(module, x):
    """FLOPs of the weight matmuls (mm, addmm) of one forward, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        module(x)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)


def test_useful_flops_match_torch_flop_counter():
    """bench's FLOPs (3 x forward) against the matmuls torch counts in a forward of the same modules;
    the MoE's (1, k) @ (k, d) gate sum is a bmm, left out of the useful work as documented."""
    tokens, d, E, k, h = 64, 16, 4, 2, 8
    res = bench.compare_moe(tokens, E, k, CPU, rounds=1, d=d, d_expert=h)
    x = torch.randn(1, tokens, d)
    moe = MoEAdapter(moe_cfg(d, E, k, h))
    assert res["flops"]["moe"] == res["flops"]["naive"] == 3 * matmul_flops(moe, x)
    assert res["flops"]["dense"] == 3 * matmul_flops(DenseAdapter(d, k * h, d), x)
    assert set(res["times"]) == {"moe", "dense", "naive"} and all(v > 0 for v in res["gflops"].values())


def test_mixtral_peer_flops_match_torch_flop_counter():
    pytest.importorskip("transformers")
    peer = bench.MixtralPeer(16, 32, 4, 2)
    x = torch.randn(2, 50, 16)
    y, _ = peer(x)
    assert y.shape == (2, 50, 16)
    assert peer.flops_per_token * 100 == matmul_flops(peer, x)


@pytest.mark.parametrize("args", [["--targets"], []])
def test_bench_runs_at_microscopic_size(monkeypatch, capsys, args):
    monkeypatch.setattr(bench, "TARGET_MOE", dict(tokens=64, d=16, n_experts=4, top_k=2, d_expert=8))
    monkeypatch.setattr(bench, "TARGET_MOA", dict(n_experts=3, d=16, r=4, b=2, m=10))
    monkeypatch.setattr(bench, "compare_ast", functools.partial(bench.compare_ast, frames=64, preset="tiny"))
    monkeypatch.setattr(bench, "PEAK_N", 64)
    bench.main([*args, "--rounds=1", "--device=cpu"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([\w-]+) \| \d", out, re.M)           # MoE, MoA and (full run) AST variants
    moe = ["moe", "dense", "naive"] + ["hf-mixtral"] * ("| hf-mixtral |" in out)
    assert rows == moe + ["soft", "dense", "single"] + ([] if args else ["none", "single", "dense", "soft"])
    line = [l for l in out.splitlines() if l.startswith("targets:")]
    assert len(line) == 1 and len(line[0].split(" | ")) == 4
    assert re.search(r"^targets: moe/dense \d+\.\d\dx \(\S+\) \(<= 1\.10\) .* soft/dense \d+\.\d\dx \(\S+\) \(<= 0\.3\)$", line[0])
