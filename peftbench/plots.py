"""``peftbench plot``: figures from a results store (matplotlib; every figure as PNG and SVG).

* ``ranks_<label>``: final rank per layer × module kind, one heatmap per method that reports ``ranks``
* ``rank_over_steps``: total and per-layer rank during training (methods that report ``rank_history``)
* ``metric_vs_params``: dev metric against trainable adapter parameters, one panel per task
* ``curves_<task>``: training loss and the evaluated metric over steps (the validation split's under
  ``train.select: validation``, dev's under ``select: dev``), one line per method
* ``pareto_<task>``: dev metric (mean ± std over seeds) against trainable adapter parameters, peak memory and
  median step time, one labelled point per method (each point's SVG id: ``pareto-<panel>-<label>``)
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import record
from .audit import measured_counts

_LAYER = re.compile(r"\.(\d+)\.(.+)$")


def _layer_and_kind(module: str) -> tuple[int, str]:
    match = _LAYER.search(module)
    return (int(match.group(1)), match.group(2)) if match else (-1, module)


#: the files each figure is written as (``formats=("png",)``: the HTML report embeds PNGs only)
FORMATS = ("png", "svg")


def _save(fig, out: Path, name: str, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    paths = [out / f"{name}.{kind}" for kind in formats]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=130)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def rank_heatmaps(runs: list[dict[str, Any]], out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    by_label: dict[str, list[dict[str, int]]] = defaultdict(list)
    for run in runs:
        ranks = (run.get("method_report") or {}).get("ranks")
        if ranks:
            by_label[run["label"]].append(ranks)
    for label, rank_maps in by_label.items():
        cells: dict[tuple[int, str], list[int]] = defaultdict(list)
        for ranks in rank_maps:  # mean over tasks and seeds
            for module, rank in ranks.items():
                cells[_layer_and_kind(module)].append(rank)
        layers = sorted({layer for layer, _ in cells})
        kinds = sorted({kind for _, kind in cells}, key=lambda k: list(dict.fromkeys(kk for _, kk in cells)).index(k))
        grid = np.full((len(kinds), len(layers)), np.nan)
        for (layer, kind), values in cells.items():
            grid[kinds.index(kind), layers.index(layer)] = statistics.fmean(values)
        fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.55 * len(layers)), 1.4 + 0.45 * len(kinds)))
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xlabel("layer")
        for (i, j), value in np.ndenumerate(grid):
            if value == value:
                ax.text(j, i, f"{value:.0f}" if value == int(value) else f"{value:.1f}", ha="center", va="center",
                        color="white" if value < np.nanmax(grid) * 0.6 else "black", fontsize=7)
        fig.colorbar(image, ax=ax, label="final rank")
        ax.set_title(f"{label}: final rank per module (mean of {len(rank_maps)} run(s))", fontsize=9)
        written += _save(fig, out, f"ranks_{_safe(label)}", formats)
    return written


def rank_over_steps(runs: list[dict[str, Any]], out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    import matplotlib.pyplot as plt

    with_history = [r for r in runs if (r.get("method_report") or {}).get("rank_history")]
    if not with_history:
        return []
    fig, (total_ax, layer_ax) = plt.subplots(1, 2, figsize=(11, 4))
    shown = set()
    for run in with_history:
        history = run["method_report"]["rank_history"]
        steps = [h["step"] for h in history]
        key = (run["label"], run["task"])
        if key in shown:
            continue  # one seed per (method, task) keeps the figure readable
        shown.add(key)
        total_ax.plot(steps, [sum(h["ranks"].values()) for h in history], label=f"{run['label']} / {run['task']}")
        if len(shown) == 1:
            per_layer: dict[int, list[int]] = defaultdict(list)
            for h in history:
                totals: dict[int, int] = defaultdict(int)
                for module, rank in h["ranks"].items():
                    totals[_layer_and_kind(module)[0]] += rank
                for layer, value in totals.items():
                    per_layer[layer].append(value)
            for layer, values in sorted(per_layer.items()):
                layer_ax.plot(steps[:len(values)], values, label=f"layer {layer}")
            layer_ax.set_title(f"rank per layer: {run['label']} / {run['task']}")
    total_ax.set_title("total rank during training")
    for ax in (total_ax, layer_ax):
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    total_ax.set_ylabel("sum of ranks")
    return _save(fig, out, "rank_over_steps", formats)


def metric_vs_params(runs: list[dict[str, Any]], main_metric: dict[str, str], out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs if r["task"] in main_metric})
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        points: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for run in runs:
            metric = main_metric[task]
            if run["task"] == task and metric in (run.get("best") or {}):
                points[run["label"]].append((measured_counts(run)["final"] or 0, 100 * run["best"][metric]))
        for label, values in points.items():
            x = statistics.fmean(v[0] for v in values)
            y = statistics.fmean(v[1] for v in values)
            ax.scatter([x], [y], label=label)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable adapter parameters")
        ax.set_title(f"{task} ({main_metric[task]} ×100)")
    return _save(fig, out, "metric_vs_params", formats)


def evaluated_split(runs: list[dict[str, Any]]) -> str:
    """The split the runs' history evaluations scored: ``validation`` under ``train.select: validation`` (dev is
    then scored once, at the checkpoint it chose, and is not in the history), ``dev`` otherwise (a run stored
    without the key selected on dev)."""
    rules = {((run.get("spec") or {}).get("train") or {}).get("select") or "dev" for run in runs}
    return " or ".join(sorted({"validation" if rule == "validation" else "dev" for rule in rules}))


def training_curves(runs: list[dict[str, Any]], main_metric: dict[str, str], out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({r["task"] for r in runs if r["task"] in main_metric}):
        fig, (loss_ax, dev_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
        seen = set()
        plotted = []
        for run in runs:
            if run["task"] != task or run["label"] in seen:
                continue
            plotted.append(run)
            seen.add(run["label"])
            history = run.get("history") or []
            losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
            devs = [(h["step"], 100 * h[main_metric[task]]) for h in history if main_metric[task] in h]
            if losses:
                loss_ax.plot(*zip(*losses), label=run["label"])
            if devs:
                dev_ax.plot(*zip(*devs), marker="o", markersize=3, label=run["label"])
        loss_ax.set_title(f"{task}: training loss")
        dev_ax.set_title(f"{task}: {evaluated_split(plotted)} {main_metric[task]} ×100")
        for ax in (loss_ax, dev_ax):
            ax.set_xlabel("optimizer step")
            ax.legend(fontsize=7)
        written += _save(fig, out, f"curves_{_safe(task)}", formats)
    return written


def pareto_panels() -> list[tuple[str, str, Any, bool]]:
    """The Pareto panels: ``(panel id, x axis label, the x value of a run, log scale)``: the measured adapter
    count, then every cost of the run record with a panel (:class:`peftbench.record.Cost`), in its unit."""
    def cost_of(name: str, scale: float):
        return lambda run: run[name] * scale if run.get(name) else None  # 0 or none measured: no point

    return [("params", "final adapter parameters (measured)", lambda r: measured_counts(r)["final"], True),
            *((cost.plot[0], cost.plot[1], cost_of(name, cost.scale), False) for name, cost in record.cost_panels())]


def pareto_points(runs: list[dict[str, Any]], task: str, metric: str, x_of) -> dict[str, tuple[float, float, float]]:
    """``{label: (mean x, mean metric ×100, std of the metric over seeds)}`` of ``task``'s runs with an x."""
    by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        x = x_of(run) if run["task"] == task and metric in (run.get("best") or {}) else None
        if x is not None:
            by_label[run["label"]].append((x, 100 * run["best"][metric]))
    return {label: (statistics.fmean(x for x, _ in v), statistics.fmean(y for _, y in v),
                    statistics.stdev(y for _, y in v) if len(v) > 1 else 0.0) for label, v in by_label.items()}


def pareto(runs: list[dict[str, Any]], main_metric: dict[str, str], out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Accuracy against cost, one figure per task: is a method's score worth what it costs?"""
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({r["task"] for r in runs if r["task"] in main_metric}):
        metric = main_metric[task]
        panels = pareto_panels()
        fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False)
        for ax, (panel, xlabel, x_of, log) in zip(axes[0], panels):
            for label, (x, y, std) in pareto_points(runs, task, metric, x_of).items():
                bars = ax.errorbar([x], [y], yerr=[std], fmt="o", capsize=3, label=label)
                bars.lines[0].set_gid(f"pareto-{panel}-{_safe(label)}")  # findable in the SVG (tests)
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"dev {metric} ×100")
        fig.suptitle(f"{task}: {metric} against cost (mean ± std over seeds)", fontsize=9)
        written += _save(fig, out, f"pareto_{_safe(task)}", formats)
    return written


def plot_all(runs: list[dict[str, Any]], main_metric: dict[str, str], out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return (rank_heatmaps(runs, out) + rank_over_steps(runs, out) + metric_vs_params(runs, main_metric, out)
            + training_curves(runs, main_metric, out) + pareto(runs, main_metric, out))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
