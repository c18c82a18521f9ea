"""moe_adapter.py against independent references.

- The sorted dispatch equals a per-token Python loop written from the equations (float64, 1e-10):
  masks, stacking, top-1, no shared expert, position routing.
- Balance loss: a hand-computed 2-expert case (1.15), 1.0 at balance and E on one expert, rising in
  between; padding changes neither loss nor load; the gradient reaches the router, not the experts.
  aux["loss"] equals the losses recomputed by hand from the router weights; the z-loss by hand.
- Reductions: top_k = E is a softmax-weighted dense mixture, shared experts alone an nn.Sequential
  MLP, the dense adapter LN-MLP-LN written with F.layer_norm.
- Sizes: the paper preset's counts and matched dense widths by hand arithmetic (94,440,448 /
  70,834,176; 20488, 15364); per-token FLOPs against torch's FlopCounterMode on a real forward.
- gradcheck through gates, experts, shared expert, norm and aux loss; fp32 router under bf16
  autocast; CUDA equals CPU (when present).
- A toy task (8 clusters, 8 top-1 experts): the balance loss keeps every expert busy, without it
  the routing collapses. Bad configs and inputs raise errors naming the field; the file copied alone
  imports and runs.
"""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from importscan import imported_packages
import moe_adapter as M
from moe_adapter import DenseAdapter, MoEAdapter, MoEAdapterConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(**kw):
    base = dict(d_in=5, d_out=7, stack=3, n_experts=4, top_k=2, d_expert=6, n_shared=1,
                d_shared=8, balance_weight=0.1, z_weight=0.01)
    return MoEAdapterConfig(**{**base, **kw})


def lengths_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# ----------------------------------------------------------------------------------------------
# The reference: one token at a time, python lists for top-k.


def naive_forward(adapter: MoEAdapter, x, mask=None):
    """Per-token loop written from the paper's equations, independent of the fast dispatch."""
    cfg = adapter.cfg
    B, T, d = x.shape
    S, E, k = cfg.stack, cfg.n_experts, cfg.top_k
    T_tok = math.ceil(T / S)
    tokens = []                                                # (b, t, h) of every real token
    for b in range(B):
        for t in range(T_tok):
            frames, any_real = [], False
            for s in range(S):
                f = t * S + s
                real = f < T and (mask is None or bool(mask[b, f]))
                frames.append(x[b, f] if real else x.new_zeros(d))
                any_real |= real
            if any_real:
                tokens.append((b, t, adapter.norm_in(torch.cat(frames))))
    # Route each token: full probabilities, top-k by sorting, gates renormalised.
    routes = []
    for b, t, h in tokens:
        if cfg.router == "position":                           # moe-random: experts t, t+1, .. mod E
            routes.append([((t + r) % E, 1.0 / k) for r in range(k)])
            continue
        logits = [float(v) for v in adapter.router.weight @ h]
        m = max(logits)
        ex = [math.exp(v - m) for v in logits]
        scores = [v / sum(ex) for v in ex]
        chosen = sorted(range(E), key=lambda e: -scores[e])[:k]
        total = sum(scores[e] for e in chosen)
        routes.append([(e, scores[e] / total) for e in chosen])
    y = x.new_zeros(B, T_tok, cfg.d_out)
    index = torch.full((B, T_tok, k), -1, dtype=torch.long)
    weight = x.new_zeros(B, T_tok, k)
    for n, (b, t, h) in enumerate(tokens):
        out = adapter.shared(h[None])[0] if adapter.shared is not None else 0.0
        for r, (e, g) in enumerate(routes[n]):
            index[b, t, r] = e
            out = out + g * adapter.experts[e](h[None])[0]
            weight[b, t, r] = g
        y[b, t] = adapter.norm_out(out)
    return y, index, weight


CASES = {
    "plain": (dict(), None),
    "masked": (dict(), [10, 4, 7]),
    "no_stack": (dict(stack=1), [10, 1, 6]),
    "top1": (dict(top_k=1), [9, 10, 5]),
    "no_shared": (dict(n_shared=0), [10, 3, 10]),
    "top3": (dict(top_k=3), None),
    "position": (dict(router="position", top_k=3), [10, 4, 7]),
}


