"""bf16 autocast numerics of the MoE adapter, Soft-MoA and the LLM (issue 18, item 6).

Each module runs forward and backward under torch.autocast(bfloat16), on CPU and on CUDA when present, on
ordinary and extreme inputs: activations at 1e4 / 3e4, tiny ones (1e-30, fp32-subnormal 1e-40, exact zeros),
every token routed to one expert (router weights set so its logit dominates), a one-token clip, a clip whose
only real frame is the last, an all-but-one padded batch and (LLM) a long audio span. Outputs, aux losses and
every gradient (parameters and input) must be finite, and match a float32 run of the same weights within a
loose relative tolerance (bf16 keeps 8 mantissa bits): outputs 3%, gradients 10% (2% / 5% on ordinary inputs).
Gradients are not compared where raw 1e4-scale activations meet a weight matrix with no norm in front: there
bf16's absolute error (~|x| |w| 2^-8 >> 1) moves pre-activations across SiLU/GELU's bend, a real precision
limit of bf16, not a bug. Beyond these scales fp32 itself overflows (LayerNorm's variance at |x| ~ 1e19).
"""
import pytest
import torch

import soft_moa
from llm import LLM, LLMConfig, build_batch
from moe_adapter import ADAPTER_KINDS, MoEAdapterConfig, build_adapter

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
SCALES = {"large_1e4": 1e4, "large_3e4": 3e4, "tiny_1e-30": 1e-30, "subnormal_1e-40": 1e-40, "zero": 0.0}


def run(model, device, bf16, call, inputs):
    """Forward `call(model, *inputs)` -> (outputs, scalars) under bf16 autocast (or fp32), then backward a fixed
    random projection of the outputs plus the scalars; returns them in float32, the grads of params and inputs."""
    model.zero_grad(set_to_none=True)
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        outs, scalars = call(model, *inputs)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(device)).sum() for o in outs)
    (loss + sum(s.float() for s in scalars)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": t.grad for i, t in enumerate(inputs) if t.grad is not None})
    return [o.detach().float() for o in outs], [s.detach().float() for s in scalars], grads


def assert_finite(outs, scalars, grads):
    for i, t in enumerate(outs + scalars):
        assert torch.isfinite(t).all(), f"output/aux {i} not finite: {t}"
    assert grads, "no gradient reached anything"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"non-finite gradients: {bad}"


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check(model, device, call, inputs, normal=False, compare_grads=True):
    """bf16 run finite and close to the fp32 run; returns the bf16 outputs. normal: tighter tolerances, and the
    bf16 output must differ from fp32 at all (autocast really ran)."""
    outs, scalars, grads = run(model, device, True, call, inputs)
    assert_finite(outs, scalars, grads)
    outs32, scalars32, grads32 = run(model, device, False, call, inputs)
    y_tol, g_tol = (0.02, 0.05) if normal else (0.03, 0.1)
    for a, b in zip(outs, outs32):
        assert (0 < rel_err(a, b) if normal else True) and rel_err(a, b) < y_tol, rel_err(a, b)
    for a, b in zip(scalars, scalars32):
        assert torch.allclose(a, b, rtol=5e-3, atol=1e-6), (a, b)
    if compare_grads:
        assert grads.keys() == grads32.keys()
        for n in grads32:
            assert rel_err(grads[n], grads32[n]) < g_tol, (n, rel_err(grads[n], grads32[n]))
    return outs


# MoE adapter ------------------------------------------------------------------------------------

def moe_cfg(**kw):
    return MoEAdapterConfig(**{**dict(d_in=8, d_out=16, stack=4, n_experts=4, top_k=2, d_expert=16, n_shared=1,
                                      d_shared=32, z_weight=1e-3), **kw})


def moe_call(model, x, mask):
    y, aux = model(x, mask)
    return [y], [aux["loss"], aux["balance_loss"], aux["z_loss"]]


MOE_CASES = ["normal", *SCALES, "one_frame", "last_frame_only", "all_but_one_padded", "all_padded"]


def moe_inputs(case, device, B=3, T=10, d_in=8):
    x, mask = torch.randn(B, T, d_in), torch.rand(B, T) < 0.8
    mask[:, 0] = True
    if case in SCALES:
        x = x * SCALES[case]
    elif case == "one_frame":                  # T = 1: one token, three padding frames in its stack
        x, mask = x[:, :1], mask[:, :1]
    elif case == "last_frame_only":            # the only real frame ends the clip (a partial last stack)
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, -1] = True
    elif case == "all_but_one_padded":         # rows 1.. entirely padding; row 0 has one real frame
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[0, 3] = True
    elif case == "all_padded":                 # no real token at all (N = 0)
        mask = torch.zeros(B, T, dtype=torch.bool)
    return x.to(device), mask.to(device)


