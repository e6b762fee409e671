"""Observers: plugins that watch every run through the run hooks (loggers, trackers, progress bars).

An observer is any object with ``@hookimpl`` run hooks, registered for the runs it watches; unlike a method,
it sees every run. The built-in progress bar is one, so the path a third-party tracker takes is the one the
core uses itself. Observers implement only hooks called once per run, per log point or per evaluation
(``peftbench_train_start``, ``peftbench_on_log``, ``peftbench_on_evaluate``, ``peftbench_train_end``...):
the per-micro-batch hooks are for methods, and a run whose method needs none of them makes no hook call in
its loop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .hookspecs import hookimpl


class ProgressBar:
    """A tqdm bar over the optimizer steps of a run, showing at each log point the loss, the learning rate,
    the best in-budget dev score so far (of ``metric``, the task's main metric) and the method's current budget (its
    ``state.logs``: e.g. PrunedLoRA's mean rank and adapter count). It moves at log points (``train.log_every``)."""

    def __init__(self, desc: str, metric: str):
        self.desc, self.metric = desc, metric
        self.best = -math.inf
        self.bar: Any = None

    @hookimpl
    def peftbench_train_start(self, state):
        self.close()
        self.best = -math.inf
        self.bar = tqdm(total=state.total_steps, desc=self.desc, dynamic_ncols=True, leave=False)

    @hookimpl
    def peftbench_on_log(self, state, record):
        self.bar.update(state.step - self.bar.n)  # a resumed run starts at its checkpoint's step
        budget = {key: f"{value:,.4g}" for key, value in state.logs.items()}
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", best=f"{self.best:.4f}",
                             **budget, refresh=False)

    @hookimpl
    def peftbench_on_evaluate(self, metrics, in_budget):
        if in_budget:  # the same selection as the run's reported metric: an over-budget score is never shown as best
            self.best = max(self.best, metrics.get(self.metric, -math.inf))

    @hookimpl
    def peftbench_train_end(self):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def forked_rng() -> Iterator[None]:
    """Run a block with the training random generators forked (torch's, CUDA's where in use, numpy's global one
    and Python's ``random``, all of which the trainer seeds): what an observer draws never changes training,
    as evaluations draw nothing from it either."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


@contextmanager
def observing(host, *observers: Any) -> Iterator[None]:
    """Register ``observers`` with ``host`` for the duration of a ``with`` block (one run); on the way out,
    however the run ended, they are unregistered and closed (``close()``, if they have one)."""
    for observer in observers:
        host.pm.register(observer, name=f"observer:{type(observer).__name__}:{id(observer)}")
    try:
        yield
    finally:
        for observer in observers:
            host.pm.unregister(observer)
            if callable(getattr(observer, "close", None)):
                observer.close()
