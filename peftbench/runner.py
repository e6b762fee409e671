"""Running a sweep: budget check, grid expansion, one run after another, every result in the store.

:class:`Sweep` is the bookkeeping every executor shares (claims, failures, artifacts, log lines, summary);
:mod:`peftbench.executors` runs the claimed runs here, as Ray tasks, or on all processes of an
``accelerate launch``.

What can go wrong, and what happens then:

* **Bad input** (config, data, unknown names, budgets no method meets) raises a :class:`PeftbenchError`
  before any training where it can be seen up front (names, budgets, every pending task's data); one that
  only shows inside a run stops the sweep after storing that run as failed. The CLI exits with status 2;
  finished runs stay stored.
* **A run that fails** (loss became NaN/inf, out of memory, a plugin that raises) is stored as ``failed``
  with its reason and traceback, memory is released, and the sweep goes on with the next run (unless
  ``fail_fast``). The summary counts them; the CLI exits with status 1.
* **A killed sweep** (kill -9, power cut, Ctrl-C): rerunning the same command skips finished runs and redoes
  the rest; with ``output.checkpoint`` a long run continues from its last epoch end
  (:mod:`peftbench.checkpoint`). Several processes may share one store (:mod:`peftbench.store`).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .budget import Shapes, Solved, solve_all
from .config import Config, data_dir_for
from .errors import DataError, PeftbenchError, PluginError
from .host import Host
from .runs import RunSpec, expand
from .schema import to_dict
from .store import Store


@dataclass
class SweepSummary:
    done: int = 0
    skipped: int = 0  #: finished earlier
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    busy: int = 0  #: running in another live process

    @property
    def ok(self) -> bool:
        return not self.failed


def make_host(config: Config, extra_plugins: list[str] | tuple[str, ...] = ()) -> Host:
    """The plugin host of a sweep; unknown task and method names and bad method params fail here, naming
    the config key."""
    host = Host(plugins=list(extra_plugins))
    for spec in config.plugins:
        host.load_spec(spec, source=f"{config.where('plugins')}plugins")
    for i, name in enumerate(config.tasks):
        _check_name(host.task, name, f"{config.where('tasks')}tasks[{i}]")
    for i, method in enumerate(config.methods):
        _check_name(host.method, method.name, f"{config.where(f'methods[{i}]')}methods[{i}].name")
    config.check_params(host.method)
    return host


def _check_name(lookup: Callable[[str], Any], name: str, key: str) -> None:
    try:
        lookup(name)
    except PluginError as exc:
        raise PluginError(f"{key}: {exc}") from None


def solve_budgets(config: Config, host: Host, shapes: Shapes | None = None) -> dict[tuple[str, str], Solved]:
    """:func:`peftbench.budget.solve_all`, with a plugin that raises in a budget hook reported as bad input
    (nothing can run without budgets) naming the plugin code that raised."""
    try:
        return solve_all(config, host, shapes)
    except PeftbenchError:
        raise
    except Exception as exc:
        raise PluginError(f"solving the trainable-parameter budgets failed: {type(exc).__name__}: {exc} "
                          f"(raised at {_origin(exc)})") from exc


def check_data(config: Config, host: Host, tasks: list[str]) -> None:
    """Load every split of ``tasks`` once and check it against its task, so that a malformed file stops
    the sweep before any training instead of hours into it."""
    data_dir = data_dir_for(config)
    for name in tasks:
        task = host.task(name)
        for split in ("train", *task.dev_splits):
            try:
                data = task.load(split, data_dir)
            except PeftbenchError:
                raise
            except Exception as exc:
                raise DataError(f"task {name!r}: loading the {split!r} split failed: {type(exc).__name__}: "
                                f"{exc} (raised at {_origin(exc)})") from exc
            _check_split(task, split, data)


def _check_split(task, split: str, data) -> None:
    """Shape and label checks every task's data must pass (a task plugin may check more, with lines)."""
    where = f"task {task.name!r}, {split} split ({data.source})"
    if len(data.texts) != len(task.text_fields):
        raise DataError(f"{where}: {len(data.texts)} text column(s), the task has {len(task.text_fields)} "
                        f"({', '.join(task.text_fields)})")
    if not len(data.labels):
        raise DataError(f"{where}: no examples")
    if any(len(column) != len(data.labels) for column in data.texts):
        raise DataError(f"{where}: text columns and labels differ in length")
    labels = np.asarray(data.labels, dtype=np.float64)
    if task.is_regression:
        bad = ~np.isfinite(labels)
        problem = "is not a finite number"
    else:
        bad = ~((labels == np.round(labels)) & (labels >= 0) & (labels < task.num_labels))
        problem = f"is outside the task's labels 0..{task.num_labels - 1}"
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: example {i}: label {data.labels[i]!r} {problem} "
                        f"({int(bad.sum())} such label(s))")


