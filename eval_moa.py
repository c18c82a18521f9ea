"""Score train_moa.py's Soft-MoA runs and print the paper-like tables (Cappellazzo et al.,
arXiv 2402.00828).

    python eval_moa.py runs/moa                       # score runs without eval.json, print the tables
    python eval_moa.py runs/moa/esc50/soft-pfeiffer-s0    # a run inside: its folder is scored
    python eval_moa.py runs/moa --force               # score again even where eval.json exists
    python eval_moa.py runs/moa --runs=esc50/linear-s0,esc50/full-s0   # only these runs, and their table

Per run (eval.json): test accuracy of best.pt (lowest validation loss), accuracy per class, and
for each mixture (block i, beside "attn" or "ffn"): each adapter's share of a clip's tokens,
averaged over the tokens of a clip and then over the clips of a class, so every clip counts once
(the paper's Fig. 3, expert usage per class), and each adapter's contribution,
the mean norm of its part of the mixture output over the test tokens (Fig. 2 right: are all
adapters used?). moa_compare writes the paper-like table (moa.md / moa.json, or ablation.md).
Runs under OUT_DIR/ablate/ (train_moa.py ablate) make the ablation table, the others moa.md.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List, Optional, Sequence

import torch

import data
import soft_moa as sm
import train_moa
from eval import _pyplot, _save, _usage_panel, mean_std, moa_out_dir, parse_cli
from loop import load, make_ctx, write_json


@torch.no_grad()
def evaluate_moa_run(run_dir: str, ast: dict, cache: dict, ctx, force: bool = True) -> dict:
    path = os.path.join(run_dir, "eval.json")
    if not force and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    c = s["config"]
    roles = train_moa.fold_split(cache["split"], s["seed"])
    test = train_moa.FbankData(cache, roles["test"], ast["mean"], ast["std"])
    C = len(cache["classes"])
    model, trainable = train_moa.build_peft_model(ast, s["method"], C, cache["x"].shape[1], c["r"], c["n_experts"], c["slots"])
    best = load(os.path.join(run_dir, "best.pt"))
    if set(best) != set(trainable):
        raise SystemExit(f"{run_dir}/best.pt does not hold the trainable parameters of {s['method']}")
    model.load_state_dict(best, strict=False)
    model.to(ctx.device).eval()
    preds, usage, contrib, n_tok = [], {}, {}, 0.0
    for i in range(0, len(test), 128):
        x, mask, y = test.batch(torch.arange(i, min(i + 128, len(test))), ctx.device)
        with ctx.autocast():
            out = model(x, mask)
        preds.append(out.logits.float().argmax(-1).cpu())
        real = out.mask.float()                                                    # (b, m)
        n_tok += float(real.sum())
        for layer, infos in enumerate(out.adapter_info):
            for key, info in infos.items():
                if "expert_usage" not in info:                                     # single adapter
                    continue
                name = f"block{layer}.{key}"
                usage.setdefault(name, []).append(sm.usage_per_sequence(info["expert_usage"].float(), out.mask).cpu())
                contrib[name] = contrib.get(name, 0) + (info["expert_contribution"].float() * real[..., None]).sum((0, 1)).cpu()
    pred, y = torch.cat(preds), test.y
    hit = (pred == y).float()
    per_class = {cls: float(hit[y == k].mean()) for k, cls in enumerate(cache["classes"]) if (y == k).any()}
    result = dict(bench=s["bench"], method=s["method"], seed=s["seed"], r=c["r"], n_experts=c["n_experts"],
                  slots=c["slots"], accuracy=float(hit.mean()), per_class=per_class, n_test=len(y),
                  params=s["params"], head_params=s["head_params"], macs_per_token=s["macs_per_token"],
                  ms_per_step=s["ms_per_step"], tokens=s["tokens"], classes=cache["classes"],
                  usage_by_class={k: sm.expert_usage_by_class(torch.cat(v), y, C).tolist() for k, v in usage.items()},
                  contribution={k: (v / n_tok).tolist() for k, v in contrib.items()})
    write_json(result, path)
    return result


def contribution_shares(results: List[dict]) -> Dict[str, List[List[float]]]:
    """{mixture: [per run: each adapter's share of the summed contributions]} over runs."""
    out = {}
    for r in results:
        for name, v in r["contribution"].items():
            t = torch.tensor(v)
            out.setdefault(name, []).append((t / t.sum().clamp_min(1e-12)).tolist())
    return out


def usage_heatmaps(results: List[dict], path: str, title: str) -> Optional[str]:
    """Expert usage per class at each run's last mixture, one panel per run (the paper's Fig. 3)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 0.16 * len(results[0]["classes"]) + 2.2),
                             squeeze=False)
    for ax, r in zip(axes[0], results):
        last = sorted(r["usage_by_class"], key=lambda k: (int(k.split(".")[0][5:]), k))[-1]
        m = torch.tensor(r["usage_by_class"][last])                                # (C, n)
        _usage_panel(fig, ax, m, r["classes"], "a", f"{r['method']} ({last})",
                     row_text=dict(fontsize=5 if len(r["classes"]) > 20 else 8), title_text=dict(fontsize=9))
    return _save(plt, fig, path, title)


def moa_compare(out_dir: str, run_dirs: Sequence[str], ablation: bool = False) -> str:
    """The paper-like table: test accuracy mean ± std over seeds per method and benchmark, trainable
    parameters, adapter MACs per token and ms per training step; then adapter contributions per
    layer and usage heatmaps (moa.md / moa.json), or the ablation table (ablation.md / .json)."""
    results = []
    for r in run_dirs:
        with open(os.path.join(r, "eval.json")) as f:
            results.append(json.load(f))
    if not results:
        raise SystemExit(f"{out_dir}: no evaluated Soft-MoA run (eval.json) to compare")
    names = list(data.BENCHMARKS) + ["data"]
    benches = sorted(dict.fromkeys(r["bench"] for r in results), key=names.index)
    key = (lambda r: (r["method"], r["n_experts"], r["r"], r["slots"])) if ablation else (lambda r: r["method"])
    order = list(train_moa.MOA_METHODS)
    rows = sorted(dict.fromkeys(key(r) for r in results),
                  key=lambda k: (order.index(k[0]), *k[1:]) if ablation else (order.index(k),))
    group = {k: [r for r in results if key(r) == k] for k in rows}
    head = "| method | adapters n | r | slots p |" if ablation else "| method |"
    lines = [head + "".join(f" {b} |" for b in benches) + " trainable params (no head) | adapter MACs/token | ms/step |",
             "|---" * (head.count("|") - 1 + len(benches) + 3) + "|"]
    table = {}
    for k in rows:
        rs = group[k]
        accs = {b: [r["accuracy"] for r in rs if r["bench"] == b] for b in benches}
        params = sorted({r["params"] - (r["head_params"] if r["method"] != "linear" else 0) for r in rs})
        if rs[0]["method"] == "linear":
            params = [0]
        macs = statistics.mean(r["macs_per_token"] for r in rs)
        label = " | ".join(map(str, k)) if ablation else k
        table[label] = dict(accuracy=accs, seeds=sorted({r["seed"] for r in rs}), params=params, macs_per_token=macs,
                            ms_per_step=[r["ms_per_step"] for r in rs])
        lines.append(f"| {label} |" + "".join(f" {mean_std(accs[b])} |" for b in benches)
                     + f" {'/'.join(f'{p:,}' for p in params)} | {macs:,.0f} | {mean_std(table[label]['ms_per_step'], '{:.1f}')} |")
    text = "\n".join(lines)
    seeds = max(len(v["seeds"]) for v in table.values())
    intro = (f"Test accuracy, mean ± std over {seeds} seeds (fold benchmarks: seed i tests on fold i+1); "
             "params: trainable, without the linear head; MACs: all mixtures, per token; ms/step: "
             "mean over all runs of the row:")
    if not ablation:
        shares = {}
        for m in ("soft-pfeiffer", "dense-pfeiffer", "soft-houlsby", "dense-houlsby"):
            rs = [r for r in results if r["method"] == m]
            if not rs:
                continue
            per = contribution_shares(rs)
            shares[m] = {name: torch.tensor(v).mean(0).tolist() for name, v in per.items()}
        if shares:
            n = len(next(iter(next(iter(shares.values())).values())))
            text += ("\n\nEach adapter's share of its mixture's output (mean contribution norm over test tokens, "
                     f"mean over benchmarks and seeds; uniform = {1 / n:.3f}):\n\n"
                     "| method | mixture | " + " | ".join(f"a{e}" for e in range(n)) + " | min / max |\n|---|---|"
                     + "---|" * (n + 1))
            for m, per in shares.items():
                for name in sorted(per, key=lambda k: (int(k.split(".")[0][5:]), k)):
                    v = per[name]
                    text += (f"\n| {m} | {name} | " + " | ".join(f"{x:.3f}" for x in v)
                             + f" | {min(v) / max(v):.2f} |")
            table["contribution_shares"] = shares
        for b in benches:
            rs = [r for r in results if r["bench"] == b and r["seed"] == 0 and r["usage_by_class"]
                  and r["method"] in ("soft-pfeiffer", "dense-pfeiffer")]
            if rs:
                usage_heatmaps(rs, os.path.join(out_dir, f"usage-{b}.png"), f"{b}: expert usage per class (seed 0)")
    name = "ablation" if ablation else "moa"
    print(f"\n{intro}\n\n{text}\n")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(intro + "\n\n" + text + "\n")
    write_json(table, os.path.join(out_dir, f"{name}.json"))
    return text


def moa_main(out_dir: str, force: bool, runs: Optional[Sequence[str]] = None) -> None:
    """Score the runs of a train_moa.py folder without eval.json (all with force), print the
    tables. runs: the run folders, relative to out_dir (esc50/soft-pfeiffer-s0,
    ablate/fsc/...), in table order; default: every finished run inside."""
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = train_moa.MoAConfig(**json.load(f))
    ctx = make_ctx(cfg.device, cfg.dtype)
    ast = train_moa.stage_ast(cfg, ctx, resume=False)
    if runs is None:
        runs = sorted(os.path.relpath(root, out_dir) for root, _, files in os.walk(out_dir) if "summary.json" in files)
    found = {False: [], True: []}
    for r in runs:
        found[r.startswith("ablate" + os.sep)].append(os.path.join(out_dir, r))
    if not found[False] and not found[True]:
        raise SystemExit(f"{out_dir}: no finished Soft-MoA run (a folder with summary.json) inside")
    caches = {}
    for ablation, rs in found.items():
        for r in rs:
            with open(os.path.join(r, "summary.json")) as f:
                bench = json.load(f)["bench"]
            if bench not in caches:
                caches.update(train_moa.moa_data(cfg, ctx, [bench]))
            evaluate_moa_run(r, ast, caches[bench], ctx, force=force)
        if rs:
            moa_compare(out_dir, rs, ablation=ablation)


def main(argv: Optional[Sequence[str]] = None) -> None:
    paths, force, runs = parse_cli(argv, "eval_moa.py")
    for p in paths:
        if not os.path.isdir(p):
            raise SystemExit(f"{p}: no such folder")
        moa = moa_out_dir(p)
        if moa is None:
            raise SystemExit(f"{p}: not a train_moa.py folder (no Soft-MoA config.json in it or above it); "
                             f"train.py's runs: python eval.py {p}")
        if moa != os.path.abspath(p):                  # a run inside one
            print(f"{p} is a Soft-MoA run: scoring its folder {moa}")
        moa_main(moa, force, runs)


if __name__ == "__main__":
    main()
