"""Tests for soft_moa.py. Every numeric check compares against an independent reference: explicit
Python loops over slots and tokens written from the Soft MoE equations, hand-derived cases, hand
arithmetic, torch's FLOP counter, or autograd's finite differences; never against the module's own output."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from importscan import imported_packages
import soft_moa
from soft_moa import (AST_BASE_TOKENS, Adapter, DenseMoA, SingleAdapter, SoftMoA, adapted_sublayer,
                      build_mixture, macs_per_token, make_block_adapters, mark_trainable)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("single", "dense", "soft")


# ----------------------------------------------------------------------------------------------
# Independent references

def count_params(module):
    return sum(prm.numel() for prm in module.parameters() if prm.requires_grad)


def with_stats(module):
    for mod in module.modules():
        if isinstance(mod, (DenseMoA, SoftMoA)):
            mod.stats = True
    return module


def adapters_of(module):
    return [mod for mod in module.modules() if isinstance(mod, Adapter)]


def randomize_up(module, std=0.5):
    """Fresh adapters output zero; give every up-projection random values so outputs are nonzero."""
    with torch.no_grad():
        for ad in adapters_of(module):
            ad.up.weight.normal_(0, std)
            ad.up.bias.normal_(0, std)
    return module


def lengths_mask(lengths, m):
    return torch.arange(m)[None, :] < torch.tensor(lengths)[:, None]  # (b, m) True = real


def naive_gelu(v):
    return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))


def naive_adapter(ad, v):
    """scale * (W_up gelu(W_down v + b_down) + b_up) for one vector v (d,), written out in float64."""
    W1, c1, W2, c2 = (t.detach().double() for t in (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias))
    return ad.scale * (W2 @ naive_gelu(W1 @ v.double() + c1) + c2)


def naive_soft(moa, x, mask=None):
    """Soft MoE (Puigcerver et al. Eqs. 1-2) with explicit loops over slots and tokens, in float64.
    Returns y (b, m, d) and the per-expert contribution norms (b, m, n)."""
    b, m, d = x.shape
    n, p = moa.n_experts, moa.slots_per_expert
    S = n * p
    phi = moa.phi.detach().double()
    x = x.detach().double()
    y = torch.zeros(b, m, d, dtype=torch.float64)
    contrib = torch.zeros(b, m, n, dtype=torch.float64)
    for bi in range(b):
        real = [t for t in range(m) if mask is None or bool(mask[bi, t])]
        logit = {}
        for t in real:
            for j in range(S):
                if moa.normalize:
                    cos = float(x[bi, t] @ phi[:, j]) / (float(x[bi, t].norm()) * float(phi[:, j].norm()))
                    logit[t, j] = moa.scale.item() * cos
                else:
                    logit[t, j] = float(x[bi, t] @ phi[:, j])
        slot_out = []
        for j in range(S):  # dispatch: softmax over the real tokens, per slot
            top = max(logit[t, j] for t in real)
            z = sum(math.exp(logit[t, j] - top) for t in real)
            slot_in = torch.zeros(d, dtype=torch.float64)
            for t in real:
                slot_in += math.exp(logit[t, j] - top) / z * x[bi, t]
            slot_out.append(naive_adapter(moa.experts[j // p], slot_in))
        for t in real:  # combine: softmax over all slots, per token
            top = max(logit[t, j] for j in range(S))
            z = sum(math.exp(logit[t, j] - top) for j in range(S))
            parts = torch.zeros(n, d, dtype=torch.float64)
            for j in range(S):
                parts[j // p] += math.exp(logit[t, j] - top) / z * slot_out[j]
            y[bi, t] = parts.sum(0)
            contrib[bi, t] = parts.norm(dim=-1)
    return y, contrib


def naive_dense(moa, x, mask=None):
    """Dense-MoA with explicit loops over tokens and experts, float64."""
    b, m, d = x.shape
    n = moa.n_experts
    w, c = moa.router.weight.detach().double(), moa.router.bias.detach().double()
    x = x.detach().double()
    y = torch.zeros(b, m, d, dtype=torch.float64)
    contrib = torch.zeros(b, m, n, dtype=torch.float64)
    for bi in range(b):
        for t in range(m):
            if mask is not None and not bool(mask[bi, t]):
                continue
            logits = [float(w[i] @ x[bi, t] + c[i]) for i in range(n)]
            top = max(logits)
            z = sum(math.exp(v - top) for v in logits)
            for i in range(n):
                part = math.exp(logits[i] - top) / z * naive_adapter(moa.experts[i], x[bi, t])
                y[bi, t] += part
                contrib[bi, t, i] = part.norm()
    return y, contrib


# ----------------------------------------------------------------------------------------------
# Soft-MoA and Dense-MoA against the naive loops

@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_soft_moa_matches_naive_loops(normalize, masked):
    b, m, d = 3, 6, 8
    moa = with_stats(randomize_up(SoftMoA(d, n_experts=3, slots_per_expert=2, r=3, normalize=normalize)).double())
    if normalize:
        with torch.no_grad():
            moa.scale.fill_(1.7)  # a non-unit scale, so using or dropping it shows
    x = torch.randn(b, m, d, dtype=torch.float64)
    mask = lengths_mask([6, 4, 1], m) if masked else None
    y, info = moa(x, mask)
    ref, ref_contrib = naive_soft(moa, x, mask)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(info["expert_contribution"], ref_contrib, rtol=0, atol=1e-12)
    if masked:
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))


@pytest.mark.parametrize("masked", [False, True])
def test_dense_moa_matches_naive_loops(masked):
    b, m, d = 2, 5, 8
    moa = with_stats(randomize_up(DenseMoA(d, n_experts=3, r=4)).double())
    x = torch.randn(b, m, d, dtype=torch.float64)
    mask = lengths_mask([5, 2], m) if masked else None
    y, info = moa(x, mask)
    ref, ref_contrib = naive_dense(moa, x, mask)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(info["expert_contribution"], ref_contrib, rtol=0, atol=1e-12)


def test_weights_are_convex_and_padding_gets_no_weight():
    b, m, d = 3, 7, 8
    moa = with_stats(randomize_up(SoftMoA(d, 4, 2, 3)).double())
    x = torch.randn(b, m, d, dtype=torch.float64)
    mask = lengths_mask([7, 3, 1], m)
    _, info = moa(x, mask)
    D, C = info["dispatch"], info["combine"]
    assert D.shape == C.shape == (b, m, 8)
    torch.testing.assert_close(D.sum(1), torch.ones(b, 8, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(C.sum(-1), mask.double(), rtol=0, atol=1e-12)  # 1 real, 0 padded
    assert torch.equal(D[~mask], torch.zeros_like(D[~mask]))  # exactly zero, not just small
    assert (D[mask] > 0).all()  # real tokens all take part
    usage = info["expert_usage"]  # (b, m, n) combine mass per expert
    torch.testing.assert_close(usage.sum(-1), mask.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(usage, C.view(b, m, 4, 2).sum(-1), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["soft", "dense"])
def test_statistics_only_when_asked_and_they_change_nothing_else(kind):
    mix = randomize_up(build_mixture(kind, 8, 3, n_experts=3, slots_per_expert=2))
    x, mask = torch.randn(2, 6, 8, requires_grad=True), lengths_mask([6, 4], 6)
    y, info = mix(x, mask)
    assert set(info) == ({"dispatch", "combine"} if kind == "soft" else {"router_probs"})
    grad = torch.autograd.grad(y.square().sum(), [x, *mix.parameters()])
    y2, info2 = with_stats(mix)(x, mask)
    assert set(info2) == set(info) | {"expert_usage", "expert_contribution"}
    assert torch.equal(y2, y)
    assert all(map(torch.equal, torch.autograd.grad(y2.square().sum(), [x, *mix.parameters()]), grad))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_has_no_host_sync(kind):
    # A .item() / .tolist() / bool(tensor) in the forward would be a graph break: fullgraph fails on it.
    torch._dynamo.reset()
    mix = randomize_up(build_mixture(kind, 8, 3, n_experts=3, slots_per_expert=2))
    x, mask = torch.randn(2, 6, 8), lengths_mask([6, 4], 6)
    y, _ = torch.compile(mix, fullgraph=True, backend="eager")(x, mask)
    assert torch.equal(y, mix(x, mask)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("junk", ["large", "nan"])
def test_padded_values_change_no_real_output(kind, junk):
    b, m, d = 2, 6, 8
    mix = randomize_up(build_mixture(kind, d, 3, n_experts=3, slots_per_expert=2))
    x = torch.randn(b, m, d)
    mask = lengths_mask([4, 6], m)
    y, _ = mix(x, mask)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), d) * 1e3 if junk == "large" else float("nan")
    y2, _ = mix(x2, mask)
    assert torch.equal(y2[mask], y[mask])
    assert torch.equal(y2[~mask], torch.zeros_like(y2[~mask]))
    assert y[mask].abs().sum() > 0  # the comparison is not between two zero tensors


@pytest.mark.parametrize("kind", ["soft", "dense"])
def test_permuting_tokens_permutes_output(kind):
    b, m, d = 2, 9, 8
    mix = randomize_up(build_mixture(kind, d, 3, n_experts=3, slots_per_expert=2)).double()
    x = torch.randn(b, m, d, dtype=torch.float64)
    mask = lengths_mask([9, 5], m)
    perm = torch.randperm(m)
    y, _ = mix(x, mask)
    yp, _ = mix(x[:, perm], mask[:, perm])
    torch.testing.assert_close(yp, y[:, perm], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Hand-derivable cases

def test_one_expert_one_slot_zero_phi_is_adapter_of_mean_token():
    # phi = 0: all logits 0, so the single slot is the plain mean of the real tokens, and the
    # combine softmax over one slot is 1: every real token receives adapter(mean).
    b, m, d = 2, 5, 6
    moa = randomize_up(SoftMoA(d, 1, 1, 4)).double()
    with torch.no_grad():
        moa.phi.zero_()
    x = torch.randn(b, m, d, dtype=torch.float64)
    mask = lengths_mask([5, 3], m)
    y, _ = moa(x, mask)
    ad = moa.experts[0]
    W1, c1, W2, c2 = (t.detach() for t in (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias))
    for bi, length in enumerate([5, 3]):
        mean = x[bi, :length].sum(0) / length
        hidden = W1 @ mean + c1
        expected = W2 @ (0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))) + c2
        for t in range(m):
            want = expected if t < length else torch.zeros(d, dtype=torch.float64)
            torch.testing.assert_close(y[bi, t], want, rtol=0, atol=1e-12)


def test_dense_moa_with_one_adapter_is_that_adapter():
    b, m, d = 2, 4, 6
    moa = randomize_up(DenseMoA(d, 1, 3)).double()
    x = torch.randn(b, m, d, dtype=torch.float64)
    y, info = moa(x)
    ad = moa.experts[0]
    W1, c1, W2, c2 = (t.detach() for t in (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias))
    hidden = x @ W1.T + c1
    expected = (0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))) @ W2.T + c2
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert torch.equal(info["router_probs"], torch.ones(b, m, 1, dtype=torch.float64))


def test_single_adapter_by_hand_with_scale_and_padding():
    mix = randomize_up(SingleAdapter(6, 3, scale=0.5)).double()
    x, mask = torch.randn(2, 4, 6, dtype=torch.float64), lengths_mask([4, 2], 4)
    y, info = mix(x, mask)
    ad = mix.adapter
    W1, c1, W2, c2 = (t.detach() for t in (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias))
    hidden = x @ W1.T + c1
    expected = 0.5 * ((0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))) @ W2.T + c2)
    expected[~mask] = 0
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert info == {}


# ----------------------------------------------------------------------------------------------
# Placement in a tiny pre-norm block

class TinyBlock(nn.Module):
    """A pre-norm transformer block written the way encoder.py is meant to use soft_moa."""

    def __init__(self, d=8, placement="pfeiffer", kind="soft"):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.adapters = make_block_adapters(placement, kind, d=d, r=3, n_experts=3, slots_per_expert=2)

    def forward(self, x, mask=None, use_adapters=True):
        def attn(h):
            pad = None if mask is None else ~mask
            return self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]

        def mixture(key):
            return self.adapters[key] if use_adapters and key in self.adapters else None

        x, _ = adapted_sublayer(x, self.norm1, attn, mixture("attn"), mask)
        x, _ = adapted_sublayer(x, self.norm2, self.mlp, mixture("ffn"), mask)
        return x


@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_mixture_leaves_block_unchanged(kind, placement):
    block = TinyBlock(placement=placement, kind=kind)
    x = torch.randn(2, 5, 8)
    mask = lengths_mask([5, 3], 5)
    expected_keys = {"pfeiffer": {"attn"}, "houlsby": {"attn", "ffn"}}[placement]
    assert set(block.adapters.keys()) == expected_keys
    assert torch.equal(block(x, mask), block(x, mask, use_adapters=False))
    randomize_up(block)  # and the comparison can fail: a trained mixture does change the block
    assert not torch.allclose(block(x, mask), block(x, mask, use_adapters=False))


def _sgd_steps(block, x, target, steps):
    opt = torch.optim.SGD([prm for prm in block.parameters() if prm.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(block(x), target).backward()
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_up_moves_at_step_one_and_down_at_step_two(kind):
    # While up.weight is zero, d loss / d down = (up.weight^T g * gelu') x^T is exactly zero, so
    # one step moves only the up-projection; the down-projection moves from step two on.
    block = TinyBlock(kind=kind, placement="houlsby")
    mark_trainable(block, extra=())
    x, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ads = adapters_of(block)
    assert len(ads) == (2 if kind == "single" else 6)
    down0 = [ad.down.weight.detach().clone() for ad in ads]
    up0 = [ad.up.weight.detach().clone() for ad in ads]
    _sgd_steps(block, x, target, 1)
    for ad, d0, u0 in zip(ads, down0, up0):
        assert torch.equal(ad.down.weight, d0)
        assert not torch.equal(ad.up.weight, u0)
    _sgd_steps(block, x, target, 1)
    for ad, d0 in zip(ads, down0):
        assert not torch.equal(ad.down.weight, d0)


@pytest.mark.parametrize("kind", KINDS)
def test_authors_zero_init_of_both_projections_never_trains_the_weights(kind):
    # The authors' public code zero-initialises both projections: GELU(0) = 0 keeps up.weight's
    # gradient at zero and zero up.weight keeps down's at zero, forever; only up.bias learns.
    block = TinyBlock(kind=kind, placement="houlsby")
    mark_trainable(block, extra=())
    with torch.no_grad():
        for ad in adapters_of(block):
            for prm in (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias):
                prm.zero_()
    x, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    _sgd_steps(block, x, target, 5)
    for ad in adapters_of(block):
        for prm in (ad.down.weight, ad.down.bias, ad.up.weight):
            assert torch.equal(prm, torch.zeros_like(prm))
        assert ad.up.bias.abs().sum() > 0  # the block did train


@pytest.mark.parametrize("kind", KINDS)
def test_pfeiffer_attn_mixture_output_is_added_once(kind):
    block = randomize_up(TinyBlock(kind=kind, placement="pfeiffer")).double()
    with torch.no_grad():  # a zero FFN, so the block's output difference is the mixture's alone
        block.mlp[2].weight.zero_()
        block.mlp[2].bias.zero_()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    diff = block(x) - block(x, use_adapters=False)
    a, _ = block.adapters["attn"](block.norm1(x))  # the mixture on the LayerNorm output
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(diff, a, rtol=0, atol=1e-12)


def test_adapted_sublayer_without_mixture_is_plain_prenorm_residual():
    norm, lin = nn.LayerNorm(4), nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)
    out, info = adapted_sublayer(x, norm, lin)
    assert torch.equal(out, x + lin(norm(x))) and info == {}


# ----------------------------------------------------------------------------------------------
# Gradients against finite differences

def _gradcheck_module(module, x, mask):
    names = [k for k, _ in module.named_parameters()]
    params = [prm.detach().clone().requires_grad_(True) for _, prm in module.named_parameters()]

    def f(x, *flat):
        return torch.func.functional_call(module, dict(zip(names, flat)), (x, mask))[0]

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_soft_moa(normalize):
    moa = randomize_up(SoftMoA(4, 2, 2, 3, normalize=normalize)).double()
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    _gradcheck_module(moa, x, lengths_mask([3, 4], 4))


def test_gradcheck_dense_moa():
    moa = randomize_up(DenseMoA(4, 2, 3)).double()
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    _gradcheck_module(moa, x, lengths_mask([3, 4], 4))


# ----------------------------------------------------------------------------------------------
# What is trained

class TinyEncoder(nn.Module):
    def __init__(self, placement, kind):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.blocks = nn.ModuleList(TinyBlock(placement=placement, kind=kind) for _ in range(2))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)


def _soft_names(prefix, n=3):
    names = [f"{prefix}.phi"]
    for i in range(n):
        names += [f"{prefix}.experts.{i}.{proj}.{w}" for proj in ("down", "up") for w in ("weight", "bias")]
    return names


def test_mark_trainable_pfeiffer_soft_exact_set():
    model = TinyEncoder("pfeiffer", "soft")
    names = mark_trainable(model)
    expected = ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    for i in range(2):
        expected += _soft_names(f"blocks.{i}.adapters.attn")
        expected += [f"blocks.{i}.norm1.weight", f"blocks.{i}.norm1.bias"]  # feeds the mixture
    assert names == sorted(expected)
    assert {k for k, prm in model.named_parameters() if prm.requires_grad} == set(expected)
    # hand count: 2 x (phi 8*6 + 3 adapters x (2*8*3 + 3 + 8) + norm1 16) + norm 16 + head 8*3+3
    assert count_params(model) == 2 * (48 + 3 * 59 + 16) + 16 + 27


def test_mark_trainable_houlsby_dense_unfreezes_both_feeding_norms():
    model = TinyEncoder("houlsby", "dense")
    names = set(mark_trainable(model, extra=("head",)))
    expected = {"head.weight", "head.bias"}
    for i in range(2):
        for key, norm in (("attn", "norm1"), ("ffn", "norm2")):
            expected |= {f"blocks.{i}.adapters.{key}.router.weight", f"blocks.{i}.adapters.{key}.router.bias"}
            expected |= set(_soft_names(f"blocks.{i}.adapters.{key}")[1:])
            expected |= {f"blocks.{i}.{norm}.weight", f"blocks.{i}.{norm}.bias"}
    assert names == expected


def test_mark_trainable_rejects_unknown_names():
    with pytest.raises(ValueError, match="'classifier' matches no parameter"):
        mark_trainable(TinyEncoder("pfeiffer", "soft"), extra=("classifier",))
    with pytest.raises(ValueError, match="no feeding norm; expected attribute 'ln_1'"):
        mark_trainable(TinyEncoder("pfeiffer", "soft"), feeding_norms={"attn": "ln_1"})


# ----------------------------------------------------------------------------------------------
# Cost accounting against hand arithmetic

def test_ast_token_count():
    # 128 mel bins x 1024 frames, 16x16 patches at stride 10, plus [CLS] and distillation tokens
    assert AST_BASE_TOKENS == ((128 - 16) // 10 + 1) * ((1024 - 16) // 10 + 1) + 2 == 1214


def test_macs_per_token_at_paper_settings():
    d, r, n = 768, 6, 7
    assert macs_per_token("single", d, r) == 9216  # 2 * 768 * 6
    assert macs_per_token("dense", d, r, n) == 7 * 9216 + 768 * 7 == 69888
    soft = macs_per_token("soft", d, r, n, 1, m_tokens=1214)
    assert soft == pytest.approx(3 * 768 * 7 + 7 * 9216 / 1214)  # 16128 + 53.14
    assert round(soft) == 16181
    assert macs_per_token("soft", d, r, n, 2, m_tokens=1214) == pytest.approx(3 * 768 * 14 + 14 * 9216 / 1214)


@pytest.mark.parametrize("kind", KINDS)
def test_macs_per_token_match_torchs_flop_counter(kind):
    # FlopCounterMode counts 2 FLOPs per multiply-add of every matmul the forward runs, biases left out.
    b, m, d, r, n, p = 2, 10, 16, 3, 4, 2
    mix = build_mixture(kind, d, r, n, p)
    with FlopCounterMode(display=False) as counter:
        mix(torch.randn(b, m, d), torch.ones(b, m, dtype=torch.bool))
    counted = counter.get_total_flops() / 2 / (b * m)
    # Dense-MoA mixes the n up-projection biases with a (b m, n) @ (n, d) matmul: n d, a bias term the
    # paper's count (and macs_per_token) leaves out.
    assert counted == macs_per_token(kind, d, r, n, p, m_tokens=m) + (n * d if kind == "dense" else 0)


def test_param_counts_at_paper_settings():
    adapter = 768 * 6 + 6 + 6 * 768 + 768  # down W, b; up W, b = 9990
    assert count_params(build_mixture("single", 768, 6)) == adapter == 9990
    assert count_params(build_mixture("dense", 768, 6, 7)) == 7 * adapter + 768 * 7 + 7 == 75313
    assert count_params(build_mixture("soft", 768, 6, 7, 1)) == 7 * adapter + 768 * 7 == 75306
    assert count_params(build_mixture("soft", 768, 6, 7, 2, normalize=True)) == 7 * adapter + 768 * 14 + 1


# ----------------------------------------------------------------------------------------------
# Subnormal weights

def _subnormal(w):
    return ((w != 0) & (w.abs() < torch.finfo(w.dtype).tiny)).any().item()


def test_no_subnormal_weights_and_output_still_matches_reference():
    b, m, d = 2, 300, 16
    moa = randomize_up(SoftMoA(d, 4, 1, 4), std=0.1)
    with torch.no_grad():
        moa.phi.normal_(0, 1.0)  # logits with std ~40: the plain softmax leaves subnormals
    x = torch.randn(b, m, d) * 10
    logits = x @ moa.phi.detach()
    assert _subnormal(torch.softmax(logits, dim=1)), "test precondition: plain softmax has subnormals"
    y, info = moa(x)
    assert not _subnormal(info["dispatch"]) and not _subnormal(info["combine"])
    ref = _soft_reference_float64(moa, x)
    assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def _soft_reference_float64(moa, x):
    # Same equations as naive_soft, vectorised in float64 (where no weight here is subnormal);
    # the loop version is too slow for 300 tokens and is checked against the module above.
    n, p = moa.n_experts, moa.slots_per_expert
    x = x.double()
    logits = x @ moa.phi.detach().double()  # (b, m, s)
    xs = torch.softmax(logits, dim=1).transpose(1, 2) @ x  # (b, s, d)
    ys = torch.stack([naive_adapter(moa.experts[j // p], xs[bi, j])
                      for bi in range(x.shape[0]) for j in range(n * p)]).view(x.shape[0], n * p, -1)
    return torch.softmax(logits, dim=2) @ ys


def test_softmax_gradient_has_no_subnormals():
    # Flushing only after the softmax would leave subnormals in the softmax's backward pass.
    logits = (torch.randn(4, 300, 8) * 40).requires_grad_(True)
    g = torch.randn(4, 300, 8)
    (torch.softmax(logits, 1) * g).sum().backward()
    assert _subnormal(logits.grad), "test precondition: plain softmax backward has subnormals"
    logits.grad = None
    w = soft_moa._softmax(logits, 1)
    (w * g).sum().backward()
    assert not _subnormal(w) and not _subnormal(logits.grad)


# ----------------------------------------------------------------------------------------------
# Bad input

def _soft():
    return SoftMoA(8, 2, 1, 2)


BAD_CALLS = [
    (lambda: _soft()(torch.randn(4, 8)), r"shape \(b, m >= 1, d = 8\), got torch.float32 \(4, 8\)"),
    (lambda: _soft()(torch.randn(2, 3, 5)), r"d = 8\), got torch.float32 \(2, 3, 5\)"),
    (lambda: _soft()(torch.randn(2, 3, 8), torch.ones(2, 3)), r"mask must be a bool tensor.*got torch.float32"),
    (lambda: _soft()(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool)),
     r"mask .* shape \(b, m\) = \(2, 3\), got torch.bool \(2, 4\)"),
    (lambda: _soft()(torch.zeros(2, 3, 8, dtype=torch.long)), r"floating-point"),
    (lambda: SoftMoA(8, 0, 1, 2), r"n_experts must be an integer >= 1, got 0"),
    (lambda: SoftMoA(8, 2, 0, 2), r"slots_per_expert must be an integer >= 1, got 0"),
    (lambda: SoftMoA(8, 2, 1, 0), r"r must be an integer >= 1, got 0"),
    (lambda: Adapter(0, 2), r"d must be an integer >= 1, got 0"),
    (lambda: DenseMoA(8, 0, 2), r"n_experts must be an integer >= 1"),
    (lambda: build_mixture("sparse", 8, 2),
     r"unknown mixture kind 'sparse'; expected one of 'single', 'dense', 'soft'"),
    (lambda: build_mixture("dense", 8, 2, normalize=True),
     r"normalize=True applies only to kind 'soft'"),
    (lambda: make_block_adapters("adapterfusion", "soft", d=8, r=2),
     r"unknown placement 'adapterfusion'; expected one of 'pfeiffer', 'houlsby', 'none'"),
    (lambda: macs_per_token("sparse", 768, 6), r"unknown mixture kind 'sparse'"),
]


@pytest.mark.parametrize("call,match", BAD_CALLS)
def test_bad_input_raises_value_error_naming_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("kind", KINDS)
def test_every_mixture_checks_its_input(kind):
    mix = build_mixture(kind, 8, 2)
    with pytest.raises(ValueError, match=r"d = 8\), got torch.float32 \(1, 2, 7\)"):
        mix(torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        mix(torch.randn(1, 2, 8), torch.zeros(1, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# Dtypes

WEIGHT_KEYS = ("dispatch", "combine", "router_probs")


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_on_cpu(kind):
    mix = randomize_up(build_mixture(kind, 16, 4, n_experts=3, slots_per_expert=2), std=0.1)
    x, mask = torch.randn(2, 6, 16), lengths_mask([6, 4], 6)
    y32, info32 = mix(x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, info = mix(x, mask)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)
    for key in WEIGHT_KEYS:
        if key in info:  # routed in float32 despite autocast: same weights as without it
            assert info[key].dtype == torch.float32
            torch.testing.assert_close(info[key], info32[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_output_in_input_dtype_weights_in_at_least_float32(kind, dtype, weight_dtype):
    mix = randomize_up(build_mixture(kind, 16, 4, n_experts=3)).to(dtype)
    y, info = mix(torch.randn(2, 6, 16, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    for key in WEIGHT_KEYS:
        if key in info:
            assert info[key].dtype == weight_dtype


# ----------------------------------------------------------------------------------------------
# The file stands alone, and the README section runs

def test_imports_only_torch_and_stdlib():
    assert imported_packages(os.path.join(ROOT, "soft_moa.py")) == {"torch"}


def _run_python(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_copied_alone_it_imports_and_runs(tmp_path):
    shutil.copy(os.path.join(ROOT, "soft_moa.py"), tmp_path / "soft_moa.py")
    code = ("import torch, soft_moa\n"
            "assert soft_moa.__file__.startswith(%r)\n"
            "moa = soft_moa.build_mixture('soft', 16, 4)\n"
            "y, info = moa(torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool())\n"
            "print(tuple(y.shape), tuple(info['dispatch'].shape))\n") % str(tmp_path)
    out = _run_python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 5, 16) (2, 5, 7)"

