"""One sweep's bookkeeping, shared by every executor: check the data, claim each run, train it, record it.

:class:`Sweep` holds the run list and does everything around training a run: the data check before any
training, claims in the store, checkpoints, storing each run's :class:`Outcome` and artifacts, the log lines
and the :class:`SweepSummary`. :func:`train_outcome` trains one run and turns what went wrong in it into an
outcome. An executor (:mod:`peftbench.executors`) only decides where and when each claimed run trains;
:func:`peftbench.runner.run_sweep` hands it the sweep.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import audit, miss_line
from .budget import Solved
from .config import Config, data_dir_for
from .data import content_fingerprint
from .errors import ConfigError, DataError, PeftbenchError
from .history import write_generations, write_history
from .host import Host
from .record import result_fields
from .runs import RunSpec, expand
from .schedule import InBudgetPlan, in_budget_plan, train_examples
from .store import Store
from .tuning import check_holdout, point_text


@dataclass
class SweepSummary:
    done: int = 0
    skipped: int = 0  #: finished earlier
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)
    busy: int = 0  #: running in another live process
    busy_ids: list[str] = field(default_factory=list)
    #: runs skipped as running elsewhere whose process has since stopped without finishing them
    abandoned: list[str] = field(default_factory=list)
    #: (label, task)s whose final runs were not started: none of their tuning runs finished (why, one line each)
    not_started: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.abandoned


@dataclass
class Outcome:
    """What training one run gave, wherever it trained: its result, or why it failed."""

    fields: dict[str, Any] | None = None  #: the result as stored (:func:`peftbench.record.result_fields`), when it finished
    weights: Any = None  #: best trainable weights: tensors, or safetensors bytes from a remote worker
    final_weights: Any = None  #: the same after the last step, where they are not the selected ones (else None)
    reason: str | None = None  #: one line, when it failed
    traceback: str = ""
    error: PeftbenchError | None = None  #: bad input (every further run would fail the same way)

    @property
    def ok(self) -> bool:
        return self.reason is None


class Sweep:
    """The driver's side of a sweep: the run list, the data check, claims in the store, checkpoints, storing
    each run's outcome and artifacts, the log lines and the summary."""

    def __init__(self, config: Config, host: Host, store: Store | None, solved: dict[tuple[str, str], Solved],
                 summary: SweepSummary, log=print, runs: list[RunSpec] | None = None, what: str | None = None):
        self.config, self.host, self.store, self.solved = config, host, store, solved
        self.summary, self.log, self.what = summary, log, what
        self.trained_s: list[float] = []  #: wall time of each run this sweep finished (for the ETA)
        self._done_before = self._done()  # a summary shared by sweeps (tuning's two phases) counts them all
        # every split is read and checked before any training; its content fingerprint is part of each run's
        # identity, so a run on changed data is a new run, never "finished earlier" (``runs``: made from
        # checked data already, e.g. the phases of tuning, :mod:`peftbench.tuning`)
        if runs is None:
            runs = expand(config, solved, check_sweep_data(config, host, solved))
        self.runs = runs

    def check(self) -> None:
        """Announce the sweep (its data was checked when the run list was made)."""
        config, runs = self.config, self.runs
        what = self.what or f"{len(config.methods)} methods × {len(config.tasks)} tasks × {len(config.seeds)} seeds"
        self.log(f"peftbench: sweep {config.name!r}: {len(runs)} runs ({what}) → {self.store.path}")

    def claim(self, i: int, spec: RunSpec) -> str | None:
        """Claim run ``i`` (1-based) in the store: its log tag, or ``None`` to skip it (finished earlier, or
        running in another live process)."""
        tuning = f" tuning {point_text(spec.tuning['point'])}" if spec.tuning else ""
        tag = f"[{i}/{len(self.runs)}] {spec.label} {spec.task} seed={spec.seed}{tuning} ({spec.run_id})"
        claim = self.store.claim(spec.run_id, _spec_fields(spec, self.solved[(spec.label, spec.task)],
                                                           self.host.plugin_specs()))
        if claim == "claimed":
            return tag
        self.summary.skipped += claim == "done"
        self.summary.busy += claim == "busy"
        if claim == "busy":
            self.summary.busy_ids.append(spec.run_id)
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
                artifacts = write_artifacts(self.config, spec, outcome.weights,
                                            outcome.final_weights) if spec.save_adapters else None
            except Exception as exc:  # a full disk: the run's failure, like one in training
                outcome = Outcome(reason=failure_reason(exc), traceback=traceback.format_exc())
        if not outcome.ok:
            self._failed(spec, outcome.reason, outcome.traceback)
            self.log(f"{tag}: FAILED: {outcome.reason}; {self.eta()}")
            return False
        solved = self.solved[(spec.label, spec.task)]
        checked = audit(outcome.fields, solved.target if solved.matched else None, self.config.budget.tolerance)
        generations = outcome.fields.pop("generations", None)
        fields = {**outcome.fields, "artifacts": artifacts, "audit": checked}
        if not self.store.finish(spec.run_id, "done", fields):
            self.log(f"{tag}: finished, but another process took the run over meanwhile; its result is kept")
        if checkpoint is not None:
            checkpoint.remove()
        self.summary.done += 1
        self.trained_s.append(fields["wall_s"])
        self._write_files(spec, tag, fields["history"], generations)
        task = self.host.task(spec.task)
        # the main metric, or where the run chose without one (`select_on: gold_logprob`), what it chose on
        main = next((m for m in (task.main_metric, *task.tie_break) if m in fields["best"]), task.main_metric)
        peak = f" (peak {checked['peak']:,})" if checked["peak"] != checked["final"] else ""
        chosen = {"validation": "chosen on the validation split, dev scored once", "final": "the final model",
                  "dev": "the best of the dev evaluations"}[spec.train.select]
        self.log(f"{tag}: best in-budget {main} {fields['best'].get(main, float('nan')):.4f} at step "
                 f"{fields['best_step']} ({chosen}; {fields.get('in_budget_evals')}/{fields.get('evaluations')} "
                 "evaluations in budget), "
                 f"{fields['wall_s']:.0f}s, {fields['tokens_per_s']:,.0f} tok/s, adapter {checked['final']:,}{peak}"
                 f"; {self.eta()}")
        if checked["ok"] is False:  # measured after training: e.g. AdaLoRA's allocation under a triplet budget
            self.log(f"{tag}: {miss_line(checked)}")
        return True

    def _write_files(self, spec: RunSpec, tag: str, history: list[dict[str, Any]],
                     generations: list[dict[str, Any]] | None) -> None:
        """The run's metric history as ``<output.dir>/<run_id>/history.csv`` (:mod:`peftbench.history`) and, for a
        causal-LM task, the generations its reported metrics score (those of its one reported checkpoint,
        each saying so) as ``generations.jsonl``; a file that cannot be written is said,
        never the run's failure (the store holds the history and the metrics)."""
        try:
            write_history(self.config.output.dir, spec.run_id, history)
            if generations:
                write_generations(self.config.output.dir, spec.run_id, generations)
        except OSError as exc:
            self.log(f"{tag}: could not write the run's files ({exc}); the store holds its history and metrics")

    def eta(self) -> str:
        """``k/N runs done, ETA 1h02m``: the runs left times the mean wall time of the runs this sweep trained
        (measured, evaluation included); runs found finished count as done and cost nothing."""
        done = self._done() - self._done_before
        left = max(len(self.runs) - done, 0)
        text = f"{done}/{len(self.runs)} runs done"
        if left and self.trained_s:
            text += f", ETA {_duration(left * statistics.fmean(self.trained_s))}"
        return text

    def _done(self) -> int:
        s = self.summary
        return s.done + s.skipped + len(s.failed) + s.busy

    def stopped(self, spec: RunSpec, reason: str = "interrupted", tb: str | None = None) -> None:
        """A claimed run that was stopped before it finished (Ctrl-C, SIGTERM, a cancelled remote task):
        stored as failed, so that rerunning the sweep redoes it."""
        self._failed(spec, reason, traceback.format_exc() if tb is None else tb)

    def _failed(self, spec: RunSpec, reason: str, tb: str) -> None:
        self.store.finish(spec.run_id, "failed", {"error": reason, "traceback": tb})
        self.summary.failed.append((spec, reason))


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# -- the data check --------------------------------------------------------------------------------------