@pytest.mark.parametrize("case", CASES)
def test_fast_dispatch_equals_per_token_loop(case):
    overrides, lengths = CASES[case]
    adapter = MoEAdapter(small_cfg(**overrides)).double().eval()
    x = torch.randn(3, 10, 5, dtype=torch.float64)
    mask = None if lengths is None else lengths_mask(lengths, 10)
    with torch.no_grad():
        y, aux = adapter(x, mask)
        y_ref, index_ref, weight_ref = naive_forward(adapter, x, mask)
    assert y.shape == (3, math.ceil(10 / adapter.cfg.stack), 7)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    # Same experts in the same order, same applied gates (0 at padding).
    assert torch.equal(aux["expert_index"], index_ref)
    torch.testing.assert_close(aux["expert_weight"], weight_ref, rtol=0, atol=1e-12)


def test_padding_garbage_does_not_leak_and_batch_equals_items_alone():
    adapter = MoEAdapter(small_cfg()).double().eval()
    lengths = [10, 7, 2]
    x = torch.randn(3, 10, 5, dtype=torch.float64)
    mask = lengths_mask(lengths, 10)
    x_garbage = torch.where(mask[..., None], x, torch.full_like(x, 1e3))
    with torch.no_grad():
        y, aux = adapter(x, mask)
        y_g, aux_g = adapter(x_garbage, mask)
        torch.testing.assert_close(y, y_g, rtol=0, atol=0)
        for b, n in enumerate(lengths):
            y_b, aux_b = adapter(x[b:b + 1, :n])
            n_tok = math.ceil(n / 3)
            torch.testing.assert_close(y[b, :n_tok], y_b[0], rtol=0, atol=1e-12)
            assert torch.equal(aux["expert_index"][b, :n_tok], aux_b["expert_index"][0])
            assert (y[b, n_tok:] == 0).all() and (aux["expert_index"][b, n_tok:] == -1).all()


def test_all_padding_batch_gives_zero_output_and_losses():
    adapter = MoEAdapter(small_cfg())
    y, aux = adapter(torch.randn(2, 6, 5), torch.zeros(2, 6, dtype=torch.bool))
    assert y.shape == (2, 2, 7) and (y == 0).all()
    assert aux["balance_loss"].item() == 0 and aux["z_loss"].item() == 0
    assert (aux["expert_index"] == -1).all()


# ----------------------------------------------------------------------------------------------
# Losses


def test_balance_loss_hand_computed_two_experts_four_tokens():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    # top-1: f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert M.load_balancing_loss(probs, torch.tensor([[0], [0], [1], [0]])).item() == pytest.approx(1.15)
    # top-2 over 2 experts: f = (1/2, 1/2) whatever P is: 2 * 0.5 * (0.65 + 0.35) = 1.0
    assert M.load_balancing_loss(probs, torch.tensor([[0, 1]] * 4)).item() == pytest.approx(1.0)


def test_balance_loss_is_one_when_balanced_and_grows_with_imbalance():
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    round_robin = torch.arange(N).remainder(E)[:, None]
    assert M.load_balancing_loss(uniform, round_robin).item() == pytest.approx(1.0)
    losses = []
    for c in (0.0, 0.3, 0.6, 0.9, 1.0):          # c = share of probability mass on expert 0
        probs = torch.full((N, E), (1 - c) / (E - 1))
        probs[:, 0] = c
        probs = probs * (1 - 1e-9) + 1e-9 / E if c == 0 else probs
        idx = round_robin if c == 0.0 else torch.where(torch.rand(N, 1) < c, 0, round_robin)
        losses.append(M.load_balancing_loss(probs, torch.zeros(N, 1, dtype=torch.long)
                                            if c == 1.0 else idx).item())
    assert losses[-1] == pytest.approx(E)          # everything on one expert: the maximum, E
    assert all(a < b for a, b in zip(losses, losses[1:])), losses


def test_padding_changes_neither_balance_loss_nor_load():
    adapter = MoEAdapter(small_cfg())
    x = torch.randn(2, 9, 5)
    x_padded = torch.cat([x, torch.randn(2, 6, 5) * 50], dim=1)     # 2 extra tokens of garbage
    mask = torch.cat([torch.ones(2, 9, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)], 1)
    _, aux = adapter(x)
    _, aux_p = adapter(x_padded, mask)
    torch.testing.assert_close(aux_p["balance_loss"], aux["balance_loss"])
    torch.testing.assert_close(aux_p["z_loss"], aux["z_loss"])
    torch.testing.assert_close(aux_p["expert_load"], aux["expert_load"])


