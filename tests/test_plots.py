"""`peftbench plot` writes every figure as PNG and SVG from stored run records."""

import pytest

pytest.importorskip("matplotlib")

from peftbench.plots import plot_all  # noqa: E402


def _run(label, task, seed, ranks=None, history=None, value=0.7, adapter=1000):
    report = {}
    if ranks:
        report["ranks"] = ranks
    if history:
        report["rank_history"] = history
    return {"label": label, "task": task, "seed": seed, "best": {"accuracy": value}, "trainable": {"adapter": adapter},
            "method_report": report,
            "history": [{"step": 10, "loss": 0.7}, {"step": 20, "loss": 0.5, "accuracy": value}]}


def test_all_figures_written(tmp_path):
    modules = [f"bert.encoder.layer.{i}.attention.self.{k}" for i in range(3) for k in ("query", "value")]
    ranks = {m: 2 + i for i, m in enumerate(modules)}
    history = [{"step": s, "ranks": {m: max(1, 8 - s // 10) for m in modules}} for s in (0, 10, 20, 30)]
    runs = [_run("lora", "rte", 0), _run("prilora", "rte", 0, ranks=ranks, value=0.72),
            _run("adalora", "rte", 0, ranks=ranks, history=history, value=0.75, adapter=1200)]
    written = plot_all(runs, {"rte": "accuracy"}, tmp_path)
    names = {p.name for p in written}
    for stem in ("ranks_prilora", "ranks_adalora", "rank_over_steps", "metric_vs_params", "curves_rte"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    assert all(p.stat().st_size > 1000 for p in written)
    assert "ranks_lora.png" not in names  # LoRA reports no rank allocation


def test_no_rank_reports_means_no_rank_figures(tmp_path):
    written = plot_all([_run("lora", "rte", 0)], {"rte": "accuracy"}, tmp_path)
    assert {p.stem for p in written} == {"metric_vs_params", "curves_rte", "pareto_rte"}


def test_pareto_figure_has_one_point_per_method_and_panel(tmp_path):
    runs = [{**_run(label, "rte", seed, value=value + seed / 100, adapter=adapter), "median_step_s": step,
             "peak_mem_bytes": mem} for seed in (0, 1)
            for label, value, adapter, step, mem in [("lora", 0.70, 1000, 0.01, 2 ** 30),
                                                    ("adalora", 0.72, 1200, 0.15, 3 * 2 ** 30)]]
    runs.append({**_run("old", "rte", 0), "median_step_s": None})  # a run without costs: only in the params panel
    written = plot_all(runs, {"rte": "accuracy"}, tmp_path)
    assert {"pareto_rte.png", "pareto_rte.svg"} <= {p.name for p in written}
    svg = (tmp_path / "pareto_rte.svg").read_text()
    import re

    assert sorted(re.findall(r'id="pareto-params-([^"]+)"', svg)) == ["adalora", "lora", "old"]
    assert sorted(re.findall(r'id="pareto-memory-([^"]+)"', svg)) == ["adalora", "lora"]
    assert sorted(re.findall(r'id="pareto-step-([^"]+)"', svg)) == ["adalora", "lora"]


def test_curves_name_the_split_their_evaluations_scored(tmp_path):
    """Under train.select: validation the history holds the validation split's evaluations (dev is scored once,
    at the chosen checkpoint): the curve's title says so; runs selected on dev (or stored without the key) say dev."""
    validation = [{**_run("lora", "rte", 0), "spec": {"train": {"select": "validation"}}}]
    dev = [{**_run("lora", "rte", 0), "spec": {"train": {"select": "dev"}}}]
    for runs, title in ((validation, "rte: validation accuracy"), (dev, "rte: dev accuracy"),
                        ([_run("lora", "rte", 0)], "rte: dev accuracy")):
        (svg,) = [p for p in plot_all(runs, {"rte": "accuracy"}, tmp_path) if p.name == "curves_rte.svg"]
        assert title in svg.read_text()
