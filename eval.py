"""Evaluate and compare train.py's adapter runs: the MoE-Adapter paper's analyses (Lei et al., arXiv 2601.02967).

    python eval.py runs/tiny                  # evaluate every run in the folder, print the comparison
    python eval.py runs/tiny/moe-s0           # one run: accuracy, expert use, gradient conflict
    python eval.py runs/tiny --force          # evaluate again even where eval.json exists
    python eval.py runs/tiny --runs=moe-s0,moe-s1     # only these runs of the folder, and their comparison
    python eval.py runs/tiny/moe-s0 --audio=my.wav [--ask="Which word is spoken?"]   # a file or folder: answers
    python eval.py runs/tiny/moe-s0 --export=moe      # moe.pt, moe.json (+ .safetensors): moe_adapter.load_adapter

Per run (eval.json, on best.pt): exact-match and closed-set accuracy, expert use (Fig. 3), gradient conflict
(Figs. 4-5). Per folder: floors.json (chance, linear probes, text ceiling), comparison.md.
"""
import contextlib
import copy
import itertools
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import data
import llm as lm
import loop
import pretrain
import train
from data import UsageError
from moe_adapter import ADAPTER_KINDS, MoEAdapterConfig, build_adapter

GROUPS = ("semantic", "paralinguistic")
DOMAIN_PAIRS = ("music|speech", "environment|music", "environment|speech")   # the paper's three pairs
_json = loop.read_json


def frozen_config(out_dir: str) -> train.TrainConfig:
    """OUT/config.json (out_dir: where it lies now), once its frozen encoder and LLM exist (none is trained again)."""
    try:
        cfg = train.TrainConfig(**{**_json(os.path.join(out_dir, "config.json")), "out_dir": out_dir})
    except (OSError, TypeError, ValueError) as e:                       # missing, foreign, older or broken
        raise UsageError(f"{out_dir}: no config.json of this train.py ({type(e).__name__}: {e})") from None
    for path in (cfg.encoder_checkpoint or os.path.join(out_dir, "encoder", "encoder.pt"),
                 cfg.llm_checkpoint or os.path.join(out_dir, "llm", "llm.pt")):
        if not os.path.exists(path):
            raise UsageError(f"{path}: missing; {out_dir} has no pre-trained encoder and LLM (python train.py)")
    return cfg


def load_parts(out_dir: str, ctx: Optional[loop.Ctx] = None) -> dict:
    """train.prepare of an output folder: frozen encoder, LLM and features (nothing is retrained)."""
    cfg = frozen_config(out_dir)
    return train.prepare(cfg, ctx or loop.make_ctx(cfg.device, cfg.dtype), resume=False)


def load_model(run_dir: str, parts: dict, which: str = "best.pt") -> train.AudioLLM:
    """The run's adapter and its LLM (tuned weights or LoRA) from `which`; parts["llm"] is untouched."""
    summary = _json(os.path.join(run_dir, "summary.json"))
    model = train.AudioLLM(build_adapter(summary["kind"], MoEAdapterConfig(**summary["adapter_config"])),
                           copy.deepcopy(parts["llm"]))
    state = loop.load(os.path.join(run_dir, which))
    state = state.get("model", state)                          # last.pt wraps it with the optimiser
    if "lora" in state:
        lm.add_lora(model.llm, rank=summary["config"]["lora_rank"])
    model.load_trained(state)
    lm.freeze(model.llm)
    return model.to(next(parts["llm"].parameters()).device).eval()


