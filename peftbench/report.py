"""``peftbench report``: one self-contained HTML page of a results store (no server, no network).

Everything is inline: CSS, a few lines of JS that sort a table by a clicked column, and every figure as a
base64 PNG (made by :mod:`peftbench.plots`, the figures ``peftbench plot`` writes). The comparison table is
:func:`peftbench.tables.comparison`, the one ``peftbench table`` prints, with its marks and their legend.
Long lists (every run, the training settings) sit in collapsed ``<details>``, so the page reads the same
for one run and for hundreds. Built with the standard library only: ``string.Template`` and ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import platform
import subprocess
import tempfile
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from string import Template
from typing import Any

from . import record
from .audit import MISS_MARK, stored_audit
from .costs import MEM_KINDS
from .record import human_count
from .tables import Cell, comparison, selection_text, tuning_table
from .tuning import chosen_lines, current_choices, is_tuning_run, point_text, tuning_note

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$style</style></head>
<body><main>
<h1>$title</h1>
$body
</main>
<script>$script</script>
</body></html>
""")

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; margin: 0; background: #f6f7f9; }
main { max-width: 1280px; margin: 0 auto; padding: 1rem 1.5rem 3rem; background: #fff; }
h1 { font-size: 1.6rem; margin: .4rem 0 .2rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #dde1e7; }
h3 { font-size: 1.05rem; margin-bottom: .3rem; }
.summary { color: #4a5468; margin: 0 0 1rem; }
table { border-collapse: collapse; margin: .5rem 0; font-variant-numeric: tabular-nums; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #e6e9ee; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
thead th { background: #eef1f5; position: sticky; top: 0; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th[data-dir=asc]::after { content: " ▲"; } table.sortable thead th[data-dir=desc]::after { content: " ▼"; }
.wide { overflow-x: auto; max-width: 100%; }
strong.best { color: #0b5394; } .sig { color: #8a4b00; } .miss { color: #b00020; font-weight: bold; }
ul.notes { color: #4a5468; font-size: .9em; padding-left: 1.2rem; }
figure { margin: .5rem 0 1rem; } figure img { max-width: 100%; height: auto; border: 1px solid #e6e9ee; }
figcaption { color: #4a5468; font-size: .9em; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; } .grid figure { flex: 1 1 560px; }
details { margin: .5rem 0; } summary { cursor: pointer; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; } dt { color: #4a5468; } dd { margin: 0; }
code { background: #f0f2f5; padding: 0 .25rem; border-radius: 3px; }
"""

#: click a column header to sort by it (numbers with units as numbers, "—" last); nothing else runs
SCRIPT = """
const UNITS = {K: 1e3, M: 1e6, B: 1e9, KiB: 1024, MiB: 1048576, GiB: 1073741824};
function sortKey(cell) {
  const text = cell.textContent.replace(/,/g, "").trim();
  const m = text.match(/^(-?\\d[\\d.]*)(\\s?)(KiB|MiB|GiB|K|M|B)?/);
  if (!m) return text === "—" || text === "" ? null : text.toLowerCase();
  const unit = m[3] === "B" && m[2] ? 1 : (UNITS[m[3]] || 1);
  return parseFloat(m[1]) * unit;
}
document.querySelectorAll("table.sortable").forEach(table => {
  table.querySelectorAll("thead th").forEach((th, column) => th.addEventListener("click", () => {
    const ascending = th.dataset.dir !== "asc";
    table.querySelectorAll("thead th").forEach(other => delete other.dataset.dir);
    th.dataset.dir = ascending ? "asc" : "desc";
    const body = table.tBodies[0];
    const rows = Array.from(body.rows).map(row => [sortKey(row.cells[column]), row]);
    rows.sort(([a], [b]) => {
      if (a === null || b === null) return (a === null) - (b === null);
      const order = typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
      return ascending ? order : -order;
    });
    rows.forEach(([, row]) => body.appendChild(row));
  }));
});
"""

#: the packages whose versions the environment section lists
PACKAGES = ("peftbench", "torch", "transformers", "accelerate", "datasets", "pluggy", "numpy", "scipy", "matplotlib")


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def write_report(runs: list[dict[str, Any]], main_metric: dict[str, str], out_dir: str | Path,
                 unfinished: list[dict[str, Any]] | None = None, source: str | Path | None = None,
                 title: str = "peftbench report", tie_break: dict[str, tuple[str, ...]] | None = None) -> Path:
    """Write ``<out_dir>/index.html`` from stored ``done`` runs (``unfinished``: the store's other runs, listed
    as such); ``source``: the store it was read from; ``tie_break``: each task's tie-break metrics, which the
    tuning's choice used (:func:`peftbench.tuning.choose`). Returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = [run for run in current_choices(runs, main_metric, tie_break) if not is_tuning_run(run)]
    tuning = [run for run in runs if is_tuning_run(run)]
    body = [summary(final, tuning, unfinished or [], source),
            table_section(final, main_metric),
            figures_section(final, main_metric),
            protocol_section(final, tuning, main_metric, tie_break),
            environment_section(runs, source),
            runs_section(final, unfinished or [], main_metric)]
    page = out / "index.html"
    page.write_text(PAGE.substitute(title=e(title), style=STYLE, script=SCRIPT, body="\n".join(body)),
                    encoding="utf-8")
    return page


def summary(runs: list[dict[str, Any]], tuning: list[dict[str, Any]], unfinished: list[dict[str, Any]],
            source: str | Path | None) -> str:
    started = [r["started"] for r in runs if r.get("started")]
    finished = [r["finished"] for r in runs if r.get("finished")]
    when = (f", trained {_date(min(started))} – {_date(max(finished))}" if started and finished else "")
    parts = [f"{len(runs)} finished run(s): {len({r['label'] for r in runs})} method(s) × "
             f"{len({r['task'] for r in runs})} task(s) × {len({r['seed'] for r in runs})} seed(s){when}"]
    if tuning:
        parts.append(f"{len(tuning)} tuning run(s)")
    if unfinished:
        parts.append(f"{len(unfinished)} run(s) not finished (listed at the end)")
    store = f" from <code>{e(source)}</code>" if source else ""
    return f'<p class="summary">{"; ".join(e(p) for p in parts)}{store}; made {e(_date(time.time()))}.</p>'


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


# -- the comparison table ----------------------------------------------------------------------------------


def table_section(runs: list[dict[str, Any]], main_metric: dict[str, str]) -> str:
    table = comparison(runs, main_metric, "markdown", cost=True)
    if table is None:
        return "<h2>Comparison</h2><p>No finished runs.</p>"
    return ("<h2>Comparison</h2>\n<p>Dev main metric ×100 per method and task (click a column to sort), with the "
            "trainable adapter parameters and the costs of each method.</p>\n"
            + html_table(table.header, table.rows, cell=html_cell, table_id="comparison")
            + '<ul class="notes">' + "".join(f"<li>{e(note)}</li>" for note in table.footer("html") if note) + "</ul>")


def html_cell(cell: Cell) -> str:
    """A cell of :func:`peftbench.tables.comparison` as HTML: the best in bold, † and ‼ titled."""
    out = e(cell.value + (f"±{cell.std}" if cell.std is not None else ""))
    if cell.best:
        out = f'<strong class="best">{out}</strong>'
    if cell.significant:
        out += '<span class="sig" title="differs from the baseline: paired bootstrap over the examples of its split (dev or test) and seeds (or a seed permutation test), Holm-corrected">†</span>'
    if cell.missed:
        out += f'<span class="miss" title="missed its parameter budget">{MISS_MARK}</span>'
    return out


def html_table(header: list[str], rows: list[list[str]], cell=e, table_id: str | None = None,
               text_columns: int = 1) -> str:
    """A sortable table; the first ``text_columns`` columns left-aligned (names), the others numbers."""
    ident = f' id="{e(table_id)}"' if table_id else ""
    head = "".join(f'<th{" class=text" if i < text_columns else ""}>{e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=text" if i < text_columns else ""}>{cell(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return (f'<div class="wide"><table class="sortable"{ident}><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}</tbody></table></div>\n")


# -- figures ---------------------------------------------------------------------------------------------


def figures_section(runs: list[dict[str, Any]], main_metric: dict[str, str]) -> str:
    """Pareto fronts, rank allocations and training curves, as embedded PNGs."""
    if not runs:
        return ""
    try:
        import matplotlib
    except ImportError:
        return "<h2>Figures</h2><p>Figures need matplotlib: <code>pip install 'peftbench[plot]'</code>.</p>"
    from . import plots

    matplotlib.use("Agg")
    groups = [  # (heading, caption, draw, layout: "stack" one per line for the wide three-panel figures)
        ("Accuracy against cost", "dev metric (mean ± std over seeds) against trainable parameters, peak memory "
         "and median step time: one point per method",
         lambda out: plots.pareto(runs, main_metric, out, ("png",)), "stack"),
        ("Rank allocation", "final rank per layer and module, mean over a method's runs (methods that report "
         "ranks), and the ranks during training",
         lambda out: plots.rank_heatmaps(runs, out, ("png",)) + plots.rank_over_steps(runs, out, ("png",)), "grid"),
        ("Training curves", "training loss and the main metric of the evaluations that choose the checkpoint (the "
         "validation split under train.select: validation, dev under select: dev) over optimizer steps, one seed "
         "per method",
         lambda out: plots.training_curves(runs, main_metric, out, ("png",)), "grid"),
    ]
    parts = []
    with tempfile.TemporaryDirectory(prefix="peftbench-report-") as tmp:
        for heading, caption, draw, box in groups:
            paths = draw(Path(tmp))
            if paths:
                parts.append(f"<h3>{e(heading)}</h3><p class=summary>{e(caption)}</p><div class={box}>"
                             + "".join(_figure(path) for path in paths) + "</div>")
    return "<h2>Figures</h2>\n" + "\n".join(parts)


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{e(path.stem)}">'
            f"<figcaption>{e(path.stem)}</figcaption></figure>")


# -- protocol ----------------------------------------------------------------------------------------------


def protocol_section(runs: list[dict[str, Any]], tuning: list[dict[str, Any]], main_metric: dict[str, str],
                     tie_break: dict[str, tuple[str, ...]] | None = None) -> str:
    """How the numbers were obtained: selection rule, budgets, seeds, tuning, the settings of every method."""
    seeds = sorted({r["seed"] for r in runs})
    budgets = sorted({(r.get("budget") or {}).get("target") for r in runs} - {None})
    tolerances = sorted({stored_audit(r).get("tolerance") for r in runs} - {None})
    items = [
        ("selection", f"reported metric: {selection_text(runs, 'best')}; the final evaluation always counts"),
        ("main metrics", ", ".join(f"{t}: {m}" for t, m in main_metric.items()) or "—"),
        ("seeds", ", ".join(map(str, seeds)) or "—"),
        ("budget", (", ".join(f"{b:,}" for b in budgets) + " adapter parameters"
                    + (f", tolerance {', '.join(f'{t:.1%}' for t in tolerances)}" if tolerances else ""))
         if budgets else "—"),
        ("tuning", tuning_note(runs)),
        *(("chosen", line) for line in chosen_lines(runs)),
        *(("grid", line) for line in _grids(runs)),
    ]
    out = ["<h2>Protocol</h2>", "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in items) + "</dl>",
           _in_budget_table(runs)]
    out.append(_settings(runs))
    if tuning:
        out.append(f"<details><summary>Tuning runs ({len(tuning)})</summary><pre>"
                   f"{e(tuning_table(tuning, main_metric, 'plain', tie_break=tie_break))}</pre></details>")
    return "\n".join(out)


def _grids(runs: list[dict[str, Any]]) -> list[str]:
    grids: dict[str, str] = {}
    for run in runs:
        tuned = (run.get("spec") or {}).get("tuned")
        if tuned and tuned.get("grid"):
            grids.setdefault(run["label"], "; ".join(f"{k}: {v}" for k, v in tuned["grid"].items()))
    return [f"{label}: {grid}" for label, grid in grids.items()]


def _in_budget_table(runs: list[dict[str, Any]]) -> str:
    """Per method and task: from which step evaluations counted, and how many did."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["label"], run["task"])].append(run)
    rows = []
    for (label, task), mine in groups.items():
        counted = [r.get("in_budget_evals") for r in mine if r.get("in_budget_evals") is not None]
        total = [r.get("evaluations") for r in mine if r.get("evaluations") is not None]
        rows.append([label, task, _joined(r.get("in_budget_from") for r in mine),
                     f"{_joined(counted)} of {_joined(total)}" if total else "—", _joined(r.get("steps") for r in mine)])
    return ("<details><summary>Evaluations in budget per method and task</summary>"
            + html_table(["method", "task", "in budget from step", "evaluations counted", "steps"], rows,
                         text_columns=2) + "</details>")


def _joined(values) -> str:
    found = sorted({v for v in values if v is not None})
    return "/".join(map(str, found)) if found else "—"


def _settings(runs: list[dict[str, Any]]) -> str:
    """Training settings shared by every run, then those that differ and each method's params."""
    specs = {r["label"]: r.get("spec") or {} for r in runs}
    trains = [(r.get("spec") or {}).get("train") or {} for r in runs]
    keys = sorted({k for t in trains for k in t})
    common = {k: trains[0].get(k) for k in keys if trains and all(t.get(k) == trains[0].get(k) for t in trains)}
    varying = [k for k in keys if k not in common]
    rows = [[label, ", ".join(f"{k}={(spec.get('train') or {}).get(k)}" for k in varying),
             point_text({f"params.{k}": v for k, v in (spec.get("params") or {}).items()}),
             (spec.get("model") or {}).get("name_or_path", "—")] for label, spec in specs.items()]
    return ("<details><summary>Training settings and method parameters</summary>"
            "<p>Shared by every run: " + e(", ".join(f"{k}={v}" for k, v in common.items())) + "</p>"
            + html_table(["method", "differing training settings", "method params (first run)", "model"], rows,
                         text_columns=4) + "</details>")


# -- environment -------------------------------------------------------------------------------------------


def environment_section(runs: list[dict[str, Any]], source: str | Path | None) -> str:
    kinds = sorted({r["mem_kind"] for r in runs if r.get("mem_kind")})
    devices = sorted({f"{(r.get('spec') or {}).get('train', {}).get('device', '?')} "
                      f"(precision {(r.get('spec') or {}).get('train', {}).get('precision', '?')})" for r in runs})
    items = [
        ("runs trained on", ", ".join(sorted({r.get("host") or "?" for r in runs})) or "—"),
        ("device setting", ", ".join(devices) or "—"),
        ("memory measured as", "; ".join(MEM_KINDS.get(k, k) for k in kinds) or "—"),
        ("models", ", ".join(sorted({r.get("model") or "?" for r in runs})) or "—"),
        ("data fingerprints", "; ".join(f"{task}: " + ", ".join(f"{s}={f}" for s, f in sorted(data.items()))
                                        for task, data in _fingerprints(runs).items()) or "—"),
        ("git commit", _git_commit(Path(source).resolve().parent if source else Path.cwd())),
        ("report made with", f"Python {platform.python_version()} on {platform.platform()}; "
                             + ", ".join(f"{name} {_version(name)}" for name in PACKAGES)),
    ]
    return ("<h2>Environment</h2><dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in items) + "</dl>"
            "<p class=summary>Package versions are those of the environment the report was made in; the runs "
            "record their host and device settings.</p>")


def _fingerprints(runs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for run in runs:
        data = (run.get("spec") or {}).get("data")
        if data and not is_tuning_run(run):
            found.setdefault(run["task"], data)
    return found


def _git_commit(folder: Path) -> str:
    """The commit of the git checkout holding the store (where its configs usually live), ``+dirty`` when
    it has uncommitted changes; "not a git checkout" otherwise."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return f"{folder} is not in a git checkout"
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{commit.stdout.strip()}{' + uncommitted changes' if dirty else ''} (checkout of {folder})"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


# -- every run ---------------------------------------------------------------------------------------------

def _score(key: str):
    """A stored metric of the run's task (its main one) ×100."""
    def cell(run: dict[str, Any], metric: str | None) -> str:
        value = (run.get(key) or {}).get(metric)
        return f"{100 * value:.2f}" if value is not None else "—"
    return cell


def _verdict(run: dict[str, Any], metric: str | None) -> str:
    checked = stored_audit(run)
    return {True: "ok", False: f"{MISS_MARK} missed", None: "reference" if checked.get("reference") else "—"}[
        checked.get("ok")]


#: the table of every run: a run record field (shown with its header and format, :mod:`peftbench.record`) or a
#: ``(header, cell of a stored run and its task's main metric)`` computed from several
RUN_COLUMNS = (
    "run_id", "label", "task", "seed", ("best ×100", _score("best")), "best_step", ("final ×100", _score("final")),
    ("best any ×100", _score("best_any")),
    ("evals in budget", lambda run, _: f"{run.get('in_budget_evals', '—')}/{run.get('evaluations', '—')}"),
    "steps", ("adapter params", lambda run, _: human_count(stored_audit(run).get("final"))), ("budget", _verdict),
    "median_step_s", "peak_mem_bytes", "train_s", "sweep",
)


def runs_section(runs: list[dict[str, Any]], unfinished: list[dict[str, Any]], main_metric: dict[str, str]) -> str:
    header = [column[0] if isinstance(column, tuple) else record.header(column) for column in RUN_COLUMNS]
    rows = [[column[1](run, main_metric.get(run["task"])) if isinstance(column, tuple)
             else record.display(column, run.get(column)) for column in RUN_COLUMNS] for run in runs]
    out = [f"<h2>Runs</h2><details><summary>Every finished run ({len(runs)})</summary>"
           + html_table(header, rows, text_columns=3) + "</details>"]
    if unfinished:
        rows = [[r["run_id"], r["label"], r["task"], str(r["seed"]), r["status"], (r.get("error") or "")[:200]]
                for r in unfinished]
        out.append(f"<details><summary>Runs not finished ({len(unfinished)})</summary>"
                   + html_table(["run id", "method", "task", "seed", "status", "error"], rows, text_columns=3)
                   + "</details>")
    return "\n".join(out)


__all__ = ["write_report"]
