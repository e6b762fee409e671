"""Experiment trackers (`output.trackers`): observers that mirror every run's history to TensorBoard, MLflow or
a third-party tracker, and never change a run's result or exit status."""

import warnings

import pytest
from helpers import ExplodingTracker, RecordingTracker

from peftbench.config import load_config
from peftbench.errors import ConfigError
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store
from peftbench.testing import tiny_config

METHODS = [{"name": "lora", "params": {"r": 4, "alpha": 8}}, {"name": "prunedlora", "params": {"prune_every": None}}]


def _sweep(tmp_path, trackers, methods=METHODS):
    config = tiny_config(tmp_path, methods=methods, output={"trackers": trackers})
    store = Store(config.output.db)
    summary = run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
    runs = store.runs()
    store.close()
    return config, summary, {run["label"]: run for run in runs}


def _logged(history):
    """The stored history as the trackers get it: {tag: [(step, value)]}."""
    expected = {}
    for entry in history:
        evaluation = "in_budget" in entry
        for key, value in entry.items():
            if key in ("step", "in_budget") or (key == "epoch" and evaluation):
                continue
            if evaluation:
                tag = f"dev/{key}" if key not in ("rank", "adapter_params", "adalora_budget") else None
            else:
                tag = f"train/{key}" if key in ("loss", "lr", "epoch") else f"method/{key}"
            if tag:
                expected.setdefault(tag, []).append((entry["step"], float(value)))
    return expected


def _same(got, points):
    """Same steps, same values (TensorBoard keeps float32)."""
    return [s for s, _ in got] == [s for s, _ in points] and \
        [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-12)


def test_tensorboard_event_files_hold_the_stored_history(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, summary, runs = _sweep(tmp_path, ["tensorboard"])
    assert summary.ok
    for label, run in runs.items():
        folder = tmp_path / "runs" / run["run_id"] / "tensorboard"
        assert list(folder.glob("events.out.tfevents.*")), f"no event file for {label}"
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag, points in _logged(run["history"]).items():
            got = [(e.step, e.value) for e in events.Scalars(tag)]
            assert _same(got, points), (label, tag, got, points)
        main = "accuracy"
        assert events.Scalars(f"best/{main}")[-1].value == pytest.approx(run["best"][main])
        if run["final"]:  # dev is scored once: after the last step only where that is the selected checkpoint
            assert events.Scalars(f"final/{main}")[-1].value == pytest.approx(run["final"][main])
        else:
            assert f"final/{main}" not in events.Tags()["scalars"]
    # the method's current budget is logged at every log point (PrunedLoRA's rank and adapter count)
    assert "method/adapter_params" in _logged(runs["prunedlora"]["history"])


def test_mlflow_local_file_store_holds_the_stored_history(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    mlflow.set_tracking_uri(uri)
    config, summary, runs = _sweep(tmp_path, ["mlflow"], methods=METHODS[:1])
    assert summary.ok
    client = MlflowClient(uri)
    (experiment,) = [x for x in client.search_experiments() if x.name == config.name]
    (found,) = client.search_runs([experiment.experiment_id])
    run = runs["lora"]
    assert found.data.params["run_id"] == run["run_id"]
    assert found.data.params["train.lr"] == str(config.train.lr)
    for tag, points in _logged(run["history"]).items():
        got = [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, tag)]
        assert _same(sorted(got), sorted(points)), (tag, got, points)
    assert found.data.metrics["best/accuracy"] == pytest.approx(run["best"]["accuracy"])


def test_a_third_party_tracker_gets_params_and_metrics(tmp_path):
    RecordingTracker.seen.clear()
    _, summary, runs = _sweep(tmp_path, ["helpers:RecordingTracker"], methods=METHODS[:1])
    run = runs["lora"]
    seen = RecordingTracker.seen[run["run_id"]]
    assert seen["params"]["method"] == "lora" and seen["params"]["params.r"] == 4
    sent = {}
    for step, values in seen["metrics"]:
        for tag, value in values.items():
            sent.setdefault(tag, []).append((step, value))
    for tag, points in _logged(run["history"]).items():
        assert _same(sent[tag], points), tag


def test_a_tracker_that_raises_everywhere_changes_nothing(tmp_path):
    _, plain, expected = _sweep(tmp_path / "plain", [])
    ExplodingTracker.calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, summary, runs = _sweep(tmp_path / "exploding", ["helpers:ExplodingTracker", "helpers:BrokenInitTracker"])
    assert summary.ok and not summary.failed and summary.done == plain.done == 2
    assert ExplodingTracker.calls == ["start", "start"]  # one try per run, then switched off
    for label, run in runs.items():
        for key in ("best", "final", "best_step", "best_any", "evaluations", "in_budget_evals", "trainable"):
            assert run[key] == expected[label][key], (label, key)
        assert run["history"] == expected[label]["history"]  # deterministic CPU runs: bit for bit
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("tracker 'exploding' failed in start" in m for m in messages) == 2  # once per run
    assert sum("'helpers:BrokenInitTracker' could not be made" in m for m in messages) == 2


@pytest.mark.parametrize("trackers,expected", [
    ("[tensorbord]", r"c\.yaml:\d+: output\.trackers\[0\]: unknown tracker 'tensorbord'"),
    ("[nowhere:Tracker]", r"c\.yaml:\d+: output\.trackers\[0\]: cannot import tracker 'nowhere:Tracker'"),
    ("[peftbench.store:Store]", r"c\.yaml:\d+: output\.trackers\[0\]: 'peftbench.store:Store' is not a subclass"),
    ("[helpers:RecordingTracker, helpers:RecordingTracker]", r"c\.yaml:5: output\.trackers: repeated tracker\(s\) \['helpers:RecordingTracker'\]$"),
])
def test_bad_trackers_name_file_and_line(tmp_path, trackers, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"tasks: [toy]\nmethods: [lora]\nplugins: [peftbench.testing]\noutput:\n  trackers: {trackers}\n")
    with pytest.raises(ConfigError, match=expected):
        load_config(str(path))


def test_the_readme_tracker_works(tmp_path, monkeypatch):
    """The third-party tracker of the README, as printed there."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "class JsonLines" in block]
    (tmp_path / "mytracker.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, summary, runs = _sweep(tmp_path, ["mytracker:JsonLines"], methods=METHODS[:1])
    assert summary.ok
    lines = (tmp_path / "runs" / runs["lora"]["run_id"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(runs["lora"]["history"]) + 1  # every log point and evaluation, and best/final
