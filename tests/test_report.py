"""`peftbench report`: one self-contained HTML page, rendered by headless Chromium in the tests (the table and
every figure must render, with no console error), for a small real store and a synthetic one of 200 runs."""

import re

import pytest
from helpers import GLUE_METRICS, render_in_chromium, synthetic_store, train_sweep

from peftbench.cli import main
from peftbench.store import Store
from peftbench.testing import tiny_config

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """Four tiny runs: LoRA and PrunedLoRA (whose ranks change: a heatmap and rank curves), two seeds each."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTBENCH_CACHE", str(tmp / "cache"))
        config = tiny_config(tmp, methods=[{"name": "lora", "params": {"r": 4, "alpha": 8}},
                                           {"name": "prunedlora", "params": {"prune_every": None}}],
                             seeds=[0, 1])
        train_sweep(config)
    return config.output.db


def _report(db, out, *extra):
    assert main(["report", str(db), "--out", str(out), "--plugin", "peftbench.testing", *extra]) == 0
    return out / "index.html"


def _self_contained(text):
    """No reference to anything outside the page (the only URLs are data: URIs)."""
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "http://" not in text and "https://" not in text


def test_report_of_a_real_store_renders_in_chromium(real_store, tmp_path):
    page = _report(real_store, tmp_path / "report")
    text = page.read_text()
    _self_contained(text)
    for part in ("Comparison", "Accuracy against cost", "Rank allocation", "Training curves", "Protocol",
                 "in-budget selection", "Environment", "seeds", "torch"):
        assert part in text, part
    shown = render_in_chromium(page, screenshot=tmp_path / "report.png")
    assert shown["errors"] == []
    assert shown["tables"]["comparison"] == 2  # lora, prunedlora
    assert len(shown["images"]) >= 4  # pareto, the PrunedLoRA heatmap, rank over steps, curves
    assert all(width > 0 for _, width in shown["images"]), shown["images"]
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_of_200_runs_renders_in_chromium(tmp_path):
    db = tmp_path / "big.sqlite"
    assert synthetic_store(db) == 200
    page = _report(db, tmp_path / "report")
    _self_contained(page.read_text())
    shown = render_in_chromium(page)
    assert shown["errors"] == []
    assert shown["tables"]["comparison"] == 5
    # 8 Pareto figures, 3 rank heatmaps, the rank curves and 8 curve figures: all decoded
    assert len(shown["images"]) == 8 + 3 + 1 + 8
    assert all(width > 0 for _, width in shown["images"]), shown["images"]
    # sorting by avg (descending) puts the synthetic best method (full) first
    assert shown["sorted"][0] == "full" and shown["sorted"][-1] == "lora"


def test_report_marks_best_significance_and_budget_misses(tmp_path):
    from peftbench.report import write_report

    db = tmp_path / "s.sqlite"
    synthetic_store(db, tasks=("rte", "sst2"), methods=("lora", "adalora"), seeds=(0, 1, 2))
    store = Store(db)
    runs = store.runs()
    store.close()
    runs[0]["audit"] = {**runs[0]["audit"], "ok": False, "miss": 0.2}
    gold = [i % 2 for i in range(300)]
    for run in runs:  # adalora right on 90 % of the dev examples, lora on 60 %: the bootstrap marks it
        right = 270 if run["label"] == "adalora" else 180
        run["dev_predictions"] = {"validation": {"labels": gold, "predictions": [
            g if i < right else 1 - g for i, g in enumerate(gold)]}}
    text = write_report(runs, {t: GLUE_METRICS[t] for t in ("rte", "sst2")}, tmp_path / "out").read_text()
    assert '<strong class="best">' in text
    assert 'class="sig"' in text
    assert 'class="miss"' in text and "missed its budget" in text
    assert "12 finished run(s): 2 method(s) × 2 task(s) × 3 seed(s)" in text


def test_report_shows_a_label_with_mark_characters_as_text():
    """Cells come to the page as values and flags: a label that looks like a mark is not made bold or titled."""
    from peftbench.report import table_section

    runs = [{"label": "**odd**†", "task": "rte", "seed": s, "best": {"accuracy": 0.7}, "final": {"accuracy": 0.7}}
            for s in (0, 1)]
    html = table_section(runs, {"rte": "accuracy"})
    assert "<td class=text>**odd**†</td>" in html and 'class="sig"' not in html


def test_report_lists_unfinished_runs_and_reads_the_store_only(tmp_path):
    db = tmp_path / "s.sqlite"
    synthetic_store(db, tasks=("rte",), methods=("lora",), seeds=(0,))
    store = Store(db)
    store.claim("f" * 16, {"sweep": "glue", "label": "lora", "method": "lora", "task": "rte", "seed": 1,
                           "spec": {}, "budget": {}})
    store.finish("f" * 16, "failed", {"error": "RuntimeError: boom"})
    store.close()
    before = db.read_bytes()
    db.chmod(0o444)
    page = _report(db, tmp_path / "out")
    assert db.read_bytes() == before
    text = page.read_text()
    assert "Runs not finished (1)" in text and "RuntimeError: boom" in text


def test_report_of_a_missing_store_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
