"""Executors: the local one (the default, never imports Ray), Ray tasks with the driver alone writing the
store, and the pieces of the distributed executor that run without a launcher (``tests/test_distributed.py``
launches two processes).

The Ray tests share one local Ray instance (2 CPUs, module-scoped: starting Ray takes 15-30 s on 2 cores) and
are skipped when Ray is not installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from peftbench import executors
from peftbench.cli import main
from peftbench.errors import ConfigError, DataError, PeftbenchError
from peftbench.executors import RayExecutor, rebuild_spec, spec_payload, worker_plugins
from peftbench.host import Host
from peftbench.runner import make_host, run_sweep, solve_budgets
from peftbench.runs import expand
from peftbench.store import Store
from peftbench.sweep import Outcome, Sweep, SweepSummary
from peftbench.testing import tiny_config

#: 256 toy examples, batch 32: 8 optimizer steps
FAST_TRAIN = {"epochs": 1, "batch_size": 32, "eval_every": 4, "log_every": 2, "max_length": 24, "num_threads": 1}
LORA = {"name": "lora", "params": {"r": 4, "alpha": 8}}

#: loaded by the driver and, by its absolute path, by every Ray worker
PLUGIN = '''
"""Test plugin: LoRA that fails on request or sleeps per step, and an observer that reports where it ran."""
import os
import time
from dataclasses import dataclass
from pathlib import Path

from peftbench.errors import ConfigError
from peftbench.hookspecs import hookimpl
from peftbench.plugins.lora import LoRA, LoRAParams

PEFTBENCH_API_VERSION = 1
SLEEP_WHILE = Path({sleep_marker!r})  #: steps of `sleepy` runs sleep while this file exists


@dataclass
class FaultyParams(LoRAParams):
    fail_in: str = ""  #: "after_backward" (a failure) or "inject_bad_input" (bad input)


class Faulty(LoRA):
    name = "faulty"
    Params = FaultyParams

    @hookimpl
    def peftbench_inject(self, model, targets):
        if self.params.fail_in == "inject_bad_input":
            raise ConfigError("methods[1].params.fail_in: planted bad input")
        return super().peftbench_inject(model, targets)

    @hookimpl
    def peftbench_after_backward(self):
        if self.params.fail_in == "after_backward":
            raise RuntimeError("planted failure in after_backward")


class Sleepy(LoRA):
    name = "sleepy"

    @hookimpl
    def peftbench_after_optimizer_step(self):
        if SLEEP_WHILE.exists():
            time.sleep(0.5)


@hookimpl
def peftbench_add_methods():
    return [Faulty, Sleepy]


@hookimpl
def peftbench_report():
    open_files = [os.path.realpath(f"/proc/self/fd/{{fd}}") for fd in os.listdir("/proc/self/fd")]
    return {{"pid": os.getpid(), "open_sqlite": [f for f in open_files if ".sqlite" in f]}}
'''


def _config(tmp_path: Path, plugin: Path, methods, name: str = "results", **train):
    """A tiny sweep whose plugins are peftbench.testing and the test plugin (by file path)."""
    return tiny_config(tmp_path, methods=methods, train={**FAST_TRAIN, **train},
                       plugins=["peftbench.testing", str(plugin)],
                       output={"db": str(tmp_path / f"{name}.sqlite"), "dir": str(tmp_path / f"{name}-runs")})


def _sweep(config, executor, fail_fast=False):
    lines: list[str] = []
    summary = SweepSummary()
    store = Store(config.output.db)
    try:
        run_sweep(config, make_host(config), store, fail_fast=fail_fast, log=lines.append, summary=summary,
                  executor=executor)
    finally:
        rows = {r["label"]: r for r in store.runs(status=None)}
        store.close()
    return summary, rows, lines


# -- without Ray ------------------------------------------------------------------------------------------


def test_a_local_sweep_never_imports_ray(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:  # imported by a Ray test: hide
        monkeypatch.delitem(sys.modules, name)
    config = tmp_path / "c.yaml"
    data = tiny_config(tmp_path, train=FAST_TRAIN).to_dict()
    data.pop("source")
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--no-progress"]) == 0
    assert "1 run(s) finished" in capsys.readouterr().out
    assert "ray" not in sys.modules


def test_ray_flags_need_the_ray_executor(tmp_path, capsys):
    assert main(["run", "quickstart", "--address", "auto"]) == 2
    assert "--address only apply to --executor ray" in capsys.readouterr().err
    assert main(["run", "quickstart", "--executor", "ray", "--gpus-per-run", "-1"]) == 2
    assert "--gpus-per-run: must be 0 or more, got -1.0" in capsys.readouterr().err


def test_the_ray_executor_without_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"--executor ray needs Ray: pip install 'peftbench\[ray\]'"):
        RayExecutor().run(sweep=None)


def test_a_run_travels_to_a_worker_as_plain_data_and_comes_back_the_same(tmp_path, host):
    """Every built-in method's solved run survives the trip (same run id), with file paths made absolute."""
    methods = [LORA, {"name": "adalora"}, {"name": "prilora"}, {"name": "prunedlora"}, {"name": "full"}]
    config = tiny_config(tmp_path, methods=methods, data_dir="relative/glue")
    runs = expand(config, solve_budgets(config, host))
    assert len(runs) == 5
    for spec in runs:
        payload = json.loads(json.dumps(spec_payload(spec)))  # nothing but JSON-able data
        assert payload["data_dir"] == os.path.abspath("relative/glue")
        back = rebuild_spec(payload, Host())
        assert back.run_id == spec.run_id and back.params == spec.params and back.train == spec.train