# --- Accuracy
@torch.no_grad()
def choice_logp(model: train.AudioLLM, d: train.AdapterData, tok, ctx, batch: int = 64) -> List[torch.Tensor]:
    """Per question, (choices,): each choice's sum of log p(answer tokens, EOS | audio, prompt)."""
    scores = []
    for idx in torch.arange(len(d)).split(batch):
        feats, fmask, prompts, _ = d.batch(idx, ctx.device)
        choices = [d.items[i]["choices"] for i in idx.tolist()]
        rows = [(prompts[b], tok.encode(c)) for b, ch in enumerate(choices) for c in ch]
        owner = torch.tensor([b for b, ch in enumerate(choices) for _ in ch], device=ctx.device)
        with ctx.autocast():
            logits, labels, _, _ = model(feats[owner], fmask[owner], [r[0] for r in rows], [r[1] for r in rows])
        logp = logits[:, :-1].float().log_softmax(-1)                               # (R, N-1, V)
        target = labels[:, 1:]                                                      # IGNORE_INDEX: not answer
        tok_lp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != lm.IGNORE_INDEX)
        scores += tok_lp.sum(1).cpu().split([len(ch) for ch in choices])
    return scores


def closed_set(model: train.AudioLLM, d: train.AdapterData, tok, ctx, batch: int = 64) -> List[int]:
    """Index of the most likely choice per question."""
    return [int(s.argmax()) for s in choice_logp(model, d, tok, ctx, batch)]


@torch.no_grad()
def greedy(model: train.AudioLLM, d: train.AdapterData, tok, ctx, batch: int = 128, max_new: int = 0) -> List[str]:
    """Greedy answers (KV-cached decoding) of at most max_new tokens (0: the longest answer + 2), as text."""
    max_new = max_new or max(len(a) for a in d.answers) + 2
    out = []
    for idx in torch.arange(len(d)).split(batch):
        feats, fmask, prompts, _ = d.batch(idx, ctx.device)
        with ctx.autocast():
            y, aux = model.adapter(feats, fmask)
            b = lm.build_batch(prompts, None, aux["mask"].sum(1).tolist(), cfg=model.llm.cfg, padding_side="left",
                               device=ctx.device)
            new = model.llm.generate(b["input_ids"], b["attention_mask"], audio_embeds=y, audio_mask=aux["mask"],
                                     max_new_tokens=max_new)
        out += [tok.decode(row.tolist()) for row in new]
    return out


def macro(per_task: Dict[str, float]) -> dict:
    """{"tasks": per task, "semantic", "paralinguistic", "all"}: macro averages over tasks."""
    out = dict(tasks=per_task)
    for g in GROUPS + ("all",):
        vals = [a for t, a in per_task.items() if g == "all" or data.TASKS[t].group == g]
        out[g] = statistics.mean(vals) if vals else math.nan
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
        r.update(closed=r["closed"] / r["n"], exact=r["exact"] / r["n"])
    avg = {m: macro({t: r[m] for t, r in per.items()}) for m in ("closed", "exact")}
    return dict(tasks=per, **{f"{g}_{m}": avg[m][g] for g in GROUPS + ("all",) for m in ("closed", "exact")})


# --- Floors and ceilings: what the adapters are compared against, on the same test questions
def text_only(llm_model: lm.LLM):
    """The text ceiling: the pre-trained LLM alone, called like AudioLLM (features unused), on with_facts prompts."""
    def forward(feats, fmask, prompts, answers=None):
        b = lm.build_batch(prompts, answers, cfg=llm_model.cfg, device=feats.device)
        return llm_model(b["input_ids"], b["attention_mask"])[0], b.get("labels"), {}, b
    return forward


def with_facts(items: List[dict]) -> List[dict]:
    """The same questions, each after the true label words of its clip (the LLM's text format)."""
    facts = {c["index"]: c["answer"] for c in train.caption_items(items)}
    return [dict(it, question=f"{facts[it['index']]}. {it['question']}") for it in items]


def pooled(parts: dict, split: str, what: str, batch: int = 256) -> torch.Tensor:
    """(N_clips, d): each clip's mean over real frames of the encoder features ("encoder") or the log-mel."""
    out = []
    for j in torch.arange(len(parts["domains"][split])).split(batch):
        if what == "encoder":
            x, m = parts[split].features(j, "cpu")                            # (B, T', d), (B, T') real prefix
            out.append(data.frame_mean(x, m.sum(1)))
        else:
            mel, frames = parts["mels"][split].batch(j)                            # (B, F, T), (B,)
            out.append(data.frame_mean(mel.transpose(1, 2), frames))
    return torch.cat(out)


