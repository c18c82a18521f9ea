"""llm.py (and hf.py's decoder loader) against independent references: Hugging Face transformers'
LLaMA / Qwen2 / Qwen3 (when installed), complex-number RoPE and a hand-made rotation, a per-head
attention loop, uncached and per-row runs, hand-computed losses, and published parameter counts."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

from importscan import imported_packages
import llm
from hf import HFTokenizer, config_from_hf, load_llm
from llm import (IGNORE_INDEX, LLM, LLMConfig, LoRALinear, WordTokenizer, add_lora, build_batch,
                 freeze, lm_loss, mark_trainable)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(**kw):
    """Every optional part on: GQA (4 query heads on 2 kv heads), q/k/v bias, q/k norm, untied."""
    base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                max_seq_len=64, qkv_bias=True, qk_norm=True, tie_embeddings=False)
    return LLMConfig(**{**base, **kw})


def make_model(cfg=None, dtype=torch.float64):
    """Random model with non-trivial norm gains and biases (all-ones gains would hide misplaced norms)."""
    model = LLM(cfg or small_cfg())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.mul_(4.0)                     # std 0.08: logits far from uniform, no near-ties
    return model.to(dtype).eval()


def twin(model, **cfg_changes):
    """Same weights, different config (e.g. the math attention path)."""
    other = LLM(replace(model.cfg, **cfg_changes)).to(next(model.parameters()).dtype).eval()
    other.load_state_dict(model.state_dict())
    return other


def random_ids(B, T, cfg):
    """Token ids above the special ones (no audio placeholder among them)."""
    return torch.randint(5, cfg.vocab_size, (B, T))


def audio_batch(cfg, padding_side, dtype=torch.float64):
    """Three rows with different audio and prompt lengths, and the adapter-style (y, mask)."""
    prompts = [[7, 8, 9, 10], [11, 12], [13, 14, 15]]
    answers = [[20, 21], [22, 23, 24, 25], [26]]
    n_audio = [3, 1, 2]
    y = torch.randn(3, 4, cfg.d_model, dtype=dtype)
    mask = torch.arange(4)[None, :] < torch.tensor(n_audio)[:, None]         # (B, T') prefix masks
    batch = build_batch(prompts, answers, n_audio, cfg=cfg, padding_side=padding_side)
    return batch, y, mask


# ----------------------------------------------------------------------------------------------
# RoPE


def test_rope_matches_complex_rotation():
    """Eq. 2 against the RoPE paper's form: pair (x_i, x_{i+hd/2}) as a complex number times
    exp(j p theta^(-2i/hd))."""
    hd, theta = 8, 500.0
    x = torch.randn(2, 3, 5, hd, dtype=torch.float64)                       # (B, h, T, hd)
    pos = torch.tensor([[0, 1, 2, 7, 30], [4, 4, 9, 0, 11]])
    cos, sin = llm.rope_cos_sin(pos, hd, theta, torch.float64)
    got = llm.apply_rope(x, cos, sin)
    z = torch.complex(x[..., :hd // 2], x[..., hd // 2:])                  # (B, h, T, hd/2)
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)    # (hd/2,)
    rot = torch.polar(torch.ones(2, 5, hd // 2, dtype=torch.float64), pos[..., None] * freq)
    ref = z * rot[:, None]
    torch.testing.assert_close(got, torch.cat([ref.real, ref.imag], -1), rtol=0, atol=1e-12)


def test_rope_relative_position_hand_case():
    """hd = 2: the single frequency is theta^0 = 1, so q = k = (1, 0) at positions m, n score
    cos(m - n) exactly; for a random hd = 8 pair the score depends on m - n only."""
    def score(q, k, m, n, hd):
        cq, sq = llm.rope_cos_sin(torch.tensor([[m]]), hd, 10000.0, torch.float64)
        ck, sk = llm.rope_cos_sin(torch.tensor([[n]]), hd, 10000.0, torch.float64)
        return float((llm.apply_rope(q, cq, sq) * llm.apply_rope(k, ck, sk)).sum())

    e = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    for m, n in [(0, 0), (3, 1), (1, 3), (10, 4), (7, 7)]:
        assert score(e, e, m, n, 2) == pytest.approx(math.cos(m - n), abs=1e-12)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64)
    assert score(q, k, 5, 2, 8) == pytest.approx(score(q, k, 13, 10, 8), abs=1e-10)
    assert score(q, k, 5, 2, 8) == pytest.approx(score(q, k, 3, 0, 8), abs=1e-10)
    assert abs(score(q, k, 5, 2, 8) - score(q, k, 5, 3, 8)) > 1e-3


# ----------------------------------------------------------------------------------------------
# Attention


def naive_attention(q, k, v, mask):
    """Per batch, head and query: query head h reads kv head h // G; explicit softmax."""
    B, H, T, hd = q.shape
    G = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s = (k[b, h // G] @ q[b, h, t]) / math.sqrt(hd)                 # (L,)
                s = torch.where(mask[b, 0, t], s, torch.tensor(float("-inf"), dtype=s.dtype))
                w = torch.exp(s - s.max())
                out[b, h, t] = (w / w.sum()) @ v[b, h // G]
    return out


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_attention_matches_per_head_loop(impl):
    q = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 7, 6, dtype=torch.float64)                   # L = 7: 2 cached
    key_real = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    mask = llm.causal_padding_mask(key_real, start=2, T=5)                  # (2, 1, 5, 7)
    # By hand: query t sits at column 2 + t; it sees real keys up to itself, and always itself.
    ref = torch.tensor([[[(j <= 2 + t and bool(key_real[b, j])) or j == 2 + t for j in range(7)]
                         for t in range(5)] for b in range(2)])
    assert torch.equal(mask[:, 0], ref)
    got = llm.attention(q, k, v, mask, impl)
    torch.testing.assert_close(got, naive_attention(q, k, v, mask), rtol=0, atol=1e-12)
    # No mask = plain causal with T == L.
    k2, v2 = k[:, :, :5], v[:, :, :5]
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)
    torch.testing.assert_close(llm.attention(q, k2, v2, None, impl), naive_attention(q, k2, v2, causal),
                               rtol=0, atol=1e-12)


def test_sdpa_and_math_paths_give_the_same_logits():
    model = make_model()
    batch, y, am = audio_batch(model.cfg, "left")
    args = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        a, _ = model(*args, audio_embeds=y, audio_mask=am)
        b, _ = twin(model, attn_impl="math")(*args, audio_embeds=y, audio_mask=am)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Cache, padding, positions


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_cached_decoding_equals_full_forward(impl):
    model = make_model(small_cfg(attn_impl=impl))
    ids = random_ids(2, 12, model.cfg)
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, :3] = False                                                     # row 1 left-padded
    with torch.no_grad():
        full, _ = model(ids, real)
        cache = model.new_cache(2, 12)
        chunks = [model(ids[:, :6], real[:, :6], cache=cache)[0]]          # prefill
        for t in range(6, 9):                                               # one token at a time
            chunks.append(model(ids[:, t:t + 1], cache=cache)[0])
        chunks.append(model(ids[:, 9:], cache=cache)[0])                    # then a chunk of 3
    assert cache.length == 12
    cached = torch.cat(chunks, dim=1)
    torch.testing.assert_close(cached[real], full[real], rtol=0, atol=1e-10)