def check_data(config: Config, host: Host, tasks: list[str],
               sizes: dict[str, int] | None = None) -> dict[str, dict[str, str]]:
    """Load every split of ``tasks`` once and check it against its task, so that a malformed file stops
    the sweep before any training instead of hours into it. Returns each split's content fingerprint (and
    puts each task's number of training examples in ``sizes``, if given)."""
    data_dir = data_dir_for(config)
    fingerprints: dict[str, dict[str, str]] = {}
    for name in tasks:
        task = host.task(name)
        for split in ("train", *task.dev_splits, *task.final_splits):
            try:
                data = task.load(split, data_dir)
            except PeftbenchError:
                raise
            except Exception as exc:
                raise DataError(f"task {name!r}: loading the {split!r} split failed: {type(exc).__name__}: "
                                f"{exc} (raised at {raised_at(exc)})") from exc
            _check_split(task, split, data)
            fingerprints.setdefault(name, {})[split] = content_fingerprint(data)
            if split == "train" and sizes is not None:
                sizes[name] = len(data.labels)
        if task.scoring is not None:  # how its results are scored is part of them, like the data they come from
            fingerprints[name]["scoring"] = task.scoring
    return fingerprints


def check_sweep_data(config: Config, host: Host, solved: dict[tuple[str, str], Solved],
                     sizes: dict[str, int] | None = None) -> dict[str, dict[str, str]]:
    """Before any training: every split checked (:func:`check_data`), and every method's schedule checked to
    leave enough evaluations in budget (a reported metric comes only from those). The splits' fingerprints
    (and each task's training examples in ``sizes``, if given)."""
    sizes = {} if sizes is None else sizes
    data = check_data(config, host, config.tasks, sizes)
    check_holdout(config, host, sizes)
    check_in_budget(config, in_budget_plans(config, host, solved, sizes))
    return data