def run_sweep(config: Config, host: Host, store: Store | None, fail_fast: bool = False, progress: bool = True,
              log=print, summary: SweepSummary | None = None,
              solved: dict[tuple[str, str], Solved] | None = None, executor=None) -> SweepSummary:
    """Run every pending run of ``config``; returns (and fills ``summary`` with) what happened.
    ``solved``: the budgets, if already solved (:func:`solve_budgets`). ``executor``: where the runs train
    (:mod:`peftbench.executors`; default: one after another in this process). ``store`` is ``None`` only on
    the non-main processes of a distributed run."""
    from .executors import LocalExecutor

    summary = summary if summary is not None else SweepSummary()
    sweep = Sweep(config, host, store, solved or solve_budgets(config, host), summary, log)
    (executor or LocalExecutor(progress=progress)).run(sweep, fail_fast=fail_fast)
    return summary


@dataclass
class Outcome:
    """What training one run gave, wherever it trained: its result, or why it failed."""

    fields: dict[str, Any] | None = None  #: the result as stored (:func:`_result_fields`), when it finished
    weights: Any = None  #: best trainable weights: tensors, or safetensors bytes from a remote worker
    reason: str | None = None  #: one line, when it failed
    traceback: str = ""
    error: PeftbenchError | None = None  #: bad input (every further run would fail the same way)

    @property
    def ok(self) -> bool:
        return self.reason is None


def train_outcome(spec: RunSpec, host: Host, progress: bool = True, checkpoint=None) -> Outcome:
    """Train one run and catch what went wrong in it (a ``KeyboardInterrupt`` passes through)."""
    failure = None
    try:
        result = run_one(spec, host, progress=progress, checkpoint=checkpoint)
    except PeftbenchError as exc:
        return Outcome(reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(), error=exc)
    except Exception as exc:  # record and go on: one bad run must not lose the sweep
        failure = (failure_reason(exc), traceback.format_exc())
    if failure is not None:  # outside the except block: the traceback (and the run's tensors) are freed
        release_memory()
        return Outcome(reason=failure[0], traceback=failure[1])
    return Outcome(fields=_result_fields(result, None), weights=result.best_state if spec.save_adapters else None)


class Sweep:
    """The driver's side of a sweep, shared by every executor: the run list, the data check, claims in the
    store, checkpoints, storing each run's outcome and artifacts, the log lines and the summary. An executor
    (:mod:`peftbench.executors`) only decides where and when each claimed run trains."""

    def __init__(self, config: Config, host: Host, store: Store | None, solved: dict[tuple[str, str], Solved],
                 summary: SweepSummary, log=print):
        self.config, self.host, self.store, self.solved = config, host, store, solved
        self.summary, self.log = summary, log
        self.runs = expand(config, solved)

    def check(self) -> None:
        """Announce the sweep and check the data of every task with pending runs, before any training."""
        config, runs = self.config, self.runs
        self.log(f"peftbench: sweep {config.name!r}: {len(runs)} runs ({len(config.methods)} methods × "
                 f"{len(config.tasks)} tasks × {len(config.seeds)} seeds) → {self.store.path}")
        check_data(config, self.host, sorted({s.task for s in runs if self.store.status(s.run_id) != "done"}))

    def claim(self, i: int, spec: RunSpec) -> str | None:
        """Claim run ``i`` (1-based) in the store: its log tag, or ``None`` to skip it (finished earlier, or
        running in another live process)."""
        tag = f"[{i}/{len(self.runs)}] {spec.label} {spec.task} seed={spec.seed} ({spec.run_id})"
        claim = self.store.claim(spec.run_id, _spec_fields(spec, self.solved[(spec.label, spec.task)]))
        if claim == "claimed":
            return tag
        self.summary.skipped += claim == "done"
        self.summary.busy += claim == "busy"
        self.log(f"{tag}: {'finished earlier, skipped' if claim == 'done' else 'running elsewhere, skipped'}")
        return None

    def checkpoint(self, spec: RunSpec, tag: str, quiet: bool = False):
        """The run's :class:`peftbench.checkpoint.Checkpoint` with ``output.checkpoint``, else ``None``."""
        if not self.config.output.checkpoint:
            return None
        from .checkpoint import Checkpoint

        return Checkpoint(Path(self.config.output.dir) / spec.run_id / "checkpoint.pt", spec.run_id,
                          log=(lambda message: None) if quiet else (lambda message: self.log(f"{tag}: {message}")))

    def record(self, spec: RunSpec, tag: str, outcome: Outcome, checkpoint=None) -> bool:
        """Store a claimed run's outcome (and its artifacts) and log it; returns whether it finished.
        Bad input is stored as the run's failure, then raised: it stops the sweep."""
        if outcome.error is not None:
            self._failed(spec, outcome.reason, outcome.traceback)
            self.log(f"{tag}: FAILED (bad input, stopping the sweep): {outcome.reason}")
            raise outcome.error
        if outcome.ok:
            try:
                artifacts = write_artifacts(self.config, spec, outcome.weights) if spec.save_adapters else None
            except Exception as exc:  # a full disk: the run's failure, like one in training
                outcome = Outcome(reason=failure_reason(exc), traceback=traceback.format_exc())
        if not outcome.ok:
            self._failed(spec, outcome.reason, outcome.traceback)
            self.log(f"{tag}: FAILED: {outcome.reason}")
            return False
        fields = {**outcome.fields, "artifacts": artifacts}
        if not self.store.finish(spec.run_id, "done", fields):
            self.log(f"{tag}: finished, but another process took the run over meanwhile; its result is kept")
        if checkpoint is not None:
            checkpoint.remove()
        self.summary.done += 1
        main = self.host.task(spec.task).main_metric
        self.log(f"{tag}: best {main} {fields['best'].get(main, float('nan')):.4f} at step {fields['best_step']}, "
                 f"{fields['wall_s']:.0f}s, {fields['tokens_per_s']:,.0f} tok/s, "
                 f"adapter {fields['trainable']['adapter']:,}")
        return True

    def stopped(self, spec: RunSpec, reason: str = "interrupted", tb: str | None = None) -> None:
        """A claimed run that was stopped before it finished (Ctrl-C, SIGTERM, a cancelled remote task):
        stored as failed, so that rerunning the sweep redoes it."""
        self._failed(spec, reason, traceback.format_exc() if tb is None else tb)

    def _failed(self, spec: RunSpec, reason: str, tb: str) -> None:
        self.store.finish(spec.run_id, "failed", {"error": reason, "traceback": tb})
        self.summary.failed.append((spec, reason))