def probe(parts: dict, what: str) -> Dict[str, float]:
    """Test accuracy per task of a logistic regression on pooled features, fitted on the train split."""
    x = {s: pooled(parts, s, what) for s in ("train", "test")}
    acc = {}
    for task in sorted({it["task"] for it in parts["test"].items}):
        xy = {}
        for s in ("train", "test"):
            its = [it for it in parts[s].items if it["task"] == task]
            xy[s] = (x[s][[it["index"] for it in its]], torch.tensor([it["answer_index"] for it in its]))
        acc[task] = data.probe_accuracy(xy["train"], xy["test"], len(its[0]["choices"]))   # its: test questions
    return acc


def floors(out_dir: str, parts: dict, ctx) -> dict:
    """Chance, the two linear probes and the text ceiling on the test split, once per out_dir (floors.json)."""
    path = os.path.join(out_dir, "floors.json")
    if os.path.exists(path):
        return _json(path)
    test, tok = parts["test"], parts["tok"]
    text_data = train.AdapterData(with_facts(test.items), test.features, tok, test.domains)
    res = accuracy(text_data.items, closed_set(text_only(parts["llm"]), text_data, tok, ctx), [""] * len(test), tok)
    out = {"chance": macro({it["task"]: 1.0 / len(it["choices"]) for it in test.items}),
           "probe: log-mel": macro(probe(parts, "log-mel")), "probe: encoder": macro(probe(parts, "encoder")),
           "text ceiling": macro({t: r["closed"] for t, r in res["tasks"].items()})}
    loop.write_json(out, path)
    return out


# --- Expert specialisation (Fig. 3)
@torch.no_grad()
def expert_usage(model: train.AudioLLM, d: train.AdapterData, ctx, batch: int = 256) -> Optional[dict]:
    """{"domain" | "task": {name: (E,) share of its audio token-slots per expert}}; None for a dense adapter."""
    cfg = getattr(model.adapter, "cfg", None)
    if cfg is None or not cfg.n_experts:
        return None
    clips = sorted(set(d.clip.tolist()))
    per_clip = {}
    for j in torch.tensor(clips).split(batch):
        with ctx.autocast():
            _, aux = model.adapter(*d.features(j, ctx.device))
        index = aux["expert_index"].cpu()                                  # (B, N_a, k), -1: padding
        slots = F.one_hot(index.clamp(min=0), cfg.n_experts) * (index >= 0)[..., None]   # (B, N_a, k, E)
        per_clip.update(zip(j.tolist(), slots.sum((1, 2)).double()))                   # (E,) slot counts
    by_domain, by_task = {}, {}
    for jj, counts in per_clip.items():
        by_domain[d.domains[jj]] = by_domain.get(d.domains[jj], 0) + counts
    for it in d.items:
        by_task[it["task"]] = by_task.get(it["task"], 0) + per_clip[it["index"]]
    share = lambda table: {k: (v / v.sum()).tolist() for k, v in sorted(table.items())}
    return dict(domain=share(by_domain), task=share(by_task))


# --- Gradient conflict (Figs. 4-5)
def group_gradients(model: train.AudioLLM, d: train.AdapterData, groups: Dict[str, List[int]], ctx) -> dict:
    """Flattened gradient of each group's mean answer loss w.r.t. the adapter's parameters."""
    params = list(model.adapter.requires_grad_(True).parameters())
    grads = {}
    for name, idx in groups.items():
        feats, fmask, prompts, answers = d.batch(torch.tensor(idx), ctx.device)
        with torch.enable_grad(), ctx.autocast():
            logits, labels, _, _ = model(feats, fmask, prompts, answers)
            ce, n = pretrain.token_ce(logits, labels)
            g = torch.autograd.grad(ce / n, params, allow_unused=True)
        grads[name] = torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1).float()
                                 for gi, p in zip(g, params)])
    return grads


