"""Matched budgets: solve every method's size hyperparameters for one target count, and audit the result.

The target is declared once per sweep (``budget.lora_rank`` on the sweep's target modules, or an explicit
``budget.params``). Counting happens on a meta-device model, so ``peftbench budget`` costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .assembly import assemble
from .config import Config
from .errors import BudgetError, ConfigError
from .hookspecs import ParamCounts, TargetModule
from .host import Host
from .lora import rank_cost
from .method import Description
from .schema import to_dict
from .task import Task


@dataclass
class Shapes:
    """What budget hooks see: a meta model, its target modules and head module names."""

    model: Any
    targets: list[TargetModule]
    head: list[str]


@dataclass
class Solved:
    label: str
    method: str
    task: str
    params: Any
    counts: ParamCounts
    target: int | None  #: the adapter budget (None for methods outside budget matching)
    matched: bool  #: whether the method takes part in budget matching
    #: the method's effective scale and deviation switches (:meth:`peftbench.method.Method.describe`)
    description: Description = field(default_factory=Description)

    @property
    def miss(self) -> float:
        if not self.target:
            return 0.0
        return (self.counts.final - self.target) / self.target


def model_shapes(config: Config, host: Host | None = None) -> Shapes:
    """The sweep's model on the meta device (:func:`peftbench.assembly.assemble`, nothing injected): the kind of
    model its tasks train (``make_host`` checked that they agree; without a host, a sequence classifier), with
    a two-label head whatever the tasks."""
    task = replace(host.task(config.tasks[0]), num_labels=2) if host else Task("", (), 2, "")
    try:
        built = assemble(config.model, task, host, seed=0, meta=True, inject=False)
    except ConfigError as exc:  # about the `model:` section: name its line
        raise ConfigError(f"{config.where('model')}{exc}") from None
    return Shapes(built.model, built.targets, built.head)


def target_count(config: Config, targets: list[TargetModule]) -> int:
    if config.budget.params is not None:
        return config.budget.params
    if config.budget.lora_rank is None:
        raise ConfigError(f"{config.source}: budget: set `lora_rank` or `params`")
    return config.budget.lora_rank * rank_cost(targets)


def solve_method(host: Host, cls, params: Any, shapes: Shapes, target: int, tolerance: float,
                 solve: bool) -> tuple[Any, ParamCounts]:
    method = cls(params)
    with host.activate(method):
        if solve and cls.matches_budget:
            solved = host.hook.peftbench_solve_budget(model=shapes.model, targets=shapes.targets,
                                                      head=shapes.head, target=target, tolerance=tolerance)
            if solved is not None:
                params = solved
    method = cls(params)
    with host.activate(method):
        counts = host.hook.peftbench_count_trainable(model=shapes.model, targets=shapes.targets, head=shapes.head)
    if counts is None:
        raise BudgetError(f"method {cls.name!r} implements no peftbench_count_trainable hook")
    return params, counts


def solve_all(config: Config, host: Host, shapes: Shapes | None = None) -> dict[tuple[str, str], Solved]:
    """Solve every (method label, task) of the sweep. Raises :class:`BudgetError` naming every miss."""
    shapes = shapes or model_shapes(config, host)
    target = target_count(config, shapes.targets)
    solved: dict[tuple[str, str], Solved] = {}
    cache: dict[tuple, tuple[Any, ParamCounts]] = {}
    described: dict[tuple, Description] = {}
    config.check_params(host.method)  # done already when the host came from make_host
    for i, method in enumerate(config.methods):
        cls = host.method(method.name)
        for task in config.tasks:
            params = config.params_of(method, task)
            key = (method.name, repr(params), method.match_budget)
            if key not in cache:
                try:
                    cache[key] = solve_method(host, cls, params, shapes, target, config.budget.tolerance,
                                              method.match_budget)
                except (ConfigError, BudgetError) as exc:  # a budget hook refusing the params: name the method
                    raise type(exc)(f"{config.where(f'methods[{i}]')}methods[{i}] ({task}): {exc}") from None
            params, counts = cache[key]
            if key not in described:
                described[key] = cls(params).describe(shapes.targets)
            matched = cls.matches_budget and method.match_budget is True  # "nearest": solved, not matched
            solved[(method.label, task)] = Solved(method.label, method.name, task, params, counts,
                                                  target if matched else None, matched, described[key])
    misses = [s for s in solved.values() if s.matched and abs(s.miss) > config.budget.tolerance]
    if misses:
        lines = [f"  {s.label} ({s.task}): nearest achievable {s.counts.final:,} trainable "
                 f"({s.miss:+.2%}) with {to_dict(s.params)}" for s in misses]
        raise BudgetError(f"{config.source}: budget: target {target:,} adapter parameters "
                          f"(tolerance {config.budget.tolerance:.1%}) missed by:\n" + "\n".join(lines)
                          + "\n  Change the method's params, set `match_budget: false` for it (or `nearest`: its nearest size, as an "
                            "unmatched reference), or widen "
                            "budget.tolerance.")
    return solved


def budget_rows(solved: dict[tuple[str, str], Solved]) -> list[list[Any]]:
    seen, rows = set(), []
    for s in solved.values():
        key = (s.label, repr(to_dict(s.params)))
        if key in seen:
            continue
        seen.add(key)
        tasks = ",".join(x.task for x in solved.values() if x.label == s.label and to_dict(x.params) == to_dict(s.params))
        params = ", ".join(f"{k}={v}" for k, v in to_dict(s.params).items() if v not in ({}, [], None))
        # an estimate (e.g. AdaLoRA's triplet budget) depends on training: the run's audit measures it
        final, miss = ("≈", " (estimate)") if s.counts.estimate else ("", "")
        rows.append([s.label, tasks, params, f"{final}{s.counts.final:,}", f"{s.counts.peak:,}",
                     f"{s.counts.nonzero:,}", f"{s.target:,}" if s.target else "—",
                     f"{s.miss:+.2%}{miss}" if s.target else "reference",
                     s.description.scale or "—", ", ".join(s.description.deviations) or "—"])
    return rows


#: ``scale``: the adapter's effective scale (``alpha / r``; per layer ``first→last`` where it varies);
#: ``deviations``: the switches where the run departs from the paper or the method notes (``[open]``: a choice
#: the paper does not state). Both come from :meth:`peftbench.method.Method.describe`.
BUDGET_HEADERS = ["method", "tasks", "solved params", "final", "peak", "nonzero", "target", "miss", "scale",
                  "deviations"]