def test_positions_count_real_tokens_only(monkeypatch):
    """RoPE is shift-invariant, so a padded row's logits barely depend on a constant position
    offset: check the positions handed to RoPE directly. Left padding, then cached steps."""
    seen = []
    rope = llm.rope_cos_sin
    monkeypatch.setattr(llm, "rope_cos_sin", lambda pos, *a: seen.append(pos.tolist()) or rope(pos, *a))
    model = make_model()
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)
    cache = model.new_cache(3, 8)
    with torch.no_grad():
        model(random_ids(3, 5, model.cfg), real, cache=cache)
        model(random_ids(3, 1, model.cfg), cache=cache)
        model(random_ids(3, 2, model.cfg), torch.tensor([[1, 1], [0, 1], [1, 1]]).bool(), cache=cache)
    assert seen == [[[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]],
                    [[3], [5], [3]],
                    [[4, 5], [5, 6], [4, 5]]]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_gives_each_row_its_logits_alone(padding_side):
    model = make_model()
    batch, y, am = audio_batch(model.cfg, padding_side)
    ids, real = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits, _ = model(ids, real, audio_embeds=y, audio_mask=am)
        for b in range(3):
            row = ids[b][real[b]][None]                                     # (1, T_b), unpadded
            alone, _ = model(row, audio_embeds=y[b:b + 1, :int(am[b].sum())])
            torch.testing.assert_close(logits[b][real[b]], alone[0], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Audio in the input embeddings


def test_audio_replaces_placeholders_row_by_row_in_order():
    model = make_model()
    cfg = model.cfg
    A = cfg.audio_token_id
    ids = torch.tensor([[1, A, 9, A, A, 10], [1, 11, A, A, 12, 13]])
    y = torch.randn(2, 4, cfg.d_model, dtype=torch.float64)
    am = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)      # not prefixes on purpose
    x = model.embed_tokens(ids).detach().clone()                           # reference by hand
    x[0, 1], x[0, 3], x[0, 4] = y[0, 0], y[0, 2], y[0, 3]
    x[1, 2], x[1, 3] = y[1, 1], y[1, 2]
    with torch.no_grad():
        torch.testing.assert_close(model.embed(ids, y, am), x, rtol=0, atol=0)
        junk = y.clone()
        junk[~am] = 1e3                                                     # padding audio is unread
        torch.testing.assert_close(model(ids, audio_embeds=junk, audio_mask=am)[0],
                                   model(ids, audio_embeds=y, audio_mask=am)[0], rtol=0, atol=0)


