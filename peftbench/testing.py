"""Test helpers for peftbench and for plugin authors.

* From :mod:`peftbench.toys`: ``toy`` and ``toy_pair``, small synthetic tasks (no download, no data folder)
  that a tiny model learns in seconds (load this module as a plugin: ``plugins: [peftbench.testing]`` or
  ``--plugin peftbench.testing``); :func:`tiny_model_config`, a 2-layer random-init BERT; :func:`tiny_config`,
  a complete sweep config around both, for end-to-end tests in a few seconds.
* The conformance kit for method plugins (:mod:`peftbench.conformance`): :func:`check_method`,
  :class:`MethodConformance` (one pytest test per check), :class:`Conformance`, :class:`ConformanceError`.
"""

from __future__ import annotations

from .config import Config
from .conformance import CHECKS, Conformance, ConformanceError, MethodConformance, check_method
from .hookspecs import hookimpl
from .toys import (
    PEFTBENCH_API_VERSION,
    TOY_TASKS,
    ToyTask,
    peftbench_add_tasks,
    tiny_config,
    tiny_model_config,
)


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
    from .runner import make_host, run_sweep
    from .store import Store

    host = make_host(config)
    store = Store(config.output.db)
    run_sweep(config, host, store, progress=False, log=lambda *a: None)
    (run,) = store.runs()
    return host, run


__all__ = ["PEFTBENCH_API_VERSION", "TOY_TASKS", "ToyTask", "peftbench_add_tasks", "tiny_model_config",
           "tiny_config", "CHECKS", "Conformance", "ConformanceError", "MethodConformance", "check_method"]
