"""Running a sweep: the plugin host, the budgets, then every pending run, every result in the store.

:func:`resolve` decides everything before training, the same for ``peftbench run``, its ``--dry-run`` and
:func:`run_sweep`: preflight (model, ``train.max_length``, a writable store), budgets, the data check and the
run specs. :func:`run_sweep` hands a :class:`peftbench.sweep.Sweep` (the bookkeeping: data check, claims, outcomes,
artifacts, log lines) to an executor (:mod:`peftbench.executors`: here, as Ray tasks, or on all processes of
an ``accelerate launch``); :func:`print_summary` says what happened.

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

import functools
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import modeling
from .budget import Shapes, Solved, model_shapes, solve_all
from .config import Config, data_dir_for
from .errors import ConfigError, DataError, PeftbenchError, PluginError
from .executors import LocalExecutor
from .host import Host
from .runs import RunSpec, expand
from .schema import key_path
from .store import Store
from .sweep import Sweep, SweepSummary, check_sweep_data, check_tuning_in_budget, raised_at
from .tuning import check_grid_counts, choose_from_store, edges, extended, final_runs, tuning_runs


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
    for steps in config.per_task_keys():  # a misspelled task there would be ignored silently
        _check_name(host.task, steps[-1], f"{config.locate(steps)}{key_path('', steps)}")
    for name, options in config.task_options.items():
        steps = ("task_options", name)
        if name not in config.tasks:
            raise ConfigError(f"{config.locate(steps)}task_options.{name}: not a task of this sweep "
                              f"(tasks: {', '.join(config.tasks)})")
        host.configure_task(name, options, config.locate(steps))
    kinds = {host.task(name).kind for name in config.tasks}
    if len(kinds) > 1:  # one model per sweep: a classifier and a causal LM are two
        raise ConfigError(f"{config.where('tasks')}tasks: {config.tasks} mix task kinds ({', '.join(sorted(kinds))}); "
                          "one sweep trains one kind of model: split them into two configs")
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
        shapes = shapes or model_shapes(config, host)
        solved = solve_all(config, host, shapes)
        if config.tune is not None:  # a grid's params must not change a method's size
            check_grid_counts(config, host, solved, shapes)
        return solved
    except PeftbenchError:
        raise
    except Exception as exc:
        raise PluginError(f"solving the trainable-parameter budgets failed: {type(exc).__name__}: {exc} "
                          f"(raised at {raised_at(exc)})") from exc


@dataclass(frozen=True)
class Resolved:
    """A sweep as it is decided before any training (:func:`resolve`)."""

    solved: dict[tuple[str, str], Solved]  #: each (method label, task)'s budget-solved params
    data: dict[str, dict[str, str]]  #: each task's split fingerprints (every split read and checked)
    #: the runs to train first: the sweep's, or with ``tune:`` those of the tuning phase (the final phase's
    #: follow from its choices: :func:`peftbench.tuning.final_runs`)
    runs: list[RunSpec]
    sizes: dict[str, int] = field(default_factory=dict)  #: each task's training examples (tuning runs' steps)


def resolve(config: Config, host: Host, solved: dict[tuple[str, str], Solved] | None = None,
            db: str | None = None) -> Resolved:
    """Everything a sweep decides before training, the same for every entry point (``peftbench run``, its
    ``--dry-run``, :func:`run_sweep`): the model and tokenizer found, ``train.max_length`` within the model's
    positions, the store (``db``, default ``output.db``) and output folder writable, the budgets solved
    (``solved``: already), every split read and checked, and the run specs of the first phase."""
    modeling.preflight(config.model)
    modeling.check_max_length(config)
    check_writable(db or config.output.db, config.output.dir)  # before any training, not after it
    solved = solved or solve_budgets(config, host)
    sizes: dict[str, int] = {}
    data = check_sweep_data(config, host, solved, sizes)  # every split and every in-budget plan, before training
    check_fits(config, host)
    runs = tuning_runs(config, solved, data, sizes) if config.tune is not None else expand(config, solved, data)
    return Resolved(solved, data, runs, sizes)


def check_fits(config: Config, host: Host) -> None:
    """Every example of every task fits each run's ``train.max_length`` (a generation task's prompts must leave
    room for a response): a config error naming the key's line, before any training."""
    tokenizer = functools.cache(lambda: modeling.load_tokenizer(config.model))  # only for tasks that need it
    checked = set()
    for method in config.methods:
        for name in config.tasks:
            max_length = config.train_for(method, name).max_length
            if (name, max_length) in checked:
                continue
            checked.add((name, max_length))
            try:
                task = host.task(name).with_options(config.task_options.get(name))
                task.check_fits(data_dir_for(config), tokenizer, max_length)
            except DataError as exc:
                raise ConfigError(f"{config.where_train(method, name, 'max_length')}{max_length} is too short "
                                  f"for task {name}: {exc}") from None


def check_writable(db: str, output_dir: str) -> None:
    """The store and the output folder can be written: checked before training, so that a sweep never trains
    runs whose results it then cannot keep."""
    db_path = Path(db)
    if db_path.is_dir():
        raise ConfigError(f"--db / output.db {db!r} is a directory; give the path of a results file")
    problem = _unwritable_dir(db_path.parent)
    if problem:
        raise ConfigError(f"--db / output.db {db!r}: {problem}")
    if db_path.exists():
        try:
            with open(db_path, "r+b"):
                pass
        except OSError as exc:
            raise ConfigError(f"--db / output.db {db!r}: the store cannot be written ({exc.strerror})") from None
    problem = _unwritable_dir(Path(output_dir))
    if problem:
        raise ConfigError(f"output.dir {output_dir!r}: {problem}")