def test_moe_adapter_output_plugs_in_directly():
    """The adapter's (y, aux['mask']) and build_batch's n_audio from the mask fit forward as they are."""
    from moe_adapter import MoEAdapter, MoEAdapterConfig
    cfg = small_cfg()
    adapter = MoEAdapter(MoEAdapterConfig(d_in=8, d_out=cfg.d_model, stack=2, n_experts=4, top_k=2,
                                          d_expert=8, d_shared=16))
    model = make_model(cfg, torch.float32)
    frames = torch.randn(2, 9, 8)
    fmask = torch.arange(9)[None] < torch.tensor([[9], [4]])
    y, aux = adapter(frames, fmask)                                         # (2, 5, D), mask (2, 5)
    batch = build_batch([[7, 8], [9]], [[10], [11, 12]], aux["mask"].sum(1).tolist(), cfg=cfg)
    logits, loss = model(batch["input_ids"], batch["attention_mask"], audio_embeds=y,
                         audio_mask=aux["mask"], labels=batch["labels"])
    (loss + aux["loss"]).backward()
    assert torch.isfinite(loss)
    assert adapter.norm_out.weight.grad.abs().sum() > 0                     # only the LM loss reaches it


def test_frozen_llm_passes_gradient_to_the_audio_only():
    model = freeze(make_model(dtype=torch.float32))
    batch, y, am = audio_batch(model.cfg, "right", torch.float32)
    y.requires_grad_(True)
    _, loss = model(batch["input_ids"], batch["attention_mask"], audio_embeds=y, audio_mask=am,
                    labels=batch["labels"])
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert (y.grad[am].abs().sum(-1) > 0).all() and (y.grad[~am] == 0).all()


# ----------------------------------------------------------------------------------------------
# Loss on answer tokens only


def test_build_batch_layout_and_labels():
    cfg = small_cfg()
    out = build_batch([[7, 8], [9]], [[20, 21], [22]], [2, 1], cfg=cfg, padding_side="right")
    A, E = cfg.audio_token_id, cfg.eos_id
    assert out["input_ids"].tolist() == [[1, A, A, 7, 8, 20, 21, E], [1, A, 9, 22, E, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100] * 5 + [20, 21, E], [-100] * 3 + [22, E] + [-100] * 3]
    assert out["attention_mask"].sum(1).tolist() == [8, 5]
    left = build_batch([[7, 8], [9]], None, [2, 1], cfg=cfg, padding_side="left")
    assert left["input_ids"].tolist() == [[1, A, A, 7, 8], [0, 0, 1, A, 9]] and "labels" not in left


