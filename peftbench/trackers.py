"""Experiment trackers (``output.trackers``): observers that send every run to TensorBoard, MLflow, ...

A tracker is an observer (:mod:`peftbench.observers`) made for one run and registered for it next to the
progress bar. It gets, through the run hooks: the run's resolved hyperparameters (its spec, flattened) at the
start; the loss, learning rate and the method's ``logs`` (current budget, ranks) at every log point; the dev
metrics at every evaluation; the best in-budget and the final metrics at the end, from the run's record
(``peftbench_run_end``).

``output.trackers`` names each tracker: a name accelerate knows (``accelerate.tracking.LOGGER_TYPE_TO_CLASS``:
``tensorboard``, ``mlflow``, ``wandb``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ...) or
``module:Class``, a :class:`Tracker` subclass of a third party. TensorBoard writes to
``<output.dir>/<run_id>/tensorboard``; the others go where their library is configured to (MLflow:
``MLFLOW_TRACKING_URI``; experiment = the sweep's name, run name = ``label/task/s<seed>``).

A tracker never makes a run fail: its first error is a warning naming it, and it is then switched off for the
rest of that run (its state is unknown after an error); the run goes on unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import warnings
from pathlib import Path
from typing import Any

from .hookspecs import hookimpl


class Tracker:
    """Base class of a tracker: implement :meth:`start`, :meth:`log_params`, :meth:`log_metrics` and
    :meth:`finish` (any of them; the defaults do nothing). The hooks around them catch every error."""

    name = "tracker"

    def __init__(self, spec: Any, run_dir: Path):
        self.spec, self.run_dir = spec, run_dir
        self.broken = False
        self.started = False

    # -- what a tracker implements ---------------------------------------------------------------------

    def start(self) -> None:
        """Open the run (called once, on the main process, before training)."""

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's resolved hyperparameters, flat (``train.lr``, ``params.r``...)."""

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Scalars at optimizer step ``step`` (``train/loss``, ``dev/accuracy``, ``method/rank``...)."""

    def finish(self) -> None:
        """Close the run (called once, however the run ended)."""

    # -- the run hooks ---------------------------------------------------------------------------------

    @hookimpl
    def peftbench_train_start(self, state):
        if getattr(state.accelerator, "is_main_process", True):  # one record per run under accelerate launch
            self._safely("start", self._start)

    def _start(self) -> None:
        self.start()
        self.started = True
        self.log_params(flat_params(self.spec))

    @hookimpl
    def peftbench_on_log(self, state, record):
        values = {f"train/{k}": record[k] for k in ("loss", "lr", "epoch") if k in record}
        values.update({f"method/{k}": v for k, v in state.logs.items()})
        self._metrics(values, state.step)

    @hookimpl
    def peftbench_on_evaluate(self, state, metrics):
        self._metrics({f"dev/{k}": v for k, v in metrics.items()}, state.step)

    @hookimpl
    def peftbench_run_end(self, record):
        """The finished run's record: the reported (best in-budget) and the final metrics, at its last step."""
        values = {f"best/{k}": v for k, v in (record.best or {}).items()}
        values.update({f"final/{k}": v for k, v in (record.final or {}).items()})
        values["best/step"] = record.best_step
        self._metrics(values, record.steps)

    def close(self) -> None:
        """Called by :func:`peftbench.observers.observing` when the run ends, however it ended."""
        if self.started:
            self._safely("finish", self.finish)
            self.started = False

    def _metrics(self, values: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if numbers:
            self._safely("log", lambda: self.log_metrics(numbers, step))

    def _safely(self, what: str, call) -> None:
        if self.broken or (what != "start" and not self.started):
            return
        try:
            call()
        except Exception as exc:  # a tracker never fails a run
            self.broken = True
            warnings.warn(f"peftbench: tracker {self.name!r} failed in {what} ({type(exc).__name__}: {exc}); run "
                          f"{getattr(self.spec, 'run_id', '?')} goes on without it", RuntimeWarning, stacklevel=2)


class AccelerateTracker(Tracker):
    """A tracker accelerate knows (``accelerate.tracking``), by its name."""

    def __init__(self, spec: Any, run_dir: Path, name: str):
        super().__init__(spec, run_dir)
        self.name, self.tracker = name, None

    def start(self) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[self.name]
        accepted = inspect.signature(cls.__init__).parameters
        title = f"{self.spec.label}/{self.spec.task}/s{self.spec.seed}"
        kwargs = {"run_name": title if "experiment_name" in accepted else self.spec.sweep,  # wandb & co: project
                  "experiment_name": self.spec.sweep, "logging_dir": str(self.run_dir)}
        if self.name == "tensorboard":
            kwargs["run_name"] = "tensorboard"  # its folder under the run's own: <output.dir>/<run_id>/tensorboard
        self.tracker = cls(**{k: v for k, v in kwargs.items() if k in accepted})
        if hasattr(self.tracker, "start"):  # accelerate >= 1.2 opens the run in start()
            self.tracker.start()

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.store_init_configuration(params)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.tracker.log(values, step=step)

    def finish(self) -> None:
        self.tracker.finish()


def flat_params(spec: Any) -> dict[str, Any]:
    """The run's identity (method, params, model, train settings, data fingerprints...) as flat
    ``key.sub: value`` pairs of plain types (lists and ``None`` as text), plus its id and sweep."""
    out: dict[str, Any] = {"run_id": spec.run_id, "sweep": spec.sweep}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", spec.identity())
    return out


def known_trackers() -> list[str]:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_tracker(name: str) -> str | None:
    """Why ``name`` is no usable tracker (unknown, not installed, not a :class:`Tracker`), or ``None``."""
    if ":" in name:
        try:
            cls = _import(name)
        except Exception as exc:
            return f"cannot import tracker {name!r} ({type(exc).__name__}: {exc})"
        return None if isinstance(cls, type) and issubclass(cls, Tracker) else \
            f"{name!r} is not a subclass of peftbench.trackers.Tracker"
    if name not in known_trackers():
        return f"unknown tracker {name!r}; choose from {', '.join(known_trackers())}, or give module:Class"
    package = {"tensorboard": "tensorboard", "comet_ml": "comet_ml"}.get(name, name)
    if importlib.util.find_spec(package) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        return f"tracker {name!r} needs the {package!r} package (pip install 'peftbench[trackers]' or {package})"
    return None


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_trackers(spec: Any) -> list[Tracker]:
    """The trackers of one run (``spec.trackers``), made (not started: that happens in the run's first hook).
    A tracker that cannot be made is a warning, never the run's failure."""
    made = []
    run_dir = Path(spec.out_dir or "results/runs") / spec.run_id
    for name in getattr(spec, "trackers", None) or ():
        try:
            made.append(_import(name)(spec, run_dir) if ":" in name else AccelerateTracker(spec, run_dir, name))
        except Exception as exc:
            warnings.warn(f"peftbench: tracker {name!r} could not be made ({type(exc).__name__}: {exc}); run "
                          f"{spec.run_id} goes on without it", RuntimeWarning, stacklevel=2)
    return made


__all__ = ["Tracker", "AccelerateTracker", "check_tracker", "flat_params", "known_trackers", "run_trackers"]