def _unwritable_dir(folder: Path) -> str | None:
    """Why files cannot be created in ``folder``, or ``None``: tried (a temporary file in the nearest folder that
    exists), not guessed from permission bits; nothing is left behind, no folder is made."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".peftbench-write-test-"):
            pass
    except OSError as exc:
        return f"cannot create files in {existing} ({exc.strerror or exc})"
    return None


def run_sweep(config: Config, host: Host, store: Store | None, fail_fast: bool = False, progress: bool = True,
              log=print, summary: SweepSummary | None = None,
              solved: dict[tuple[str, str], Solved] | None = None, executor=None,
              resolved: Resolved | None = None) -> SweepSummary:
    """Run every pending run of ``config``; returns (and fills ``summary`` with) what happened.
    ``solved``: the budgets, if already solved (:func:`solve_budgets`); ``resolved``: the whole sweep, if
    already resolved (:func:`resolve`). ``executor``: where the runs train (:mod:`peftbench.executors`;
    default: one after another in this process). ``store`` is ``None`` only on the non-main processes of a
    distributed run."""
    summary = summary if summary is not None else SweepSummary()
    resolved = resolved or resolve(config, host, solved, db=str(store.path) if store is not None else None)
    executor = executor or LocalExecutor(progress=progress)
    if config.tune is not None:
        run_tuned(config, host, store, resolved, summary, log, executor, fail_fast)
        return summary
    executor.run(Sweep(config, host, store, resolved.solved, summary, log, runs=resolved.runs), fail_fast=fail_fast)
    return summary


def run_tuned(config: Config, host: Host, store: Store | None, resolved: Resolved,
              summary: SweepSummary, log, executor, fail_fast: bool) -> None:
    """A sweep with ``tune:`` (:mod:`peftbench.tuning`): the tuning runs on held-out training data, the choice
    per (method label, task) (a choice at the edge of its grid extends that grid and tunes again, up to
    ``tune.extend_edges`` times), then the sweep's runs at the chosen points."""
    solved, data, sizes = resolved.solved, resolved.data, resolved.sizes
    main_metric = {task: host.task(task).main_metric for task in config.tasks}
    tie_break = {task: host.task(task).tie_break for task in config.tasks}  # ties broken as selection breaks them
    # the main process reads the store; under `accelerate launch` the others follow its choice
    decide = getattr(executor, "on_main", lambda config, decide: decide())
    grids: dict[tuple[str, str], dict] = {}
    for extension in range(config.tune.extend_edges + 1):
        phase = tuning_runs(config, solved, data, sizes, grids)
        check_tuning_in_budget(config, host, solved, phase, sizes)
        per_grid = Counter((spec.label, spec.task, spec.seed) for spec in phase).values() or [0]
        points = f"{min(per_grid)}" if min(per_grid) == max(per_grid) else f"{min(per_grid)}-{max(per_grid)}"
        executor.run(Sweep(config, host, store, solved, summary, log, runs=phase, what=(
            f"tuning: {len(config.methods)} methods × {len(config.tasks)} tasks × {points} grid points × "
            f"{len(config.tune.seeds)} tuning seeds, on {100 * config.tune.holdout:g}% of the training set held out"
            + (f" (grids extended past an edge: {extension})" if extension else ""))), fail_fast=fail_fast)
        if fail_fast and summary.failed:
            return
        choices = decide(config, lambda phase=phase: choose_from_store(phase, store, main_metric, tie_break))
        wider = {}
        for (label, task), choice in choices.items():
            grid = grids.get((label, task)) or config.grid_for(next(m for m in config.methods if m.label == label))
            choice.edges = edges(choice.point, grid) if choice.complete else []  # a partial grid: no choice yet
            if choice.edges and extended(choice.point, grid) != grid:
                wider[(label, task)] = extended(choice.point, grid)
        if not wider or extension == config.tune.extend_edges:
            break
        log(f"peftbench: extending the grid past its edge (tune.extend_edges) for "
            f"{', '.join(f'{label} {task}' for label, task in wider)}")
        grids.update(wider)
    for choice in choices.values():
        log(f"peftbench: {choice.line()}")
        if choice.edges:
            log(f"peftbench: warning: {choice.label} {choice.task} chose the edge of its grid "
                f"({', '.join(choice.edges)}): a wider grid may move it (tune.extend_edges extends it automatically)")
        if choice.point is None:
            summary.not_started.append(choice.line())
    executor.run(Sweep(config, host, store, solved, summary, log,
                       runs=final_runs(config, solved, data, choices, grids),
                       what=f"at the tuned settings: {len(config.methods)} methods × {len(config.tasks)} tasks × "
                            f"{len(config.seeds)} seeds"), fail_fast=fail_fast)


def print_summary(summary: SweepSummary, started: float, out=None) -> None:
    out = out or sys.stdout  # looked up at call time, not import time
    took = time.time() - started
    print(f"peftbench: {summary.done} run(s) finished, {summary.skipped} skipped (finished earlier), "
          f"{len(summary.failed)} failed, {summary.busy} running elsewhere, in {took:.0f}s", file=out)
    if summary.abandoned:
        print(f"  unfinished: {len(summary.abandoned)} run(s) skipped as running elsewhere were left unfinished by a "
              f"process that stopped ({', '.join(summary.abandoned[:5])}); rerun the same command to train them",
              file=out)
    for line in summary.not_started:
        print(f"  not started: {line}", file=out)
    for spec, reason in summary.failed:
        print(f"  failed: {spec.label} {spec.task} seed={spec.seed} ({spec.run_id}): {reason}", file=out)
    if summary.failed:
        print("  (tracebacks are stored with each run; rerun the same command to redo failed runs)", file=out)


__all__ = ["make_host", "solve_budgets", "Resolved", "resolve", "check_writable", "run_sweep", "run_tuned",
           "print_summary"]
