"""Evaluate train.py's adapter runs and compare them: the MoE-Adapter paper's results and analyses
(Lei et al., arXiv 2601.02967) at the scale the runs were trained at.

    python eval.py runs/tiny                  # evaluate every run in the folder, print the comparison
    python eval.py runs/tiny/moe-s0           # one run: accuracy, expert use, gradient conflict
    python eval.py runs/tiny --force          # evaluate again even where eval.json exists
    python eval.py runs/tiny --runs=moe-s0,moe-s1     # only these runs of the folder, and their comparison

train_moa.py's Soft-MoA runs are scored by eval_moa.py, which imports this file's plotting helpers.

Per run (eval.json in the run folder), on the model with the lowest validation loss (best.pt):
- Accuracy per task on the held-out test split, two ways: greedy decoding, exact match of the
  answer text (the paper's protocol), and closed-set scoring, the choice whose answer tokens + EOS
  the model finds most likely. Grouped into semantic and paralinguistic (macro average of tasks).
- Expert specialisation (the paper's Fig. 3): share of each domain's and each task's audio
  token-slots routed to each expert, on the test clips; a heatmap PNG when matplotlib is installed.
- Gradient conflict (the paper's Figs. 4-5): for each task (and each of the domains speech, music,
  environment), the gradient of the answer loss on a fixed batch of training questions with
  respect to the adapter's parameters; the pairwise cosine similarities, their mean, and the share
  of pairs that conflict (cosine < 0), on the trained model.
Per folder (floors.json): chance, a linear probe per task on the frozen encoder's mean-pooled
features and on the mean log-mel, and the text ceiling (the LLM reading the true label words).
The comparison (comparison.md / .json) puts them above mean +/- std over seeds per adapter kind,
then each MoE kind minus every other kind paired by seed; training curves when matplotlib is installed.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

import llm as lm
import loop
import train
from moe_adapter import ADAPTER_KINDS, build_adapter

GROUPS = ("semantic", "paralinguistic")


# ----------------------------------------------------------------------------------------------
# Loading


def load_parts(out_dir: str, ctx: Optional[loop.Ctx] = None) -> dict:
    """The frozen encoder, LLM and encoder features (cached, or live) of an output folder
    (nothing is retrained)."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"{out_dir}: no config.json; expected a folder written by train.py")
    with open(path) as f:
        cfg = train.TrainConfig(**json.load(f))
    ctx = ctx or loop.make_ctx(cfg.device, cfg.dtype)
    return train.prepare(cfg, ctx, resume=False)


