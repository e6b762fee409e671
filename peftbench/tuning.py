"""Per-method hyperparameter tuning without dev leakage (the config's ``tune:`` section).

Phase 1 trains every method × task × grid point × tuning seed on the training set minus a held-out part
(``tune.holdout`` of it, split with ``tune.seed``, stratified by label for classification) and evaluates on
that part only: a tuning run never reads the task's dev splits, and its identity holds only the training
set's fingerprint. The training set is subsampled first (``train.max_train_samples``), then split, so the
final runs train on exactly the tuning runs' train part plus held-out part; ``train.max_eval_samples`` does
not cap the held-out part. A grid value overrides the key's value from ``train:`` and every override.

Phase 2 chooses, per (method label, task), the grid point with the best mean held-out main metric over the
tuning seeds that finished (the stored ``best``); a tie goes to the best mean of each of the task's tie-break
metrics in order (:attr:`peftbench.task.Task.tie_break`, as checkpoint selection breaks one; GSM8K's strict
match often ties at 0), a full tie to the earlier point. It then trains the sweep's seeds at
that point on the full training set, evaluated on dev as without tuning. Both phases are ordinary sweeps
(:class:`peftbench.sweep.Sweep`): resumable, each run trained once. Tuning runs carry ``tuning`` in their
identity, final runs ``tuned`` (the chosen values and the grid), so neither collides with untuned runs and
tables tell them apart.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import schedule
from .config import Config, TrainConfig, grid_points
from .errors import ConfigError
from .runs import RunSpec, expand
from .schema import key_path
from .task import selection_key


def point_text(point: dict[str, Any]) -> str:
    """``lr=0.0003, alpha=16`` (keys without their section)."""
    return ", ".join(f"{key.partition('.')[2]}={_short(value)}" for key, value in point.items()) or "(defaults)"


def _short(value: Any) -> Any:
    """A float to 6 significant digits (an extended grid's values stored before they were rounded)."""
    return f"{value:.6g}" if isinstance(value, float) else value


def apply_point(train: TrainConfig, params: Any, point: dict[str, Any]) -> tuple[TrainConfig, Any]:
    """``train`` and ``params`` with the point's ``train.<key>`` and ``params.<key>`` values."""
    values = {"train": {}, "params": {}}
    for key, value in point.items():
        section, _, name = key.partition(".")
        values[section][name] = value
    train = dataclasses.replace(train, **values["train"]) if values["train"] else train
    return train, dataclasses.replace(params, **values["params"]) if values["params"] else params


def tuning_runs(config: Config, solved: dict, data: dict[str, dict[str, str]] | None,
                sizes: dict[str, int] | None = None,
                grids: dict[tuple[str, str], dict[str, list[Any]]] | None = None) -> list[RunSpec]:
    """Phase 1: every method × task × tuning seed × grid point, on the training set only (its fingerprint
    alone in the identity: the dev splits play no part in a tuning run). ``sizes``: each task's training
    examples: a tuning run then takes as many steps as the final runs at its point (:func:`matched_steps`);
    ``grids``: per (label, task), a grid extended past an edge (:func:`extended`), else the config's."""
    tune, grids = config.tune, grids or {}
    train_only = {task: {k: v for k, v in splits.items() if k in ("train", "scoring")}
                  for task, splits in (data or {}).items() if "train" in splits}
    runs = []
    for spec in expand(config, solved, train_only, seeds=tune.seeds):
        method = next(m for m in config.methods if m.label == spec.label)
        for index, point in enumerate(ordered_points(config.grid_for(method), grids.get((spec.label, spec.task)))):
            train, params = apply_point(spec.train, spec.params, point)
            if sizes and spec.task in sizes:
                train = matched_steps(train, sizes[spec.task], tune.holdout)
            # no adapter files: only the held-out metric of a tuning run is used (a grid of full fine-tuning
            # runs would otherwise write a whole model per point)
            runs.append(dataclasses.replace(spec, train=train, params=params, save_adapters=False, tuning={
                "holdout": tune.holdout, "split_seed": tune.seed, "point": point, "index": index}))
    return runs


def matched_steps(train: TrainConfig, examples: int, holdout: float) -> TrainConfig:
    """``train`` for a tuning run that takes exactly the final runs' steps (``max_steps``; as many epochs of its
    smaller training part as that needs), so that the warmup, the decay and a method's schedule (AdaLoRA's
    budget, PrunedLoRA's events) fall where they fall in the runs it chooses for."""
    final = schedule.total_steps(train, schedule.batches(schedule.train_examples(train, examples), train.batch_size))
    own = schedule.steps_per_epoch(schedule.batches(schedule.train_examples(train, examples, holdout),
                                                    train.batch_size), train.grad_accum)
    return dataclasses.replace(train, epochs=max(1, math.ceil(final / own)), max_steps=final)


def ordered_points(grid: dict[str, list[Any]], extended_grid: dict[str, list[Any]] | None = None
                   ) -> list[dict[str, Any]]:
    """The points of ``grid``, then those that ``extended_grid`` adds: a point keeps its index (and its
    tuning runs their ids) when a grid is extended."""
    points = grid_points(grid)
    return points + [p for p in grid_points(extended_grid) if p not in points] if extended_grid else points


def _numeric(values: list[Any]) -> bool:
    return len(values) >= 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def edges(point: dict[str, Any], grid: dict[str, list[Any]]) -> list[str]:
    """The keys of ``point`` at the edge of their numeric grid axis, as ``lr=0.0045 (largest)``."""
    found = []
    for key, value in point.items():
        values = grid.get(key, [])
        if _numeric(values) and value in (min(values), max(values)):
            side = "largest" if value == max(values) else "smallest"
            found.append(f"{key.partition('.')[2]}={_short(value)} ({side} of {len(values)})")
    return found


def extended(point: dict[str, Any], grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``grid`` with one more value past every edge that ``point`` is at (the geometric step of the axis' two
    values nearest to that edge; an integer axis stays integer); ``grid`` itself where nothing is at an edge."""
    grid = dict(grid)
    for key, value in point.items():
        values = sorted(grid.get(key, []))
        if not _numeric(values) or value not in (values[0], values[-1]) or 0 in values[:2] + values[-2:]:
            continue
        inner, edge = (values[1], values[0]) if value == values[0] else (values[-2], values[-1])
        new = float(f"{edge * (edge / inner):.12g}")  # 0.0135, not 0.013499999999999996 (in the run's id too)
        if all(isinstance(v, int) for v in values):
            new = int(round(new)) if round(new) != edge else edge + (edge - inner)
        grid[key] = [*grid[key], new] if value == values[-1] else [new, *grid[key]]
    return grid


@dataclass
class Choice:
    """The grid point chosen for one (method label, task), and from how many tuning runs."""

    label: str
    task: str
    point: dict[str, Any] | None  #: ``None``: no tuning run finished, nothing to choose from
    score: float | None  #: its mean held-out main metric
    finished: int
    total: int
    edges: list[str] = dataclasses.field(default_factory=list)  #: the point's keys at an edge of the grid (:func:`edges`)
    #: the tie-break metric that decided between points of an equal main metric, and the point's mean of it
    tie_break: tuple[str, float] | None = None

    @property
    def complete(self) -> bool:
        """Every tuning run finished (a diverged one counts, as the grid's worst point)."""
        return self.point is not None and self.finished == self.total

    def line(self) -> str:
        if self.point is None:
            return (f"tuned {self.label} {self.task}: none of its {self.total} tuning run(s) finished; its final "
                    "runs are not started (rerun the same command to retry the failed tuning runs)")
        if not self.complete:  # a choice from part of the grid is no equal search: not reported
            return (f"tuned {self.label} {self.task}: {self.total - self.finished} of its {self.total} tuning "
                    "runs failed; its final runs are not started until the whole grid has run (rerun the same "
                    f"command to retry them; so far the best is {point_text(self.point)}, held-out "
                    f"{self.score:.4f})")
        tie = f", a tie broken by {self.tie_break[0]} {self.tie_break[1]:.4f}" if self.tie_break else ""
        score = f"held-out {self.score:.4f}{tie}"
        if self.tie_break and self.score == -math.inf:  # no main metric: chosen on the tie-break alone
            score = f"held-out {self.tie_break[0]} {self.tie_break[1]:.4f}"
        edge = f"; at the edge of its grid: {', '.join(self.edges)}" if self.edges else ""
        return f"tuned {self.label} {self.task}: {point_text(self.point)} ({score}{edge})"


def held_out_key(best: dict[str, Any] | None, metrics: tuple[str, ...]) -> tuple[float, ...] | None:
    """A tuning run's held-out ``metrics`` (main metric, then the task's tie-break ones) from its stored ``best``,
    as :func:`choose` ranks them: :func:`peftbench.task.selection_key`, as checkpoint selection keys them (a causal-LM
    run that chose on ``gold_logprob`` alone has no answers to score); ``None`` without any of them."""
    best = best or {}
    if all(best.get(name) is None for name in metrics):
        return None
    return selection_key(best, metrics)


def choose(scored: Iterable[tuple[str, str, int, dict[str, Any], float | tuple[float, ...] | None]],
           tie_break: dict[str, tuple[str, ...]] | None = None) -> dict[tuple[str, str], Choice]:
    """Per (label, task), from ``(label, task, point index, point, held-out score)`` of every tuning run, where
    the score is the main metric or ``(main metric, *its tie-break metrics)`` (:func:`held_out_key`; their names
    per task in ``tie_break``), ``None``: not finished, ``-inf``: diverged (a finished run at the worst score):
    the point with the best mean main metric; on a tie, the best mean of each tie-break metric in order (the
    rule of checkpoint selection); on a full tie, the earlier point."""
    by_point: dict[tuple[str, str], dict[int, tuple[dict, list[tuple[float, ...]]]]] = {}
    totals: dict[tuple[str, str], int] = {}
    for label, task, index, point, score in scored:
        key = (label, task)
        totals[key] = totals.get(key, 0) + 1
        scores = by_point.setdefault(key, {}).setdefault(index, (point, []))[1]
        score = (score,) if isinstance(score, (int, float)) else score
        if score is not None and not math.isnan(score[0]):  # -inf: diverged, finished at the worst score
            scores.append(tuple(-math.inf if math.isnan(v) else v for v in score))
    choices = {}
    for key, points in by_point.items():
        # a point whose every run diverged (each key all -inf) is out of the choice
        means = {i: (_means(s), p) for i, (p, s) in points.items() if s and max(max(k) for k in s) > -math.inf}
        best = max(sorted(means), key=lambda i: means[i][0], default=None)  # max keeps the first of ties
        names = (tie_break or {}).get(key[1], ())
        choices[key] = Choice(*key, means[best][1] if best is not None else None,
                              means[best][0][0] if best is not None else None,
                              sum(len(s) for _, s in points.values()), totals[key],
                              tie_break=_decided_by({i: m for i, (m, _) in means.items()}, best, names))
    return choices


def _means(keys: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The mean of each place of ``keys`` over the tuning seeds (a diverged run's ``(-inf,)``: -inf in each)."""
    width = max(len(k) for k in keys)
    return tuple(statistics.fmean(column) for column in zip(*(k + (-math.inf,) * (width - len(k)) for k in keys)))


def _decided_by(means: dict[int, tuple[float, ...]], best: int | None, names: tuple[str, ...]
                ) -> tuple[str, float] | None:
    """The tie-break metric (and ``best``'s mean of it) that set ``best`` apart from the points of its main
    score; ``None`` where the main metric decided, or the tie was full (the earlier point)."""
    if best is None:
        return None
    top = means[best]
    rivals = [m for i, m in means.items() if i != best and m[0] == top[0]]
    for place in range(1, len(top)):
        if not rivals:
            return None
        left = [m for m in rivals if m[place] == top[place]]
        if len(left) < len(rivals):
            return (names[place - 1] if place <= len(names) else f"tie-break {place}"), top[place]
        rivals = left
    return None


def choose_from_store(runs: list[RunSpec], store, main_metric: dict[str, str],
                      tie_break: dict[str, tuple[str, ...]] | None = None) -> dict[tuple[str, str], Choice]:
    """:func:`choose` over the tuning ``runs`` as stored (their ``best`` held-out metrics; ``tie_break``: each
    task's tie-break metrics, :attr:`peftbench.task.Task.tie_break`)."""
    scored = []
    for spec in runs:
        row = store.get(spec.run_id) or {}
        metrics = (main_metric[spec.task], *(tie_break or {}).get(spec.task, ()))
        score = held_out_key(row.get("best"), metrics) if row.get("status") == "done" else None
        if row.get("status") == "failed" and str(row.get("error") or "").startswith("Diverged"):
            score = -math.inf  # the learning rate is too large: an outcome of the search, not a failure
        scored.append((spec.label, spec.task, spec.tuning["index"], spec.tuning["point"], score))
    return choose(scored, tie_break)


def final_runs(config: Config, solved: dict, data: dict[str, dict[str, str]] | None,
               choices: dict[tuple[str, str], Choice],
               grids: dict[tuple[str, str], dict[str, list[Any]]] | None = None) -> list[RunSpec]:
    """Phase 2: the sweep's runs at each (label, task)'s chosen point, with how it was chosen (``grids``: an
    extended grid per (label, task)); none for a (label, task) without a choice."""
    tune, runs, grids = config.tune, [], grids or {}
    for spec in expand(config, solved, data):
        choice = choices.get((spec.label, spec.task))
        if choice is None or not choice.complete:
            continue
        method = next(m for m in config.methods if m.label == spec.label)
        train, params = apply_point(spec.train, spec.params, choice.point)
        runs.append(dataclasses.replace(spec, train=train, params=params, tuned={
            "values": choice.point, "grid": grids.get((spec.label, spec.task)) or config.grid_for(method),
            "holdout": tune.holdout, "split_seed": tune.seed, "seeds": list(tune.seeds)}))
    return runs


def check_grid_counts(config: Config, host, solved: dict, shapes) -> None:
    """Params in a grid must reach the run and leave a method's trainable count as solved (``alpha`` may vary,
    ``r`` may not): else the search would compare methods of other sizes, or train the same point twice under
    two names. Each point is solved again from the params as written, as the budgets are (on the meta model):
    a count that moves (final or peak), or a value the solver replaces (PrunedLoRA's ``init_ratio``, which only
    feeds the solved ``init_r``), is refused naming the key."""
    from .budget import solve_method, target_count

    target = target_count(config, shapes.targets)
    for i, method in enumerate(config.methods):
        cls = host.method(method.name)
        for point in grid_points(config.grid_for(method)):
            changed = {k: v for k, v in point.items() if k.startswith("params.")}
            for task in config.tasks if changed else ():
                before = solved[(method.label, task)]
                _, written = apply_point(config.train, config.params_of(method, task), changed)
                _, applied = apply_point(config.train, before.params, changed)  # what a tuning run trains
                params, counts = solve_method(host, cls, written, shapes, target, config.budget.tolerance,
                                              method.match_budget)
                steps = (*config.grid_steps(i), next(iter(changed)))
                where = f"{config.locate(steps)}{key_path('', steps[:-1])}: {point_text(changed)}"
                if (counts.final, counts.peak) != (before.counts.final, before.counts.peak):
                    raise ConfigError(
                        f"{where} changes {method.label}'s trainable count ({before.counts.final:,} → "
                        f"{counts.final:,}, peak {before.counts.peak:,} → {counts.peak:,} on {task}); tune only "
                        "params that keep the count (e.g. alpha, dropout), not size hyperparameters")
                if params != applied:
                    raise ConfigError(f"{where}: {method.label}'s budget solver sets what this value would change, "
                                      "so every grid point would train the same run; tune another key")


def check_holdout(config: Config, host, sizes: dict[str, int]) -> None:
    """Before any training: ``tune.holdout`` of each task's training set (``sizes``, after
    ``max_train_samples``) must leave both parts non-empty, and, for classification (split stratified by label),
    room for every class in each part: what :func:`peftbench.data.holdout_split` needs (sizes as scikit-learn
    rounds them: the held-out part is ``ceil(holdout × n)``). With ``train.select: validation`` every run, a
    tuning run included, then takes its selection split (``train.validation_size``) out of what it trains on:
    that split needs the same room (:func:`peftbench.data.selection_split`)."""
    fraction = config.tune.holdout if config.tune else None
    for method in config.methods:
        for task, size in sizes.items():
            train = config.train_for(method, task)
            n = min(size, train.max_train_samples or size)
            need = max(1, host.task(task).num_labels)  # causal-LM and regression tasks: not stratified
            per_class = " (one per class: the split is stratified by label)" if need > 1 else ""
            trained = {"final runs": n}
            if fraction:
                held = math.ceil(fraction * n)
                if min(held, n - held) < need:
                    raise ConfigError(
                        f"{config.locate(('tune', 'holdout'))}tune.holdout: {fraction:g} of {task}'s {n} training "
                        f"examples holds out {held} and trains on {n - held}; each part needs at least "
                        f"{need}{per_class}")
                trained[f"tuning runs (tune.holdout {fraction:g} of {n})"] = n - held
            if train.select != "validation":
                continue
            for runs, left in trained.items():
                validation = schedule.held_out(left, train.validation_size)
                if min(validation, left - validation) < need:
                    raise ConfigError(
                        f"{config.locate(('train', 'validation_size'))}train.validation_size: the {runs} of {task} "
                        f"train on {left} examples; the selection split takes {validation} of them and leaves "
                        f"{left - validation}; each part needs at least {need}{per_class}")


def tuning_note(runs: list[dict[str, Any]]) -> str:
    """The tables' footer line on tuning, from the stored final runs' ``tuned`` specs."""
    tuned = [(r.get("spec") or {}).get("tuned") for r in runs]
    tuned = [t for t in tuned if t]
    if not tuned:
        return "hyperparameters not tuned per method"
    holdouts = sorted({f"{100 * t['holdout']:g}%" for t in tuned})
    sizes = sorted({len(grid_points(t["grid"])) for t in tuned})
    seeds = sorted({s for t in tuned for s in t["seeds"]})
    return (f"hyperparameters tuned per method on a held-out {'/'.join(holdouts)} of the training set (grid of "
            f"{'/'.join(map(str, sizes))} points, seeds {', '.join(map(str, seeds))})")


def chosen_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One line per tuned label: its chosen values and the tasks they were chosen for."""
    chosen: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        tuned = (run.get("spec") or {}).get("tuned")
        if tuned:
            at_edge = edges(tuned["values"], tuned["grid"])
            text = point_text(tuned["values"]) + (f" [edge of grid: {', '.join(at_edge)}]" if at_edge else "")
            tasks = chosen.setdefault(run["label"], {}).setdefault(text, [])
            if run["task"] not in tasks:
                tasks.append(run["task"])
    return [f"{label}: " + "; ".join(f"{values} ({', '.join(tasks)})" for values, tasks in by_values.items())
            for label, by_values in chosen.items()]


def current_choices(runs: list[dict[str, Any]], main_metric: dict[str, str],
                    tie_break: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    """``runs`` less the final runs trained at a point that the stored tuning runs no longer choose (a choice an
    earlier peftbench made on an incomplete grid, superseded once the grid completed), or chosen from a grid
    that lacks points the stored tuning runs tried (the same choice before ``tune.extend_edges`` extended the
    grid: its runs have another identity and the same scores, never to be counted twice): one setting per
    tuned label and task. Untuned runs, and tuning runs, pass through. ``tie_break``: each task's tie-break
    metrics, as the sweep chose with them (:func:`choose_from_store`)."""
    scored, tried = [], defaultdict(list)
    for run in runs:
        tuning = (run.get("spec") or {}).get("tuning")
        if tuning and run.get("status", "done") == "done" and run["task"] in main_metric:
            metrics = (main_metric[run["task"]], *(tie_break or {}).get(run["task"], ()))
            scored.append((run["label"], run["task"], tuning["index"], tuning["point"],
                           held_out_key(run.get("best"), metrics)))
            tried[(run["label"], run["task"])].append(tuning["point"])
    choices = choose(scored, tie_break)
    keep = []
    for run in runs:
        tuned = (run.get("spec") or {}).get("tuned")
        choice = choices.get((run["label"], run["task"]))
        if tuned and choice is not None and choice.point is not None and (tuned["values"] != choice.point or any(
                not _in_grid(point, tuned.get("grid") or {}) for point in tried[(run["label"], run["task"])])):
            continue
        keep.append(run)
    return keep


def _in_grid(point: dict[str, Any], grid: dict[str, list[Any]]) -> bool:
    """Whether ``point`` is one of ``grid``'s points (a run stored without its grid counts every point in)."""
    return not grid or all(value in grid.get(key, [value]) for key, value in point.items())


def is_tuning_run(run: dict[str, Any]) -> bool:
    """A stored run of phase 1 (trained and evaluated on parts of the training set)."""
    return bool((run.get("spec") or {}).get("tuning"))


__all__ = ["grid_points", "point_text", "apply_point", "tuning_runs", "matched_steps", "ordered_points", "edges",
           "extended", "Choice", "held_out_key", "choose", "choose_from_store", "final_runs", "check_grid_counts", "check_holdout",
           "tuning_note", "chosen_lines", "current_choices", "is_tuning_run"]