def in_budget_plans(config: Config, host: Host, solved: dict[tuple[str, str], Solved],
                    sizes: dict[str, int]) -> dict[tuple[str, str], InBudgetPlan]:
    """Per (method label, task) of the tasks in ``sizes`` (training examples): which dev evaluations of its
    runs will count toward the reported metric (:func:`peftbench.schedule.in_budget_plan`)."""
    plans = {}
    for i, method in enumerate(config.methods):
        for task in (t for t in config.tasks if t in sizes):
            train = config.train_for(method, task)
            examples = train_examples(train, sizes[task])
            instance = host.method(method.name)(solved[(method.label, task)].params)
            try:
                with host.activate(instance):
                    plans[(method.label, task)] = in_budget_plan(
                        train, examples, lambda total: host.hook.peftbench_in_budget_from(total_steps=total))
            except ConfigError as exc:  # a schedule that cannot fit this run's steps: name the method and task
                raise ConfigError(f"{config.where(f'methods[{i}]')}methods[{i}] ({method.label}, {task}): {exc}"
                                  ) from None
    return plans


def check_in_budget(config: Config, plans: dict[tuple[str, str], InBudgetPlan]) -> None:
    """A method whose schedule leaves fewer than ``budget.min_evaluations`` evaluations in budget (or fewer than
    the run has) would report one noisy reading, not a best: a config error naming it."""
    needed = config.budget.min_evaluations
    for i, method in enumerate(config.methods):
        for task in config.tasks:
            plan = plans.get((method.label, task))
            if (plan is None or plan.counted >= min(needed, len(plan.evaluations))
                    or config.train_for(method, task).select == "final"):  # no evaluation chooses: nothing to count
                continue
            raise ConfigError(
                f"{config.where(f'methods[{i}]')}methods[{i}] ({method.label}, {task}): only {plan.counted} of the "
                f"run's {len(plan.evaluations)} dev evaluations (steps {_steps(plan.evaluations)}) are in budget: "
                f"the adapter reaches its budget at step {plan.from_step} of {plan.total_steps}, and only "
                "evaluations from then on count toward the reported metric. Evaluate more often (train.eval_every) "
                f"or end the method's schedule earlier (budget.min_evaluations: {needed}); `peftbench budget` shows "
                "every method's plan")


