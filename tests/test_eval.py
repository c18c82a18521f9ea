"""eval.py against independent references: closed-set scoring against one LLM call per choice,
accuracy and cosine tables by hand, expert shares against a per-clip loop."""
import json
import math
import os
import shutil

import pytest
import torch

import eval as E
import llm as lm
import loop
import train


@pytest.fixture(scope="module")
def parts(micro_run):
    return E.load_parts(micro_run)


def test_closed_set_picks_the_choice_a_plain_llm_call_finds_most_likely(micro_run, parts):
    model = E.load_model(os.path.join(micro_run, "moe-s0"), parts)
    d, tok, ctx = parts["test"], parts["tok"], loop.Ctx(torch.device("cpu"))
    n = min(len(d), 24)
    sub = train.AdapterData(d.items[:n], d.features, tok, d.domains)
    got = E.closed_set(model, sub, tok, ctx, batch=7)
    for i in range(n):
        it = d.items[i]
        x, m = d.features(torch.tensor([it["index"]]), "cpu")
        with torch.no_grad():
            y, aux = model.adapter(x, m)
            nll = []
            for c in it["choices"]:
                b = lm.build_batch([sub.prompts[i]], [tok.encode(c)], aux["mask"].sum(1).tolist(), cfg=model.llm.cfg)
                _, loss = model.llm(b["input_ids"], b["attention_mask"], audio_embeds=y, audio_mask=aux["mask"],
                                    labels=b["labels"])
                nll.append(loss.item() * int((b["labels"] != -100).sum()))   # mean -> sum over answer + EOS
        assert got[i] == min(range(len(nll)), key=nll.__getitem__)


def test_accuracy_by_hand():
    class Tok:
        encode = staticmethod(lambda s: s.split())
        decode = staticmethod(lambda ids: " ".join(ids))
    items = [dict(task="word", group="semantic", answer="yes", answer_index=0),
             dict(task="word", group="semantic", answer="no", answer_index=1),
             dict(task="rate", group="paralinguistic", answer="slow", answer_index=2)]
    acc = E.accuracy(items, closed=[0, 0, 2], answers=["yes", "no", "fast"], tok=Tok())
    assert acc["tasks"]["word"] == dict(group="semantic", n=2, closed=0.5, exact=1.0)
    assert acc["semantic_closed"] == 0.5 and acc["paralinguistic_closed"] == 1.0
    assert acc["all_closed"] == 0.75 and acc["all_exact"] == 0.5              # macro over tasks


def test_cosine_table_by_hand():
    t = E.cosine_table({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0]),
                        "c": torch.tensor([-3.0, 0.0])})
    assert t["pairs"] == pytest.approx({"a|b": 0.0, "a|c": -1.0, "b|c": 0.0})
    assert t["mean"] == pytest.approx(-1 / 3) and t["conflict"] == pytest.approx(1 / 3)


def test_expert_usage_matches_a_per_clip_loop(micro_run, parts):
    model = E.load_model(os.path.join(micro_run, "moe-s0"), parts)
    d = parts["test"]
    usage = E.expert_usage(model, d, loop.Ctx(torch.device("cpu")), batch=5)
    E_ = model.adapter.cfg.n_experts
    ref = {}
    for j in sorted(set(d.clip.tolist())):
        with torch.no_grad():
            _, aux = model.adapter(*d.features(torch.tensor([j]), "cpu"))
        idx = aux["expert_index"][aux["expert_index"] >= 0]
        ref[d.domains[j]] = ref.get(d.domains[j], 0) + torch.bincount(idx, minlength=E_).double()
    for dom, counts in ref.items():
        torch.testing.assert_close(torch.tensor(usage["domain"][dom], dtype=torch.float64), counts / counts.sum())
    for shares in usage["task"].values():
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-9)


def test_evaluate_run_writes_every_analysis(micro_run, parts):
    run = os.path.join(micro_run, "moe-s0")
    res = E.evaluate_run(run, parts=parts, ctx=loop.Ctx(torch.device("cpu")))
    saved = json.load(open(os.path.join(run, "eval.json")))
    assert saved["kind"] == "moe" and set(saved["gradient_conflict"]) == {"task", "domain"}
    # The paper's three domains only: no pair with the mixtures.
    assert set(res["gradient_conflict"]["domain"]["pairs"]) <= set(E.DOMAIN_PAIRS)
    assert set(res["expert_usage"]) == {"domain", "task"}
    # One task-pair cosine by another route: the LLM's own mean loss, a dot product over norms.
    model, d = E.load_model(run, parts), parts["train"]
    groups = E.fixed_groups(d, "task", 64)
    a, b = sorted(groups)[:2]
    params = list(model.adapter.parameters())
    grads = []
    for name in (a, b):
        feats, fmask, prompts, answers = d.batch(torch.tensor(groups[name]), "cpu")
        for p in params:
            p.requires_grad_(True)
        y, aux = model.adapter(feats, fmask)
        batch = lm.build_batch(prompts, answers, aux["mask"].sum(1).tolist(), cfg=model.llm.cfg)
        _, loss = model.llm(batch["input_ids"], batch["attention_mask"], audio_embeds=y, audio_mask=aux["mask"],
                            labels=batch["labels"])
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(g, params)]))
    cos = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    assert res["gradient_conflict"]["task"]["pairs"][f"{a}|{b}"] == pytest.approx(cos, abs=1e-4)
    text = E.compare(micro_run, [run])
    assert "| moe | 1 |" in text and os.path.exists(os.path.join(micro_run, "comparison.json"))