def run_one(spec: RunSpec, host: Host, progress: bool = True, checkpoint=None):
    """Train one run (``checkpoint``: a :class:`peftbench.checkpoint.Checkpoint` to save to / resume from)."""
    from .checkpoint import unresumable
    from .trainer import train  # torch-heavy import only when training

    method = host.method(spec.method)(spec.params)
    if checkpoint is not None and (reason := unresumable(method)):
        checkpoint.log(f"no checkpoints for this run: {reason}")
        checkpoint = None
    with host.activate(method):
        return train(spec, host, method, progress=progress, checkpoint=checkpoint)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def failure_reason(exc: BaseException) -> str:
    """One line for the store and the summary: what went wrong and, where it helps, what to change."""
    if is_out_of_memory(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"out of memory ({type(exc).__name__}: {first}); lower train.batch_size (raising "
                "train.grad_accum keeps the effective batch) or train.max_length")
    return f"{type(exc).__name__}: {exc}"


def release_memory() -> None:
    """Free what a failed run left behind (reference cycles, cached CUDA blocks) before the next run."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _origin(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame that raised ``exc``."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def _spec_fields(spec: RunSpec, budget: Solved) -> dict[str, Any]:
    return {
        "sweep": spec.sweep, "label": spec.label, "method": spec.method, "task": spec.task, "seed": spec.seed,
        "model": spec.model.name_or_path, "spec": spec.identity(),
        "budget": {"target": budget.target, "matched": budget.matched, "final": budget.counts.final,
                   "peak": budget.counts.peak, "nonzero": budget.counts.nonzero, "miss": budget.miss},
    }


def _result_fields(result, artifacts: str | None) -> dict[str, Any]:
    return {
        "trainable": result.trainable, "best": result.best, "final": result.final, "best_step": result.best_step,
        "history": result.history, "method_report": result.method_report, "wall_s": result.wall_s,
        "train_s": result.train_s, "tokens_per_s": result.tokens_per_s, "peak_mem_bytes": result.peak_mem_bytes,
        "mem_kind": result.mem_kind, "steps": result.steps, "artifacts": artifacts,
        "median_step_s": statistics.median(result.step_times) if result.step_times else None,
    }


def write_artifacts(config: Config, spec: RunSpec, weights) -> str | None:
    """The best checkpoint's trainable weights (tensors, or the safetensors bytes a remote worker sent) as the
    run's ``trainable.safetensors``, with its ``spec.json``, for export; returns the run's folder (``None``:
    no weights)."""
    if weights is None:
        return None
    out = Path(config.output.dir) / spec.run_id
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, bytes):
        (out / "trainable.safetensors").write_bytes(weights)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "trainable.safetensors"))
    (out / "spec.json").write_text(json.dumps({"run_id": spec.run_id, **spec.identity()}, indent=2, default=str))
    return str(out)


def print_summary(summary: SweepSummary, started: float, out=None) -> None:
    out = out or sys.stdout  # looked up at call time, not import time
    took = time.time() - started
    print(f"peftbench: {summary.done} run(s) finished, {summary.skipped} skipped (finished earlier), "
          f"{len(summary.failed)} failed, {summary.busy} running elsewhere, in {took:.0f}s", file=out)
    for spec, reason in summary.failed:
        print(f"  failed: {spec.label} {spec.task} seed={spec.seed} ({spec.run_id}): {reason}", file=out)
    if summary.failed:
        print("  (tracebacks are stored with each run; rerun the same command to redo failed runs)", file=out)


__all__ = ["run_sweep", "Sweep", "Outcome", "train_outcome", "run_one", "make_host", "solve_budgets", "check_data",
           "print_summary", "to_dict"]