def test_expert_load_is_share_of_token_slots():
    adapter = MoEAdapter(small_cfg())
    _, aux = adapter(torch.randn(3, 12, 5), lengths_mask([12, 5, 8], 12))
    idx = aux["expert_index"][aux["mask"]]                          # (N, k)
    ref = torch.stack([(idx == e).float().sum() for e in range(4)]) / idx.numel()
    torch.testing.assert_close(aux["expert_load"], ref)


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_gradient_reaches_router(top_k):
    adapter = MoEAdapter(small_cfg(top_k=top_k))
    _, aux = adapter(torch.randn(2, 12, 5))
    aux["balance_loss"].backward()
    g = adapter.router.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert all(p.grad is None for p in adapter.experts.parameters())   # f is a hard count


@pytest.mark.parametrize("train", [True, False])
def test_aux_loss_recomputed_by_hand_in_train_and_eval_mode(train):
    """Eq. 4 and 5 from the router weights with loops over experts, weighted 0.3 and 0.02."""
    adapter = MoEAdapter(small_cfg(balance_weight=0.3, z_weight=0.02, stack=1)).double().train(train)
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    _, aux = adapter(x)
    h = adapter.norm_in(x.reshape(12, 5))
    logits = h @ adapter.router.weight.T                             # (12, 4)
    probs = logits.softmax(-1)
    chosen = probs.topk(2, -1).indices                               # (12, 2)
    balance = 4 * sum(int((chosen == e).sum()) / chosen.numel() * probs[:, e].mean() for e in range(4))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 12
    torch.testing.assert_close(aux["loss"], 0.3 * balance + 0.02 * z, rtol=0, atol=1e-12)
    aux["loss"].backward()                                          # on whenever its weight is non-zero
    assert adapter.router.weight.grad.abs().sum() > 0


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    assert M.router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_top1_renormalised_gate_gives_router_no_task_gradient():
    """The documented trap: top-1 with softmax over the kept logit makes every gate p/p = 1, so
    the task loss leaves the router untrained (only round-off remains); Switch-style gates don't."""
    x = torch.randn(2, 12, 5)
    grads = {}
    for normalize in (True, False):
        torch.manual_seed(0)
        adapter = MoEAdapter(small_cfg(top_k=1, normalize_topk=normalize))
        y, _ = adapter(x)
        (y ** 2).sum().backward()
        grads[normalize] = adapter.router.weight.grad.norm().item()
    assert grads[False] > 1e-4
    assert grads[True] < 1e-6 * grads[False]


# ----------------------------------------------------------------------------------------------
# Reductions to simpler modules


def test_top_k_equal_to_n_experts_is_softmax_weighted_dense_mixture():
    adapter = MoEAdapter(small_cfg(top_k=4, stack=1)).double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        y, _ = adapter(x)
        h = adapter.norm_in(x)
        p = (h @ adapter.router.weight.T).softmax(-1)              # (B, T, E)
        mix = sum(p[..., e:e + 1] * adapter.experts[e](h) for e in range(4))
        y_ref = adapter.norm_out(adapter.shared(h) + mix)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)


def test_shared_experts_only_is_a_plain_mlp():
    cfg = small_cfg(n_experts=0, top_k=0, n_shared=2, d_shared=5, stack=2)
    adapter = MoEAdapter(cfg).double()
    mlp = nn.Sequential(nn.LayerNorm(10), nn.Linear(10, 10), nn.SiLU(), nn.Linear(10, 7),
                        nn.LayerNorm(7)).double()
    with torch.no_grad():
        for dst, src in zip([mlp[0], mlp[1], mlp[3], mlp[4]],
                            [adapter.norm_in, adapter.shared.fc1, adapter.shared.fc2, adapter.norm_out]):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    x = torch.randn(3, 8, 5, dtype=torch.float64)
    y, aux = adapter(x)
    torch.testing.assert_close(y, mlp(x.reshape(3, 4, 10)), rtol=0, atol=1e-12)
    assert aux["loss"].item() == 0 and aux["expert_index"].shape == (3, 4, 0)


