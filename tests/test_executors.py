"""Executors: the local one (the default, never imports Ray), Ray tasks with the driver alone writing the
store, and the pieces of the distributed executor that run without a launcher (``tests/test_distributed.py``
launches two processes).

The Ray tests share one local Ray instance (2 CPUs, module-scoped: starting Ray takes 15-30 s on 2 cores).
``.[dev]`` installs Ray; without it they skip, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from peftbench.errors import ConfigError
from peftbench.hookspecs import hookimpl
from peftbench.plugins.lora import LoRA, LoRAParams

PEFTBENCH_API_VERSION = 1
SLEEP_WHILE = Path({sleep_marker!r})  #: steps of `sleepy` runs sleep while this file exists
#: a `doomed` run kills its own worker process in the second half of its steps while this file exists; the
#: file says "once" (the kill deletes it) or "always"; each kill adds a line to KILLS
KILL_WHILE = Path({kill_marker!r})
KILLS = Path({kill_marker!r} + ".log")


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


class Doomed(LoRA):
    name = "doomed"

    @hookimpl
    def peftbench_on_log(self, state):  # not a hook that keeps training state: runs stay resumable
        if state.step > state.total_steps // 2 and KILL_WHILE.exists():
            if KILL_WHILE.read_text() == "once":
                KILL_WHILE.unlink()
            with KILLS.open("a") as f:
                f.write(f"{{os.getpid()}} at step {{state.step}}\\n")
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer, a crash or a lost node would


@hookimpl
def peftbench_add_methods():
    return [Faulty, Sleepy, Doomed]


@hookimpl
def peftbench_report():
    open_files = [os.path.realpath(f"/proc/self/fd/{{fd}}") for fd in os.listdir("/proc/self/fd")]
    return {{"pid": os.getpid(), "open_sqlite": [f for f in open_files if ".sqlite" in f]}}
'''


def _config(tmp_path: Path, plugin: Path, methods, name: str = "results", checkpoint: bool = False, **train):
    """A tiny sweep whose plugins are peftbench.testing and the test plugin (by file path)."""
    return tiny_config(tmp_path, methods=methods, train={**FAST_TRAIN, **train},
                       plugins=["peftbench.testing", str(plugin)],
                       output={"db": str(tmp_path / f"{name}.sqlite"), "dir": str(tmp_path / f"{name}-runs"),
                               "checkpoint": checkpoint})


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
    if os.environ.get("CI"):  # CI installs `.[dev]`, which has Ray: there a missing Ray fails, never skips
        try:
            import ray
        except ImportError as exc:
            pytest.fail(f"CI={os.environ['CI']} but Ray does not import ({exc}): pip install -e '.[dev]'")
    else:
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
    path.write_text(PLUGIN.format(sleep_marker=str(folder / "sleep"), kill_marker=str(folder / "kill")))
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

    # the selected checkpoint's weights, and the final ones (kept: here they are another checkpoint)
    assert here["best_step"] < here["steps"]
    for name in ("trainable.safetensors", "trainable_final.safetensors"):
        ray_weights = load_file(Path(lora["artifacts"]) / name)
        local_weights = load_file(Path(here["artifacts"]) / name)
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



# -- Ray: a worker killed, the driver killed --------------------------------------------------------------

DOOMED = {"name": "doomed", "params": {"r": 4, "alpha": 8}}  #: LoRA (the same run as LORA) that kills its worker


def _arm(plugin: Path, mode: str):
    """Make the `doomed` runs kill their worker process ("once" or "always"); returns a function giving the
    kills so far (``pid at step N``)."""
    kills = plugin.parent / "kill.log"
    kills.unlink(missing_ok=True)
    (plugin.parent / "kill").write_text(mode)
    return lambda: kills.read_text().splitlines() if kills.exists() else []


@pytest.mark.slow
def test_a_run_whose_ray_worker_is_killed_is_retried_from_its_checkpoint(ray, plugin, tmp_path):
    """A worker process killed mid-run (the kernel's OOM killer, a crash, a lost node): Ray starts the run's
    task again, which resumes from the run's last checkpoint, and the result is an uninterrupted run's."""
    config = _config(tmp_path, plugin, [LORA, DOOMED], checkpoint=True, epochs=2)  # 16 steps, a checkpoint at 8
    kills = _arm(plugin, "once")
    summary, rows, lines = _sweep(config, RayExecutor())
    assert [kill.split(" ", 1)[1] for kill in kills()] == ["at step 10"]
    assert (summary.done, summary.failed) == (2, [])
    lora, doomed = rows["lora"], rows["doomed"]
    assert doomed["status"] == "done"
    tag = f"({doomed['run_id']}): "
    assert any(line.startswith("[2/2] doomed toy seed=0 ") and tag + "the Ray task failed: WorkerCrashedError: " in line
               and line.endswith("; starting the run again (attempt 2 of 2)") for line in lines), lines
    assert any(tag + "resumed from " in line and "at epoch 1, step 8" in line for line in lines), lines
    assert (doomed["history"], doomed["best"], doomed["final"], doomed["steps"]) == \
           (lora["history"], lora["best"], lora["final"], lora["steps"])
    assert not (Path(config.output.dir) / doomed["run_id"] / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_run_whose_ray_worker_dies_on_every_attempt_fails_and_a_rerun_completes_only_it(ray, plugin, tmp_path):
    config = _config(tmp_path, plugin, [LORA, DOOMED, {"name": "lora", "label": "lora8", "params": {"r": 8, "alpha": 16}}])
    kills = _arm(plugin, "always")
    try:
        summary, rows, lines = _sweep(config, RayExecutor())
    finally:
        (plugin.parent / "kill").unlink()
    assert len(kills()) == 2  # started once more (executors.WORKER_RETRIES), not 3 times more (Ray's default)
    assert summary.done == 2 and [spec.label for spec, _ in summary.failed] == ["doomed"]
    doomed = rows["doomed"]
    assert doomed["status"] == "failed", doomed
    assert doomed["error"].startswith("the Ray task failed: WorkerCrashedError: ")
    assert doomed["error"].endswith("(started 2 times: its worker process died each time)")
    # its place among the three depends on when Ray's workers finish: any "k/3 runs done[, ETA ...]"
    assert any(f"({doomed['run_id']}): FAILED: {doomed['error']}; " in line and "/3 runs done" in line
               for line in lines), lines
    finished = {label: rows[label]["finished"] for label in ("lora", "lora8")}

    summary, rows, lines = _sweep(config, RayExecutor())  # the rerun trains the failed run only
    assert (summary.done, summary.skipped, summary.failed) == (1, 2, [])
    assert rows["doomed"]["status"] == "done" and {label: rows[label]["finished"] for label in finished} == finished


@pytest.mark.slow
def test_a_killed_ray_driver_leaves_a_sweep_that_a_rerun_resumes(ray, plugin, tmp_path):
    """kill -9 of ``peftbench run --executor ray`` (joined to a running cluster) after its first result: the
    runs it had claimed stay ``running`` under its dead pid; rerunning trains exactly those."""
    config = _config(tmp_path, plugin, [LORA, {"name": "sleepy", "label": "sleepy_a", "params": {"r": 4, "alpha": 8}},
                                        {"name": "sleepy", "label": "sleepy_b", "params": {"r": 4, "alpha": 8}}])
    data = config.to_dict()
    data.pop("source")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "driver.log"
    (plugin.parent / "sleep").touch()  # the sleepy runs are still training when lora's result comes
    try:
        with out.open("w") as f:
            driver = subprocess.Popen(
                [sys.executable, "-m", "peftbench.cli", "run", str(tmp_path / "sweep.yaml"), "--no-progress",
                 "--executor", "ray", "--address", ray.get_runtime_context().gcs_address],
                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 240
            while "best in-budget" not in out.read_text():
                assert driver.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)
        finally:
            driver.kill()
            driver.wait()
    finally:
        (plugin.parent / "sleep").unlink()
    with Store(config.output.db) as store:
        before = {r["label"]: r for r in store.runs(status=None)}
    assert before["lora"]["status"] == "done"
    assert all(before[label]["status"] == "running" and before[label]["pid"] == driver.pid
               for label in ("sleepy_a", "sleepy_b")), before

    summary, rows, lines = _sweep(config, RayExecutor())
    assert (summary.done, summary.skipped, summary.failed, summary.busy) == (2, 1, [], 0), lines
    assert rows["lora"]["finished"] == before["lora"]["finished"]  # not trained again
    assert all(row["status"] == "done" for row in rows.values())
