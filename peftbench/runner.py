"""Running a sweep: budget check, grid expansion, one run after another, every result in the store.

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
    """The plugin host of a sweep; unknown task and method names fail here, naming the config key."""
    host = Host(plugins=list(extra_plugins))
    for spec in config.plugins:
        host.load_spec(spec, source=f"{config.where('plugins')}plugins")
    for i, name in enumerate(config.tasks):
        _check_name(host.task, name, f"{config.where('tasks')}tasks[{i}]")
    for i, method in enumerate(config.methods):
        _check_name(host.method, method.name, f"{config.where(f'methods[{i}]')}methods[{i}].name")
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
    except PeftbenchError as exc:
        if str(exc).startswith(config.source) or type(exc).__init__ is not Exception.__init__:
            raise
        raise type(exc)(f"{config.source}: {exc}") from None  # name the file: "c.yaml: methods[0].params.r: ..."
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


def run_sweep(config: Config, host: Host, store: Store, fail_fast: bool = False, progress: bool = True,
              log=print, summary: SweepSummary | None = None,
              solved: dict[tuple[str, str], Solved] | None = None) -> SweepSummary:
    """Run every pending run of ``config``; returns (and fills ``summary`` with) what happened.
    ``solved``: the budgets, if already solved (:func:`solve_budgets`)."""
    summary = summary if summary is not None else SweepSummary()
    solved = solved or solve_budgets(config, host)
    runs = expand(config, solved)
    log(f"peftbench: sweep {config.name!r}: {len(runs)} runs "
        f"({len(config.methods)} methods × {len(config.tasks)} tasks × {len(config.seeds)} seeds) → {store.path}")
    pending_tasks = sorted({spec.task for spec in runs if store.status(spec.run_id) != "done"})
    check_data(config, host, pending_tasks)
    for i, spec in enumerate(runs, start=1):
        tag = f"[{i}/{len(runs)}] {spec.label} {spec.task} seed={spec.seed} ({spec.run_id})"
        claim = store.claim(spec.run_id, _spec_fields(spec, solved[(spec.label, spec.task)]))
        if claim != "claimed":
            summary.skipped += claim == "done"
            summary.busy += claim == "busy"
            log(f"{tag}: {'finished earlier, skipped' if claim == 'done' else 'running elsewhere, skipped'}")
            continue
        checkpoint = None
        if config.output.checkpoint:
            from .checkpoint import Checkpoint

            checkpoint = Checkpoint(Path(config.output.dir) / spec.run_id / "checkpoint.pt", spec.run_id,
                                    log=lambda message, tag=tag: log(f"{tag}: {message}"))
        failure = None
        try:
            result = run_one(spec, host, progress=progress, checkpoint=checkpoint)
            artifacts = save_artifacts(config, spec, result) if spec.save_adapters else None
        except KeyboardInterrupt:
            store.finish(spec.run_id, "failed", {"error": "interrupted", "traceback": traceback.format_exc()})
            summary.failed.append((spec, "interrupted"))
            raise
        except PeftbenchError as exc:  # bad input: every further run would fail the same way
            reason = f"{type(exc).__name__}: {exc}"
            store.finish(spec.run_id, "failed", {"error": reason, "traceback": traceback.format_exc()})
            summary.failed.append((spec, reason))
            log(f"{tag}: FAILED (bad input, stopping the sweep): {reason}")
            raise
        except Exception as exc:  # record and go on: one bad run must not lose the sweep
            failure = (failure_reason(exc), traceback.format_exc())
        if failure is not None:  # outside the except block: the traceback (and the run's tensors) are freed
            release_memory()
            reason, tb = failure
            store.finish(spec.run_id, "failed", {"error": reason, "traceback": tb})
            summary.failed.append((spec, reason))
            log(f"{tag}: FAILED: {reason}")
            if fail_fast:
                break
            continue
        if not store.finish(spec.run_id, "done", _result_fields(result, artifacts)):
            log(f"{tag}: finished, but another process took the run over meanwhile; its result is kept")
        if checkpoint is not None:
            checkpoint.remove()
        summary.done += 1
        main = host.task(spec.task).main_metric
        log(f"{tag}: best {main} {result.best.get(main, float('nan')):.4f} at step {result.best_step}, "
            f"{result.wall_s:.0f}s, {result.tokens_per_s:,.0f} tok/s, adapter {result.trainable['adapter']:,}")
    return summary


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


def save_artifacts(config: Config, spec: RunSpec, result) -> str | None:
    """The best checkpoint's trainable weights (safetensors) and the run's spec, for export."""
    if result.best_state is None:
        return None
    from safetensors.torch import save_file

    out = Path(config.output.dir) / spec.run_id
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.best_state.items()}, str(out / "trainable.safetensors"))
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


__all__ = ["run_sweep", "run_one", "make_host", "solve_budgets", "check_data", "print_summary", "to_dict"]
