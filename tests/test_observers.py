"""Observers see every run through the run hooks; the built-in progress bar is one."""

from peftbench.budget import solve_all
from peftbench.hookspecs import hookimpl
from peftbench.host import PluginInfo
from peftbench.observers import ProgressBar
from peftbench.runs import expand
from peftbench.sweep import run_one
from peftbench.testing import tiny_config


class Tracker:
    def __init__(self):
        self.logged, self.evaluated = [], []

    @hookimpl
    def peftbench_on_log(self, state, record):
        assert record["step"] == state.step
        self.logged.append(record)

    @hookimpl
    def peftbench_on_evaluate(self, state, metrics):
        self.evaluated.append((state.step, metrics))


def _spec(host, tmp_path):
    config = tiny_config(tmp_path, train={"epochs": 2, "batch_size": 32, "log_every": 3})
    (spec,) = expand(config, solve_all(config, host))
    return spec


def test_an_observer_sees_every_log_point_and_evaluation(host, tmp_path):
    tracker = Tracker()
    host.add_plugin(tracker, PluginInfo("tracker", "object"))
    result = run_one(_spec(host, tmp_path), host, progress=False)
    assert tracker.logged == [r for r in result.history if "loss" in r]
    assert [r["step"] for r in tracker.logged] == [3, 6, 9, 12, 15, 16]  # every log_every steps and the last
    assert [step for step, _ in tracker.evaluated] == [8, 16]
    evaluations = [r for r in result.history if "in_budget" in r]  # of the validation split
    assert tracker.evaluated[-1][1]["accuracy"] == evaluations[-1]["accuracy"]


def test_the_progress_bar_is_an_observer_of_the_run_only_and_changes_nothing(host, tmp_path):
    spec = _spec(host, tmp_path)
    called = []
    undo = host.pm.add_hookcall_monitoring(lambda name, impls, kwargs: called.append(name), lambda *a: None)
    try:
        shown = run_one(spec, host, progress=True)
    finally:
        undo()
    quiet = run_one(spec, host, progress=False)
    assert shown.history == quiet.history and shown.final == quiet.final
    # no per-step hook: train_start, a call per log point and per evaluation, train_end; the export sizes the adapter
    log, evaluate = "peftbench_on_log", "peftbench_on_evaluate"  # steps 3, 6, epoch end 8, 9, 12, 15, 16
    assert called == ["peftbench_inject", "peftbench_train_start", log, log, evaluate, log, log, log, log,
                      "peftbench_train_end", evaluate, "peftbench_report", "peftbench_export_peft"]
    assert not any(isinstance(p, ProgressBar) for p in host.pm.get_plugins())  # unregistered after the run


def test_the_progress_bar_shows_only_in_budget_scores_as_best():
    """An evaluation at which the method was over its budget is never shown as the best so far."""
    bar = ProgressBar("run", "accuracy")
    bar.peftbench_on_evaluate(metrics={"accuracy": 0.9}, in_budget=False)
    assert bar.best == float("-inf")
    bar.peftbench_on_evaluate(metrics={"accuracy": 0.7}, in_budget=True)
    bar.peftbench_on_evaluate(metrics={"accuracy": 0.95}, in_budget=False)
    assert bar.best == 0.7


class RecordKeeper:
    """An observer of finished runs only (``peftbench_run_end``)."""

    def __init__(self):
        self.records = []

    @hookimpl
    def peftbench_run_end(self, spec, record):
        self.records.append((spec, record))


def test_an_observer_gets_each_finished_runs_record_as_stored(tmp_path):
    """``peftbench_run_end`` hands observers the run record: every field the trainer measured and the run's
    identity, equal to what the store then holds (the budget, audit and artifacts are the sweep's, added later)."""
    import json

    from helpers import train_sweep

    from peftbench import record

    keeper = RecordKeeper()
    _, (run,) = train_sweep(tiny_config(tmp_path), keeper)
    ((spec, got),) = keeper.records
    assert isinstance(got, record.RunRecord) and spec.run_id == got.run_id == run["run_id"]
    measured = [f.name for f in record.columns() if f.metadata["result"]]
    assert "best" in measured and "median_step_s" in measured
    for name in [*measured, "sweep", "label", "method", "task", "seed", "model", "spec", "status"]:
        assert json.loads(json.dumps(getattr(got, name))) == run[name], name
    assert got.budget is None and got.audit is None and run["audit"]["final"] is not None