def cosine_table(grads: Dict[str, torch.Tensor]) -> dict:
    """Pairwise cosines, their mean and the share of conflicting (negative) pairs."""
    pairs = {f"{a}|{b}": float(F.cosine_similarity(grads[a], grads[b], dim=0))
             for a, b in itertools.combinations(sorted(grads), 2)}
    vals = list(pairs.values())
    return dict(pairs=pairs, mean=statistics.mean(vals) if vals else math.nan,
                conflict=sum(v < 0 for v in vals) / len(vals) if vals else math.nan)


def fixed_groups(d: train.AdapterData, key: str, n: int, seed: int = 0) -> Dict[str, List[int]]:
    """The first n questions of each task or clip domain in a fixed shuffle: the same batches for every run."""
    order = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed)).tolist()
    out: Dict[str, List[int]] = {}
    for i in order:
        name = d.items[i]["task"] if key == "task" else d.domains[d.items[i]["index"]]
        if len(out.setdefault(name, [])) < n:
            out[name].append(i)
    return {k: v for k, v in out.items() if len(v) >= max(2, n // 4)}


def gradient_conflict(model: train.AudioLLM, parts: dict, ctx, n: int = 64) -> dict:
    """Cosines of the adapter gradients between tasks and the paper's three domains (no mixtures)."""
    groups = {key: fixed_groups(parts["train"], key, n) for key in ("task", "domain")}
    groups["domain"].pop("mixture", None)
    return {key: cosine_table(group_gradients(model, parts["train"], g, ctx)) for key, g in groups.items()}


# --- One run, and the comparison
def evaluate_run(run_dir: str, parts: dict, ctx, force: bool = True) -> dict:
    """Score one run (parts: its load_parts) and write eval.json into its folder."""
    path = os.path.join(run_dir, "eval.json")
    if not force and os.path.exists(path):
        return _json(path)
    summary = _json(os.path.join(run_dir, "summary.json"))
    model = load_model(run_dir, parts)
    test, tok = parts["test"], parts["tok"]
    result = {k: summary[k] for k in ("kind", "seed", "params", "ms_per_step", "best_step", "best_valid")}
    result["train_seconds"] = summary["seconds"]
    result.update(accuracy(test.items, closed_set(model, test, tok, ctx), greedy(model, test, tok, ctx), tok))
    result["expert_usage"] = expert_usage(model, test, ctx)
    result["gradient_conflict"] = g = gradient_conflict(model, parts, ctx)
    loop.write_json(result, path)
    print(f"eval {os.path.basename(run_dir)}: semantic {result['semantic_closed']:.3f} paralinguistic "
          f"{result['paralinguistic_closed']:.3f} (closed set), exact match {result['all_exact']:.3f}; "
          f"domain-gradient cosine {g['domain']['mean']:+.3f}, task-gradient cosine {g['task']['mean']:+.3f}")
    return result


def mean_std(vals: Sequence[float], fmt: str = "{:.3f}") -> str:
    vals = [v for v in vals if v == v]                 # NaN left out
    if len(vals) < 2:
        return fmt.format(vals[0]) if vals else "–"
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.replace('+', '').format(statistics.stdev(vals))}"


def paired(a: List[dict], b: List[dict], key: str) -> Optional[dict]:
    """Differences a - b of `key` over the seeds both kinds ran (same data order, same initial LLM)."""
    bs = {r["seed"]: r[key] for r in b}
    d = [r[key] - bs[r["seed"]] for r in a if r["seed"] in bs]
    return dict(diffs=d, mean=statistics.mean(d), std=statistics.stdev(d) if len(d) > 1 else math.nan,
                wins=sum(x > 0 for x in d), n=len(d)) if d else None


def compare(out_dir: str, run_dirs: Sequence[str], floor: Optional[dict] = None) -> str:
    """comparison.md / .json: floors, per kind mean ± std over seeds, MoE kinds paired by seed, per task."""
    results = [_json(os.path.join(r, "eval.json")) for r in run_dirs]
    path = os.path.join(out_dir, "floors.json")
    floor = (_json(path) if os.path.exists(path) else {}) if floor is None else floor
    kinds = sorted({r["kind"] for r in results}, key=ADAPTER_KINDS.index)       # moe, moe-random, dense-*
    by_kind = {k: [r for r in results if r["kind"] == k] for k in kinds}
    lines = ["| model | seeds | params (total / active) | MFLOPs/token | semantic | paralinguistic | all "
             "| exact match | domain-grad cosine | task-grad cosine | ms/step |", "|" + "---|" * 11]
    lines += [f"| {name} | – | – | – | {f['semantic']:.3f} | {f['paralinguistic']:.3f} | {f['all']:.3f} | – | – | – | – |"
              for name, f in floor.items()]
    table = dict(floors=floor, kinds={}, paired={})
    for k, rs in by_kind.items():
        p = rs[0]["params"]
        table["kinds"][k] = row = dict(seeds=[r["seed"] for r in rs], params=p, **{key: [r[key] for r in rs] for key
            in ("semantic_closed", "paralinguistic_closed", "all_closed", "all_exact", "ms_per_step")},
            **{f"{g}_cos": [r["gradient_conflict"][g]["mean"] for r in rs] for g in ("task", "domain")})
        cells = [mean_std(row[c]) for c in ("semantic_closed", "paralinguistic_closed", "all_closed", "all_exact")]
        cells += [mean_std(row["domain_cos"], "{:+.3f}"), mean_std(row["task_cos"], "{:+.3f}"),
                  mean_std(row["ms_per_step"], "{:.1f}")]
        lines.append(f"| {k} | {len(rs)} | {p['total']:,} / {p['active']:,} | {p['flops_per_token'] / 1e6:.3f} | "
                     + " | ".join(cells) + " |")
    moes = [k for k in kinds if k.startswith("moe")]
    # Each MoE kind against every kind after it: moe - moe-random, moe - dense-*, moe-random - dense-*.
    pairs = [(m, d) for m in moes for d in kinds if d != m and not (d in moes and moes.index(d) < moes.index(m))]
    if pairs:
        lines += ["", "| paired by seed | semantic | paralinguistic | all | seeds won (sem / para) |", "|---|---|---|---|---|"]
    cell = lambda x: f"{x['mean']:+.3f} ± {x['std']:.3f}" if x["n"] > 1 else f"{x['mean']:+.3f}"
    for m, d in pairs:
        pr = {g: paired(by_kind[m], by_kind[d], f"{g}_closed") for g in GROUPS + ("all",)}
        if pr["all"] is None:
            continue
        table["paired"][f"{m} - {d}"] = pr
        sem, para = pr["semantic"], pr["paralinguistic"]
        lines.append(f"| {m} − {d} | {cell(sem)} | {cell(para)} | {cell(pr['all'])} "
                     f"| {sem['wins']}/{sem['n']} / {para['wins']}/{para['n']} |")
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
    import plots                                    # OUT_DIR/figures/*.png, when matplotlib is installed
    plots.train_figures(out_dir, run_dirs)
    return text


def moa_out_dir(path: str) -> Optional[str]:
    """The train_moa.py folder that `path` is or lies in (its config.json is a MoAConfig's), else None."""
    p = os.path.abspath(path)
    for _ in range(4):                                  # OUT, OUT/bench/run, OUT/ablate/bench/run
        cfg = os.path.join(p, "config.json")
        if os.path.exists(cfg):
            return p if {"ablate_budget", "bench_clips"} <= set(_json(cfg)) else None
        p = os.path.dirname(p)
    return None


# --- Your own audio: ask a run about it; export a run's adapter
def read_clips(path: str) -> List[data.Clip]:
    """--audio: one file or every audio file of a folder, as 16 kHz mono clips (data.load_audio mixes, resamples)."""
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith((".wav", ".flac", ".ogg"))
                   and not f.startswith(".")) if os.path.isdir(path) else [path] * os.path.exists(path)
    if not files:
        raise UsageError(f"--audio={path}: " + ("no .wav, .flac or .ogg file in the folder" if os.path.isdir(path)
                                                else "no such file or folder"))
    try:
        return [data.Clip(data.load_audio(f), data.SAMPLE_RATE, {}, "", source=f) for f in files]
    except (ValueError, ImportError, OSError) as e:                     # each message names the file
        raise UsageError(f"--audio={path}: {e}") from None