def force_one_expert(model, e):
    """LN output z has zero mean, so with gain 1 and bias 1 each token's h sums to D: expert e's logit is 10 D."""
    with torch.no_grad():
        model.norm_in.weight.fill_(1.0)
        model.norm_in.bias.fill_(1.0)
        model.router.weight.zero_()
        model.router.weight[e] = 10.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_moe_bf16_matches_fp32_on_normal_inputs(kind, device):
    model = build_adapter(kind, moe_cfg()).to(device)
    check(model, device, moe_call, moe_inputs("normal", device, B=4, T=32), normal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MOE_CASES)
@pytest.mark.parametrize("kind,norm_in", [(k, True) for k in ADAPTER_KINDS] + [("moe", False), ("moe-random", False)])
def test_moe_bf16_on_extreme_inputs(kind, norm_in, case, device):
    model = build_adapter(kind, moe_cfg(norm_in=norm_in)).to(device)
    x, mask = moe_inputs(case, device)
    (y,) = check(model, device, moe_call, (x, mask), compare_grads=norm_in or not case.startswith("large"))
    if case.endswith("padded"):                # padding tokens are exactly zero, real ones are not
        tok = torch.nn.functional.pad(mask, (0, -mask.shape[1] % 4)).view(mask.shape[0], -1, 4).any(-1)
        assert (y[~tok] == 0).all() and (y[tok].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("case", ["normal", "large_3e4", "tiny_1e-30", "one_frame", "all_but_one_padded"])
def test_moe_all_tokens_to_one_expert(case, top_k, device):
    model = build_adapter("moe", moe_cfg(top_k=top_k)).to(device)
    force_one_expert(model, e=2)
    x, mask = moe_inputs(case, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        _, aux = model(x, mask)
    assert (aux["expert_index"][aux["mask"]][:, 0] == 2).all()       # every real token's first choice
    assert aux["expert_load"][2].item() == 1 / top_k                 # its share of the k slots
    assert aux["balance_loss"].item() == pytest.approx(4 / top_k)    # E f_2 P_2, P_2 = 1, the others' P = 0
    check(model, device, moe_call, (x, mask))


# Soft-MoA ---------------------------------------------------------------------------------------

MOA_KINDS = [("single", False), ("dense", False), ("soft", False), ("soft", True)]
MOA_CASES = [*SCALES, "one_token", "last_token_only", "all_but_one_padded", "one_expert"]


def moa_model(kind, normalize, device, d=16):
    model = soft_moa.build_mixture(kind, d, r=4, n_experts=4, slots_per_expert=2, normalize=normalize)
    with torch.no_grad():                     # up starts at zero: give the adapters an output
        for m in model.modules():
            if isinstance(m, soft_moa.Adapter):
                m.up.weight.normal_(0, 0.3)
                m.up.bias.normal_(0, 0.1)
    return model.to(device)


def moa_call(model, x, mask):
    y, info = model(x, mask)
    return [y], []


def moa_inputs(case, device, b=3, m=12, d=16):
    x, mask = torch.randn(b, m, d), torch.rand(b, m) < 0.8
    mask[:, 0] = True
    if case in SCALES:
        x = x * SCALES[case]
    elif case == "one_token":
        x, mask = x[:, :1], mask[:, :1]
    elif case == "last_token_only":
        mask = torch.zeros(b, m, dtype=torch.bool)
        mask[:, -1] = True
    elif case == "all_but_one_padded":        # every sequence keeps one real token (the mixtures need >= 1)
        mask = torch.zeros(b, m, dtype=torch.bool)
        mask[torch.arange(b), torch.arange(b) * 3] = True
    elif case == "one_expert":                 # positive-mean tokens, see force_moa_expert
        x = x + 3.0
    return x.to(device), mask.to(device)


def force_moa_expert(model, e=0):
    """Dense: router bias 30 on expert e. Soft: slot e*p's logit 10 sum_d x_d (normalised: scale 30): every token's
    combine weight sits on expert e (inputs have mean 3)."""
    with torch.no_grad():
        if isinstance(model, soft_moa.DenseMoA):
            model.router.weight.zero_()
            model.router.bias.zero_()
            model.router.bias[e] = 30.0
        elif isinstance(model, soft_moa.SoftMoA):
            model.phi.zero_()
            model.phi[:, e * model.slots_per_expert] = 10.0
            if model.normalize:
                model.scale.fill_(30.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,normalize", MOA_KINDS)
def test_moa_bf16_matches_fp32_on_normal_inputs(kind, normalize, device):
    check(moa_model(kind, normalize, device), device, moa_call, moa_inputs("normal", device), normal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MOA_CASES)
@pytest.mark.parametrize("kind,normalize", MOA_KINDS)
def test_moa_bf16_on_extreme_inputs(kind, normalize, case, device):
    model = moa_model(kind, normalize, device)
    x, mask = moa_inputs(case, device)
    if case == "one_expert":
        force_moa_expert(model)
        if kind != "single":
            model.stats = True
            with torch.autocast(device, dtype=torch.bfloat16):
                _, info = model(x, mask)
            usage = info["expert_usage"][mask]                       # (real tokens, n)
            assert torch.isfinite(info["expert_contribution"]).all()
            assert (usage[:, 0] > 0.999).all(), usage
            model.stats = False
    (y,) = check(model, device, moa_call, (x, mask), compare_grads=not case.startswith("large"))
    assert (y[~mask] == 0).all()


# An all-padding row: its dispatch softmax is 0/0; soft_moa._softmax maps it to zero weights, not NaN.
@pytest.mark.parametrize("normalize", [False, True])
def test_soft_moa_fully_padded_row(normalize):
    model = moa_model("soft", normalize, "cpu")
    x, mask = moa_inputs("normal", "cpu")
    mask[1] = False
    (y,), _, grads = run(model, "cpu", True, moa_call, (x, mask))
    assert_finite([y], [], grads)
    assert (y[1] == 0).all()


# LLM --------------------------------------------------------------------------------------------

def llm_cfg(**kw):
    return LLMConfig(**{**dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                               max_seq_len=512), **kw})


def llm_call(model, audio, ids, attention_mask, audio_mask, labels):
    logits, loss = model(ids, attention_mask, audio_embeds=audio, audio_mask=audio_mask, labels=labels)
    return [logits], [loss]


LLM_CASES = [*SCALES, "one_audio_token", "all_but_one_padded", "long_audio"]


def llm_inputs(case, device, cfg, padding_side="right"):
    """audio (B, T', D), the batch from build_batch (prompts, answers, n_audio per row), audio_mask, labels."""
    n_audio, prompts, answers = [6, 3, 5], [[7, 8], [9], [10, 11, 12]], [[13, 14], [15], [16, 17]]
    if case == "one_audio_token":
        n_audio = [1, 1, 1]
    elif case == "all_but_one_padded":         # one long row; the others [BOS] (EOS) padded to its length
        n_audio, prompts, answers = [40, 0, 0], [[7] * 8, [], []], [[13] * 6, [], [15]]
    elif case == "long_audio":                 # ~470 audio tokens: close to max_seq_len
        n_audio = [470, 200, 1]
    Tp = max(n_audio)
    audio_mask = torch.arange(Tp)[None] < torch.tensor(n_audio)[:, None]
    audio = torch.randn(len(n_audio), Tp, cfg.d_model) * SCALES.get(case, 1.0)
    batch = build_batch(prompts, answers, n_audio, cfg=cfg, padding_side=padding_side)
    return (audio.to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device),
            audio_mask.to(device), batch["labels"].to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_llm_bf16_matches_fp32_on_normal_inputs(attn_impl, device):
    cfg = llm_cfg(attn_impl=attn_impl)
    check(LLM(cfg).to(device), device, llm_call, llm_inputs("normal", device, cfg), normal=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@pytest.mark.parametrize("case", LLM_CASES)
def test_llm_bf16_on_extreme_inputs(case, attn_impl, padding_side, device):
    cfg = llm_cfg(attn_impl=attn_impl, qk_norm=True)
    check(LLM(cfg).to(device), device, llm_call, llm_inputs(case, device, cfg, padding_side))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["large_3e4", "tiny_1e-30", "last_frame_only", "all_but_one_padded"])
def test_adapter_into_llm_bf16_finite(case, device):
    """Frames -> MoE adapter -> LLM (n_audio from aux['mask']; rows with no audio too) -> loss, one bf16 graph."""
    cfg = llm_cfg()
    adapter, model = build_adapter("moe", moe_cfg(d_out=cfg.d_model)).to(device), LLM(cfg).to(device)
    x, mask = moe_inputs(case, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, aux = adapter(x.requires_grad_(), mask)
        n_audio = aux["mask"].sum(1).tolist()
        batch = build_batch([[7]] * len(n_audio), [[13, 14]] * len(n_audio), n_audio, cfg=cfg, device=device)
        logits, loss = model(batch["input_ids"], batch["attention_mask"], audio_embeds=y,
                             audio_mask=aux["mask"], labels=batch["labels"])
    (loss + aux["loss"]).backward()
    grads = {n: p.grad for n, p in [*adapter.named_parameters(), *model.named_parameters()] if p.grad is not None}
    assert_finite([logits.float()], [loss, aux["loss"]], {**grads, "x": x.grad})