def test_dense_adapter_is_ln_mlp_ln_with_same_aux_record():
    dense = DenseAdapter(5, 11, 7, stack=3).double()
    moe = MoEAdapter(small_cfg()).double()
    x = torch.randn(2, 10, 5, dtype=torch.float64)
    mask = lengths_mask([10, 4], 10)
    y, aux = dense(x, mask)
    _, aux_moe = moe(x, mask)
    assert set(aux) == set(aux_moe)
    tok = F.pad(x * mask[..., None], (0, 0, 0, 2)).reshape(2, 4, 15)
    ref = F.layer_norm(tok, (15,))
    ref = dense.mlp.fc2(F.silu(dense.mlp.fc1(ref)))
    ref = F.layer_norm(ref, (7,))
    torch.testing.assert_close(y[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(y[1, :2], ref[1, :2], rtol=0, atol=1e-12)
    assert (y[1, 2:] == 0).all() and aux["loss"].item() == 0


# ----------------------------------------------------------------------------------------------
# Sizes: the paper's numbers by hand


def test_paper_preset_parameter_counts_by_hand():
    cfg = MoEAdapterConfig.paper()
    with torch.device("meta"):
        counts = M.count_params(MoEAdapter(cfg))
    expert = 2560 * 1280 + 1280 + 1280 * 2048 + 2048               # 5,901,568
    shared = 2560 * 10240 + 10240 + 10240 * 2048 + 2048            # 47,198,208
    router, norms = 2560 * 8, 2 * 2560 + 2 * 2048
    assert counts["total"] == 8 * expert + shared + router + norms == 94_440_448
    assert counts["active"] == 4 * expert + shared + router + norms == 70_834_176
    assert round(counts["total"] / 1e6, 1) == 94.4 and round(counts["active"] / 1e6, 1) == 70.8
    assert counts["flops_per_token"] == 2 * (2560 * 8 + (4 * 1280 + 10240) * (2560 + 2048))


def test_dense_widths_matched_by_hand():
    cfg = MoEAdapterConfig.paper()
    # params: H * (2560 + 2048 + 1) + 2048 + norms(9216) = 94,440,448  ->  H = 20487.998
    assert M.dense_hidden_for(cfg, "params") == 20488
    # flops: H * 4608 = 2560*8 + (4*1280 + 10240) * 4608  ->  H = 15360 + 4.44
    assert M.dense_hidden_for(cfg, "flops") == 15364
    with torch.device("meta"):
        dense = M.count_params(DenseAdapter(2560, 20480, 2048))
    assert round(dense["total"] / 1e6, 1) == 94.4                  # the paper's hidden 20480
    tiny = MoEAdapterConfig.tiny()                                  # D=256, O=128: one hidden unit = 385 params
    with torch.device("meta"):
        moe = M.count_params(MoEAdapter(tiny))
        dense = {m: M.count_params(M.build_adapter("dense-" + m, tiny)) for m in ("params", "flops")}
    assert abs(dense["params"]["total"] - moe["total"]) <= (256 + 128 + 1) / 2
    assert abs(dense["flops"]["flops_per_token"] - moe["flops_per_token"]) <= 256 + 128


@pytest.mark.parametrize("kind", M.ADAPTER_KINDS)
def test_flops_per_token_match_torch_flop_counter(kind):
    """FlopCounterMode counts every matmul of a real forward: the counted weight matrices per token,
    plus the MoE's (1, k) @ (k, O) gate products, which count_params leaves out."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = MoEAdapterConfig.tiny(n_shared=2)
    adapter = M.build_adapter(kind, cfg)
    x = torch.randn(3, 20, 64)                                      # N = 3 * 5 tokens
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        adapter(x)
    gates = 2 * cfg.top_k * cfg.d_out if kind.startswith("moe") else 0
    assert counter.get_total_flops() == 15 * (M.count_params(adapter)["flops_per_token"] + gates)


def test_build_adapter_kinds_share_the_call_signature():
    cfg = MoEAdapterConfig.tiny()
    x, mask = torch.randn(2, 9, 64), lengths_mask([9, 5], 9)
    for kind in M.ADAPTER_KINDS:
        y, aux = M.build_adapter(kind, cfg)(x, mask)
        assert y.shape == (2, 3, 128) and aux["mask"].tolist() == [[True] * 3, [True, True, False]]
        assert aux["expert_index"].shape[:2] == (2, 3)


def test_moe_random_is_the_moe_without_a_router():
    cfg = MoEAdapterConfig.tiny()
    moe, rnd = M.build_adapter("moe", cfg), M.build_adapter("moe-random", cfg)
    assert rnd.router is None and rnd.cfg.router == "position"
    # Same experts and shared expert; only the router's E x D weights are missing.
    assert M.count_params(moe)["total"] - M.count_params(rnd)["total"] == cfg.n_experts * cfg.d_token
    y, aux = rnd(torch.randn(2, 9, 64, requires_grad=True), lengths_mask([9, 5], 9))
    assert aux["expert_index"][0, :, 0].tolist() == [0, 1, 2]           # token t -> expert t mod E first
    assert not aux["balance_loss"].requires_grad                        # uniform P: nothing to learn


# ----------------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_gates_and_experts():
    cfg = MoEAdapterConfig(d_in=3, d_out=4, stack=2, n_experts=3, top_k=2, d_expert=4, n_shared=1,
                           d_shared=3, z_weight=0.1)
    adapter = MoEAdapter(cfg).double()
    names = ["router.weight", "experts.0.fc1.weight", "experts.2.fc2.bias", "shared.fc1.weight",
             "norm_in.weight"]
    params = dict(adapter.named_parameters())
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = lengths_mask([5, 3], 5)

    def f(x, *ps):
        y, aux = torch.func.functional_call(adapter, {**params, **dict(zip(names, ps))}, (x, mask))
        return y, aux["loss"]

    inputs = (x, *[params[n].detach().clone().requires_grad_() for n in names])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Numerics and devices


def test_router_runs_in_float32_under_bf16_autocast():
    torch.manual_seed(1)
    adapter = MoEAdapter(MoEAdapterConfig.tiny())
    x = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = adapter(x)
    assert aux["expert_weight"].dtype == torch.float32
    assert torch.isfinite(y.float()).all()
    # The gates are fp32 softmaxes of the chosen experts: they still sum to 1 at fp32 precision,
    # which bf16 router logits (8 significant bits) would not give.
    torch.testing.assert_close(aux["expert_weight"].sum(-1), torch.ones(2, 4), rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_runs_under_bf16():
    adapter = MoEAdapter(small_cfg()).double()
    x = torch.randn(3, 10, 5, dtype=torch.float64)
    mask = lengths_mask([10, 4, 7], 10)
    y_cpu, aux_cpu = adapter(x, mask)
    y_gpu, aux_gpu = adapter.cuda()(x.cuda(), mask.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=1e-10)
    assert torch.equal(aux_gpu["expert_index"].cpu(), aux_cpu["expert_index"])
    adapter = MoEAdapter(MoEAdapterConfig.tiny()).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = adapter(torch.randn(2, 16, 64, device="cuda"))
        (y.float().pow(2).mean() + aux["loss"]).backward()
    assert aux["expert_weight"].dtype == torch.float32 and torch.isfinite(y.float()).all()


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=5), "top_k must be in"),
    (dict(d_in=0), "d_in, d_out and stack must be >= 1"),
    (dict(stack=-1), "stack must be >= 1"),
    (dict(d_expert=0), "d_expert and d_shared must be >= 1"),
    (dict(n_experts=0, top_k=2), "top_k must be in"),
    (dict(n_experts=-2), "n_experts and n_shared must be >= 0"),
    (dict(n_experts=0, n_shared=0, top_k=0), "at least one expert"),
    (dict(router="noisy"), "unknown router 'noisy'; allowed: softmax, position"),
    (dict(z_weight=-1.0), "z_weight must be >= 0"),
])
def test_bad_config_is_named(kw, message):
    with pytest.raises(ValueError, match=message):
        small_cfg(**kw)


@pytest.mark.parametrize("make, message", [
    (lambda: (torch.randn(3, 5), None), r"x must be .*\(B, T, d_in=5\).*got .*\(3, 5\)"),
    (lambda: (torch.randn(2, 3, 6), None), r"x must be .*\(B, T, d_in=5\).*got .*\(2, 3, 6\)"),
    (lambda: (torch.randn(2, 3, 5), torch.ones(2, 4, dtype=torch.bool)), r"mask must be .*\(B, T\) = \(2, 3\).*\(2, 4\)"),
    (lambda: (torch.randn(2, 3, 5), torch.ones(2, 3)), "mask must be a bool .*float32"),
    (lambda: (torch.ones(2, 3, 5, dtype=torch.long), None), "floating-point.*int64"),
])
def test_bad_input_is_named(make, message):
    x, mask = make()
    for adapter in (MoEAdapter(small_cfg()), DenseAdapter(5, 4, 7, stack=3)):
        with pytest.raises(ValueError, match=message):
            adapter(x, mask)


def test_bad_names_list_allowed_values():
    with pytest.raises(ValueError, match="allowed: moe, moe-random, dense-params, dense-flops"):
        M.build_adapter("sparse", small_cfg())
    with pytest.raises(ValueError, match="allowed: params, flops"):
        M.dense_hidden_for(small_cfg(), "memory")
    with pytest.raises(TypeError, match="MoEAdapter or DenseAdapter"):
        M.count_params(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="DenseAdapter: sizes must be >= 1.*d_hidden=0"):
        DenseAdapter(5, 0, 7)


# ----------------------------------------------------------------------------------------------
# Copyable alone


def test_imports_only_torch_and_stdlib():
    assert imported_packages(os.path.join(ROOT, "moe_adapter.py")) == {"torch"}


def test_file_copied_alone_imports_and_runs(tmp_path):
    shutil.copy(os.path.join(ROOT, "moe_adapter.py"), tmp_path)
    code = ("import torch, moe_adapter as m; a = m.MoEAdapter(m.MoEAdapterConfig.tiny()); "
            "y, aux = a(torch.randn(2, 10, 64)); print(tuple(y.shape), m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(2, 3, 128)" in out.stdout and str(tmp_path) in out.stdout


# ----------------------------------------------------------------------------------------------
# A toy task where routing matters


def _cluster_task(n_clusters=8, d=16, n=4096, seed=0):
    """Tokens from well-separated clusters; cluster c needs its own linear map A_c."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, d, generator=g) * 3.0
    maps = torch.randn(n_clusters, d, d, generator=g) / d ** 0.5
    c = torch.randint(0, n_clusters, (n,), generator=g)
    x = centers[c] + torch.randn(n, d, generator=g)
    y = torch.einsum("nij,nj->ni", maps[c], x)
    return x, y, c


def _train_toy(balance_weight, seed, steps=400):
    """Top-1 Switch-style gates (the router learns from the task too), small experts that each
    fit about one cluster's map, no shared expert. Returns (relative MSE, expert load)."""
    torch.manual_seed(seed)
    x, y, _ = _cluster_task(seed=seed)
    cfg = MoEAdapterConfig(d_in=16, d_out=16, stack=1, n_experts=8, top_k=1, d_expert=16,
                           n_shared=0, balance_weight=balance_weight, normalize_topk=False,
                           norm_out=False)
    adapter = MoEAdapter(cfg)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (256,))
        pred, aux = adapter(x[i][:, None])                          # one frame per sequence
        loss = F.mse_loss(pred[:, 0], y[i]) + aux["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred, aux = adapter(x[:, None])
    return F.mse_loss(pred[:, 0], y).item() / y.var().item(), aux["expert_load"]


def test_toy_clusters_balance_loss_keeps_experts_busy_and_collapse_without_it():
    """8 clusters, 8 experts, top-1, 3 seeds: with the loss every expert keeps about 1/8 of the tokens
    and the fit is better; without it a few experts take most tokens. (Weight 1.0, not Switch's 1e-2,
    because the toy trains only 400 steps.)"""
    seeds = (0, 1, 2)
    with_loss = [_train_toy(1.0, s) for s in seeds]
    without = [_train_toy(0.0, s) for s in seeds]
    mean = lambda v: sum(v) / len(v)
    mse_with, mse_without = mean([r[0] for r in with_loss]), mean([r[0] for r in without])
    max_with = mean([r[1].max().item() for r in with_loss])
    max_without = mean([r[1].max().item() for r in without])
    dead_with = sum(int((r[1] < 0.02).sum()) for r in with_loss)
    dead_without = sum(int((r[1] < 0.02).sum()) for r in without)
    assert mse_with < 0.035, "the MoE must fit the per-cluster maps"
    assert max_with < 0.16 and dead_with == 0, "balanced: every expert near 1/8 of the tokens"
    assert max_without > 0.3 and dead_without >= 3, "collapse: few experts take most tokens"
    assert mse_with < mse_without
