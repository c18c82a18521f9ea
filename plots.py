"""The papers' figures as small PNGs in OUT_DIR/figures (eval.py, eval_moa.py; needs matplotlib): MoE-Adapter Figs.
3-5 and training curves, Soft-MoA Figs. 2-3. Experts differ between seeds: usage is drawn per run. Returns the arrays."""
import io
import json
import os

import numpy as np

import data
from loop import read_json
from moe_adapter import ADAPTER_KINDS

_said = []


def _figure(w: float, h: float, rows: int = 1, cols: int = 1, **grid):
    """A Figure drawn by matplotlib's Agg canvas (no pyplot, no GUI) and its axes; (None, None) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:                                   # an optional extra: said once per process
        if not _said:
            print("pip install matplotlib for figures")
            _said.append(True)
        return None, None
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, gridspec_kw=grid)


def _save(fig, out_dir: str, name: str, title: str) -> None:
    """A 64-colour PNG (a third of the size of matplotlib's RGBA one); a grid's unused axes removed."""
    for ax in fig.axes:
        if not ax.has_data():
            ax.remove()
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    from PIL import Image                                  # matplotlib's own dependency
    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    Image.open(buf).convert("RGB").quantize(64).save(os.path.join(out_dir, "figures", name), optimize=True)


def _heatmaps(out_dir: str, name: str, title: str, panels, cols: int, **kw) -> None:
    """One PNG, `cols` heatmaps a row; panels: (title, m, row labels, column labels). Small ones carry their values."""
    heights = [max(len(p[1]) for p in panels[i:i + cols]) for i in range(0, len(panels), cols)]
    per_row, cols = 0.2 if max(heights) < 20 else 0.09, min(cols, len(panels))         # inches per heatmap row
    fig, axes = _figure(max(6.5, 1.5 + 3.3 * cols), 0.8 + 0.5 * len(heights) + per_row * sum(heights),
                        len(heights), cols, height_ratios=heights)
    for ax, (t, m, rows, columns) in zip(axes.flat, panels):
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="Blues", **kw)
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7 if per_row > 0.1 else 5)
        ax.set_title(t, fontsize=8)
        if m.size > 80:
            fig.colorbar(im, ax=ax, shrink=0.6).ax.tick_params(labelsize=7)
            continue
        for (i, j), v in np.ndenumerate(m):
            dark = np.dot(im.cmap(im.norm(v))[:3], (0.3, 0.6, 0.1)) < 0.5
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if dark else "k")
    _save(fig, out_dir, name, title)


def _metrics(path: str) -> dict:
    """{step: record} of a metrics.jsonl (a resumed run's repeated steps: the last), {} when missing."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def train_figures(out_dir: str, run_dirs) -> dict:
    """expert_usage_{domain,task}.png, domain_cosines.png, curves.png for train.py's runs."""
    if _figure(1, 1)[0] is None:
        return {}
    ev = sorted(((read_json(os.path.join(r, "eval.json")), r) for r in run_dirs),
                key=lambda er: (ADAPTER_KINDS.index(er[0]["kind"]), er[0]["seed"]))
    kinds = list(dict.fromkeys(e["kind"] for e, _ in ev))
    drawn, moe = {}, [e for e, _ in ev if e.get("expert_usage")]
    for key in ("domain", "task") if moe else ():             # Fig. 3: share of each name's token slots per expert
        names = sorted(moe[0]["expert_usage"][key], key=lambda n: (key == "task" and data.TASKS[n].group, n))
        rows = [f"{n} ({data.TASKS[n].group[0].upper()})" if key == "task" else n for n in names]
        panels = [(f"{e['kind']} seed {e['seed']}", np.array([e["expert_usage"][key][n] for n in names]), rows,
                   [f"e{i}" for i in range(len(e["expert_usage"][key][names[0]]))]) for e in moe]
        drawn.update({f"{key}/{e['kind']}-s{e['seed']}": p[1] for e, p in zip(moe, panels)})
        title = (f"Expert usage by {key}: share of the test clips' routed token slots per expert (rows sum to 1, "
                 f"uniform {1 / len(panels[0][3]):.3f})" + ("\nS semantic, P paralinguistic; the router sees the audio "
                 "alone, so tasks asked of the same clips route alike" if key == "task" else "")
                 + ("\nmoe-random: experts routed by token position (a control)" if "moe-random" in kinds else ""))
        _heatmaps(out_dir, f"expert_usage_{key}.png", title, panels, sum(e["kind"] == moe[0]["kind"] for e in moe),
                  vmin=0, vmax=max(p[1].max() for p in panels))
    pairs = sorted(ev[0][0]["gradient_conflict"]["domain"]["pairs"])
    if pairs:                                                 # none when the data has one domain
        fig, axes = _figure(6.4, 3.2)                         # Figs. 4-5: domain-gradient cosines per kind
        ax, width = axes[0, 0], 0.8 / len(kinds)
        for i, k in enumerate(kinds):
            seeds = np.array([[e["gradient_conflict"]["domain"]["pairs"][p] for p in pairs]
                              for e, _ in ev if e["kind"] == k])                                # (seeds, pairs)
            x = np.arange(len(pairs)) + (i - (len(kinds) - 1) / 2) * width
            ax.bar(x, seeds.mean(0), width, color=f"C{i}", label=f"{k} ({len(seeds)} seeds)", alpha=0.8)
            ax.plot(np.broadcast_to(x, seeds.shape).ravel(), seeds.ravel(), "k.", ms=3)
            drawn[f"cosine/{k}"] = seeds.mean(0)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(pairs)), [p.replace("|", " – ") for p in pairs], fontsize=8)
        ax.set(ylabel="cosine of the adapter gradients")
        ax.legend(fontsize=7)
        _save(fig, out_dir, "domain_cosines.png", "Domain-gradient cosines of the trained adapters: bar = mean over "
              "seeds, dot = one seed\n(below 0: the two domains' updates conflict)")
    fig, axes = _figure(9, 3.2, 1, 2)                         # training curves, mean over seeds per kind
    for ax, phase, title in zip(axes[0], ("align", ""), ("3a. align: the adapter alone, on captions",
                                                         "3b. tune: on questions + captions (valid: questions)")):
        for i, k in enumerate(kinds):
            runs = [_metrics(os.path.join(r, phase, "metrics.jsonl")) for e, r in ev if e["kind"] == k]
            for metric, style in (("ce", "-"), ("valid_loss", "o--")) if all(runs) else ():
                steps = sorted(set.intersection(*({s for s, m in run.items() if metric in m} for run in runs)))
                w = max(1, len(steps) // 30) if metric == "ce" else 1                      # running mean
                y = drawn[f"curves/{phase or 'tune'}/{k}/{metric}"] = np.convolve(
                    np.mean([[run[s][metric] for s in steps] for run in runs], 0), np.ones(w) / w, "valid")
                ax.plot(steps[w - 1:], y, style, color=f"C{i}", ms=3, lw=1, label=k if metric == "ce" else None)
        ax.set(xlabel="step", ylabel="cross-entropy per answer token")
        ax.set_title(title, fontsize=9)
        if ax.lines:                                       # no align phase: the panel is removed
            ax.legend(fontsize=7)
    _save(fig, out_dir, "curves.png", "Training curves, mean over seeds: solid = train CE (running mean), "
          "dots = validation loss")
    return drawn


def moa_figures(out_dir: str, run_dirs) -> dict:
    """moa_contribution.png (Fig. 2) and moa_usage.png (Fig. 3) for the lowest seed of each train_moa.py run."""
    ev = [e for e in (read_json(os.path.join(r, "eval.json")) for r in run_dirs) if e["contribution"]]
    if not ev or _figure(1, 1)[0] is None:                                # no mixture among the methods
        return {}
    seed = min(e["seed"] for e in ev)
    ev = sorted((e for e in ev if e["seed"] == seed), key=lambda e: (e["method"].endswith("houlsby"), e["method"]))
    order = lambda name: (int(name.split(".")[0][5:]), name)                            # block10 after block9
    rows = {}                                                  # method: {bench mixture: adapter shares}
    for e in ev:
        for name, c in sorted(e["contribution"].items(), key=lambda nc: order(nc[0])):
            rows.setdefault(e["method"], {})[f"{e['bench']} {name}"] = np.array(c) / sum(c)
    drawn = {f"contribution/{k}": np.array(list(v.values())) for k, v in rows.items()}     # (rows, adapters)
    n = len(next(iter(ev[0]["contribution"].values())))                                # adapters per mixture
    _heatmaps(out_dir, "moa_contribution.png", f"Each adapter's share of its mixture's output (mean norm over test "
              f"tokens), seed {seed}; uniform = {1 / n:.2f}", [(k, drawn[f"contribution/{k}"], list(v),
              [f"a{i}" for i in range(n)]) for k, v in rows.items()], 2, vmin=0, vmax=2 / n)
    soft = {}
    for e in (e for e in ev if e["method"].startswith("soft")):          # each benchmark's first Soft-MoA method
        soft.setdefault(e["bench"], e)
    last = {b: max(e["usage_by_class"], key=order) for b, e in soft.items()}          # and its last mixture
    drawn.update({f"usage/{b}": np.array(e["usage_by_class"][last[b]], dtype=float) for b, e in soft.items()})
    panels = [(f"{b}: {e['method']} {last[b]}", drawn[f"usage/{b}"], e["classes"], [f"a{i}" for i in range(n)])
              for b, e in soft.items()]                                             # (classes, adapters)
    if soft:
        _heatmaps(out_dir, "moa_usage.png", f"Soft-MoA adapter usage by class, seed {seed}: each token's combine "
                  "weight per adapter,\nmean over the class's test tokens (blank: no test clip of the class)",
                  panels, len(soft))
    return drawn
