"""A run's metric history as CSV: ``<output.dir>/<run_id>/history.csv``, written when the run finishes.

One row per history entry, in order. Columns: ``step`` (optimizer steps completed), ``epoch``, ``kind``
(``log``: a log point, every ``train.log_every`` steps and the last; ``eval``: a dev evaluation), ``loss``
(mean training loss since the previous log point; log rows), ``lr`` (log rows), ``in_budget`` (eval rows:
``true`` if the evaluation counted toward the reported metric), then the dev metrics (eval rows; a second dev
split's prefixed with its name, e.g. ``validation_mismatched_accuracy``) and the method's logs (e.g. ``rank``,
``adapter_params``, ``adalora_budget``), each sorted by name. A cell a row has no value for is empty.
Numbers are written as Python's ``repr`` (round-trips exactly). See docs/results-schema.md.

A causal-LM run also writes ``generations.jsonl``: the greedy generations of its reported checkpoint (those its
dev and test metrics score), one JSON object per line (``checkpoint``: ``selected``, ``step``, ``split``,
``index`` in the split, ``reference``, ``generation``: ``null`` where it ran into a cap).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .atomic import atomic_write

FIXED = ("step", "epoch", "kind", "loss", "lr", "in_budget")


def history_csv(history: list[dict[str, Any]]) -> str:
    evaluated = sorted({k for h in history if "in_budget" in h for k in h} - set(FIXED))
    logged = sorted({k for h in history if "in_budget" not in h for k in h} - set(FIXED) - set(evaluated))
    columns = [*FIXED, *evaluated, *logged]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for entry in history:
        row = {**entry, "kind": "eval" if "in_budget" in entry else "log"}
        writer.writerow([_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def write_history(out_dir: str | Path, run_id: str, history: list[dict[str, Any]]) -> Path:
    path = Path(out_dir) / run_id / "history.csv"
    with atomic_write(path, "w") as f:
        f.write(history_csv(history))
    return path


def write_generations(out_dir: str | Path, run_id: str, generations: list[dict[str, Any]]) -> Path:
    path = Path(out_dir) / run_id / "generations.jsonl"
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
    return path


__all__ = ["FIXED", "history_csv", "write_generations", "write_history"]