@torch.no_grad()
def ask(run_dir: str, clips: List[data.Clip], question: Optional[str] = None, ctx=None) -> List[tuple]:
    """Print and return (file, question, greedy answer, closed-set choice, its probability) of best.pt per clip, for
    each trained task's first question or `question` (free: no choice); training's centre crop, log-mel, encoder."""
    ctx = ctx or loop.make_ctx("auto", "auto")
    cfg = frozen_config(os.path.dirname(os.path.abspath(run_dir)))
    split_items = train.instruction_items(cfg, train.sources(cfg))
    choices = {it["task"]: it["choices"] for s in ("train", "valid", "test") for it in split_items[s]}  # as prepare
    tok, llm_model = pretrain.stage_llm(cfg, choices, ctx, resume=False)      # resume=False: load what exists
    encoder, model = pretrain.stage_encoder(cfg, None, ctx, resume=False), load_model(run_dir, dict(llm=llm_model))
    tasks = {t: choices[t] for t in data.TASKS if t in {it["task"] for it in split_items["train"]}}   # trained on
    b = train.clip_batch(clips, cfg.clip_seconds, range(len(clips)))                 # centre crop, zero-padding
    mel, frames = train.log_mel(b, cfg.n_mels, cfg.mel_frames)
    mels = train.Mels([""] * len(clips), cfg.mel_frames, mel.half() if cfg.cache_features else mel, frames)
    asked = [(t, data.TASKS[t].questions[0]) for t in tasks] if question is None else \
        [(next((t for t in tasks if question in data.TASKS[t].questions), None), question)]   # a template: its task
    items = [dict(index=j, task=t, question=q, answer="", choices=tasks.get(t))
             for j in range(len(clips)) for t, q in asked]
    d = train.AdapterData(items, train.live_features(encoder, mels, ctx), tok, mels.domain)
    longest = sum(max(len(tok.encode(c)) for c in ch) for ch in tasks.values()) + 2      # room for a caption
    scores = [s.softmax(0) for s in choice_logp(model, d, tok, ctx)] if asked[0][0] else [None] * len(items)
    rows = [(os.path.basename(clips[it["index"]].source), it["question"], a,
             None if p is None else it["choices"][int(p.argmax())], None if p is None else float(p.max()))
            for it, a, p in zip(items, greedy(model, d, tok, ctx, max_new=longest), scores)]
    for c in clips:
        if len(c.audio) > round(cfg.clip_seconds * data.SAMPLE_RATE):
            print(f"{c.source}: cropped {len(c.audio) / data.SAMPLE_RATE:.1f} s -> {cfg.clip_seconds:.1f} s (centre)")
    print("| file | question | answer | closed-set choice (p) |\n|---|---|---|---|")
    for f, q, a, c, p in rows:
        print(f"| {f} | {q} | {a or '(empty)'} | " + ("– (free question)" if c is None else f"{c} ({p:.2f})") + " |")
    return rows