def load_model(run_dir: str, parts: dict, which: str = "best.pt") -> train.AudioLLM:
    """The run's adapter and its LLM (fine-tuned weights or LoRA, if the run tuned the LLM) from
    `which` (best.pt or last.pt). parts["llm"] is left as it is."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    from moe_adapter import MoEAdapterConfig
    adapter = build_adapter(summary["kind"], MoEAdapterConfig(**summary["adapter_config"]))
    llm_model = copy.deepcopy(parts["llm"])
    state = loop.load(os.path.join(run_dir, which))
    state = state.get("model", state)                          # last.pt wraps it with the optimiser
    adapter.load_state_dict(state["adapter"])
    if "llm" in state:
        llm_model.load_state_dict(state["llm"])
    elif "lora" in state:
        lm.add_lora(llm_model, rank=summary["config"]["lora_rank"])
        llm_model.load_state_dict(state["lora"], strict=False)
    device = next(parts["llm"].parameters()).device
    return train.AudioLLM(adapter.to(device), lm.freeze(llm_model).to(device)).eval()


# ----------------------------------------------------------------------------------------------
# Accuracy


@torch.no_grad()
def closed_set(model: train.AudioLLM, d: train.AdapterData, tok, ctx, batch: int = 64) -> List[int]:
    """Index of the most likely choice per question: sum of log p(answer tokens, EOS | audio, prompt)."""
    preds = []
    choice_ids = {}
    for i0 in range(0, len(d), batch):
        idx = torch.arange(i0, min(i0 + batch, len(d)))
        feats, fmask, prompts, _ = d.batch(idx, ctx.device)
        rows, owner = [], []
        for b, i in enumerate(idx.tolist()):
            ch = d.items[i]["choices"]
            key = tuple(ch)
            if key not in choice_ids:
                choice_ids[key] = [tok.encode(c) for c in ch]
            rows += [(prompts[b], a) for a in choice_ids[key]]
            owner += [b] * len(ch)
        owner = torch.tensor(owner, device=ctx.device)
        with ctx.autocast():
            logits, labels, _, _ = model(feats[owner], fmask[owner], [r[0] for r in rows], [r[1] for r in rows])
        logp = logits[:, :-1].float().log_softmax(-1)                               # (R, N-1, V)
        target = labels[:, 1:]
        keep = target != train.IGNORE_INDEX
        tok_lp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * keep    # (R, N-1)
        score = tok_lp.sum(1).cpu()                                                 # (R,)
        start = 0
        for b, i in enumerate(idx.tolist()):
            n = len(d.items[i]["choices"])
            preds.append(int(score[start:start + n].argmax()))
            start += n
    return preds


@torch.no_grad()
def greedy(model: train.AudioLLM, d: train.AdapterData, tok, ctx, batch: int = 128) -> List[str]:
    """Greedy answers (KV-cached decoding), as text."""
    max_new = max(len(a) for a in d.answers) + 2
    out = []
    for i0 in range(0, len(d), batch):
        idx = torch.arange(i0, min(i0 + batch, len(d)))
        feats, fmask, prompts, _ = d.batch(idx, ctx.device)
        with ctx.autocast():
            y, aux = model.adapter(feats, fmask)
            b = lm.build_batch(prompts, None, aux["mask"].sum(1).tolist(), cfg=model.llm.cfg,
                               padding_side="left", device=ctx.device)
            new = model.llm.generate(b["input_ids"], b["attention_mask"], audio_embeds=y,
                                     audio_mask=aux["mask"], max_new_tokens=max_new)
        out += [tok.decode(row.tolist()) for row in new]
    return out


def accuracy(items: List[dict], closed: List[int], answers: List[str], tok) -> dict:
    """Per-task closed-set and exact-match accuracy; per-group and overall macro averages."""
    per = {}
    for it, c, a in zip(items, closed, answers):
        r = per.setdefault(it["task"], dict(group=it["group"], n=0, closed=0, exact=0))
        r["n"] += 1
        r["closed"] += int(c == it["answer_index"])
        r["exact"] += int(a == tok.decode(tok.encode(it["answer"])))
    for r in per.values():
        r["closed"] /= r["n"]
        r["exact"] /= r["n"]
    out = dict(tasks=per)
    for g in GROUPS + ("all",):
        rows = [r for r in per.values() if g in ("all", r["group"])]
        for m in ("closed", "exact"):
            out[f"{g}_{m}"] = statistics.mean(r[m] for r in rows) if rows else math.nan
    return out


# ----------------------------------------------------------------------------------------------
# Floors and ceilings: what a reader compares the adapters against, on the same test questions


class TextOnly(nn.Module):
    """The text ceiling: the pre-trained LLM (never tuned on audio) reads the clip's true label
    words (train.caption) where the audio would be; called like AudioLLM, the features unused."""

    def __init__(self, llm_model: lm.LLM):
        super().__init__()
        self.llm = llm_model

    def forward(self, feats, fmask, prompts, answers=None):
        b = lm.build_batch(prompts, answers, cfg=self.llm.cfg, device=feats.device)
        logits, _ = self.llm(b["input_ids"], b["attention_mask"])
        return logits, b.get("labels"), {}, b


def with_facts(items: List[dict]) -> List[dict]:
    """The same questions, each after the true label words of its clip (the LLM's text format)."""
    facts = train.clip_labels(items)
    return [dict(it, question=f"{train.caption(facts[it['index']])}. {it['question']}",
                 prompt=f"{train.caption(facts[it['index']])}. {it['prompt']}") for it in items]


def pooled(parts: dict, split: str, what: str, batch: int = 256) -> torch.Tensor:
    """(N_clips, d) mean over real frames of every clip of a split: the frozen encoder's features
    (what the adapter sees) or the log-mel (F bins) that the encoder reads."""
    out = []
    n = len(parts["domains"][split])
    for i0 in range(0, n, batch):
        j = torch.arange(i0, min(i0 + batch, n))
        if what == "encoder":
            x, m = parts[split].clip_features(j, "cpu")                            # (B, T', d), (B, T')
        else:
            mel, frames = parts["mels"][split].batch(j)                            # (B, F, T), (B,)
            x = mel.float().transpose(1, 2)
            m = torch.arange(x.shape[1])[None, :] < frames[:, None]
        m = m.float()[..., None]
        out.append((x.float() * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out)


def probe(parts: dict, what: str) -> Dict[str, float]:
    """Test accuracy per task of a logistic regression (data.probe_accuracy) on pooled features,
    fitted on the train split's clips of that task."""
    x = {s: pooled(parts, s, what) for s in ("train", "test")}
    acc = {}
    for task in sorted({it["task"] for it in parts["test"].items}):
        xy = {}
        for s in ("train", "test"):
            its = [it for it in parts[s].items if it["task"] == task]
            xy[s] = (x[s][[it["index"] for it in its]], torch.tensor([it["answer_index"] for it in its]))
        n_classes = len(next(it for it in parts["test"].items if it["task"] == task)["choices"])
        acc[task] = data.probe_accuracy(xy["train"], xy["test"], n_classes)
    return acc


def macro(per_task: Dict[str, float]) -> dict:
    """{"tasks": per task, "semantic", "paralinguistic", "all"}: macro averages over tasks."""
    out = dict(tasks=per_task)
    for g in GROUPS + ("all",):
        vals = [a for t, a in per_task.items() if g == "all" or data.TASKS[t].group == g]
        out[g] = statistics.mean(vals) if vals else math.nan
    return out


def floors(out_dir: str, parts: dict, ctx) -> dict:
    """chance (1 / answer-set size), the two linear probes and the text ceiling, on the test split;
    computed once per out_dir (floors.json)."""
    path = os.path.join(out_dir, "floors.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    test, tok = parts["test"], parts["tok"]
    chance = {}
    for it in test.items:
        chance[it["task"]] = 1.0 / len(it["choices"])
    text_data = train.AdapterData(with_facts(test.items), test.features, tok, parts["cfg"].prompt, test.domains)
    model = TextOnly(parts["llm"]).eval()
    res = accuracy(text_data.items, closed_set(model, text_data, tok, ctx), [""] * len(test), tok)
    out = {"chance": macro(chance), "probe: log-mel": macro(probe(parts, "log-mel")),
           "probe: encoder": macro(probe(parts, "encoder")),
           "text ceiling": macro({t: r["closed"] for t, r in res["tasks"].items()})}
    loop.write_json(out, path)
    return out


# ----------------------------------------------------------------------------------------------
# Expert specialisation


@torch.no_grad()
def expert_usage(model: train.AudioLLM, d: train.AdapterData, ctx, batch: int = 256) -> Optional[dict]:
    """{"domain": {name: (E,) shares}, "task": {name: (E,) shares}}: of the audio token-slots of
    each domain's test clips (each task's questions), the share routed to each expert. None for a
    dense adapter (one expert by construction)."""
    cfg = getattr(model.adapter, "cfg", None)
    if cfg is None or not cfg.n_experts:
        return None
    E = cfg.n_experts
    clips = sorted(set(d.clip.tolist()))
    per_clip = {}
    for i0 in range(0, len(clips), batch):
        j = torch.tensor(clips[i0:i0 + batch])
        with ctx.autocast():
            _, aux = model.adapter(*d.clip_features(j, ctx.device))
        index = aux["expert_index"].cpu()                                           # (B, N_a, k)
        for b, jj in enumerate(j.tolist()):
            sel = index[b][index[b] >= 0]
            per_clip[jj] = torch.bincount(sel, minlength=E).double()                # (E,) slot counts
    by_domain, by_task = {}, {}
    for jj, counts in per_clip.items():
        dom = d.domains[jj]
        by_domain[dom] = by_domain.get(dom, 0) + counts
    for it in d.items:
        by_task[it["task"]] = by_task.get(it["task"], 0) + per_clip[it["index"]]
    share = lambda table: {k: (v / v.sum()).tolist() for k, v in sorted(table.items())}
    return dict(domain=share(by_domain), task=share(by_task))


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib (plots are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _usage_panel(fig, ax, m: torch.Tensor, rows: List[str], prefix: str, title: str,
                 row_text: Optional[dict] = None, title_text: Optional[dict] = None) -> None:
    """One usage heatmap: rows x experts (named prefix0, prefix1, ...), with its colour bar."""
    im = ax.imshow(m.numpy(), cmap="viridis", vmin=0, aspect="auto")        # numpy: no __array__ warning
    ax.set_yticks(range(len(rows)), rows, **(row_text or {}))
    ax.set_xticks(range(m.shape[1]), [f"{prefix}{e}" for e in range(m.shape[1])])
    ax.set_title(title, **(title_text or {}))
    fig.colorbar(im, ax=ax, fraction=0.04)


def _save(plt, fig, path: str, title: Optional[str] = None) -> str:
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(usage: dict, path: str, title: str) -> Optional[str]:
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[1, 2]))
    for ax, key in zip(axes, ("domain", "task")):
        names = list(usage[key])
        _usage_panel(fig, ax, torch.tensor([usage[key][n] for n in names]), names, "e",
                     f"share of {key} token-slots per expert")
    return _save(plt, fig, path, title)


# ----------------------------------------------------------------------------------------------
# Gradient conflict


def group_gradients(model: train.AudioLLM, d: train.AdapterData, groups: Dict[str, List[int]], ctx) -> Dict[str, torch.Tensor]:
    """Flattened gradient of each group's mean answer loss w.r.t. the adapter's parameters."""
    params = [p for p in model.adapter.parameters()]
    grads = {}
    for name, idx in groups.items():
        feats, fmask, prompts, answers = d.batch(torch.tensor(idx), ctx.device)
        with torch.enable_grad(), ctx.autocast():
            for p in params:
                p.requires_grad_(True)
            logits, labels, _, _ = model(feats, fmask, prompts, answers)
            ce, n = train.token_ce(logits, labels)
            g = torch.autograd.grad(ce / n, params, allow_unused=True)
        grads[name] = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1).float()
                                 for gi, p in zip(g, params)])
    return grads


