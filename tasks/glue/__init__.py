"""The eight GLUE tasks with their official metrics.

Data comes, in this order, from the config's ``data_dir``, ``$PEFTBENCH_GLUE_DIR`` (both laid out as
``<dir>/<Task>/train.tsv`` and ``dev.tsv``, MNLI ``dev_matched.tsv``/``dev_mismatched.tsv``: UTF-8,
tab-separated, no quoting, HF ``glue`` column names) or the hub (``datasets.load_dataset("nyu-mll/glue", task)``,
the name kept in :mod:`peftbench.hub`).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from peftbench import hub
from peftbench.errors import DataError
from peftbench.hookspecs import hookimpl
from peftbench.task import Split, Task

PEFTBENCH_API_VERSION = 2
__version__ = "1.0"

csv.field_size_limit(sys.maxsize)


def accuracy(predictions, labels):
    return {"accuracy": float(accuracy_score(labels, predictions))}


def accuracy_f1(predictions, labels):
    return {"accuracy": float(accuracy_score(labels, predictions)), "f1": float(f1_score(labels, predictions))}


def matthews(predictions, labels):
    return {"matthews": float(matthews_corrcoef(labels, predictions))}


def correlations(predictions, labels):
    if np.std(predictions) == 0:  # a constant prediction has no correlation (scipy would warn and give nan)
        pearson = spearman = 0.0
    else:
        pearson, spearman = float(pearsonr(predictions, labels)[0]), float(spearmanr(predictions, labels)[0])
    return {"pearson": pearson, "spearman": spearman, "corr": (pearson + spearman) / 2}


@dataclass
class GlueTask(Task):
    folder: str = ""  #: folder name in a local GLUE directory
    metric_fn: object = None
    hub_splits: tuple[str, ...] = ("train", "validation")

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return self.metric_fn(np.asarray(predictions), np.asarray(labels))

    def load(self, split: str, data_dir: str | None) -> Split:
        tried = []
        if data_dir:
            path = Path(data_dir) / self.folder / f"{split}.tsv"
            if path.exists():
                return self.read_tsv(path)
            tried.append(f"{path} (missing)")
        else:
            tried.append("no local folder (config data_dir and $PEFTBENCH_GLUE_DIR unset)")
        from peftbench.modeling import _hub_unreachable

        if _hub_unreachable():  # say so at once, not after minutes of the hub library's retries
            tried.append(f'the hub ("{hub.GLUE}"): unreachable from this machine (or HF_HUB_OFFLINE is set)')
        else:
            try:
                return self.load_hub(split)
            except Exception as exc:  # unknown split, ...
                tried.append(f'datasets.load_dataset("{hub.GLUE}", "{self.hub_name}") ({type(exc).__name__}: '
                             f"{str(exc).splitlines()[0] if str(exc) else ''})")
        raise DataError(f"task {self.name!r}: no {split!r} split found; looked in: " + "; ".join(tried)
                        + ". Set `data_dir` in the config or PEFTBENCH_GLUE_DIR to a GLUE folder.")

    @property
    def hub_name(self) -> str:
        return {"sst2": "sst2", "stsb": "stsb"}.get(self.name, self.name)

    def load_hub(self, split: str) -> Split:
        import datasets

        hub_split = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
                     "dev_mismatched": "validation_mismatched"}[split]
        ds = datasets.load_dataset(hub.GLUE, self.hub_name, split=hub_split)
        return Split([list(ds[f]) for f in self.text_fields], [float(x) for x in ds["label"]],
                     f"hub:{hub.GLUE}/{self.hub_name}/{hub_split}")

    def read_tsv(self, path: Path) -> Split:
        """Read a no-quoting TSV; malformed rows and labels outside the task's label set name file:line."""
        texts: list[list[str]] = [[] for _ in self.text_fields]
        labels: list[float] = []
        # utf-8-sig: a byte-order mark (some editors write one) is not part of the first column's name
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: empty file (expected a header row)")
                missing = [c for c in (*self.text_fields, "label") if c not in header]
                if missing:
                    raise DataError(f"{path}:1: header lacks column(s) {missing}; found {header}")
                text_cols = [header.index(c) for c in self.text_fields]
                label_col = header.index("label")
                for row in reader:
                    if not row:
                        continue
                    if len(row) != len(header):
                        raise DataError(f"{path}:{reader.line_num}: expected {len(header)} tab-separated fields, "
                                        f"got {len(row)} (the files use no quoting; a stray tab or newline?)")
                    for texts_of_field, col in zip(texts, text_cols):
                        texts_of_field.append(row[col])
                    labels.append(self._parse_label(row[label_col], path, reader.line_num))
            except UnicodeDecodeError as exc:  # decoded in blocks: find the line itself
                raise DataError(f"{path}:{_undecodable_line(path)}: not UTF-8 text ({exc.reason})") from None
            except csv.Error as exc:  # e.g. a NUL byte
                raise DataError(f"{path}:{reader.line_num}: unreadable row ({exc})") from None
        if not labels:
            raise DataError(f"{path}: no data rows")
        return Split(texts, labels, str(path))

    def _parse_label(self, raw: str, path: Path, line_no: int) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{path}:{line_no}: label {raw!r} is not a number") from None
        if self.is_regression:
            if not 0.0 <= value <= 5.0:
                raise DataError(f"{path}:{line_no}: similarity score {value} outside [0, 5]")
        elif not value.is_integer() or not 0 <= value < self.num_labels:
            raise DataError(f"{path}:{line_no}: label {raw!r} outside the task's labels "
                            f"0..{self.num_labels - 1} ({', '.join(self.label_names)})")
        return value


def _undecodable_line(path: Path) -> int:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return 0


#: in the column order of the AdaLoRA paper's GLUE table: peftbench's tables follow the order in which task
#: plugins register their tasks
GLUE_TASKS = [
    GlueTask("mnli", ("premise", "hypothesis"), 3, "accuracy", dev_splits=("dev_matched", "dev_mismatched"),
             folder="MNLI", metric_fn=accuracy, label_names=("entailment", "neutral", "contradiction")),
    GlueTask("sst2", ("sentence",), 2, "accuracy", folder="SST-2", metric_fn=accuracy,
             label_names=("negative", "positive")),
    GlueTask("cola", ("sentence",), 2, "matthews", folder="CoLA", metric_fn=matthews,
             label_names=("unacceptable", "acceptable")),
    GlueTask("qqp", ("question1", "question2"), 2, "accuracy", folder="QQP", metric_fn=accuracy_f1,
             label_names=("not_duplicate", "duplicate")),
    GlueTask("qnli", ("question", "sentence"), 2, "accuracy", folder="QNLI", metric_fn=accuracy,
             label_names=("entailment", "not_entailment")),
    GlueTask("rte", ("sentence1", "sentence2"), 2, "accuracy", folder="RTE", metric_fn=accuracy,
             label_names=("entailment", "not_entailment")),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, "accuracy", folder="MRPC", metric_fn=accuracy_f1,
             label_names=("not_equivalent", "equivalent")),
    GlueTask("stsb", ("sentence1", "sentence2"), 1, "corr", folder="STS-B", metric_fn=correlations),
]


@hookimpl
def peftbench_add_tasks():
    return GLUE_TASKS
