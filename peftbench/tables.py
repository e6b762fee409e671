"""Cross-method comparison tables from the results store.

Rows are methods (labels) with their measured final adapter count (``params``, the budget audit's, averaged
over the label's runs) and the largest count during training (``peak``: AdaLoRA and PrunedLoRA start
bigger), columns are tasks plus the average; each cell is mean ± std over seeds of the task's main metric
(×100, as in the papers), the best mean of each column marked, ``‼`` where a run missed its budget (the
audit of :mod:`peftbench.audit`). Task columns come in the order of ``main_metric`` (the CLI lists tasks in
the order their plugins register them, so a task plugin decides its columns' order).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from tabulate import tabulate

from . import record, stats
from .audit import MISS_MARK, missed, stored_audit
from .costs import MEM_KINDS
from .record import human_count
from .tuning import (
    choose,
    chosen_lines,
    current_choices,
    held_out_key,
    is_tuning_run,
    point_text,
    tuning_note,
)

FORMATS = ("markdown", "latex", "csv", "plain", "json")

#: what each stored metric is, for the footer: ``best`` (the default) only counts in-budget evaluations
SELECTIONS = {
    "best": "the best dev evaluation at which the method was within its budget (in-budget selection)",
    "final": "the dev metrics after the last step",
    "best_any": "the best of all dev evaluations, over-budget ones included (NOT budget-matched: the old rule)",
}

def selection_text(runs: list[dict[str, Any]], metric: str) -> str:
    """What the table's numbers are, by the runs' ``train.select`` (a run stored without one: ``dev``)."""
    if metric != "best":
        once = any(_select(run) != "dev" for run in runs)
        return SELECTIONS.get(metric, metric) + (
            " (a run that scored dev once, at its selected checkpoint, only where that checkpoint is this one)"
            if once else "")
    texts = []
    for rule in sorted({_select(run) for run in runs}):
        if rule == "dev":
            counts = sorted({run.get("in_budget_evals") or 0 for run in runs if _select(run) == "dev"})
            n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
            texts.append(f"the best of {n} dev evaluations (reproduces papers; not a fair protocol), in-budget ones "
                         "only")
        else:
            texts.append(RULES[rule])
    return " / ".join(texts)


def _select(run: dict[str, Any]) -> str:
    return (((run.get("spec") or {}).get("train") or {}).get("select")) or "dev"


#: what ``best`` is under each checkpoint rule (``train.select``) but ``dev`` (:func:`selection_text`)
RULES = {
    "validation": "dev scored once, at the best evaluation on a validation split held out of the training data at "
                  "which the method was within its budget (in-budget selection off the reported split)",
    "final": "dev scored once, on the final model",
}



def settings_key(run: dict[str, Any]) -> str:
    """What a run was trained with, its seed and sweep left out: the data's content fingerprint, the model,
    the training settings and the method's params. Runs of one label are seeds of one setting only when
    these are equal."""
    spec = {k: v for k, v in (run.get("spec") or {}).items() if k not in ("seed", "label", "plugins", "data_dir")}  # where, not what
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:6]


def separate_settings(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """``runs`` with the label of every run whose (label, task) was trained with more than one setting (other
    data, other params) suffixed by its setting's key, so that such runs are never averaged as seeds; and
    a note naming them."""
    keys: dict[tuple[str, str], set[str]] = defaultdict(set)
    for run in runs:
        keys[(run["label"], run["task"])].add(settings_key(run))
    mixed = sorted({label for (label, _), found in keys.items() if len(found) > 1})
    if not mixed:
        return runs, []
    renamed = [{**run, "label": f"{run['label']}@{settings_key(run)}"} if run["label"] in mixed else run
               for run in runs]
    return renamed, [f"{', '.join(mixed)}: runs of one label with different settings or data, shown as one row "
                     "per setting (label@setting), never averaged as seeds"]


def runs_json(runs: list[dict[str, Any]]) -> str:
    """One JSON object per run: config (spec, with the data fingerprint), counts, metrics, costs (the run
    record's public fields, :mod:`peftbench.record`)."""
    skip = record.private_columns()
    return json.dumps([{k: v for k, v in run.items() if k not in skip} for run in runs], indent=1, default=str)


def cost_columns(runs: list[dict[str, Any]], labels: list[str], fmt: str
                 ) -> tuple[list[str], dict[str, list[str]], str]:
    """Each label's costs (the run record's cost columns), the mean over its runs (every task and seed):
    headers, cells per label and a note. CSV gets plain numbers in the units its headers name; the other
    formats human units."""
    csv_format, costs = fmt == "csv", record.costs()
    cells: dict[str, list[str]] = {}
    for label in labels:
        mine = [run for run in runs if run["label"] == label]
        row = []
        for name, cost in costs:
            values = [run[name] for run in mine if run.get(name) is not None]
            mean = statistics.fmean(values) if values else None
            if csv_format:
                row.append("" if mean is None else f"{mean * cost.scale:.6g}")
            else:
                row.append(record.display(name, mean))
        cells[label] = row
    kinds = sorted({run["mem_kind"] for run in runs if run.get("mem_kind") and run.get("label") in cells})
    mem_kinds = ", ".join(MEM_KINDS.get(k, k) for k in kinds) or "not measured"
    note = ("costs: mean over each method's runs (all its tasks and seeds): "
            + ", ".join(cost.note.format(mem_kinds=mem_kinds) for _, cost in costs))
    headers = [cost.csv if csv_format else record.header(name) for name, cost in costs]
    return headers, cells, note


def collect(runs: list[dict[str, Any]], main_metric: dict[str, str], metric: str = "best"
            ) -> tuple[list[str], list[str], dict[tuple[str, str], list[float]], dict[str, int]]:
    """Values per (label, task) and the trainable count per label, from stored ``done`` runs; tasks in the
    order of ``main_metric``."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    params: dict[str, int] = {}
    labels: list[str] = []
    for run in runs:
        metrics = run.get(metric) or {}
        name = main_metric.get(run["task"])
        if name is None or name not in metrics:
            continue
        if run["label"] not in labels:
            labels.append(run["label"])
        values[(run["label"], run["task"])].append(100 * float(metrics[name]))
    params = _mean_count(runs, labels, "final")
    tasks = [t for t in main_metric if any(task == t for (_, task) in values)]
    return labels, tasks, values, params


def collect_test(runs: list[dict[str, Any]], main_metric: dict[str, str], labels: list[str], metric: str = "best"
                 ) -> dict[tuple[str, str], list[float]]:
    """The main metric on each task's test split (``test_<metric>``: a split scored once, at the run's reported
    checkpoint, like GSM8K's test set) per (label, task), ×100, from the same stored metrics as the dev columns
    (``metric``: where those are another checkpoint's, they have no test score); empty for tasks without one
    (GLUE). A run stored before the test split was scored at its reported checkpoint (``select: dev``) may have
    it in ``final`` only: left out of ``best``, it is of another checkpoint than its dev column."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        name = f"test_{main_metric.get(run['task'])}"
        if run["label"] in labels and name in (run.get(metric) or {}):
            values[(run["label"], run["task"])].append(100 * float(run[metric][name]))
    return values


def _mean_count(runs: list[dict[str, Any]], labels: list[str], key: str) -> dict[str, int]:
    """Each label's measured ``final`` or ``peak`` count (from the budget audit), averaged over its runs: an
    allocation, and so the count, can differ between tasks and seeds."""
    found: dict[str, list[int]] = defaultdict(list)
    for run in runs:
        count = stored_audit(run).get(key)
        if run["label"] in labels and count is not None:
            found[run["label"]].append(count)
    return {label: round(statistics.fmean(xs)) for label, xs in found.items()}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def varying_params(runs: list[dict[str, Any]]) -> dict[str, str]:
    """For ablation tables: each label's params that differ between the rows of the same method
    (``criterion=random``); a method with a single row has nothing that varies (empty)."""
    per_method: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        labels = per_method.setdefault(run.get("method", run["label"]), {})
        labels.setdefault(run["label"], (run.get("spec") or {}).get("params") or {})
    settings: dict[str, str] = {}
    for labels in per_method.values():
        keys = sorted({k for p in labels.values() for k in p})
        varying = [k for k in keys if len({repr(p.get(k)) for p in labels.values()}) > 1]
        for label, p in labels.items():
            settings[label] = ", ".join(f"{k}={p.get(k)}" for k in varying) if len(labels) > 1 else ""
    return settings


def build(runs: list[dict[str, Any]], main_metric: dict[str, str], fmt: str = "markdown", metric: str = "best",
          digits: int = 2, baseline: str | None = "lora", alpha: float = 0.05, ablation: bool = False,
          tuning: bool = False, cost: bool | None = None, tie_break: dict[str, tuple[str, ...]] | None = None,
          show: str | None = None) -> str:
    """The comparison table. Cells: mean±std ×100 over seeds; best mean per column marked; ``†`` where a paired
    t-test across seeds against ``baseline`` gives p < ``alpha``. ``ablation`` adds the varying params.
    Tuning runs (:mod:`peftbench.tuning`) are left out; ``tuning``: the table of those alone
    (:func:`tuning_table`). ``cost`` adds :func:`cost_columns` (default: in CSV only; JSON always holds every
    run's costs). ``tie_break``: each task's tie-break metrics, which the tuning's choice used. ``show``: this
    stored metric in the task columns instead of each task's main one (e.g. GSM8K's ``formatted`` or
    ``gold_logprob``), compared with ``baseline`` like the main one (per example where the runs stored it)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose from {', '.join(FORMATS)}")
    if tuning:
        runs = [run for run in runs if is_tuning_run(run)]
        return runs_json(runs) if fmt == "json" else tuning_table(runs, main_metric, fmt, digits, tie_break)
    runs = [run for run in current_choices(runs, main_metric, tie_break) if not is_tuning_run(run)]
    if fmt == "json":
        return runs_json(runs)
    if show:  # after the choices above, which the main metric made
        main_metric = {task: show for task in main_metric}
    table = comparison(runs, main_metric, fmt, metric, digits, baseline, alpha, ablation, cost)
    return render(table, fmt) if table else "(no finished runs match)"


def mark_best(text: str, fmt: str) -> str:
    """A column's best, as ``fmt`` marks it: bold (markdown, LaTeX), else a trailing ``*``."""
    return {"markdown": f"**{text}**", "latex": f"\\textbf{{{text}}}"}.get(fmt, f"{text}*")


def best_legend(fmt: str) -> str:
    return "marked *" if fmt in ("plain", "csv") else "in bold"


@dataclass(frozen=True)
class Cell:
    """One cell of a comparison table, before any format marks it: each renderer (:func:`render`, the HTML
    report) shows the flags its own way."""

    value: str  #: the mean ×100 (or the cell's text: a label, a count, a cost, "—")
    std: str | None = None  #: the std over seeds (``None``: one seed, or no score)
    best: bool = False  #: the column's best mean
    significant: bool = False  #: ``†``: differs from the baseline (:mod:`peftbench.stats`, Holm-corrected)
    missed: bool = False  #: ``‼``: a run of it missed its budget

    def text(self, fmt: str) -> str:
        """The cell as ``fmt`` shows it: ``mean±std``, marked when best, then ``†`` and ``‼``."""
        pm = "$\\pm$" if fmt == "latex" else "±"
        text = self.value + (f"{pm}{self.std}" if self.std is not None else "")
        return ((mark_best(text, fmt) if self.best else text) + ("†" if self.significant else "")
                + (MISS_MARK if self.missed else ""))


DASH = Cell("—")


@dataclass
class Table:
    """A comparison table: one row of :class:`Cell` per method label, and its footer (``note`` before the
    legend of the best marks, which depends on the format, then ``notes``)."""

    header: list[str]
    rows: list[list[Cell]]
    note: str
    notes: list[str] = field(default_factory=list)

    def footer(self, fmt: str) -> list[str]:
        return [f"{self.note}; best per column {best_legend(fmt)}", *self.notes]


def render(table: Table, fmt: str) -> str:
    """``table`` as text in ``fmt`` (markdown, LaTeX, CSV, plain)."""
    return _render(table.header, [[cell.text(fmt) for cell in row] for row in table.rows], table.footer(fmt), fmt)


def _scores(values: dict[tuple[str, str], list[float]], labels: list[str], tasks: list[str], digits: int
            ) -> dict[tuple[str, str], Cell]:
    """``mean±std`` ×100 over seeds (the mean alone for one seed) per (label, task), the column's best marked."""
    means = {key: _mean_std(xs) for key, xs in values.items()}
    best = {t: max(means[(lbl, t)][0] for lbl in labels if (lbl, t) in means) for t in tasks}
    return {(label, task): Cell(f"{mean:.{digits}f}", f"{std:.{digits}f}" if len(values[(label, task)]) > 1 else None,
                                best=mean == best[task])
            for (label, task), (mean, std) in means.items() if task in best}


def _averages(cells: dict[tuple[str, str], Cell], values: dict[tuple[str, str], list[float]], labels: list[str],
              tasks: list[str], digits: int) -> dict[str, Cell]:
    """Each label's mean over the tasks (only a label with every task has one), the best marked."""
    averages = {label: statistics.fmean(statistics.fmean(values[(label, t)]) for t in tasks)
                for label in labels if all((label, t) in cells for t in tasks)}
    best = max(averages.values()) if averages else None
    return {label: Cell(f"{avg:.{digits}f}", best=avg == best) for label, avg in averages.items()}


def comparison(runs: list[dict[str, Any]], main_metric: dict[str, str], fmt: str = "markdown", metric: str = "best",
               digits: int = 2, baseline: str | None = "lora", alpha: float = 0.05, ablation: bool = False,
               cost: bool | None = None) -> Table | None:
    """The comparison table of :func:`build` as a :class:`Table` (``None``: no finished runs), for any renderer
    (:func:`render`, the HTML report); ``fmt`` only decides the cost columns' units (CSV: plain numbers)."""
    runs, setting_notes = separate_settings(runs)
    labels, tasks, values, params = collect(runs, main_metric, metric)
    settings = varying_params(runs) if ablation else {}
    if not labels:
        return None
    dev = _scores(values, labels, tasks, digits)
    averages = _averages(dev, values, labels, tasks, digits)
    test_values = collect_test(runs, main_metric, labels, metric)
    test_tasks = [t for t in tasks if any(task == t for (_, task) in test_values)]
    test = _scores(test_values, labels, test_tasks, digits)
    comparisons = stats.compare_to_baseline(runs, main_metric, baseline, metric) if baseline else {}
    if baseline and test_tasks:  # a test column is compared on its own examples, corrected with the dev ones
        comparisons |= {(label, f"{task} test"): c for (label, task), c in stats.compare_to_baseline(
            runs, {t: main_metric[t] for t in test_tasks}, baseline, metric, split="test").items()}
    _, marks = stats.significant(comparisons, alpha)
    header = ["method", *(["setting"] if ablation else []), "params", "peak",
              *[f"{t} ({main_metric[t]})" for t in tasks], "avg",
              *[f"{t} test ({main_metric[t]})" for t in test_tasks]]
    peaks = _mean_count(runs, labels, "peak")
    misses = {(run["label"], run["task"]) for run in runs if missed(run)}
    rows = []
    for label in labels:
        row = [Cell(label), *([Cell(settings.get(label, ""))] if ablation else []),
               Cell(human_count(params.get(label)), missed=any(lbl == label for lbl, _ in misses)),
               Cell(human_count(peaks.get(label)))]
        row += [replace(dev[(label, t)], significant=marks.get((label, t), False),
                        missed=(label, t) in misses) if (label, t) in dev else DASH for t in tasks]
        row.append(averages.get(label, DASH))
        rows.append(row + [replace(test[(label, t)], significant=marks.get((label, f"{t} test"), False))
                           if (label, t) in test else DASH for t in test_tasks])
    notes = []
    if cost or (cost is None and fmt == "csv"):
        cost_header, cost_cells, cost_note = cost_columns(runs, labels, fmt)
        header += cost_header
        rows = [row + [Cell(text) for text in cost_cells[label]] for row, label in zip(rows, labels)]
        notes.append(cost_note)
    note = _note(values, selection_text(runs, metric), bool(misses), bool(test_tasks))
    references = [label for label in labels if _unmatched(runs, label)]
    if references:  # full fine-tuning, fixed-size PEFT tuners: shown beside the matched methods, not among them
        notes.append(f"unmatched references (trainable count not matched to the budget; `params` is their own): "
                     f"{', '.join(references)}")
    if baseline:
        notes += [stats.footer(comparisons, baseline, alpha, test_columns=bool(test_tasks)),
                  *difference_lines(comparisons, labels, [*tasks, *(f"{t} test" for t in test_tasks)], baseline)]
    return Table(header, rows, "; ".join([note, *setting_notes]),
                 [*notes, tuning_note(runs), *(f"chosen: {x}" for x in chosen_lines(runs))])


def _unmatched(runs: list[dict[str, Any]], label: str) -> bool:
    """Whether ``label``'s runs were left out of budget matching (their stored budget says so)."""
    budgets = [run.get("budget") or {} for run in runs if run["label"] == label]
    return bool(budgets) and all(b.get("matched") is False for b in budgets)


def difference_lines(comparisons: dict, labels: list[str], tasks: list[str], baseline: str) -> list[str]:
    """One footer line per label: its difference from ``baseline`` per task, ×100, with the 95% interval and
    the Holm-adjusted p (what the ``†`` marks are read from)."""
    adjusted, _ = stats.significant(comparisons)
    lines = []
    for label in labels:
        parts = [f"{task} {100 * c.diff:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}] p={adjusted[key]:.3g}"
                 for task in tasks if (c := comparisons.get(key := (label, task)))]
        if parts:
            lines.append(f"{label} − {baseline}: " + "; ".join(parts))
    return lines


def _note(values: dict[tuple[str, str], list[float]], selection: str, misses: bool, test: bool) -> str:
    """The footer's first line: what a cell is (``selection``: :func:`selection_text`), and its marks (the
    significance test has a line of its own)."""
    seeds = sorted({len(v) for v in values.values()})
    note = (f"mean{'±std' if max(seeds) > 1 else ''} of {selection}, "
            f"{', '.join(map(str, seeds))} seed(s), ×100")
    if misses:
        note += (f"; {MISS_MARK} a run's measured final adapter count missed its budget by more than the "
                 "tolerance (`--format json`: audit)")
    if test:
        note += ("; `test`: the task's test split, scored once at the end at each run's reported checkpoint, the "
                 "same as its dev column's (so are its generations.jsonl and export), not part of avg")
    return note


def _render(header: list[str], rows: list[list[str]], notes: list[str], fmt: str) -> str:
    """``rows`` under ``header`` in ``fmt``, the notes below (a LaTeX comment each; none in CSV)."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    table = tabulate(rows, headers=header, tablefmt={"markdown": "github", "latex": "latex_raw", "plain": "simple"}[fmt],
                     disable_numparse=True)
    if fmt == "latex":
        return table + "".join(f"\n% {note}" for note in notes)
    return table + "\n\n" + "\n".join(notes)


def tuning_table(runs: list[dict[str, Any]], main_metric: dict[str, str], fmt: str = "markdown",
                 digits: int = 2, tie_break: dict[str, tuple[str, ...]] | None = None) -> str:
    """The tuning runs: one row per method label × grid point, each task's held-out main metric ×100 (mean over
    the tuning seeds that finished), the point chosen per method and task marked (ties broken by ``tie_break``,
    each task's tie-break metrics, as the sweep chose)."""
    def names(task: str) -> tuple[str, ...]:
        return (main_metric[task], *(tie_break or {}).get(task, ()))

    scored = [(r["label"], r["task"], r["spec"]["tuning"]["index"], r["spec"]["tuning"]["point"],
               held_out_key(r.get("best"), names(r["task"]))) for r in runs if r["task"] in main_metric]
    scored = [s for s in scored if s[4] is not None]
    if not scored:
        return "(no finished tuning runs match)"
    choices = choose(scored, tie_break)
    tasks = [t for t in main_metric if any(s[1] == t for s in scored)]
    # each task's column: its main metric ×100, or where its runs chose without one (a causal-LM task's
    # `select_on: gold_logprob`), the first tie-break metric they have, as it is
    def shown_place(task: str) -> int:
        keys = [s[4] for s in scored if s[1] == task]
        return next((i for i in range(len(names(task))) if any(k[i] > -math.inf for k in keys)), 0)

    shown = {t: shown_place(t) for t in tasks}
    cells: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    points: dict[tuple[str, int], dict[str, Any]] = {}
    for label, task, index, point, key in scored:
        cells[(label, index)][task].append((100 if shown[task] == 0 else 1) * key[shown[task]])
        points[(label, index)] = point
    rows = []
    for label, index in sorted(cells, key=lambda k: ([s[0] for s in scored].index(k[0]), k[1])):
        row = [label, point_text(points[(label, index)])]
        for task in tasks:
            values = cells[(label, index)].get(task)
            chosen = choices[(label, task)].point == points[(label, index)] if values else False
            text = f"{statistics.fmean(values):.{digits}f}" if values else "—"
            row.append(mark_best(text, fmt) if chosen else text)
        rows.append(row)
    header = ["method", "point", *[f"{t} (held-out {names(t)[shown[t]]})" for t in tasks]]
    what = "held-out main metric ×100" if not any(shown.values()) else (
        "held-out main metric ×100 (a column headed by another metric: the one the runs chose on, as it is)")
    note = f"tuning runs: {what}, mean over tuning seeds; the point chosen per method and task " + best_legend(fmt)
    return _render(header, rows, [note], fmt)
