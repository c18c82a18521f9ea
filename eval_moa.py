"""Score train_moa.py's Soft-MoA runs and print the paper's tables (Cappellazzo et al., arXiv 2402.00828).

    python eval_moa.py runs/moa [--force] [--runs=esc50/linear-s0,...]   # a folder, or a run inside it

Per run, eval.json: test accuracy of best.pt (and per class), and per mixture each adapter's usage per class
(Fig. 3) and contribution (Fig. 2 right: the mean norm of its part of the mixture output over test tokens);
both drawn in OUT_DIR/figures (plots.py) when matplotlib is installed."""
import os
import statistics
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

import data
import plots
import soft_moa as sm
import train_moa
from eval import _json, mean_std, moa_out_dir, paired, parse_cli
from data import UsageError
from loop import load, make_ctx, write_json


def usage_per_clip(usage: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """info["expert_usage"] (b, m, n) -> (b, n): the mean over each clip's real tokens."""
    real = mask.to(usage.dtype)[..., None]  # (b, m, 1)
    return (usage * real).sum(1) / real.sum(1).clamp_min(1)  # (b, n)


def usage_by_class(usage: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-clip usage (b, n), labels (b,) -> the mean per class (n_classes, n); NaN rows for no clips."""
    onehot = F.one_hot(labels.long(), n_classes).to(usage.dtype)  # (b, n_classes)
    return (onehot.T @ usage) / onehot.sum(0)[:, None]  # (n_classes, n); 0/0 = NaN


@torch.no_grad()
def evaluate_moa_run(run_dir: str, ast: dict, cfg, caches: dict, ctx, force: bool = True) -> None:
    """run_dir/eval.json (kept unless force): best.pt on the test role and the usage statistics; fills caches."""
    path = os.path.join(run_dir, "eval.json")
    if not force and os.path.exists(path):
        return
    s = _json(os.path.join(run_dir, "summary.json"))
    cache = caches[s["bench"]] = caches.get(s["bench"]) or train_moa.fbank_cache(cfg, ctx, s["bench"])
    c, C = s["config"], len(cache["classes"])
    test = train_moa.FbankData(cache, train_moa.fold_split(cache["split"], s["seed"])["test"], ast["mean"], ast["std"])
    model, trainable = train_moa.build_peft_model(ast, s["method"], C, cache["x"].shape[1], c["r"], c["n_experts"],
                                                  c["slots"], c.get("head_pool", "mean"))
    best = load(os.path.join(run_dir, "best.pt"))
    if set(best) != set(trainable):
        raise UsageError(f"{run_dir}/best.pt does not hold the trainable parameters of {s['method']}")
    model.load_state_dict(best, strict=False)
    model.to(ctx.device).eval()
    for mixture in (m for m in model.modules() if isinstance(m, (sm.DenseMoA, sm.SoftMoA))):
        mixture.stats = True                                                    # the statistics of Figs. 2-3
    preds, usage, contrib, n_tok = [], {}, {}, 0.0
    for i in range(0, len(test), 128):
        x, mask, y = test.batch(torch.arange(i, min(i + 128, len(test))), ctx.device)
        with ctx.autocast():
            out = model(x, mask)
        preds.append(out.logits.float().argmax(-1).cpu())
        real = out.mask.float()                                                    # (b, m)
        n_tok += float(real.sum())
        for layer, infos in enumerate(out.adapter_info):
            for name, info in ((f"block{layer}.{k}", v) for k, v in infos.items() if "expert_usage" in v):
                usage.setdefault(name, []).append(usage_per_clip(info["expert_usage"].float(), out.mask).cpu())
                contrib[name] = contrib.get(name, 0) + (info["expert_contribution"].float() * real[..., None]).sum((0, 1)).cpu()
    y, hit, classes = test.y, (torch.cat(preds) == test.y).float(), cache["classes"]
    result = dict(**{k: s[k] for k in ("bench", "method", "seed")}, **{k: c[k] for k in ("r", "n_experts", "slots")},
                  accuracy=float(hit.mean()),
                  per_class={cls: float(hit[y == k].mean()) for k, cls in enumerate(classes) if (y == k).any()},
                  n_test=len(y), **{k: s[k] for k in ("params", "head_params", "macs_per_token", "ms_per_step", "tokens")},
                  classes=classes, usage_by_class={k: usage_by_class(torch.cat(v), y, C).tolist() for k, v in usage.items()},
                  contribution={k: (v / n_tok).tolist() for k, v in contrib.items()})
    write_json(result, path)


def moa_compare(out_dir: str, run_dirs: Sequence[str], ablation: bool = False) -> None:
    """moa.md / .json (ablation.md / .json): test accuracy mean ± std over seeds per method (and n, r, p) and
    benchmark, parameters, MACs, ms/step; not ablation: each adapter's share of its mixture's output."""
    results = [_json(os.path.join(r, "eval.json")) for r in run_dirs]
    benches = sorted({r["bench"] for r in results}, key=(list(data.BENCHMARKS) + ["data"]).index)
    key = (lambda r: (r["method"], r["n_experts"], r["r"], r["slots"])) if ablation else (lambda r: (r["method"],))
    head = "| method | adapters n | r | slots p |" if ablation else "| method |"
    lines = [head + "".join(f" {b} |" for b in benches) + " trainable params (no head) | adapter MACs/token | ms/step |",
             "|---" * (head.count("|") - 1 + len(benches) + 3) + "|"]
    table = {}
    for k in sorted(dict.fromkeys(map(key, results)), key=lambda k: (list(train_moa.MOA_METHODS).index(k[0]), *k[1:])):
        rs, label = [r for r in results if key(r) == k], " | ".join(map(str, k))
        accs = {b: [r["accuracy"] for r in rs if r["bench"] == b] for b in benches}
        params = [0] if k[0] == "linear" else sorted({r["params"] - r["head_params"] for r in rs})
        macs = statistics.mean(r["macs_per_token"] for r in rs)
        table[label] = dict(accuracy=accs, seeds=sorted({r["seed"] for r in rs}), params=params, macs_per_token=macs,
                            ms_per_step=[r["ms_per_step"] for r in rs])
        lines.append(f"| {label} |" + "".join(f" {mean_std(accs[b])} |" for b in benches)
                     + f" {'/'.join(f'{p:,}' for p in params)} | {macs:,.0f} | {mean_std(table[label]['ms_per_step'], '{:.1f}')} |")
    seeds = sorted({r["seed"] for r in results})
    if not ablation:
        lines[2:2] = probe_rows(out_dir, benches, seeds, table)             # the probes above the methods
    text = "\n".join(lines) + ("" if ablation else gap_tables(results, benches, table))
    intro = (f"Test accuracy, mean ± std over {len(seeds)} seeds (fold benchmarks: "
             "seed i tests on fold i+1); params: trainable, without the linear head; MACs: all mixtures, per token; "
             "ms/step: mean over all runs of the row:")
    runs = {}                          # (method, mixture): each run's adapter shares of the mixture's output
    for r in [] if ablation else results:
        for name, t in ((k, torch.tensor(v)) for k, v in r["contribution"].items()):
            runs.setdefault((r["method"], name), []).append((t / t.sum().clamp_min(1e-12)).tolist())
    shares = {m: {name: torch.tensor(v).mean(0).tolist() for (m2, name), v in runs.items() if m2 == m}
              for m in ("soft-pfeiffer", "dense-pfeiffer", "soft-houlsby", "dense-houlsby") if any(k[0] == m for k in runs)}
    if shares:
        n = len(next(iter(next(iter(shares.values())).values())))
        text += ("\n\nEach adapter's share of its mixture's output (mean contribution norm over test tokens, "
                 f"mean over benchmarks and seeds; uniform = {1 / n:.3f}):\n\n| method | mixture | "
                 + " | ".join(f"a{e}" for e in range(n)) + " | min / max |\n|---|---|" + "---|" * (n + 1))
        text += "".join(f"\n| {m} | {name} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {min(v) / max(v):.2f} |"
                        for m, per in shares.items()            # block10 after block9
                        for name, v in sorted(per.items(), key=lambda kv: (int(kv[0].split(".")[0][5:]), kv[0])))
        table["contribution_shares"] = shares
    print(f"\n{intro}\n\n{text}\n")
    with open(os.path.join(out_dir, "ablation.md" if ablation else "moa.md"), "w") as f:
        f.write(intro + "\n\n" + text + "\n")
    write_json(table, os.path.join(out_dir, "ablation.json" if ablation else "moa.json"))
    if not ablation:                                  # OUT_DIR/figures/moa_*.png, when matplotlib is installed
        plots.moa_figures(out_dir, run_dirs)


def probe_rows(out_dir: str, benches: Sequence[str], seeds: Sequence[int], table: dict) -> List[str]:
    """The table's probe rows from train_moa.probe_runs' OUT_DIR/BENCH/probe-s{seed}.json (test accuracy)."""
    rows = []
    for side, label in (("log_mel", "probe: mean log-mel (floor)"), ("frozen", "probe: frozen AST")):
        accs = {b: [_json(p)[side]["test"] for p in (os.path.join(out_dir, b, f"probe-s{s}.json") for s in seeds)
                    if os.path.exists(p)] for b in benches}
        if any(accs.values()):
            table[label] = dict(accuracy=accs)
            rows.append(f"| {label} |" + "".join(f" {mean_std(accs[b])} |" for b in benches) + " – | – | – |")
    return rows


def gap_tables(results: List[dict], benches: Sequence[str], table: dict) -> str:
    """Each PETL method's share of the gap from linear to full fine-tuning (of the seed means), and Soft-MoA minus
    the single adapter and Dense-MoA paired by seed."""
    runs = lambda m, b: [r for r in results if r["method"] == m and r["bench"] == b]   # noqa: E731
    mean = lambda m, b: statistics.mean(r["accuracy"] for r in runs(m, b))              # noqa: E731
    have = [m for m in train_moa.MOA_METHODS if m not in ("linear", "full") and any(r["method"] == m for r in results)]
    text = ""
    if have and all(runs(m, b) for m in ("linear", "full") for b in benches):
        span = {b: mean("full", b) - mean("linear", b) for b in benches}
        gap = {m: {b: (mean(m, b) - mean("linear", b)) / span[b] if span[b] else float("nan") for b in benches}
               for m in have}
        text += ("\n\nShare of the gap from linear (the head alone) to full fine-tuning that each method closes, "
                 "(method − linear) / (full − linear) of the means:\n\n| method |" + "".join(f" {b} |" for b in benches)
                 + "\n|---" + "|---" * len(benches) + "|"
                 + "".join(f"\n| {m} |" + "".join(f" {v:.2f} |" if v == v else " – |" for v in gap[m].values())
                           for m in have))
        table["gap_share"] = gap
    pairs = [(f"soft-{at}", f"{other}-{at}") for at in ("pfeiffer", "houlsby") for other in ("single", "dense")
             if f"soft-{at}" in have and f"{other}-{at}" in have]
    if pairs:
        diffs = {f"{a} − {b}": {c: paired(runs(a, c), runs(b, c), "accuracy") for c in benches} for a, b in pairs}
        fmt = lambda d: f"{d['mean']:+.3f} ± {d['std']:.3f} ({d['wins']}/{d['n']})" if d else "–"   # noqa: E731
        text += ("\n\nPaired by seed: mean ± std of the test-accuracy differences (seeds where the first is higher):"
                 "\n\n| difference |" + "".join(f" {b} |" for b in benches) + "\n|---" + "|---" * len(benches) + "|"
                 + "".join(f"\n| {k} |" + "".join(f" {fmt(v[b])} |" for b in benches) for k, v in diffs.items()))
        table["paired"] = diffs
    return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Score each folder's runs (--runs: these, relative to it, in table order) without eval.json or with --force."""
    paths, force, runs = parse_cli(argv, "eval_moa.py")
    for p in paths:
        if not os.path.isdir(p) or (out_dir := moa_out_dir(p)) is None:
            raise UsageError(f"{p}: not a train_moa.py folder (no Soft-MoA config.json in or above it; "
                             f"train.py's runs: python eval.py {p})")
        cfg = _json(os.path.join(out_dir, "config.json"))
        cfg = train_moa.MoAConfig(**{k: v for k, v in cfg.items() if k not in ("workers", "compile", "out_dir")},
                                  out_dir=out_dir)          # older fields left out; out_dir: where it is now, if moved
        ctx = make_ctx(cfg.device, cfg.dtype)
        ast, caches = train_moa.stage_ast(cfg, ctx, resume=False), {}
        names = runs if runs is not None else sorted(
            os.path.relpath(root, out_dir) for root, _, files in os.walk(out_dir) if "summary.json" in files)
        if not names:
            raise UsageError(f"{out_dir}: no finished Soft-MoA run (a folder with summary.json) inside")
        for ablation in (False, True):
            rs = [os.path.join(out_dir, r) for r in names if r.startswith("ablate" + os.sep) == ablation]
            for r in rs:
                evaluate_moa_run(r, ast, cfg, caches, ctx, force=force)
            if rs:
                moa_compare(out_dir, rs, ablation=ablation)


if __name__ == "__main__":
    data.cli(main)