def cosine_table(grads: Dict[str, torch.Tensor]) -> dict:
    """Pairwise cosines, their mean and the share of conflicting (negative) pairs."""
    pairs = {}
    for a, b in itertools.combinations(sorted(grads), 2):
        pairs[f"{a}|{b}"] = float(F.cosine_similarity(grads[a], grads[b], dim=0))
    vals = list(pairs.values())
    return dict(pairs=pairs, mean=statistics.mean(vals) if vals else math.nan,
                conflict=sum(v < 0 for v in vals) / len(vals) if vals else math.nan)


def fixed_groups(d: train.AdapterData, key: str, n: int, seed: int = 0) -> Dict[str, List[int]]:
    """The first n questions of each task (key="task") or clip domain (key="domain") in a fixed
    shuffled order of the split: the same batches for every run."""
    order = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed)).tolist()
    out: Dict[str, List[int]] = {}
    for i in order:
        name = d.items[i]["task"] if key == "task" else d.domains[d.items[i]["index"]]
        if len(out.setdefault(name, [])) < n:
            out[name].append(i)
    return {k: v for k, v in out.items() if len(v) >= max(2, n // 4)}


def gradient_conflict(model: train.AudioLLM, parts: dict, ctx, n: int = 64) -> dict:
    """Cosine tables of the trained model's adapter gradients, between tasks and between the
    paper's three domains (speech, music, environment; mixtures left out), on fixed batches of
    n training questions each."""
    d = parts["train"]
    groups = {key: fixed_groups(d, key, n) for key in ("task", "domain")}
    groups["domain"].pop("mixture", None)
    return {key: cosine_table(group_gradients(model, d, g, ctx)) for key, g in groups.items()}


# ----------------------------------------------------------------------------------------------
# One run, and the comparison


def evaluate_run(run_dir: str, parts: Optional[dict] = None, ctx=None, force: bool = True) -> dict:
    """Score one run and write eval.json (and expert_usage.png for an MoE) into its folder."""
    path = os.path.join(run_dir, "eval.json")
    if not force and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        raise SystemExit(f"{run_dir}: no summary.json; the run has not finished (train.py --resume)")
    parts = parts or load_parts(os.path.dirname(os.path.abspath(run_dir)), ctx)
    ctx = ctx or loop.make_ctx("auto", "auto")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    model = load_model(run_dir, parts)
    test, tok = parts["test"], parts["tok"]
    result = dict(kind=summary["kind"], seed=summary["seed"], params=summary["params"],
                  ms_per_step=summary["ms_per_step"], train_seconds=summary["seconds"],
                  best_step=summary["best_step"], best_valid=summary["best_valid"])
    result.update(accuracy(test.items, closed_set(model, test, tok, ctx), greedy(model, test, tok, ctx), tok))
    usage = expert_usage(model, test, ctx)
    result["expert_usage"] = usage
    if usage is not None:
        heatmap(usage, os.path.join(run_dir, "expert_usage.png"), f"{os.path.basename(run_dir)}: test clips")
    result["gradient_conflict"] = final = gradient_conflict(model, parts, ctx)
    loop.write_json(result, path)
    print(f"eval {os.path.basename(run_dir)}: semantic {result['semantic_closed']:.3f} paralinguistic "
          f"{result['paralinguistic_closed']:.3f} (closed set), exact match {result['all_exact']:.3f}; "
          f"domain-gradient cosine {final['domain']['mean']:+.3f}, task-gradient cosine {final['task']['mean']:+.3f}")
    return result


def mean_std(vals: Sequence[float], fmt: str = "{:.3f}") -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.replace('+', '').format(statistics.stdev(vals))}"


def paired(a: List[dict], b: List[dict], key: str) -> Optional[dict]:
    """Differences a - b of `key` over the seeds both kinds ran (same data order, same initial LLM)."""
    bs = {r["seed"]: r[key] for r in b}
    d = [r[key] - bs[r["seed"]] for r in a if r["seed"] in bs]
    if not d:
        return None
    return dict(diffs=d, mean=statistics.mean(d), std=statistics.stdev(d) if len(d) > 1 else math.nan,
                wins=sum(x > 0 for x in d), n=len(d))


DOMAIN_PAIRS = ("music|speech", "environment|music", "environment|speech")   # the paper's three pairs


def compare(out_dir: str, run_dirs: Optional[Sequence[str]] = None, floor: Optional[dict] = None) -> str:
    """The comparison (comparison.md / .json): floors and ceilings, then per adapter kind mean ± std
    over seeds; each MoE kind minus every other kind, paired by seed; the domain-gradient cosines; per task."""
    if run_dirs is None:
        run_dirs = sorted(os.path.join(out_dir, r) for r in os.listdir(out_dir)
                          if os.path.exists(os.path.join(out_dir, r, "eval.json")))
    results = []
    for r in run_dirs:
        with open(os.path.join(r, "eval.json")) as f:
            results.append(json.load(f))
    if not results:
        raise SystemExit(f"{out_dir}: no evaluated run (eval.json) to compare")
    if floor is None and os.path.exists(os.path.join(out_dir, "floors.json")):
        with open(os.path.join(out_dir, "floors.json")) as f:
            floor = json.load(f)
    floor = floor or {}
    kinds = sorted({r["kind"] for r in results}, key=ADAPTER_KINDS.index)       # moe, moe-random, dense-*
    by_kind = {k: [r for r in results if r["kind"] == k] for k in kinds}
    lines = ["| model | seeds | params (total / active) | MFLOPs/token | semantic | paralinguistic | all "
             "| exact match | domain-grad cosine | task-grad cosine | ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in floor.items():
        lines.append(f"| {name} | – | – | – | {f['semantic']:.3f} | {f['paralinguistic']:.3f} | {f['all']:.3f} "
                     f"| – | – | – | – |")
    table = dict(floors=floor, kinds={}, paired={})
    for k, rs in by_kind.items():
        p = rs[0]["params"]
        row = dict(seeds=[r["seed"] for r in rs], params=p)
        for key in ("semantic_closed", "paralinguistic_closed", "all_closed", "all_exact", "ms_per_step"):
            row[key] = [r[key] for r in rs]
        row["task_cos"] = [r["gradient_conflict"]["task"]["mean"] for r in rs]
        row["domain_cos"] = [r["gradient_conflict"]["domain"]["mean"] for r in rs]
        table["kinds"][k] = row
        lines.append(f"| {k} | {len(rs)} | {p['total']:,} / {p['active']:,} | {p['flops_per_token'] / 1e6:.3f} "
                     f"| {mean_std(row['semantic_closed'])} | {mean_std(row['paralinguistic_closed'])} "
                     f"| {mean_std(row['all_closed'])} | {mean_std(row['all_exact'])} "
                     f"| {mean_std(row['domain_cos'], '{:+.3f}')} | {mean_std(row['task_cos'], '{:+.3f}')} "
                     f"| {mean_std(row['ms_per_step'], '{:.1f}')} |")
    moes = [k for k in kinds if k.startswith("moe")]
    # Each MoE kind against every kind after it: moe - moe-random, moe - dense-*, moe-random - dense-*.
    pairs = [(m, d) for m in moes for d in kinds if d != m and not (d in moes and moes.index(d) < moes.index(m))]
    if pairs:
        lines += ["", "| paired by seed | semantic | paralinguistic | all | seeds won (sem / para) |", "|---|---|---|---|---|"]
        for m, d in pairs:
            pr = {g: paired(by_kind[m], by_kind[d], f"{g}_closed") for g in GROUPS + ("all",)}
            if pr["all"] is None:
                continue
            table["paired"][f"{m} - {d}"] = pr
            cell = lambda x: f"{x['mean']:+.3f} ± {x['std']:.3f}" if x["n"] > 1 else f"{x['mean']:+.3f}"
            lines.append(f"| {m} − {d} | {cell(pr['semantic'])} | {cell(pr['paralinguistic'])} | {cell(pr['all'])} "
                         f"| {pr['semantic']['wins']}/{pr['semantic']['n']} / {pr['paralinguistic']['wins']}/{pr['paralinguistic']['n']} |")
    lines += ["", "| domain pair (gradient cosine) | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for pair in DOMAIN_PAIRS:
        cells = [mean_std([r["gradient_conflict"]["domain"]["pairs"][pair] for r in by_kind[k]
                           if pair in r["gradient_conflict"]["domain"]["pairs"]], "{:+.3f}") for k in kinds]
        lines.append(f"| {pair.replace('|', ' – ')} | " + " | ".join(cells) + " |")
    tasks = sorted({t for r in results for t in r["tasks"]}, key=lambda t: (data.TASKS[t].group, t))
    names = list(floor) + kinds
    lines += ["", "| task | group | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for t in tasks:
        cells = [f"{floor[n]['tasks'][t]:.3f}" if t in floor[n]["tasks"] else "–" for n in floor]
        cells += [mean_std([r["tasks"][t]["closed"] for r in by_kind[k] if t in r["tasks"]]) for k in kinds]
        lines.append(f"| {t} | {data.TASKS[t].group} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("\nTest accuracy (closed-set scoring, macro average over tasks), mean ± std over seeds; "
          "gradient cosines of the trained adapters (best.pt):\n\n" + text + "\n")
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(text + "\n")
    loop.write_json(table, os.path.join(out_dir, "comparison.json"))
    plot_curves(out_dir, run_dirs)
    return text


def plot_curves(out_dir: str, run_dirs: Sequence[str]) -> Optional[str]:
    """Training loss and validation loss per run (curves.png), when matplotlib is installed."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {}
    for r in run_dirs:
        kind = os.path.basename(r).rsplit("-s", 1)[0]
        c = colours.setdefault(kind, f"C{len(colours)}")
        with open(os.path.join(r, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        axes[0].plot([x["step"] for x in recs], [x["ce"] for x in recs], c, alpha=0.5, lw=0.8,
                     label=kind if kind not in [l.get_label() for l in axes[0].lines] else None)
        v = [x for x in recs if "valid_loss" in x]
        axes[1].plot([x["step"] for x in v], [x["valid_loss"] for x in v], c, marker=".",
                     label=kind if kind not in [l.get_label() for l in axes[1].lines] else None)
    for ax, t in zip(axes, ("training answer loss", "validation answer loss")):
        ax.set_xlabel("step")
        ax.set_title(t)
        ax.legend()
    return _save(plt, fig, os.path.join(out_dir, "curves.png"))


def moa_out_dir(path: str) -> Optional[str]:
    """The train_moa.py folder that `path` is or lies in (its config.json is a MoAConfig's; an
    --ast_checkpoint folder has no ast/ to go by), else None."""
    p = os.path.abspath(path)
    for _ in range(4):                                  # OUT, OUT/bench/run, OUT/ablate/bench/run
        cfg = os.path.join(p, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                return p if {"ablate_budget", "bench_clips"} <= set(json.load(f)) else None
        p = os.path.dirname(p)
    return None


def parse_cli(argv: Optional[Sequence[str]], script: str):
    """OUT_DIR | RUN_DIR [...] [--force] [--runs=NAME,...] -> (paths, force, run names or None)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in argv
    names = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("--runs=")]
    paths = [a for a in argv if a != "--force" and not a.startswith("--runs=")]
    bad = [a for a in paths if a.startswith("-")]
    if bad or not paths:
        raise SystemExit(f"usage: python {script} OUT_DIR | RUN_DIR [...] [--force] [--runs=NAME,...]"
                         + (f"; unknown option {bad[0]}" if bad else ""))
    return paths, force, (names[-1] if names else None)


def main(argv: Optional[Sequence[str]] = None) -> None:
    paths, force, names = parse_cli(argv, "eval.py")
    for p in paths:
        if not os.path.isdir(p):
            raise SystemExit(f"{p}: no such folder")
        if moa_out_dir(p) is not None:
            raise SystemExit(f"{p} is a Soft-MoA folder of train_moa.py: score it with python eval_moa.py {p}")
        if os.path.exists(os.path.join(p, "summary.json")):                          # one run
            evaluate_run(p, force=True)
            continue
        runs = [os.path.join(p, r) for r in names] if names else \
            sorted(os.path.join(p, r) for r in os.listdir(p) if os.path.exists(os.path.join(p, r, "summary.json")))
        if not runs:
            raise SystemExit(f"{p}: no finished run (a folder with summary.json) inside")
        parts = load_parts(p)
        ctx = loop.make_ctx("cpu" if parts["llm"].embed_tokens.weight.device.type == "cpu" else "cuda", "auto")
        for r in runs:
            evaluate_run(r, parts=parts, ctx=ctx, force=force)
        compare(p, runs, floors(p, parts, ctx))


if __name__ == "__main__":
    main()