def test_workers_load_the_same_plugins(tmp_path, monkeypatch):
    (tmp_path / "executor_local_plugin.py").write_text("PEFTBENCH_API_VERSION = 1\n")
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, plugins=["peftbench.testing", "executor_local_plugin.py"])
    host = make_host(config, ["peftbench.testing"])
    assert worker_plugins(host) == ["peftbench.testing", str(tmp_path / "executor_local_plugin.py")]


def test_processes_agree_on_one_outcome(monkeypatch):
    """After a distributed run every process takes the same outcome: bad input first, then the lowest rank."""
    from accelerate import utils

    class State:
        process_index = 0

    def everyone(reports):
        monkeypatch.setattr(utils, "gather_object", lambda mine: mine + reports)

    ok = Outcome(fields={"best": {}})
    everyone([(None, "", None)])
    assert executors._agree(State(), ok) is ok
    everyone([("RuntimeError: boom", "tb1", None), ("ConfigError: bad", "tb2", ("ConfigError", "bad"))])
    agreed = executors._agree(State(), ok)
    assert agreed.reason == "ConfigError: bad (on process 2)" and agreed.traceback == "tb2"
    assert type(agreed.error) is ConfigError and str(agreed.error) == "bad"
    everyone([("RuntimeError: boom", "tb1", None)])
    assert executors._agree(State(), ok).reason == "RuntimeError: boom (on process 1)"
    mine = Outcome(reason="RuntimeError: mine", traceback="tb0")
    assert executors._agree(State(), mine) is mine  # the main process failed too: its own failure is kept
    assert type(executors.rebuild_error("DataError", "x")) is DataError
    assert type(executors.rebuild_error("SomePluginError", "x")) is PeftbenchError


def test_batches_must_split_evenly_between_processes(tmp_path, host):
    config = tiny_config(tmp_path, methods=[LORA, {"name": "lora", "label": "odd", "params": {"r": 4},
                                                   "train": {"batch_size": 15}}])
    sweep = Sweep(config, host, None, solve_budgets(config, host), SweepSummary())
    executors.check_batch_sizes(sweep, 1)
    with pytest.raises(ConfigError, match=r"train\.batch_size is 15 for odd on toy, not a multiple of the 2 "):
        executors.check_batch_sizes(sweep, 2)


