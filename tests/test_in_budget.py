"""In-budget model selection: a reported metric only comes from an evaluation at which the method was within its
budget (#16, bias 1)."""

from __future__ import annotations

import pytest
import yaml

import peftbench.task as task_module
import peftbench.trainer as trainer
from peftbench.config import TrainConfig
from peftbench.errors import ConfigError
from peftbench.hookspecs import hookimpl
from peftbench.method import Method
from peftbench.runner import make_host, run_sweep, solve_budgets
from peftbench.schedule import batches, evaluation_steps, in_budget_plan, train_examples
from peftbench.store import Store
from peftbench.sweep import Sweep, SweepSummary
from peftbench.tables import build
from peftbench.testing import tiny_config


class LateLoRA(Method):
    """A LoRA-sized stand-in for a method that prunes: over budget until 3 steps before the end."""

    name = "late"
    matches_budget = False  # counted apart, like a reference method: the test is about its schedule

    @hookimpl
    def peftbench_count_trainable(self, targets):
        from peftbench.hookspecs import ParamCounts

        return ParamCounts(0, 0, 0)

    @hookimpl
    def peftbench_inject(self, model, targets):
        return True

    @hookimpl
    def peftbench_in_budget_from(self, total_steps):
        return total_steps - 3


class LatePlugin:
    PEFTBENCH_API_VERSION = 2

    @hookimpl
    def peftbench_add_methods(self):
        return [LateLoRA]


LATE_PLUGIN = LatePlugin()


def _declining_scores(monkeypatch):
    """Dev accuracy that falls as training goes on: the best of any evaluation is always the earliest."""
    def score(model, loader, task, accelerator):
        score.calls += 1
        return {"accuracy": 1.0 - 0.01 * score.calls}, None
    score.calls = 0
    monkeypatch.setattr(task_module, "predict_and_score", score)


def _sweep(tmp_path, methods, **train):
    config = tiny_config(tmp_path, methods=methods, train={"epochs": 2, "eval_every": 4, **train})
    host = make_host(config)
    store = Store(config.output.db)
    summary = run_sweep(config, host, store, progress=False, log=lambda *a: None)
    assert summary.ok, summary.failed
    return host, store.runs()


PRUNEDLORA = {"name": "prunedlora", "params": {"prune_every": None, "final_ratio": 0.3}}


@pytest.mark.parametrize("method", ["adalora", PRUNEDLORA], ids=["adalora", "prunedlora"])
def test_over_budget_evaluation_never_becomes_the_reported_metric(tmp_path, monkeypatch, method):
    _declining_scores(monkeypatch)
    host, (run,) = _sweep(tmp_path, [method], select="dev")  # the rule of every select, here readable on dev
    evals = [h for h in run["history"] if "accuracy" in h]
    assert run["in_budget_from"] > 0 and evals[0]["step"] < run["in_budget_from"]
    assert not evals[0]["in_budget"] and evals[-1]["in_budget"]
    # the old rule would report the first (over-budget) evaluation; the reported one is the first in budget
    assert run["best_any_step"] == evals[0]["step"] and run["best_any"]["accuracy"] == evals[0]["accuracy"]
    first_in = next(h for h in evals if h["in_budget"])
    assert run["best_step"] == first_in["step"] >= run["in_budget_from"]
    assert run["best"]["accuracy"] == first_in["accuracy"] < run["best_any"]["accuracy"]
    assert run["in_budget_evals"] == sum(h["in_budget"] for h in evals) < run["evaluations"] == len(evals)


def test_declared_step_matches_the_methods_real_schedule(tmp_path):
    """AdaLoRA is in budget from the step after it freezes its mask, PrunedLoRA after its last event."""
    host, runs = _sweep(tmp_path, ["adalora", PRUNEDLORA])
    by_method = {run["method"]: run for run in runs}
    adalora = by_method["adalora"]["method_report"]["adalora"]
    assert by_method["adalora"]["in_budget_from"] == by_method["adalora"]["steps"] - adalora["tfinal"] + 1
    history = by_method["prunedlora"]["method_report"]["rank_history"]
    last_event = max(h["step"] for h in history)
    assert by_method["prunedlora"]["in_budget_from"] == last_event + 1  # the event step (0-based) completes


def test_lora_counts_every_evaluation_and_table_says_in_budget(tmp_path):
    host, (run,) = _sweep(tmp_path, ["lora"])
    assert run["in_budget_from"] == 0 and run["in_budget_evals"] == run["evaluations"]
    assert run["best"] == run["best_any"]
    table = build([run], {"toy": "accuracy"})
    assert "within its budget" in table
    assert "over-budget ones included" in build([run], {"toy": "accuracy"}, metric="best_any")


