"""Helpers shared by the test files (``from helpers import ...``: pytest puts tests/ on ``sys.path``)."""

from __future__ import annotations

from peftbench.config import Config
from peftbench.hookspecs import hookimpl
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store


class CrashAtStep:
    """A plugin that raises once training reaches optimizer step ``step`` (a crash in the middle of an epoch)."""

    def __init__(self, step: int):
        self.step = step

    @hookimpl
    def peftbench_after_optimizer_step(self, state):
        if state.step + 1 == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def train_one(config: Config):
    """Run a one-run sweep quietly into its store; returns the host and the stored run (tests of what comes
    after training: export, tables, reports)."""
    host = make_host(config)
    store = Store(config.output.db)
    run_sweep(config, host, store, progress=False, log=lambda *a: None)
    (run,) = store.runs()
    return host, run


def compile_without_codegen(monkeypatch) -> list:
    """Make ``train.compile`` use AOTAutograd without code generation (inductor needs minutes per run on two CPU
    cores and a C compiler): the same dynamo tracing and forward/backward graphs. Returns the list of modules
    compiled from then on (a test can check that compile ran)."""
    from torch import nn

    compiled, original = [], nn.Module.compile

    def compile_(self, *args, **kwargs):
        compiled.append(self)
        original(self, backend="aot_eager")

    monkeypatch.setattr(nn.Module, "compile", compile_)
    return compiled
