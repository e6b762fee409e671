"""The run record: what the results store keeps of one run, declared once.

Every field of :class:`RunRecord` is a column of the store's ``runs`` table, and its metadata (:func:`column`)
says everything the rest of peftbench needs to know about it:

* ``sql``: its SQLite type. The store's ``CREATE TABLE`` is the fields in their order (:func:`create_table`),
  and a store made before a field existed gets its column when it is opened (:func:`column_types`).
* ``json``: dicts and lists, stored as JSON text and decoded when read.
* ``result``: written after every run, from the trainer's :class:`~peftbench.trainer.RunResult`: ``True``
  takes the result's attribute of the same name, a function computes the value from the result
  (:func:`result_fields`).
* ``header``, ``fmt``: how tables and the report show the value (:func:`display`; a missing one is "—").
* ``cost``: a cost column (:class:`Cost`) of ``peftbench table --cost``, the report's comparison and, with
  an ``axis``, a panel of the Pareto plots.
* ``public``: listed by ``peftbench table --format json`` (not: long, or the store's bookkeeping).

So a new measurement is one field here: the store gets its column (older stores on open), the sweep writes it
after every run, and a cost shows in the tables, the report and the plots. New fields go at the end, where
``ALTER TABLE`` puts them in older stores. Nothing here imports torch: readers of a store stay light.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .runs import RunSpec


def human_count(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Cost:
    """A cost column: the mean over a method's runs, beside its accuracy."""

    csv: str  #: its CSV header: a plain number in the unit the header names
    note: str  #: what it is, for the table's footer (``{mem_kinds}``: how memory was measured)
    scale: float = 1.0  #: stored value × scale = the CSV's (and the plot's) unit
    order: int = 100  #: place among the cost columns (ties: field order)
    #: ``(panel id, x axis label)`` of a Pareto panel (the metric against this cost); ``None``: no panel
    plot: tuple[str, str] | None = None


def column(sql: str, *, json: bool = False, result: bool | Callable[[Any], Any] = False, header: str | None = None,
           fmt: Callable[[Any], str] = str, cost: Cost | None = None, public: bool = True,
           constraint: str = "") -> Any:
    """A :class:`RunRecord` field: a store column with its metadata (see the module's docstring);
    ``constraint``: SQL after the type in ``CREATE TABLE`` (``PRIMARY KEY``, ``NOT NULL``)."""
    meta = {"sql": sql, "json": json, "result": result, "header": header, "fmt": fmt, "cost": cost,
            "public": public, "constraint": constraint}
    return field(default=None, metadata=meta)


