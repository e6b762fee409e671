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
import statistics
from collections import defaultdict
from typing import Any

from tabulate import tabulate

from .audit import MISS_MARK, missed, stored_audit
from .costs import MEM_KINDS
from .tuning import choose, chosen_lines, is_tuning_run, point_text, tuning_note

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
    "validation": "dev scored once, at the best in-budget evaluation on a validation split held out of the training "
                  "data (in-budget selection off the reported split)",
    "final": "dev scored once, on the final model",
}

#: run fields that ``--format json`` leaves out (long, or the store's bookkeeping)
JSON_SKIP = ("history", "traceback", "host", "pid", "proc_start")


def settings_key(run: dict[str, Any]) -> str:
    """What a run was trained with, its seed and sweep left out: the data's content fingerprint, the model,
    the training settings and the method's params. Runs of one label are seeds of one setting only when
    these are equal."""
    spec = {k: v for k, v in (run.get("spec") or {}).items() if k not in ("seed", "label")}
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
    """One JSON object per run: config (spec, with the data fingerprint), counts, metrics, costs."""
    return json.dumps([{k: v for k, v in run.items() if k not in JSON_SKIP} for run in runs], indent=1, default=str)


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


#: the cost columns: (run field, CSV header, its scale for CSV, human header, human format)
COSTS = (
    ("median_step_s", "median_step_ms", 1e3, "step ms", lambda v: f"{v * 1e3:,.1f}"),
    ("tokens_per_s", "tokens_per_s", 1, "tok/s", lambda v: f"{v:,.0f}"),
    ("peak_mem_bytes", "peak_mem_mib", 2 ** -20, "peak mem", human_bytes),
    ("train_s", "train_s", 1, "train s", lambda v: f"{v:,.1f}"),
    ("adapter_bytes", "adapter_kib", 2 ** -10, "adapter", human_bytes),
)


def cost_columns(runs: list[dict[str, Any]], labels: list[str], fmt: str
                 ) -> tuple[list[str], dict[str, list[str]], str]:
    """Each label's costs, the mean over its runs (every task and seed): headers, cells per label and a note.
    CSV gets plain numbers in the units its headers name; the other formats human units."""
    csv_format = fmt == "csv"
    cells: dict[str, list[str]] = {}
    for label in labels:
        mine = [run for run in runs if run["label"] == label]
        row = []
        for key, _, scale, _, human in COSTS:
            values = [run[key] for run in mine if run.get(key) is not None]
            mean = statistics.fmean(values) if values else None
            if mean is None:
                row.append("" if csv_format else "—")
            else:
                row.append(f"{mean * scale:.6g}" if csv_format else human(mean))
        cells[label] = row
    kinds = sorted({run["mem_kind"] for run in runs if run.get("mem_kind") and run.get("label") in cells})
    note = ("costs: mean over each method's runs (all its tasks and seeds): median optimizer-step time, training "
            "tokens/s, peak memory (" + (", ".join(MEM_KINDS.get(k, k) for k in kinds) or "not measured")
            + "), training time, exported adapter file size (peftbench export; full fine-tuning: all weights)")
    headers = [c[1] if csv_format else c[3] for c in COSTS]
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