def test_loss_is_mean_nll_of_answer_tokens_and_ignores_the_rest():
    model = make_model()
    batch, y, am = audio_batch(model.cfg, "right")
    ids, real, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits, loss = model(ids, real, audio_embeds=y, audio_mask=am, labels=labels)
    # Hand computation: -log softmax at t-1 of the answer token at t, over answer tokens only.
    nll = [-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
           for b in range(3) for t in range(1, ids.shape[1]) if labels[b, t] != IGNORE_INDEX]
    assert len(nll) == 2 + 4 + 1 + 3                                        # answers + one EOS per row
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=0, atol=1e-12)
    # Positions whose target is BOS, audio, prompt or padding get exactly zero gradient.
    leaf = logits.detach().requires_grad_(True)
    lm_loss(leaf, labels).backward()
    carries = leaf.grad.abs().sum(-1) > 0                                   # (B, T)
    expected = torch.zeros_like(carries)
    expected[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert torch.equal(carries, expected)
    # Changing the prompt/audio labels from -100 to anything else would count them: the loss moves.
    other = labels.clone()
    other[0, 4] = 9
    assert not torch.allclose(lm_loss(logits, other), loss)


def test_tiny_model_overfits_and_reads_the_audio():
    """Same prompt, different audio -> different answers: the model must read the audio tokens.
    Then greedy generation reproduces every answer, each row stopping at its own EOS."""
    texts = ["what do you hear ?", "a dog barks", "rain on a window at night", "describe it .",
             "a man speaks", "silence"]
    tok = WordTokenizer.build(texts)
    cfg = LLMConfig(**tok.config_ids(), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=128, max_seq_len=32)
    model = LLM(cfg)
    prompts = [tok.encode(t) for t in ["what do you hear ?", "what do you hear ?", "describe it .",
                                       "describe it ."]]
    answers = [tok.encode(t) for t in ["a dog barks", "rain on a window at night", "a man speaks",
                                       "silence"]]
    n_audio = [3, 3, 2, 1]
    y = torch.randn(4, 3, cfg.d_model)
    am = torch.arange(3)[None] < torch.tensor(n_audio)[:, None]
    batch = build_batch(prompts, answers, n_audio, cfg=cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(batch["input_ids"], batch["attention_mask"], audio_embeds=y, audio_mask=am,
                        labels=batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    model.eval()
    gen = build_batch(prompts, None, n_audio, cfg=cfg, padding_side="left")
    out = model.generate(gen["input_ids"], gen["attention_mask"], audio_embeds=y, audio_mask=am,
                         max_new_tokens=12)
    longest = max(len(a) for a in answers) + 1
    assert out.shape == (4, longest)                                        # stopped when all ended
    for b, answer in enumerate(answers):
        n = len(answer)
        assert out[b, :n].tolist() == answer and out[b, n] == cfg.eos_id
        assert (out[b, n + 1:] == cfg.pad_id).all()                         # pad after its EOS
        assert tok.decode(out[b]) == tok.decode(answer)


# ----------------------------------------------------------------------------------------------
# Generation


def greedy_without_cache(model, ids, real, y, am, steps, eos):
    """Reference: re-run the whole sequence every step, argmax of the last position."""
    out, done = [], torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        logits, _ = model(ids, real, audio_embeds=y, audio_mask=am)
        scores = logits[:, -1].clone()
        scores[:, model.cfg.audio_token_id] = float("-inf")
        nxt = torch.where(done, torch.full_like(done, model.cfg.pad_id, dtype=torch.long), scores.argmax(-1))
        out.append(nxt)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], 1)
        real = torch.cat([real, torch.ones_like(real[:, :1])], 1)
        if done.all():
            break
    return torch.stack(out, 1)


def first_new_token(free):
    """(b, k, token) from an EOS-free generation (B, n): the first row b with a step k >= 1 whose
    token did not occur before in that row. Taking it as EOS makes row b stop after step k."""
    for b, row in enumerate(free.tolist()):
        for k in range(1, len(row)):
            if row[k] not in row[:k]:
                return b, k, row[k]
    raise AssertionError(f"every row repeats one token; pick another seed: {free.tolist()}")


def test_cached_greedy_generation_equals_uncached_loop():
    model = make_model()
    batch, y, am = audio_batch(model.cfg, "left")
    ids, real = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        free = twin(model, eos_id=None).generate(ids, real, audio_embeds=y, audio_mask=am, max_new_tokens=8)
        b, k, eos = first_new_token(free)
        got = model.generate(ids, real, audio_embeds=y, audio_mask=am, max_new_tokens=8, eos_id=eos)
        ref = greedy_without_cache(model, ids, real, y, am, 8, eos)
    assert torch.equal(got, ref)
    assert got[b, k] == eos and (got[b, k + 1:] == model.cfg.pad_id).all()
    assert got.shape[1] == 8                                                # another row went on


def test_generate_never_emits_the_audio_placeholder():
    model = make_model(small_cfg(audio_token_id=0, pad_id=3, eos_id=None))
    with torch.no_grad():
        model.norm.weight.zero_()                   # every logit 0: argmax alone would pick id 0
    out = model.generate(torch.tensor([[5, 6], [7, 8]]), max_new_tokens=3)
    assert out.tolist() == [[1, 1, 1], [1, 1, 1]]


# ----------------------------------------------------------------------------------------------
# Bad input and bad config


def _bad_calls():
    ids = torch.tensor([[1, 4, 9, 10]])                                      # 4: the audio placeholder
    two = torch.tensor([[5, 6]])
    y = lambda w=32: torch.randn(1, 1, w, dtype=torch.float64)              # noqa: E731
    return [
        (lambda m: m(torch.ones(1, 3)), "input_ids must be an integer tensor"),
        (lambda m: m(ids, audio_embeds=y(31)), r"audio_embeds must be \(B=1, T', d_model=32\)"),
        (lambda m: m(ids, audio_embeds=y(), audio_mask=torch.ones(1, 1)), "audio_mask must be a bool tensor"),
        (lambda m: m(torch.randint(5, 40, (1, 65))), "sequence of 65 tokens .* exceeds max_seq_len=64"),
        (lambda m: m(two, torch.ones(1, 3, dtype=torch.bool)),
         r"attention_mask must be a bool tensor \(B, T\) = \(1, 2\)"),
        (lambda m: m(two, torch.ones(1, 2)), "attention_mask must be a bool tensor"),
        (lambda m: m(two, labels=torch.tensor([[5]])), r"labels must have shape \(B, T\)"),
        (lambda m: m.generate(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1, 1], [1, 0]]).bool()),
         "generate needs left padding"),
        (lambda m: m.generate(two, max_new_tokens=63), "max_new_tokens=63 must be >= 1 and prompt"),
        (lambda m: m(torch.tensor([[5, 6, 7]]), cache=m.new_cache(1, 2)), "max_len=2 .* full"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_is_named(i):
    call, message = _bad_calls()[i]
    with pytest.raises(ValueError, match=message):
        call(make_model())


@pytest.mark.parametrize("kw, message", [
    (dict(n_heads=3, head_dim=8), "n_heads=3 must be a multiple of n_kv_heads=2"),
    (dict(d_model=30, n_heads=4, n_kv_heads=4), "d_model=30 is not divisible by n_heads=4"),
    (dict(head_dim=5), "head_dim must be even"),
    (dict(attn_impl="flash"), "attn_impl must be sdpa or math, got 'flash'"),
    (dict(audio_token_id=40), r"audio_token_id=40 must be in \[0, vocab_size=40\)"),
    (dict(n_layers=0), "n_layers must be >= 1"),
    (dict(audio_token_id=2), "audio_token_id=2 must differ from pad_id, bos_id, eos_id"),
    (dict(rope_theta=0.0), "rope_theta and norm_eps must be > 0"),
])
def test_bad_config_is_named(kw, message):
    with pytest.raises(ValueError, match=message):
        small_cfg(**kw)


def test_audio_without_placeholder_id_is_refused():
    model = make_model(small_cfg(audio_token_id=None))
    with pytest.raises(ValueError, match="audio_token_id is None"):
        model(torch.tensor([[5, 6]]), audio_embeds=torch.randn(1, 1, 32, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers as the reference (skipped without it; CI installs it)

HF_COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 initializer_range=0.1, rope_theta=5000.0, rms_norm_eps=1e-5)
HF_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=24)),
}


