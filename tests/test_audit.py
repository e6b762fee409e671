"""The budget audit after training (peftbench.audit): AdaLoRA's parameter budget, audited final counts, the
table's params/peak columns and miss marks, the miss line of `peftbench run`."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from peftbench.plugins.adalora import AdaLoRA, AdaLoRAParams, adalora_layers
from peftbench.plugins.lora import LoRA, LoRAParams
from torch import nn

from peftbench import modeling
from peftbench.audit import audit
from peftbench.budget import solve_all
from peftbench.hookspecs import TrainState
from peftbench.lora import rank_cost
from peftbench.store import Store
from peftbench.sweep import Outcome, Sweep, SweepSummary
from peftbench.tables import build
from peftbench.testing import tiny_config

NARROW, WIDE = (16, 16), (16, 128)  # a triplet costs 33 vs 145 parameters (DeBERTa: 1,537 vs 3,841)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.narrow, self.wide = nn.Linear(*NARROW), nn.Linear(*WIDE)


def adalora_with_scores(unit: str, favoured: str, lora_rank: int = 16):
    """AdaLoRA on 6 narrow and 6 wide modules, its final mask allocated from crafted scores that put every
    rank it can on the ``favoured`` modules; returns the measured counts and the LoRA-r budget."""
    model = nn.Sequential(*[Block() for _ in range(6)])
    modeling.freeze(model)
    targets = modeling.find_targets(model, ["narrow", "wide"])
    target = lora_rank * rank_cost(targets)
    method = AdaLoRA(AdaLoRA(AdaLoRAParams(budget_unit=unit)).peftbench_solve_budget(targets=targets, target=target))
    method.peftbench_inject(model=model, targets=targets)
    state = TrainState(step=0, total_steps=20, epoch=0, optimizer=None, lr_scheduler=None, accelerator=None, seed=0)
    method.peftbench_train_start(model=model, state=state)
    allocator = method.allocator
    wide = torch.tensor([name.endswith(favoured) for name in adalora_layers(model)])
    scores = torch.rand(allocator.mask.shape, generator=torch.Generator().manual_seed(0)) + 10 * wide[:, None]
    allocator.triplet_scores = lambda: scores
    with torch.no_grad():
        for layer in adalora_layers(model).values():
            layer.E.fill_(1.0)  # trained singular values: only the mask zeroes them
    allocator.step(allocator.final_step)
    report = method.peftbench_report(model=model, state=state)
    return report, target, method.peftbench_count_trainable(targets=targets)


@pytest.mark.parametrize("favoured", ["wide", "narrow"])
def test_triplet_budget_misses_and_is_flagged_parameter_budget_lands(favoured):
    report, target, predicted = adalora_with_scores("triplets", favoured)
    checked = audit({"method_report": report}, target, 0.01)
    assert predicted.estimate and abs(predicted.final - target) / target < 0.01  # the prediction looked fine
    assert checked["ok"] is False and abs(checked["miss"]) > 0.25  # ±32 %: where the ranks went decides
    assert (checked["miss"] > 0) == (favoured == "wide")
    assert checked["final"] == report["counts"]["final"] and checked["peak"] == report["counts"]["peak"]

    report, target, predicted = adalora_with_scores("params", favoured)
    checked = audit({"method_report": report}, target, 0.01)
    assert checked["ok"] is True and abs(checked["miss"]) <= 145 / 2 / target  # within half a triplet
    assert not predicted.estimate and abs(predicted.final - target) <= 1


def test_parameter_budget_is_the_default():
    assert AdaLoRAParams().budget_unit == "params"


def test_audit_fields_and_reference_methods():
    run = {"trainable": {"adapter": 500, "adapter_nonzero": 400},
           "method_report": {"counts": {"final": 300, "peak": 500, "nonzero": 280}}}
    assert audit(run, 303, 0.02) == {"target": 303, "tolerance": 0.02, "final": 300, "peak": 500, "nonzero": 280,
                                     "miss": pytest.approx(-3 / 303), "ok": True}
    # no counts reported: the trainer's measured trainable adapter
    plain = audit({"trainable": {"adapter": 500, "adapter_nonzero": 400}}, 400, 0.01)
    assert (plain["final"], plain["peak"], plain["nonzero"], plain["ok"]) == (500, 500, 400, False)
    reference = audit({"trainable": {"adapter": 10**8, "adapter_nonzero": 10**8}}, None, 0.01)
    assert reference["reference"] and reference["ok"] is None and reference["final"] == 10**8


def test_lora_reports_measured_counts():
    model = nn.Sequential(*[Block() for _ in range(2)])
    modeling.freeze(model)
    targets = modeling.find_targets(model, ["narrow", "wide"])
    method = LoRA(LoRAParams(r=4))
    method.peftbench_inject(model=model, targets=targets)
    n = 4 * rank_cost(targets)
    zeros_b = sum(t.out_features * 4 for t in targets)  # B starts at zero
    assert method.peftbench_report(model=model)["counts"] == {"final": n, "peak": n, "nonzero": n - zeros_b}


# --- sweep, store and table ---------------------------------------------------------------------------------


def fields(final: int, peak: int, value: float) -> dict:
    return {"trainable": {"adapter": peak, "adapter_nonzero": peak, "head": 10, "model_total": 10**5},
            "best": {"accuracy": value}, "final": {"accuracy": value}, "best_step": 4, "history": [],
            "method_report": {"counts": {"final": final, "peak": peak, "nonzero": peak}}, "wall_s": 1.0,
            "train_s": 1.0, "tokens_per_s": 100.0, "peak_mem_bytes": 1, "mem_kind": "cpu", "steps": 4,
            "median_step_s": 0.1}


def test_run_prints_a_miss_and_the_table_marks_it_and_shows_final_and_peak(tmp_path, host):
    config = tiny_config(tmp_path, methods=[{"name": "adalora", "label": "fits"},
                                            {"name": "adalora", "label": "misses"}, {"name": "full"}])
    lines: list[str] = []
    with Store(config.output.db) as store:
        sweep = Sweep(config, host, store, solve_all(config, host), SweepSummary(), log=lines.append)
        target = sweep.solved[("fits", "toy")].target
        counts = {"fits": (target - 20, 3 * target // 2), "misses": (target * 4 // 5, 3 * target // 2),
                  "full": (10**5, 10**5)}
        for i, spec in enumerate(sweep.runs):
            tag = sweep.claim(i + 1, spec)
            final, peak = counts[spec.label]
            assert sweep.record(spec, tag, Outcome(fields=fields(final, peak, 0.7)))
        runs = store.runs()
    miss = [line for line in lines if "BUDGET MISS" in line]
    assert len(miss) == 1 and "misses" in miss[0] and f"final adapter count {target * 4 // 5:,} is -20.0" in miss[0]
    assert any(f"adapter {target - 20:,} (peak {3 * target // 2:,})" in line for line in lines)
    audits = {run["label"]: run["audit"] for run in runs}
    assert audits["fits"]["ok"] is True and audits["misses"]["ok"] is False and audits["full"]["reference"]

    table = build(runs, {"toy": "accuracy"}, "csv")
    rows = {line.split(",")[0]: line.split(",") for line in table.splitlines()}
    assert rows["method"][:3] == ["method", "params", "peak"]
    assert rows["fits"][1] == f"{(target - 20) / 1e3:.2f}K" and rows["fits"][2] == f"{3 * target // 2 / 1e3:.2f}K"
    assert rows["misses"][1].endswith("‼") and rows["misses"][3].endswith("‼") and "‼" not in rows["fits"][3]
    assert rows["full"][1] == rows["full"][2] == "100.00K"
    assert "‼ a run's measured final adapter count missed its budget" in build(runs, {"toy": "accuracy"})


def test_old_store_gets_the_audit_column(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, sweep TEXT, label TEXT, method TEXT, task TEXT, "
                   "seed INTEGER, status TEXT NOT NULL, spec TEXT, best TEXT, final TEXT, trainable TEXT, "
                   "method_report TEXT, pid INTEGER, host TEXT, started REAL, finished REAL)")
        db.execute("INSERT INTO runs (run_id, label, task, seed, status, best, trainable) VALUES "
                   "('r', 'lora', 'toy', 0, 'done', '{\"accuracy\": 0.5}', '{\"adapter\": 1234}')")
    db.close()
    with Store(path) as store:
        assert "audit" in {row["name"] for row in store.db.execute("PRAGMA table_info(runs)")}
        runs = store.runs()
    assert runs[0]["audit"] is None
    assert build(runs, {"toy": "accuracy"}, "csv").splitlines()[1].startswith("lora,1.23K,1.23K,50.00")
