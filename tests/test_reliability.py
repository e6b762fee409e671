"""Fault isolation, exit statuses, resumable checkpoints, kill -9 / concurrent sweeps, safe loading.

A run that diverges, runs out of memory or raises inside a plugin is stored as failed with its reason and
traceback and the sweep goes on; bad input stops with exit status 2 keeping finished runs; a killed sweep
redoes only unfinished runs; a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CrashAtStep
from peftbench.plugins.lora import LoRA, LoRAParams

import peftbench.testing
from peftbench import runner
from peftbench.checkpoint import FORMAT, unresumable
from peftbench.cli import main
from peftbench.errors import ConfigError, PluginError
from peftbench.hookspecs import hookimpl
from peftbench.host import Host, PluginInfo
from peftbench.runner import run_sweep
from peftbench.runs import expand
from peftbench.store import Store
from peftbench.sweep import check_data, failure_reason, is_out_of_memory
from peftbench.testing import tiny_config, tiny_model_config

REPO = Path(__file__).resolve().parent.parent
RUN_HOOKS = ["inject", "train_start", "extra_loss", "after_backward", "after_optimizer_step", "on_evaluate",
             "train_end", "report"]
#: 256 toy examples, batch 32: 8 optimizer steps per epoch
FAST_TRAIN = {"epochs": 1, "batch_size": 32, "max_steps": 4, "log_every": 2, "eval_every": 2, "max_length": 24}


# -- a method plugin that fails on request ---------------------------------------------------------------


@dataclass
class FaultyParams(LoRAParams):
    #: the run hook that raises (``inject`` ... ``report``), or a fault: ``nan_loss``, ``oom``, ``bad_input``
    fail_in: str = ""


class Faulty(LoRA):
    """LoRA that implements every run hook and raises in the one named by ``params.fail_in``."""

    name = "faulty"
    Params = FaultyParams

    def _maybe_fail(self, hook: str) -> None:
        if self.params.fail_in == hook:
            raise RuntimeError(f"planted failure in {hook}")

    @hookimpl
    def peftbench_inject(self, model, targets):
        self._maybe_fail("inject")
        if self.params.fail_in == "bad_input":
            raise ConfigError("methods[0].params.fail_in: planted bad input")
        return super().peftbench_inject(model, targets)

    @hookimpl
    def peftbench_train_start(self, model, state):
        self._maybe_fail("train_start")

    @hookimpl
    def peftbench_extra_loss(self, model, state):
        self._maybe_fail("extra_loss")
        if self.params.fail_in == "nan_loss":
            return torch.tensor(float("nan"))
        return None

    @hookimpl
    def peftbench_after_backward(self, model, state):
        self._maybe_fail("after_backward")
        if self.params.fail_in == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    @hookimpl
    def peftbench_after_optimizer_step(self, model, state):
        self._maybe_fail("after_optimizer_step")

    @hookimpl
    def peftbench_on_evaluate(self, model, state, metrics):
        self._maybe_fail("on_evaluate")

    @hookimpl
    def peftbench_train_end(self, model, state):
        self._maybe_fail("train_end")

    @hookimpl
    def peftbench_report(self, model, state):
        self._maybe_fail("report")
        return {}


class Counting(LoRA):
    """LoRA that keeps Python-side training state (a step counter) and checkpoints it with the state hooks."""

    name = "counting"

    def __init__(self, params=None):
        super().__init__(params)
        self.steps_seen = 0

    @hookimpl
    def peftbench_after_optimizer_step(self, model, state):
        self.steps_seen += 1

    @hookimpl
    def peftbench_state_dict(self, model, state):
        return {"counting.steps_seen": self.steps_seen}

    @hookimpl
    def peftbench_load_state_dict(self, model, state, state_dict):
        self.steps_seen = state_dict["counting.steps_seen"]

    @hookimpl
    def peftbench_report(self, model, state):
        return {"steps_seen": self.steps_seen}


def _plugin_module(name: str = "faulty_plugin") -> types.ModuleType:
    module = types.ModuleType(name)
    module.PEFTBENCH_API_VERSION = 1
    module.peftbench_add_methods = hookimpl(lambda: [Faulty, Counting])
    return module


def _host(*observers) -> Host:
    host = Host()
    host.add_plugin(peftbench.testing, PluginInfo("peftbench.testing", "object"))
    host.add_plugin(_plugin_module(), PluginInfo("faulty_plugin", "object"))
    for i, obj in enumerate(observers):
        host.add_plugin(obj, PluginInfo(f"observer{i}", "object"))
    return host


def _sweep(tmp_path, methods, host=None, log=None, **kwargs):
    train = {**FAST_TRAIN, **kwargs.pop("train", {})}
    fail_fast = kwargs.pop("fail_fast", False)
    config = tiny_config(tmp_path, methods=methods, train=train, **kwargs)
    store = Store(config.output.db)
    lines: list[str] = []
    host = host or _host()
    try:
        summary = run_sweep(config, host, store, progress=False, log=log or lines.append, fail_fast=fail_fast)
    finally:
        rows = {r["label"]: r for r in store.runs(status=None)}
        store.close()
    return summary, rows, lines


LORA = {"name": "lora", "params": {"r": 4, "alpha": 8}}


def faulty(fail_in: str, label: str = "faulty") -> dict:
    return {"name": "faulty", "label": label, "params": {"r": 4, "alpha": 8, "fail_in": fail_in}}


# -- fault isolation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", RUN_HOOKS)
def test_plugin_raising_in_a_run_hook_fails_that_run_only(tmp_path, hook):
    host = _host()
    summary, rows, _ = _sweep(tmp_path, [faulty(hook), LORA], host=host)
    assert summary.done == 1 and [spec.label for spec, _ in summary.failed] == ["faulty"]
    failed = rows["faulty"]
    assert failed["status"] == "failed" and failed["error"] == f"RuntimeError: planted failure in {hook}"
    assert f"in peftbench_{hook}" in failed["traceback"]  # the frame of the hook that raised
    assert rows["lora"]["status"] == "done" and rows["lora"]["best"]["accuracy"] > 0
    assert not [p for p in host.pm.get_plugins() if isinstance(p, Faulty)]  # unregistered after its run


def test_diverged_and_out_of_memory_runs_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr("peftbench.sweep.release_memory", lambda: released.append(True))
    summary, rows, lines = _sweep(tmp_path, [faulty("nan_loss", "diverges"), faulty("oom", "ooms"), LORA])
    assert rows["diverges"]["status"] == "failed"
    assert re.fullmatch(r"Diverged: training loss became nan at step 2", rows["diverges"]["error"])
    assert rows["ooms"]["error"].startswith("out of memory (OutOfMemoryError: CUDA out of memory.")
    assert "train.batch_size" in rows["ooms"]["error"] and "train.grad_accum" in rows["ooms"]["error"]
    assert rows["lora"]["status"] == "done"
    assert len(released) == 2  # memory released after each failed run
    assert (summary.done, len(summary.failed)) == (1, 2)


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 1099511627776 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert failure_reason(ValueError("x")) == "ValueError: x"


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    summary, rows, _ = _sweep(tmp_path, [faulty("train_start"), LORA], fail_fast=True)
    assert [spec.label for spec, _ in summary.failed] == ["faulty"] and summary.done == 0
    assert set(rows) == {"faulty"}  # the next run was never claimed


def test_bad_input_inside_a_run_stops_the_sweep_keeping_finished_runs(tmp_path):
    with pytest.raises(ConfigError, match="planted bad input"):
        _sweep(tmp_path, [LORA, faulty("bad_input"), {**LORA, "label": "never"}])
    store = Store(tmp_path / "results.sqlite")
    rows = {r["label"]: r for r in store.runs(status=None)}
    assert rows["lora"]["status"] == "done"
    assert rows["faulty"]["status"] == "failed" and "planted bad input" in rows["faulty"]["error"]
    assert "never" not in rows


def test_plugin_raising_in_a_budget_hook_is_reported_before_any_run(tmp_path):
    class Broken(LoRA):
        name = "broken"

        @hookimpl
        def peftbench_solve_budget(self, targets, target):
            raise ZeroDivisionError("planted")

    plugin = types.ModuleType("broken_plugin")
    plugin.peftbench_add_methods = hookimpl(lambda: [Broken])
    host = _host(plugin)
    with pytest.raises(PluginError, match=r"ZeroDivisionError: planted \(raised at .*test_reliability\.py:\d+ "
                                          r"in peftbench_solve_budget\)"):
        _sweep(tmp_path, [{"name": "broken"}], host=host)
    assert Store(tmp_path / "results.sqlite").runs(status=None) == []


# -- the CLI: exit statuses and the summary --------------------------------------------------------------


def _write_config(tmp_path, methods, **extra) -> Path:
    data = {"name": "cli", "model": tiny_model_config(), "tasks": ["toy"], "methods": methods, "seeds": [0],
            "budget": {"lora_rank": 4}, "train": {**FAST_TRAIN, "num_threads": 1},
            "plugins": ["peftbench.testing", "faulty_plugin"],
            "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_exit_status_counts_failed_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faulty_plugin", _plugin_module())
    path = _write_config(tmp_path, [faulty("after_backward"), LORA])
    assert main(["run", str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "1 run(s) finished, 0 skipped (finished earlier), 1 failed" in out
    assert "failed: faulty toy seed=0" in out and "planted failure in after_backward" in out
    # rerun: the finished run is skipped, the failed one is redone (and fails again)
    assert main(["run", str(path), "--no-progress"]) == 1
    assert "0 run(s) finished, 1 skipped (finished earlier), 1 failed" in capsys.readouterr().out
    assert main(["run", str(path), "--no-progress", "--set", "methods.faulty.params.fail_in=''"]) == 0


def test_cli_bad_input_mid_sweep_exits_2_with_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faulty_plugin", _plugin_module())
    path = _write_config(tmp_path, [LORA, faulty("bad_input")])
    assert main(["run", str(path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "1 run(s) finished, 0 skipped (finished earlier), 1 failed" in captured.out
    assert "peftbench: error: methods[0].params.fail_in: planted bad input" in captured.err


def test_cli_sigterm_stores_the_run_as_interrupted(tmp_path, capsys, monkeypatch):
    """A cluster's time limit sends SIGTERM: the run is stored as interrupted (redone on rerun), exit 130."""
    terminator = types.ModuleType("terminator_plugin")
    terminator.PEFTBENCH_API_VERSION = 1
    terminator.peftbench_after_optimizer_step = hookimpl(lambda: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setitem(sys.modules, "faulty_plugin", terminator)
    before = signal.getsignal(signal.SIGTERM)
    path = _write_config(tmp_path, [LORA])
    assert main(["run", str(path), "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert "0 run(s) finished, 0 skipped (finished earlier), 1 failed" in captured.out
    assert "interrupted; finished runs are stored" in captured.err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only installed while running
    with Store(tmp_path / "r.sqlite") as store:
        (row,) = store.runs(status=None)
    assert row["status"] == "failed" and row["error"] == "interrupted"
    assert f"KeyboardInterrupt: signal {signal.SIGTERM.value}" in row["traceback"]


# -- resumable checkpoints --------------------------------------------------------------------------------


def test_resumed_run_equals_an_uninterrupted_run(tmp_path):
    method = {"name": "counting", "params": {"r": 4, "alpha": 8, "dropout": 0.1}}  # dropout: RNG must resume
    train = {"epochs": 3, "max_steps": None, "eval_every": 5}  # 24 steps, evaluations inside epochs
    kwargs = {"output": {"checkpoint": True}, "train": train}
    _, whole, _ = _sweep(tmp_path / "whole", [method], **kwargs)
    _, crashed, _ = _sweep(tmp_path / "resumed", [method], host=_host(CrashAtStep(19)), **kwargs)
    (row,) = crashed.values()
    assert row["status"] == "failed" and row["error"] == "RuntimeError: crash at step 19"
    checkpoint = tmp_path / "resumed" / "runs" / row["run_id"] / "checkpoint.pt"
    assert checkpoint.exists()
    summary, resumed, lines = _sweep(tmp_path / "resumed", [method], **kwargs)
    assert any(f"resumed from {checkpoint} at epoch 2, step 16" in line for line in lines)
    (a,), (b,) = whole.values(), resumed.values()
    assert b["status"] == "done" and a["run_id"] == b["run_id"]
    for key in ("history", "best", "final", "best_step", "steps", "trainable"):
        assert a[key] == b[key], key  # bit for bit on CPU
    assert a["method_report"]["steps_seen"] == b["method_report"]["steps_seen"] == 24
    assert not checkpoint.exists()  # a finished run keeps no checkpoint
    from safetensors.torch import load_file

    weights_a, weights_b = (load_file(Path(r["artifacts"]) / "trainable.safetensors") for r in (a, b))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


class Payload:
    """What an attacker's pickle does on load: run code (here, create a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("content,expected", [
    ("pickled code", "ignoring unreadable checkpoint"),
    ("garbage", "ignoring unreadable checkpoint"),
    ("wrong layout", "ignoring checkpoint .*: malformed \\(KeyError"),
    ("another run", "ignoring checkpoint .*: it belongs to run 0123456789abcdef"),
])
def test_unusable_or_unsafe_checkpoint_is_ignored(tmp_path, content, expected):
    marker = tmp_path / "pwned"
    config = tiny_config(tmp_path, train=FAST_TRAIN)
    host = _host()
    (spec,) = expand(config, runner.solve_budgets(config, host), check_data(config, host, config.tasks))
    path = Path(config.output.dir) / spec.run_id / "checkpoint.pt"  # the id the sweep gives the run
    path.parent.mkdir(parents=True)
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    else:
        torch.save({"pickled code": {"format": FORMAT, "payload": Payload(marker)},
                    "wrong layout": {"format": FORMAT, "run_id": spec.run_id},
                    "another run": {"format": FORMAT, "run_id": "0123456789abcdef"}}[content], path)
    _, rows, lines = _sweep(tmp_path, None, output={"checkpoint": True})
    assert rows["lora"]["status"] == "done" and rows["lora"]["steps"] == 4  # trained from scratch
    assert not marker.exists()  # weights_only=True refused to run the pickled code
    assert any(re.search(expected, line) for line in lines), lines


def test_methods_with_step_hooks_but_no_state_hooks_are_not_resumed():
    assert unresumable(LoRA()) is None
    assert unresumable(Counting()) is None
    reason = unresumable(Faulty())
    assert "peftbench_after_backward" in reason and "peftbench_state_dict" in reason


# -- subprocesses: kill -9 mid-sweep, two sweeps on one store -------------------------------------------

SLOW_PLUGIN = '''
"""Slows every optimizer step down; with BARRIER set, the first run of each process waits until
BARRIER_COUNT processes have started one (so that they really run at the same time)."""
import os
import time
from pathlib import Path

from peftbench.hookspecs import hookimpl

PEFTBENCH_API_VERSION = 1


@hookimpl
def peftbench_train_start():
    barrier = os.environ.get("BARRIER")
    if barrier:
        Path(barrier, str(os.getpid())).touch()
        deadline = time.time() + 120
        while len(os.listdir(barrier)) < int(os.environ["BARRIER_COUNT"]) and time.time() < deadline:
            time.sleep(0.02)


@hookimpl
def peftbench_after_optimizer_step():
    time.sleep(float(os.environ.get("STEP_SLEEP", "0.03")))
'''


def _cli_setup(tmp_path, monkeypatch, seeds, **extra):
    """A sweep config using the slow plugin; the command line to run it in a subprocess, whose environment
    (and this process', for in-process runs of the same command) can import the plugin."""
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = {"name": "sub", "model": tiny_model_config(), "tasks": ["toy"],
            "methods": [{"name": "lora", "params": {"r": 4, "alpha": 8}}], "seeds": seeds,
            "budget": {"lora_rank": 4}, "train": {**FAST_TRAIN, "num_threads": 1},
            "plugins": ["peftbench.testing", "slow_plugin"],
            "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")}, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "PEFTBENCH_PROGRESS": "", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "peftbench.cli", "run", str(path), "--no-progress"], env


def _rows(db: Path) -> list[dict]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as con:
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT run_id, status, pid, finished FROM runs")]
        except sqlite3.OperationalError:  # the table is not created yet
            return []


def test_kill_9_mid_sweep_then_rerun_redoes_only_unfinished_runs(tmp_path, monkeypatch, capsys):
    train = {**FAST_TRAIN, "num_threads": 1, "epochs": 2, "max_steps": None, "eval_every": 0}
    command, env = _cli_setup(tmp_path, monkeypatch, [0, 1, 2], train=train, output={
        "db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs"), "checkpoint": True})
    db = tmp_path / "r.sqlite"
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    killed_in = None
    while time.time() < deadline and process.poll() is None:
        rows = _rows(db)
        done = [r for r in rows if r["status"] == "done"]
        running = [r for r in rows if r["status"] == "running"]
        # kill once a run is finished and the next one has written its first-epoch checkpoint
        if done and running and (tmp_path / "runs" / running[0]["run_id"] / "checkpoint.pt").exists():
            process.send_signal(signal.SIGKILL)
            killed_in = running[0]["run_id"]
            break
        time.sleep(0.01)
    output = process.communicate(timeout=60)[0]
    assert killed_in, f"the sweep was not caught mid-run:\n{output}"
    before = {r["run_id"]: r for r in _rows(db)}
    assert before[killed_in]["status"] == "running" and before[killed_in]["pid"] == process.pid  # left behind
    finished_before = {k: r["finished"] for k, r in before.items() if r["status"] == "done"}

    assert main(command[3:]) == 0  # the same command again (in this process: no second interpreter start-up)
    out = capsys.readouterr().out
    assert f"{len(finished_before)} skipped (finished earlier), 0 failed" in out
    assert f"({killed_in}): resumed from" in out and "at epoch 1, step 8" in out
    after = {r["run_id"]: r for r in _rows(db)}
    assert len(after) == 3 and all(r["status"] == "done" for r in after.values())
    assert all(after[k]["finished"] == t for k, t in finished_before.items())  # never redone


def test_two_concurrent_sweeps_on_one_store_run_disjoint_runs(tmp_path, monkeypatch, capsys):
    """One sweep in a subprocess, the same one in this process, on one store at the same time."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    command, env = _cli_setup(tmp_path, monkeypatch, [0, 1, 2, 3, 4, 5])
    for key, value in {"BARRIER": str(barrier), "BARRIER_COUNT": "2"}.items():
        env[key] = value
        monkeypatch.setenv(key, value)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        status = main(command[3:])
    finally:
        other = process.communicate(timeout=300)[0]
    here = capsys.readouterr().out
    assert (status, process.returncode) == (0, 0), here + other
    finished = [set(re.findall(r"\(([0-9a-f]{16})\): best in-budget accuracy", out)) for out in (here, other)]
    assert all(finished), (here, other)  # both trained (the barrier made them overlap)
    assert not finished[0] & finished[1]  # no run trained twice
    rows = _rows(tmp_path / "r.sqlite")
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    assert finished[0] | finished[1] == {r["run_id"] for r in rows}


# -- safe loading -----------------------------------------------------------------------------------------

UNSAFE = [
    (r"\btorch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
    (r"\bimport pickle\b|\bpickle\.loads?\(|\bdill\b|\bcloudpickle\b", "pickle"),
    (r"\byaml\.(load|unsafe_load|full_load)\(|Loader=yaml\.(Loader|FullLoader|UnsafeLoader)", "unsafe YAML"),
    (r"allow_pickle=True", "numpy pickles"),
    (r"trust_remote_code=True", "remote code on by default"),
]


def test_no_unsafe_loading_in_the_code():
    files = [p for folder in ("peftbench", "plugins", "tasks", "benchmarks") for p in (REPO / folder).rglob("*.py")]
    assert len(files) > 10
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE:
            for match in re.finditer(pattern, text):
                found.append(f"{path.relative_to(REPO)}:{text[:match.start()].count(chr(10)) + 1}: {what}")
    assert not found, "\n".join(found)


def test_yaml_python_tags_are_refused(tmp_path):
    from peftbench.config import load_config

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(textwrap.dedent(f"""\
        tasks: [toy]
        methods: [lora]
        name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ["{marker}"]]
        """))
    with pytest.raises(ConfigError, match=r"evil\.yaml:3: YAML syntax error: could not determine a constructor"):
        load_config(str(path))
    assert not marker.exists()


def test_remote_code_is_off_unless_the_config_asks(monkeypatch):
    import transformers

    from peftbench import modeling
    from peftbench.config import ModelConfig

    seen = []

    def fake_from_pretrained(name, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    for mc in (ModelConfig(name_or_path="some/model"), ModelConfig(name_or_path="some/model", trust_remote_code=True)):
        with pytest.raises(ConfigError):
            modeling.load_config(mc, 2)
    assert seen == [False, True]


def test_results_are_stored_as_json_never_pickled(tmp_path):
    _, rows, _ = _sweep(tmp_path, None)
    with sqlite3.connect(tmp_path / "results.sqlite") as con:
        columns = [r[1] for r in con.execute("PRAGMA table_info(runs)")]
        types_ = {t for c in columns for (t,) in con.execute(f"SELECT DISTINCT typeof({c}) FROM runs")}
        assert "blob" not in types_
        import json

        for column in ("spec", "budget", "trainable", "best", "final", "history", "method_report"):
            (text,) = con.execute(f"SELECT {column} FROM runs").fetchone()
            json.loads(text)