def hf_model(arch):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls, extra = HF_ARCHS[arch]
    config = getattr(transformers, config_cls)(**HF_COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():                                                   # non-trivial gains, biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def left_padded_ids(B=3, T=11):
    ids = torch.randint(0, 97, (B, T))
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :4] = False
    real[2, :7] = False
    return ids, real


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_matches_transformers_logits_and_greedy_generation(arch, tmp_path):
    pytest.importorskip("safetensors")
    hf = hf_model(arch)
    hf.save_pretrained(tmp_path)
    ours = load_llm(tmp_path)
    ours_math = load_llm(tmp_path, attn_impl="math")
    cfg = ours.cfg
    assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm, cfg.rope_theta, cfg.norm_eps) == (
        arch != "llama" and arch != "qwen3", arch == "llama_bias", arch == "qwen3", 5000.0, 1e-5)
    if hf.config.tie_word_embeddings:                                       # tied: no lm_head saved
        from safetensors import safe_open
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
        assert ours.lm_head.weight is ours.embed_tokens.weight
    ids, real = left_padded_ids()
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=real.long(), position_ids=positions).logits
        got, _ = ours(ids, real)
        got_math, _ = ours_math(ids, real)
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_math[real], ref[real], rtol=0, atol=1e-5)
    # Greedy generation, batched and left-padded; EOS picked so that row 0 stops early.
    free = twin(ours, eos_id=None).generate(ids, real, max_new_tokens=8)
    b, k, eos = first_new_token(free)
    mine = ours.generate(ids, real, max_new_tokens=8, eos_id=eos)
    theirs = hf.generate(ids, attention_mask=real.long(), max_new_tokens=8, do_sample=False,
                         eos_token_id=eos, pad_token_id=cfg.pad_id if cfg.pad_id is not None else eos)
    assert torch.equal(mine, theirs[:, ids.shape[1]:])
    assert mine[b, k] == eos