def export(run_dir: str, path: str) -> None:
    """best.pt's "adapter.*" and "lora.*" or "llm.*" as ROOT.pt (+ .safetensors), ROOT.json for moe_adapter.load_adapter."""
    summary, root = _json(os.path.join(run_dir, "summary.json")), path[:-3] if path.endswith(".pt") else path
    state = loop.load(os.path.join(run_dir, "best.pt"))
    flat = {f"{k}.{n}": v.clone(memory_format=torch.contiguous_format)     # own storage: no tied tensors
            for k in ("adapter", "lora", "llm") for n, v in state.get(k, {}).items()}
    torch.save(flat, root + ".pt")
    loop.write_json(dict(kind=summary["kind"], config=summary["adapter_config"],
                         **{k: summary["config"][k] for k in ("tune_llm", "lora_rank")}), root + ".json")
    written = [root + ".pt", root + ".json"]
    with contextlib.suppress(ImportError):
        from safetensors.torch import save_file
        save_file(flat, root + ".safetensors")
        written.append(root + ".safetensors")
    print(f"export {run_dir}: {', '.join(written)} ({', '.join(sorted({k.split('.')[0] for k in flat}))} weights)")


def parse_cli(argv: Optional[Sequence[str]], script: str, options: str = ""):
    """OUT_DIR | RUN_DIR [...] [--force] [--runs=NAME,...] -> (paths, force, run names or None); options: usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [a.split("=", 1)[1].split(",") for a in argv if a.startswith("--runs=")]
    paths = [a for a in argv if a != "--force" and not a.startswith("--runs=")]
    bad = [a for a in paths if a.startswith("-")]
    if bad or not paths:
        raise UsageError(f"usage: python {script} OUT_DIR | RUN_DIR [...] [--force] [--runs=NAME,...]{options}"
                         + (f"; unknown option {bad[0]}" if bad else ""))
    return paths, "--force" in argv, (names[-1] if names else None)


def check_runs(p: str, names: Optional[List[str]]) -> List[str]:
    """The finished runs a path names (itself, or those inside it; --runs: these), with their out_dir's frozen parts."""
    if not os.path.isdir(p):
        raise UsageError(f"{p}: no such folder")
    if moa_out_dir(p) is not None:
        raise UsageError(f"{p} is a Soft-MoA folder of train_moa.py: score it with python eval_moa.py {p}")
    one = os.path.exists(os.path.join(p, "summary.json"))
    runs = [p] if one else [os.path.join(p, r) for r in names] if names else \
        sorted(os.path.join(p, r) for r in os.listdir(p) if os.path.exists(os.path.join(p, r, "summary.json")))
    if not runs:
        raise UsageError(f"{p}: no finished run (a folder with summary.json) inside")
    if bad := [r for r in runs if not all(os.path.exists(os.path.join(r, f)) for f in ("summary.json", "best.pt"))]:
        raise UsageError(f"{bad[0]}: no summary.json or best.pt; the run has not finished (train.py --resume)")
    frozen_config(os.path.dirname(os.path.abspath(p)) if one else p)
    return runs


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Every path and option is checked before any work: a bad second path fails before the first is scored."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opt = {k: a.split("=", 1)[1] for a in argv for k in ("--audio", "--ask", "--export") if a.startswith(k + "=")}
    audio, question, export_to = (opt.get(k) for k in ("--audio", "--ask", "--export"))
    paths, force, names = parse_cli([a for a in argv if a.split("=", 1)[0] not in opt], "eval.py",
                                    " | RUN_DIR [--audio=PATH [--ask=QUESTION]] [--export=PATH]")
    runs = {p: check_runs(p, names) for p in paths}
    if opt:                                              # your own audio, an export: one run
        if len(paths) != 1 or runs[paths[0]] != paths:
            raise UsageError(f"--audio and --export take one run folder (with summary.json), got {' '.join(paths)}")
        if export_to is not None and (os.path.isdir(export_to)
                                      or not os.access(os.path.dirname(os.path.abspath(export_to)), os.W_OK)):
            raise UsageError(f"--export={export_to}: expected a file name in an existing writable folder (out/moe)")
        if question is not None and audio is None:
            raise UsageError(f"--ask={question!r}: asks about --audio=PATH, which is missing")
        clips = read_clips(audio) if audio is not None else []
        if export_to is not None:
            export(paths[0], export_to)
        if clips:
            ask(paths[0], clips, question)
        return
    for p, rs in runs.items():                           # a run (always scored again), or a folder and its runs
        parts = load_parts(os.path.dirname(os.path.abspath(p)) if rs == [p] else p)
        ctx = loop.make_ctx("cpu" if parts["llm"].embed_tokens.weight.device.type == "cpu" else "cuda", "auto")
        for r in rs:
            evaluate_run(r, parts=parts, ctx=ctx, force=force or rs == [p])
        if rs != [p]:
            compare(p, rs, floors(p, parts, ctx))


if __name__ == "__main__":
    data.cli(main)