@dataclass
class RunRecord:
    """One run as the store keeps it: identity (written when a run is claimed), the measured result (written
    when it finishes) and the store's bookkeeping. Fields in the order of the store's columns."""

    run_id: str = column("TEXT", constraint="PRIMARY KEY", header="run id")
    sweep: str = column("TEXT", fmt=lambda name: name or "—")  #: the config's name of the sweep that claimed it
    label: str = column("TEXT", header="method")  #: the row's name (a method variant)
    method: str = column("TEXT")  #: the registered method
    task: str = column("TEXT")
    seed: int = column("INTEGER")
    model: str = column("TEXT")  #: the base model's name or path
    status: str = column("TEXT", constraint="NOT NULL")  #: running | done | failed
    spec: dict = column("TEXT", json=True)  #: everything that determines the result (:meth:`RunSpec.identity`)
    budget: dict = column("TEXT", json=True)  #: the budget's target and solved counts, before training
    trainable: dict = column("TEXT", json=True, result=True)  #: measured counts: adapter, nonzero, head, total
    #: the reported dev metrics, at the checkpoint ``train.select`` chose (default: the best in-budget evaluation on
    #: a validation split held out of the training data; dev scored once there)
    best: dict = column("TEXT", json=True, result=True)
    #: dev metrics after the last step (``select: validation``: only where that is the selected checkpoint)
    final: dict = column("TEXT", json=True, result=True)
    best_step: int = column("INTEGER", result=True, header="best step")
    history: list = column("TEXT", json=True, result=True, public=False)  #: one entry per evaluation / log point
    method_report: dict = column("TEXT", json=True, result=True)  #: what the method reported (``peftbench_report``)
    #: the best of every evaluation, over-budget ones included (information only)
    best_any: dict = column("TEXT", json=True, result=True)
    best_any_step: int = column("INTEGER", result=True)
    in_budget_from: int = column("INTEGER", result=True)  #: evaluations from this step on count toward ``best``
    evaluations: int = column("INTEGER", result=True)  #: dev evaluations in the run
    in_budget_evals: int = column("INTEGER", result=True)  #: those that counted toward ``best``
    wall_s: float = column("REAL", result=True)  #: the whole run, setup and evaluations included
    train_s: float = column("REAL", result=True, header="train s", fmt=lambda s: f"{s:,.1f}",
                            cost=Cost("train_s", "training time", order=3))
    tokens_per_s: float = column("REAL", result=True, header="tok/s", fmt=lambda v: f"{v:,.0f}",
                                 cost=Cost("tokens_per_s", "training tokens/s", order=1))
    peak_mem_bytes: int = column("INTEGER", result=True, header="peak mem", fmt=human_bytes,
                                 cost=Cost("peak_mem_mib", "peak memory ({mem_kinds})", scale=2 ** -20, order=2,
                                           plot=("memory", "peak memory (MiB)")))
    mem_kind: str = column("TEXT", result=True)  #: how memory was measured (:data:`peftbench.costs.MEM_KINDS`)
    steps: int = column("INTEGER", result=True, header="steps")  #: optimizer steps
    #: median optimizer-step time, evaluation excluded
    median_step_s: float = column("REAL", result=lambda result: _median(result.step_times), header="step ms",
                                  fmt=milliseconds, cost=Cost("median_step_ms", "median optimizer-step time",
                                                              scale=1e3, order=0,
                                                              plot=("step", "median step time (ms)")))
    error: str = column("TEXT")  #: why a failed run failed, one line
    traceback: str = column("TEXT", public=False)
    host: str = column("TEXT", public=False)  #: the claiming process: host, pid and start time
    pid: int = column("INTEGER", public=False)
    proc_start: int = column("INTEGER", public=False)
    started: float = column("REAL")  #: Unix times
    finished: float = column("REAL")
    artifacts: str = column("TEXT")  #: the run's folder (trainable.safetensors, spec.json, history.csv)
    #: size of the adapter file ``peftbench export`` writes (full fine-tuning: every weight)
    adapter_bytes: int = column("INTEGER", result=True, header="adapter", fmt=human_bytes,
                                cost=Cost("adapter_kib", "exported adapter file size (peftbench export; full "
                                          "fine-tuning: all weights)", scale=2 ** -10, order=4))
    #: average and 99th percentile of the memory in use (same kind as the peak)
    mem_stats: dict = column("TEXT", json=True, result=True)
    audit: dict = column("TEXT", json=True)  #: measured final count vs the budget (:mod:`peftbench.audit`)
    eval_s: float = column("REAL", result=True)  #: seconds evaluating: choosing evaluations (in ``train_s``), then the reported splits
    harness: dict = column("TEXT", json=True)  #: lm-evaluation-harness results (``peftbench evaluate --harness``)
    #: per-example predictions of the reported scorings, per split (dev ones, then a final test split): ``{"predictions",
    #: "labels"}``, a generation task's with per-metric ``metrics`` (:func:`peftbench.task.per_example_scores`)
    #: (:class:`~peftbench.trainer.RunResult`), for the tables' paired bootstrap (:mod:`peftbench.stats`)
    dev_predictions: dict = column("TEXT", json=True, result=True, public=False)

    @classmethod
    def from_result(cls, spec: RunSpec, result: Any, plugins: list[str] | None = None) -> RunRecord:
        """The record of a run the trainer just finished: its identity and everything it measured (the sweep
        adds ``budget``, ``audit`` and ``artifacts`` when it stores the run)."""
        return cls(run_id=spec.run_id, sweep=spec.sweep, label=spec.label, method=spec.method, task=spec.task,
                   seed=spec.seed, model=spec.model.name_or_path, status="done", spec=spec.stored(plugins or []),
                   **result_fields(result))


# -- what the store, the sweep, the tables, the report and the plots read -----------------------------------
# (functions, not constants: a record extended in a test shows everywhere)


def columns() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(RunRecord)


def column_types() -> dict[str, str]:
    """Every column's SQL type, in order (what the store adds to an older store that lacks one)."""
    return {f.name: f.metadata["sql"] for f in columns()}


def create_table() -> str:
    """The store's ``CREATE TABLE`` of the ``runs`` table."""
    lines = [f"    {f.name} {f.metadata['sql']}{' ' + f.metadata['constraint'] if f.metadata['constraint'] else ''}"
             for f in columns()]
    return "CREATE TABLE IF NOT EXISTS runs (\n" + ",\n".join(lines) + "\n);"


def json_columns() -> frozenset[str]:
    return frozenset(f.name for f in columns() if f.metadata["json"])


def private_columns() -> tuple[str, ...]:
    """Columns that ``peftbench table --format json`` leaves out."""
    return tuple(f.name for f in columns() if not f.metadata["public"])


def result_fields(result: Any) -> dict[str, Any]:
    """The columns a finished run writes, from the trainer's result."""
    out = {}
    for f in columns():
        source = f.metadata["result"]
        if source is True:
            out[f.name] = getattr(result, f.name)
        elif source:
            out[f.name] = source(result)
    return out


def header(name: str) -> str:
    return RunRecord.__dataclass_fields__[name].metadata["header"] or name


def display(name: str, value: Any) -> str:
    """A stored value as tables and the report show it ("—": none)."""
    return "—" if value is None else RunRecord.__dataclass_fields__[name].metadata["fmt"](value)


def costs() -> list[tuple[str, Cost]]:
    """``(field name, Cost)`` of every cost column, in the order the tables show them."""
    found = [(f.name, f.metadata["cost"]) for f in columns() if f.metadata["cost"] is not None]
    return sorted(found, key=lambda item: item[1].order)


def cost_panels() -> list[tuple[str, Cost]]:
    """The cost columns with a Pareto panel, in field order."""
    return [(f.name, f.metadata["cost"]) for f in columns() if f.metadata["cost"] and f.metadata["cost"].plot]


__all__ = ["Cost", "RunRecord", "column", "column_types", "columns", "cost_panels", "costs", "create_table",
           "display", "header", "human_bytes", "human_count", "json_columns", "milliseconds", "private_columns",
           "result_fields"]