def test_load_sharded_bin_and_state_dict_forms_agree(tmp_path):
    pytest.importorskip("safetensors")
    hf = hf_model("qwen3")
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    os.makedirs(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "weights.bin")
    with open(tmp_path / "one" / "config.json") as src, open(tmp_path / "bin" / "config.json", "w") as dst:
        json.dump(json.load(src), dst)
    sd = hf.state_dict()
    ids, real = left_padded_ids()
    ref = load_llm(tmp_path / "one")(ids, real)[0]
    for model in (load_llm(tmp_path / "sharded" / "model.safetensors.index.json"),
                  load_llm(tmp_path / "sharded"),
                  load_llm(tmp_path / "bin" / "weights.bin"),
                  load_llm(sd, json.load(open(tmp_path / "one" / "config.json")))):   # a state dict and its config
        assert (model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.head_dim) == (4, 2, 24)
        torch.testing.assert_close(model(ids, real)[0], ref, rtol=0, atol=0)


def test_state_dict_needs_a_config():
    hf = hf_model("llama")
    sd = hf.state_dict()
    with pytest.raises(ValueError, match="no config.json beside the weights; pass config"):
        load_llm(sd)
    model = load_llm(sd, hf.config.to_dict())
    assert (model.cfg.n_kv_heads, model.cfg.head_dim, model.cfg.tie_embeddings) == (2, 16, False)
    ids, real = left_padded_ids()
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=real.long(), position_ids=positions).logits
    torch.testing.assert_close(model(ids, real)[0][real], ref[real], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Loading: errors by name, tied embeddings, our own checkpoints


def test_load_reports_missing_unexpected_and_wrong_shaped_keys_by_name():
    cfg = small_cfg()
    sd = {f"model.{k}" if k != "lm_head.weight" else k: v for k, v in LLM(cfg).state_dict().items()}
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(17, 32)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)    # old HF buffer: ignored
    with pytest.raises(ValueError) as err:
        load_llm(sd, cfg)
    msg = str(err.value)
    assert "1 missing from the checkpoint:\n    layers.1.mlp.up_proj.weight\n" in msg
    assert "1 unexpected in the checkpoint:\n    layers.0.self_attn.extra.weight\n" in msg
    assert "wrong shape:\n    layers.0.self_attn.k_proj.weight: checkpoint (17, 32) vs model (16, 32)" in msg
    assert "inv_freq" not in msg