def check_tuning_in_budget(config: Config, host: Host, solved: dict[tuple[str, str], Solved], runs: list[RunSpec],
                           sizes: dict[str, int]) -> None:
    """:func:`check_in_budget` for the tuning runs (their own training part, their matched steps): a tuning
    score is chosen among in-budget evaluations too."""
    needed, seen = config.budget.min_evaluations, set()
    for spec in runs:
        key = (spec.label, spec.task, spec.tuning["index"])
        if key in seen or spec.task not in sizes or spec.train.select == "final":
            continue
        seen.add(key)
        instance = host.method(spec.method)(spec.params)
        examples = train_examples(spec.train, sizes[spec.task], spec.tuning["holdout"])
        with host.activate(instance):
            plan = in_budget_plan(spec.train, examples,
                                  lambda total: host.hook.peftbench_in_budget_from(total_steps=total))
        if plan.counted < min(needed, len(plan.evaluations)):
            i = next(i for i, m in enumerate(config.methods) if m.label == spec.label)
            raise ConfigError(
                f"{config.where(f'methods[{i}]')}methods[{i}] ({spec.label}, {spec.task}, tuning at "
                f"{point_text(spec.tuning['point'])}): only {plan.counted} of the tuning run's "
                f"{len(plan.evaluations)} evaluations (steps {_steps(plan.evaluations)}) are in budget (from step "
                f"{plan.from_step} of {plan.total_steps}); evaluate more often (train.eval_every) "
                f"(budget.min_evaluations: {needed})")


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{', '.join(map(str, steps[:6]))}, ..., {steps[-1]}"


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
    task.check_labels(split, data, where)


def raised_at(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame that raised ``exc``."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


# -- training one run ------------------------------------------------------------------------------------


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
    # the record's result columns, and the generations for the run's folder (:meth:`Sweep._write_files`)
    fields = {**result_fields(result), "generations": result.generations}
    return Outcome(fields=fields, weights=result.best_state if spec.save_adapters else None,
                   final_weights=result.final_state if spec.save_adapters else None)


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


# -- what the store and the run folder get ---------------------------------------------------------------


def _spec_fields(spec: RunSpec, budget: Solved, plugins: list[str]) -> dict[str, Any]:
    return {
        "sweep": spec.sweep, "label": spec.label, "method": spec.method, "task": spec.task, "seed": spec.seed,
        "model": spec.model.name_or_path, "spec": spec.stored(plugins),
        "budget": {"target": budget.target, "matched": budget.matched, "final": budget.counts.final,
                   "peak": budget.counts.peak, "nonzero": budget.counts.nonzero, "miss": budget.miss,
                   "estimate": budget.counts.estimate},
    }


def write_artifacts(config: Config, spec: RunSpec, weights, final_weights=None) -> str | None:
    """The selected checkpoint's trainable weights (tensors, or the safetensors bytes a remote worker sent) as
    the run's ``trainable.safetensors`` (and the final ones, where they differ, as
    ``trainable_final.safetensors``), with its ``spec.json``, for export; returns the run's folder (``None``:
    no weights)."""
    if weights is None:
        return None
    out = Path(config.output.dir) / spec.run_id
    out.mkdir(parents=True, exist_ok=True)
    for name, tensors in (("trainable.safetensors", weights), ("trainable_final.safetensors", final_weights)):
        if tensors is None:
            (out / name).unlink(missing_ok=True)  # a rerun's final checkpoint is its selected one
        elif isinstance(tensors, bytes):
            (out / name).write_bytes(tensors)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name))
    (out / "spec.json").write_text(json.dumps({"run_id": spec.run_id, **spec.identity()}, indent=2, default=str))
    return str(out)


__all__ = ["Sweep", "SweepSummary", "Outcome", "check_data", "check_sweep_data", "in_budget_plans", "check_in_budget",
           "check_tuning_in_budget", "train_outcome", "run_one", "failure_reason",
           "is_out_of_memory", "release_memory", "write_artifacts", "raised_at"]