def test_prilora_is_evaluated_pruned_and_training_is_unchanged(tmp_path, monkeypatch):
    """PRILoRA's evaluations see its pruning mask applied; the zeroed entries come back afterwards, so
    training goes on exactly as without the evaluation."""
    seen = []

    def score(model, loader, task, accelerator):
        a = [m.lora_A for m in model.modules() if hasattr(m, "norm_ema")]
        seen.append(sum(int((t == 0).sum()) for t in a) / sum(t.numel() for t in a))
        return {"accuracy": 0.5}, None
    monkeypatch.setattr(task_module, "predict_and_score", score)
    method = {"name": "prilora", "params": {"prune_every": 1000}}  # no event during training: only the final one
    host, (run,) = _sweep(tmp_path / "a", [method])
    assert all(abs(s - 0.5) < 0.02 for s in seen), seen  # half of every row of A zeroed at every evaluation
    monkeypatch.setattr(trainer, "evaluate", lambda run_, host_, final=False: {"accuracy": 0.5})
    host, (quiet,) = _sweep(tmp_path / "b", [method])
    losses = [[h["loss"] for h in r["history"] if "loss" in h] for r in (run, quiet)]
    assert losses[0] == losses[1]


def test_evaluation_steps_match_the_trainer(tmp_path):
    host, (run,) = _sweep(tmp_path, ["lora"], eval_every=5)
    cfg = TrainConfig(epochs=2, batch_size=16, eval_every=5)
    batches_ = batches(train_examples(cfg, 256), 16)  # the toy task's 256 examples less the validation split
    assert batches_ == 15 and [h["step"] for h in run["history"] if "accuracy" in h] == evaluation_steps(cfg, 15)


def test_schedule_that_leaves_too_few_in_budget_evaluations_is_a_config_error(tmp_path):
    config = tiny_config(tmp_path, methods=["lora", {"name": "late"}], train={"epochs": 2, "eval_every": 2},
                         budget={"min_evaluations": 3})
    config.plugins.append("tests.test_in_budget:LATE_PLUGIN")
    host = make_host(config)
    solved = solve_budgets(config, host)
    with pytest.raises(ConfigError, match=r"methods\[1\] \(late, toy\): only 2 of the run's 16 dev evaluations"):
        Sweep(config, host, Store(config.output.db), solved, SweepSummary())
    plan = in_budget_plan(TrainConfig(epochs=2, batch_size=16, eval_every=1), 256, lambda total: total - 3)
    assert (plan.total_steps, plan.from_step, plan.counted) == (32, 29, 4)


def test_old_results_are_not_taken_as_in_budget(tmp_path):
    """A run stored under the old selection rule has another identity: it is retrained, not reported."""
    from peftbench.runs import RunSpec

    spec = RunSpec("s", "lora", "lora", None, "toy", 0, None, TrainConfig(), None)
    assert spec.identity()["selection"] == "in_budget"


def test_budget_command_shows_the_plan(tmp_path, capsys):
    from peftbench.cli import main

    config = tiny_config(tmp_path, methods=["lora", "adalora", {"name": "full", "train": {"lr": 1e-4}}],
                         train={"epochs": 2, "eval_every": 4}, budget={"min_evaluations": 3})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["budget", str(path)]) == 0
    out = capsys.readouterr().out
    assert "in budget from step" in out
    plan = out[out.index("in budget from step"):]
    line = next(line for line in plan.splitlines() if line.startswith("adalora"))
    # 230 of the toy task's 256 examples train (26 are the validation split): 15 steps an epoch; tfinal 0.47:
    # the mask is frozen after step 16; learning rates of the adapter and of the head
    assert line.split() == ["adalora", "toy", "30", "17", "4", "of", "9", "0.005", "0.005"]
    line = next(line for line in plan.splitlines() if line.startswith("full"))
    assert line.split()[-2:] == ["0.0001", "0.005"]  # its own rate, the head at the sweep's like every method's
    # the rule the sweep applies (check_in_budget): a run with 2 evaluations needs 2 in budget, not 3
    assert ("fewer in budget than the smaller of budget.min_evaluations = 3 and the run's number of evaluations "
            "is a config error") in " ".join(out.split())


def test_evaluating_leaves_training_unchanged(tmp_path):
    """Evaluations draw nothing from the training RNG: with dropout, the losses are the same whether the run
    evaluates every step or only at epoch ends; and a step is evaluated once, however many reasons it has."""
    lora = {"name": "lora", "params": {"dropout": 0.1}}
    _, (often,) = _sweep(tmp_path / "a", [lora], eval_every=1, log_every=1)
    _, (rarely,) = _sweep(tmp_path / "b", [lora], eval_every=0, log_every=1)
    losses = [[h["loss"] for h in r["history"] if "loss" in h] for r in (often, rarely)]
    assert len(losses[0]) == often["steps"] and losses[0] == losses[1]
    steps = [h["step"] for h in often["history"] if "accuracy" in h]
    assert steps == list(range(1, often["steps"] + 1)) and often["evaluations"] == len(steps)