def test_our_checkpoint_round_trips_with_tied_embeddings():
    cfg = small_cfg(tie_embeddings=True)
    model = make_model(cfg, torch.float32)
    record = dict(model=model.state_dict(), config=asdict(cfg))            # what a checkpoint holds
    assert LLMConfig(**record["config"]) == cfg
    loaded = load_llm(record["model"], record["config"])
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = random_ids(2, 6, cfg)
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
    bad = dict(record["model"])
    bad["lm_head.weight"] = bad["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="own lm_head.weight but the config ties it"):
        load_llm(bad, record["config"])


@pytest.mark.parametrize("change, message", [
    (dict(model_type="mistral"), "not supported: model_type .mistral.; expected one of .*llama"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "not supported: RoPE type 'llama3'"),
    (dict(use_sliding_window=True), "not supported: use_sliding_window=True"),
    (dict(hidden_act="gelu"), "not supported: hidden_act 'gelu'"),
    (dict(mlp_bias=True), "not supported: mlp_bias=True"),
])
def test_unsupported_hf_configs_are_refused_by_name(change, message):
    hf = dict(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=112,
              num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match=message):
        config_from_hf({**hf, **change})


def test_config_from_hf_reads_both_rope_formats_and_eos_lists():
    hf = dict(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=112,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              eos_token_id=[7, 8], rope_theta=123.0)
    cfg = config_from_hf(hf)
    assert (cfg.rope_theta, cfg.eos_id, cfg.qkv_bias, cfg.n_kv_heads, cfg.head_dim) == (123.0, 7, True, 2, 16)
    hf2 = {**hf, "rope_parameters": dict(rope_type="default", rope_theta=456.0)}
    assert config_from_hf(hf2, audio_token_id=9).rope_theta == 456.0
    assert cfg.audio_token_id is None and config_from_hf({**hf, "audio_token_id": 11}).audio_token_id == 11


# ----------------------------------------------------------------------------------------------
# LoRA and freezing


def test_lora_at_initialisation_leaves_outputs_unchanged():
    model = make_model()
    ids = random_ids(2, 7, model.cfg)
    with torch.no_grad():
        before, _ = model(ids)
        names = add_lora(model, rank=4, alpha=8.0, targets=llm.LORA_TARGETS)
        after, _ = model(ids)
    assert len(names) == 2 * 4
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_lora_layer_is_base_plus_scaled_BA():
    base = torch.nn.Linear(6, 5).double()
    lora = LoRALinear(base, rank=3, alpha=6.0)
    assert (lora.lora_B == 0).all() and lora.weight is base.weight
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    ref = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), ref, rtol=0, atol=1e-12)
    model = make_model()
    add_lora(model, rank=2, targets=("k_proj", "o_proj"))
    assert isinstance(model.layers[0].self_attn.k_proj, LoRALinear)
    assert not isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['w_up'\]"):
        add_lora(model, targets=("q_proj", "w_up"))