def _fake_eval(run_dir, kind, seed, sem, para):
    os.makedirs(run_dir)
    conflict = dict(mean=0.5, pairs={"music|speech": 0.5})
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(dict(kind=kind, seed=seed, params=dict(total=10, active=5, flops_per_token=2e6),
                       semantic_closed=sem, paralinguistic_closed=para, all_closed=(sem + para) / 2,
                       all_exact=0.0, ms_per_step=1.0, gradient_conflict=dict(task=conflict, domain=conflict),
                       tasks=dict(word=dict(closed=sem), rate=dict(closed=para))), f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(dict(step=1, ce=1.0, valid_loss=1.0)) + "\n")


def test_comparison_tables_against_hand_computed_means_and_paired_margins(tmp_path):
    runs = []
    for kind, sems, paras in (("moe", (0.5, 0.7), (0.25, 0.25)), ("dense-flops", (0.4, 0.5), (0.5, 0.0))):
        for seed, (sem, para) in enumerate(zip(sems, paras)):
            runs.append(str(tmp_path / f"{kind}-s{seed}"))
            _fake_eval(runs[-1], kind, seed, sem, para)
    text = E.compare(str(tmp_path), runs)
    # moe: semantic 0.5, 0.7 -> mean 0.6, sample std 0.1414; paralinguistic 0.25, 0.25 -> 0.25 +- 0.
    assert "| moe | 2 | 10 / 5 | 2.000 | 0.600 ± 0.141 | 0.250 ± 0.000 |" in text
    # moe - dense-flops, paired by seed: semantic +0.1, +0.2 -> +0.150 +- 0.071, both won;
    # paralinguistic -0.25, +0.25 -> +0.000 +- 0.354, one won.
    assert "| moe − dense-flops | +0.150 ± 0.071 | +0.000 ± 0.354 |" in text and "| 2/2 / 1/2 |" in text
    table = json.load(open(tmp_path / "comparison.json"))
    assert table["paired"]["moe - dense-flops"]["semantic"]["diffs"] == pytest.approx([0.1, 0.2])
    assert "| word | semantic | 0.600 ± 0.141 | 0.450 ± 0.071 |" in text


def test_cli_runs_option_scores_and_compares_only_the_named_runs(micro_run):
    """train.py's `all` calls `eval.py OUT_DIR --force --runs=...`: other runs in the folder stay out."""
    other = os.path.join(micro_run, "moe-s9")                  # a finished run (summary.json) never scored
    shutil.copytree(os.path.join(micro_run, "moe-s0"), other, ignore=shutil.ignore_patterns("eval.json"))
    try:
        E.main([micro_run, "--force", "--runs=moe-s0"])
        assert not os.path.exists(os.path.join(other, "eval.json"))
        assert json.load(open(os.path.join(micro_run, "comparison.json")))["kinds"]["moe"]["seeds"] == [0]
    finally:
        shutil.rmtree(other)


def test_cli_names_bad_folders(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        E.main([str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no finished run"):
        E.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown option"):
        E.main([str(tmp_path), "--fast"])


def test_paired_differences_by_hand():
    moe = [dict(seed=s, x=v) for s, v in ((0, 0.5), (1, 0.7), (2, 0.4))]
    dense = [dict(seed=s, x=v) for s, v in ((0, 0.4), (1, 0.7), (3, 0.9))]    # seed 2 vs 3: unpaired
    p = E.paired(moe, dense, "x")
    assert p["n"] == 2 and p["wins"] == 1                       # +0.1 wins, 0.0 does not
    assert p["mean"] == pytest.approx(0.05) and p["std"] == pytest.approx(0.1 / 2 ** 0.5)


def test_text_ceiling_reads_the_clip_labels_before_the_question():
    items = [dict(index=3, task="word", answer="yes", question="Which word?"),
             dict(index=3, task="emotion", answer="sad", question="How?")]
    got = E.with_facts(items)
    assert [g["question"] for g in got] == ["yes sad. Which word?", "yes sad. How?"] and got[0]["answer"] == "yes"


def test_pooled_features_are_the_mean_over_real_frames(parts):
    x = E.pooled(parts, "test", "encoder")
    feats, mask = parts["test"].features(torch.tensor([0, 1]), "cpu")
    for j in range(2):
        torch.testing.assert_close(x[j], feats[j][mask[j]].mean(0))
    mel = E.pooled(parts, "test", "log-mel")
    m, frames = parts["mels"]["test"].batch(torch.tensor([0]))
    torch.testing.assert_close(mel[0], m[0, :, :int(frames[0])].float().mean(1))