# -- Ray ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray(tmp_path_factory):
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        # the workers inherit this environment: the test session's token cache, no progress bars
        mp.setenv("PEFTBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        mp.setenv("PEFTBENCH_PROGRESS", "")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The test plugin, one file for the module: Ray's worker processes outlive a test, and a module name
    can be imported once per process."""
    folder = tmp_path_factory.mktemp("plugin")
    path = folder / "ray_test_plugin.py"
    path.write_text(PLUGIN.format(sleep_marker=str(folder / "sleep")))
    return path


@pytest.mark.slow
def test_ray_sweep_streams_results_to_the_driver_which_alone_writes_the_store(ray, plugin, tmp_path):
    config = _config(tmp_path, plugin, [LORA, {"name": "faulty", "params": {"r": 4, "alpha": 8, "fail_in": "after_backward"}}])
    summary, rows, lines = _sweep(config, RayExecutor())
    assert (summary.done, [spec.label for spec, _ in summary.failed]) == (1, ["faulty"])
    lora, faulty = rows["lora"], rows["faulty"]
    # the run trained in a Ray worker, which never opened the store; this process claimed and wrote it
    assert lora["method_report"]["pid"] != os.getpid() and lora["method_report"]["open_sqlite"] == []
    assert lora["pid"] == os.getpid() and lora["status"] == "done"
    assert faulty["status"] == "failed" and faulty["error"] == "RuntimeError: planted failure in after_backward"
    assert "in peftbench_after_backward" in faulty["traceback"]  # the worker's traceback
    result = f"({lora['run_id']}): best in-budget accuracy {lora['best']['accuracy']:.4f} at step {lora['best_step']} "
    assert any(result in line and "tok/s, adapter 3,584" in line for line in lines), lines
    assert any("FAILED: RuntimeError: planted failure" in line for line in lines)

    # the same run trained here: the same result, and the artifacts the driver wrote from the worker's bytes
    local = _config(tmp_path, plugin, [LORA], name="local")
    _, local_rows, _ = _sweep(local, None)
    here = local_rows["lora"]
    assert here["run_id"] == lora["run_id"]
    assert (here["history"], here["best"], here["final"], here["steps"]) == \
           (lora["history"], lora["best"], lora["final"], lora["steps"])
    from safetensors.torch import load_file

    ray_weights = load_file(Path(lora["artifacts"]) / "trainable.safetensors")
    local_weights = load_file(Path(here["artifacts"]) / "trainable.safetensors")
    assert ray_weights.keys() == local_weights.keys()
    assert all(torch.equal(ray_weights[k], local_weights[k]) for k in ray_weights)
    assert json.loads((Path(lora["artifacts"]) / "spec.json").read_text())["run_id"] == lora["run_id"]

    # resume as in local mode: the finished run is skipped, the failed one redone (and fails again)
    summary, rows, lines = _sweep(config, RayExecutor())
    assert (summary.done, summary.skipped, len(summary.failed)) == (0, 1, 1)
    assert any(f"({lora['run_id']}): finished earlier, skipped" in line for line in lines)
    assert rows["faulty"]["started"] > faulty["started"]


@pytest.mark.slow
def test_interrupting_a_ray_sweep_cancels_its_tasks_and_a_rerun_redoes_them(ray, plugin, tmp_path):
    config = _config(tmp_path, plugin, [LORA, {"name": "sleepy", "label": "sleepy_a", "params": {"r": 4, "alpha": 8}},
                                {"name": "sleepy", "label": "sleepy_b", "params": {"r": 4, "alpha": 8}}])
    (plugin.parent / "sleep").touch()  # the sleepy runs take 8 × 0.5 s: still running when lora finishes

    def interrupt_after_the_first_result(line: str) -> None:
        if "best in-budget accuracy" in line:
            raise KeyboardInterrupt  # as Ctrl-C would, on the driver
    summary = SweepSummary()
    store = Store(config.output.db)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, make_host(config), store, log=interrupt_after_the_first_result, summary=summary,
                  executor=RayExecutor())
    rows = {r["label"]: r for r in store.runs(status=None)}
    assert rows["lora"]["status"] == "done"
    assert all(rows[label]["status"] == "failed" and rows[label]["error"] == "interrupted"
               for label in ("sleepy_a", "sleepy_b")), rows
    assert sorted(spec.label for spec, _ in summary.failed) == ["sleepy_a", "sleepy_b"]
    store.close()

    (plugin.parent / "sleep").unlink()
    summary, rows, _ = _sweep(config, RayExecutor())
    assert (summary.done, summary.skipped, summary.failed) == (2, 1, [])
    assert all(row["status"] == "done" for row in rows.values())


@pytest.mark.slow
def test_bad_input_in_a_ray_worker_stops_the_sweep(ray, plugin, tmp_path):
    config = _config(tmp_path, plugin, [LORA, {"name": "faulty", "params": {"r": 4, "alpha": 8,
                                                                    "fail_in": "inject_bad_input"}}])
    with pytest.raises(ConfigError, match=r"^methods\[1\]\.params\.fail_in: planted bad input$"):
        _sweep(config, RayExecutor())
    rows = {r["label"]: r for r in Store(config.output.db).runs(status=None)}
    assert rows["faulty"]["status"] == "failed" and "planted bad input" in rows["faulty"]["error"]
    assert rows["lora"]["status"] in ("done", "failed")  # finished first, or cancelled (and redone later)
    if rows["lora"]["status"] == "failed":
        assert rows["lora"]["error"] == "cancelled: the sweep stopped on bad input"


@pytest.mark.slow
def test_fail_fast_on_ray_cancels_the_outstanding_tasks(ray, plugin, tmp_path):
    config = _config(tmp_path, plugin, [{"name": "faulty", "params": {"r": 4, "alpha": 8, "fail_in": "after_backward"}},
                                        {"name": "sleepy", "params": {"r": 4, "alpha": 8}}])
    (plugin.parent / "sleep").touch()
    try:
        summary, rows, lines = _sweep(config, RayExecutor(), fail_fast=True)
    finally:
        (plugin.parent / "sleep").unlink()
    assert rows["faulty"]["error"] == "RuntimeError: planted failure in after_backward"
    reason = "cancelled: --fail-fast stopped the sweep after a failed run"
    assert rows["sleepy"]["status"] == "failed" and rows["sleepy"]["error"] == reason
    assert [spec.label for spec, _ in summary.failed] == ["faulty", "sleepy"] and summary.done == 0
    assert any(line.endswith(f"({rows['sleepy']['run_id']}): {reason}") for line in lines)