def test_freezing_leaves_only_the_intended_parameters_trainable():
    model = make_model(small_cfg(tie_embeddings=True), torch.float32)
    add_lora(model, rank=2)                                                 # q and v by default
    names = mark_trainable(model)
    expected = sorted(f"layers.{i}.self_attn.{p}_proj.lora_{m}" for i in range(2) for p in "qv" for m in "AB")
    assert names == expected
    assert mark_trainable(model, extra=("norm",)) == sorted(expected + ["norm.weight"])
    assert mark_trainable(model, lora=False, extra=("embed_tokens",)) == ["embed_tokens.weight"]
    assert model.lm_head.weight.requires_grad                              # tied: the same tensor
    with pytest.raises(ValueError, match="module path 'head' matches no parameter"):
        mark_trainable(model, extra=("head",))
    with pytest.raises(ValueError, match="no LoRA layer"):
        mark_trainable(make_model(), lora=True)
    # One optimiser step moves exactly the trainable tensors.
    mark_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = random_ids(2, 6, model.cfg)
    labels = ids.clone()
    for _ in range(2):                                                     # step 1 moves B, step 2 A
        _, loss = model(ids, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == expected


# ----------------------------------------------------------------------------------------------
# Tokenizers


def test_word_tokenizer_build_encode_decode_round_trip():
    tok = WordTokenizer.build(["The dog barks.", "the cat", "A dog!"])
    assert tok.itos[:5] == list(llm.SPECIAL_TOKENS)
    assert tok.itos[5:] == ["dog", "the", "!", ".", "a", "barks", "cat"]   # by count, then a-z
    ids = tok.encode("the dog meows .", bos=True, eos=True)
    assert ids == [1, 6, 5, tok.unk_id, 8, 2]
    assert tok.decode(ids) == "the dog <unk> ."
    assert tok.encode("<audio>") == [tok.unk_id] * 3                        # "<", "audio", ">"
    again = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))  # as a checkpoint holds it
    assert again.itos == tok.itos and again.encode("A cat barks") == tok.encode("A cat barks")
    cfg = LLMConfig(**tok.config_ids())
    assert (cfg.vocab_size, cfg.audio_token_id, cfg.eos_id) == (12, 4, 2)
    assert WordTokenizer.build(["a b a c a b"], min_count=2).itos[5:] == ["a", "b"]
    with pytest.raises(ValueError, match="not a WordTokenizer record"):
        WordTokenizer.from_dict({"format": "bpe"})


def test_hf_tokenizer_wrapper_reads_a_local_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<AUDIO>": 5}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.add_special_tokens(["<s>", "</s>", "<AUDIO>"])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(str(tmp_path), bos="<s>", eos="</s>", audio="<AUDIO>")
    assert tok.encode("hello world", bos=True, eos=True) == [1, 3, 4, 2]
    assert tok.decode([1, 3, 4, 2]) == "hello world"
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.audio_id) == (None, 1, 2, 5)
    assert tok.vocab_size == 6
    with pytest.raises(ValueError, match="pad token '<pad>' is not in the vocabulary"):
        HFTokenizer(str(tmp_path), pad="<pad>")


# ----------------------------------------------------------------------------------------------
# Presets and the file itself


def test_paper_preset_reproduces_the_published_parameter_counts():
    """Qwen3-1.7B's model card: 1.7B total, 1.4B non-embedding (tied lm_head counted once)."""
    with torch.device("meta"):
        model = LLM(LLMConfig.preset("qwen3_1_7b"))
    n = sum(p.numel() for p in model.parameters())                          # a tied lm_head once
    assert round(n / 1e9, 1) == 1.7 and round((n - model.embed_tokens.weight.numel()) / 1e9, 1) == 1.4


def test_paper_llm_width_matches_the_moe_adapter_output():
    from moe_adapter import MoEAdapterConfig
    assert LLMConfig.preset("qwen3_1_7b").d_model == MoEAdapterConfig.paper().d_out == 2048
    with pytest.raises(ValueError, match="unknown LLM preset 'gpt2'"):
        LLMConfig.preset("gpt2")


def test_imports_only_torch_and_stdlib():
    """llm.py stands alone (torch + stdlib, no hf.py); the optional packages load only in hf.py."""
    assert imported_packages(os.path.join(ROOT, "llm.py")) == {"torch"}
    code = ("import sys, llm; print([m for m in ('hf', 'transformers', 'safetensors', 'tokenizers') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_generates_in_bf16():
    model = make_model(dtype=torch.float32)
    batch, y, am = audio_batch(model.cfg, "left", torch.float32)
    args = (batch["input_ids"], batch["attention_mask"])
    cpu, _ = model(*args, audio_embeds=y, audio_mask=am)
    gpu, _ = model.cuda()(*(a.cuda() for a in args), audio_embeds=y.cuda(), audio_mask=am.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
    out = model.to(torch.bfloat16).generate(*(a.cuda() for a in args), audio_embeds=y.cuda(),
                                            audio_mask=am.cuda(), max_new_tokens=4)
    assert out.shape[0] == 3 and out.device.type == "cuda"