def collect_test(runs: list[dict[str, Any]], main_metric: dict[str, str], labels: list[str]
                 ) -> dict[tuple[str, str], list[float]]:
    """The main metric on each task's test split (``final``'s ``test_<metric>``: a split scored once, on the
    final model, like GSM8K's test set) per (label, task), ×100; empty for tasks without one (GLUE)."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs:
        name = f"test_{main_metric.get(run['task'])}"
        if run["label"] in labels and name in (run.get("final") or {}):
            values[(run["label"], run["task"])].append(100 * float(run["final"][name]))
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


def paired_p_values(runs: list[dict[str, Any]], main_metric: dict[str, str], baseline: str, metric: str = "best"
                    ) -> dict[tuple[str, str], float]:
    """Paired t-test (scipy ``ttest_rel``) of each method against ``baseline`` over the seeds both ran,
    per task. Needs at least two common seeds; identical score vectors give p = 1."""
    from scipy.stats import ttest_rel

    by_seed: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for run in runs:
        name = main_metric.get(run["task"])
        if name and name in (run.get(metric) or {}):
            by_seed[(run["label"], run["task"])][run["seed"]] = float(run[metric][name])
    p_values = {}
    for (label, task), scores in by_seed.items():
        base = by_seed.get((baseline, task))
        if label == baseline or not base:
            continue
        seeds = sorted(set(scores) & set(base))
        if len(seeds) < 2:
            continue
        a, b = [scores[s] for s in seeds], [base[s] for s in seeds]
        if a == b:
            p_values[(label, task)] = 1.0
            continue
        p = float(ttest_rel(a, b).pvalue)
        p_values[(label, task)] = p if p == p else 1.0  # constant differences give nan: no evidence either way
    return p_values


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
          tuning: bool = False, cost: bool | None = None) -> str:
    """The comparison table. Cells: mean±std ×100 over seeds; best mean per column marked; ``†`` where a paired
    t-test across seeds against ``baseline`` gives p < ``alpha``. ``ablation`` adds the varying params.
    Tuning runs (:mod:`peftbench.tuning`) are left out; ``tuning``: the table of those alone
    (:func:`tuning_table`). ``cost`` adds :func:`cost_columns` (default: in CSV only; JSON always holds every
    run's costs)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose from {', '.join(FORMATS)}")
    if tuning:
        runs = [run for run in runs if is_tuning_run(run)]
        return runs_json(runs) if fmt == "json" else tuning_table(runs, main_metric, fmt, digits)
    runs = [run for run in runs if not is_tuning_run(run)]
    if fmt == "json":
        return runs_json(runs)
    table = comparison(runs, main_metric, fmt, metric, digits, baseline, alpha, ablation, cost)
    return _render(*table, fmt) if table else "(no finished runs match)"


def comparison(runs: list[dict[str, Any]], main_metric: dict[str, str], fmt: str = "markdown", metric: str = "best",
               digits: int = 2, baseline: str | None = "lora", alpha: float = 0.05, ablation: bool = False,
               cost: bool | None = None) -> tuple[list[str], list[list[str]], list[str]] | None:
    """The comparison table of :func:`build` as ``(header, rows, notes)`` (``None``: no finished runs), its best
    cells marked as ``fmt`` marks them (markdown: ``**...**``); for renderers of their own (the HTML report)."""
    runs, notes = separate_settings(runs)
    labels, tasks, values, params = collect(runs, main_metric, metric)
    p_values = paired_p_values(runs, main_metric, baseline, metric) if baseline else {}
    settings = varying_params(runs) if ablation else {}
    if not labels:
        return None
    means = {key: _mean_std(xs) for key, xs in values.items()}
    averages = {}
    for label in labels:
        if all((label, t) in means for t in tasks):
            averages[label] = statistics.fmean(means[(label, t)][0] for t in tasks)
    best = {t: max(means[(lbl, t)][0] for lbl in labels if (lbl, t) in means) for t in tasks}
    best_avg = max(averages.values()) if averages else None

    def mark(text: str, is_best: bool) -> str:
        if not is_best:
            return text
        return {"markdown": f"**{text}**", "latex": f"\\textbf{{{text}}}"}.get(fmt, f"{text}*")

    pm = "$\\pm$" if fmt == "latex" else "±"

    def cell(xs: list[float], best_mean: float) -> str:
        """``mean±std`` over seeds (the mean alone for one seed), marked when it is the column's best."""
        mean, std = _mean_std(xs)
        return mark(f"{mean:.{digits}f}" + (f"{pm}{std:.{digits}f}" if len(xs) > 1 else ""), mean == best_mean)

    test_values = collect_test(runs, main_metric, labels)
    test_tasks = [t for t in tasks if any(task == t for (_, task) in test_values)]
    test_means = {key: _mean_std(xs) for key, xs in test_values.items()}
    test_best = {t: max(test_means[(lbl, t)][0] for lbl in labels if (lbl, t) in test_means) for t in test_tasks}
    header = ["method", *(["setting"] if ablation else []), "params", "peak",
              *[f"{t} ({main_metric[t]})" for t in tasks], "avg",
              *[f"{t} test ({main_metric[t]})" for t in test_tasks]]
    peaks = _mean_count(runs, labels, "peak")
    misses = {(run["label"], run["task"]) for run in runs if missed(run)}
    rows = []
    for label in labels:
        row = [label, *([settings.get(label, "")] if ablation else []),
               human_count(params.get(label)) + (MISS_MARK if any(lbl == label for lbl, _ in misses) else ""),
               human_count(peaks.get(label))]
        for t in tasks:
            if (label, t) not in means:
                row.append("—")
                continue
            significant = p_values.get((label, t), 1.0) < alpha
            row.append(cell(values[(label, t)], best[t]) + ("†" if significant else "")
                       + (MISS_MARK if (label, t) in misses else ""))
        avg = averages.get(label)
        row.append(mark(f"{avg:.{digits}f}", avg == best_avg) if avg is not None else "—")
        for t in test_tasks:
            if (label, t) not in test_means:
                row.append("—")
                continue
            row.append(cell(test_values[(label, t)], test_best[t]))
        rows.append(row)
    cost_notes = []
    if cost or (cost is None and fmt == "csv"):
        cost_header, cost_cells, cost_note = cost_columns(runs, labels, fmt)
        header += cost_header
        rows = [row + cost_cells[label] for row, label in zip(rows, labels)]
        cost_notes.append(cost_note)
    seeds = sorted({len(v) for v in values.values()})
    note = (f"mean{'±std' if max(seeds) > 1 else ''} of {selection_text(runs, metric)}, "
            f"{', '.join(map(str, seeds))} seed(s), ×100")
    if p_values:
        note += f"; † paired t-test vs {baseline} across seeds, p < {alpha}"
    if misses:
        note += (f"; {MISS_MARK} a run's measured final adapter count missed its budget by more than the "
                 "tolerance (`--format json`: audit)")
    if test_tasks:
        note += ("; `test`: the task's test split, scored once at the end on the final model (always in budget), "
                 "not part of avg")
    note = "; ".join([note, *notes]) + "; best per column " + ("marked *" if fmt in ("plain", "csv") else "in bold")
    return header, rows, [note, *cost_notes, tuning_note(runs), *(f"chosen: {x}" for x in chosen_lines(runs))]


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
                 digits: int = 2) -> str:
    """The tuning runs: one row per method label × grid point, each task's held-out main metric ×100 (mean over
    the tuning seeds that finished), the point chosen per method and task marked."""
    scored = [(r["label"], r["task"], r["spec"]["tuning"]["index"], r["spec"]["tuning"]["point"],
               float((r.get("best") or {})[main_metric[r["task"]]])) for r in runs
              if r["task"] in main_metric and main_metric[r["task"]] in (r.get("best") or {})]
    if not scored:
        return "(no finished tuning runs match)"
    choices = choose(scored)
    tasks = [t for t in main_metric if any(s[1] == t for s in scored)]
    cells: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    points: dict[tuple[str, int], dict[str, Any]] = {}
    for label, task, index, point, score in scored:
        cells[(label, index)][task].append(100 * score)
        points[(label, index)] = point
    rows = []
    for label, index in sorted(cells, key=lambda k: ([s[0] for s in scored].index(k[0]), k[1])):
        row = [label, point_text(points[(label, index)])]
        for task in tasks:
            values = cells[(label, index)].get(task)
            chosen = choices[(label, task)].point == points[(label, index)] if values else False
            text = f"{statistics.fmean(values):.{digits}f}" if values else "—"
            row.append({"markdown": f"**{text}**", "latex": f"\\textbf{{{text}}}"}.get(fmt, f"{text}*")
                       if chosen else text)
        rows.append(row)
    header = ["method", "point", *[f"{t} (held-out {main_metric[t]})" for t in tasks]]
    note = ("tuning runs: held-out main metric ×100, mean over tuning seeds; the point chosen per method and task "
            + ("marked *" if fmt in ("plain", "csv") else "in bold"))
    return _render(header, rows, [note], fmt)
