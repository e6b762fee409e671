"""Base class of a task plugin: where the data comes from and how predictions are scored."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Split:
    """One split of a task as plain columns: ``texts`` is one list per text field, ``labels`` aligned."""

    texts: list[list[str]]
    labels: list[float]
    source: str  #: where the split was read from (file path or hub id), for messages and the run record

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Task:
    """A supervised sentence(-pair) classification or regression task."""

    name: str  #: lower-case id used in configs, e.g. ``"rte"``
    text_fields: tuple[str, ...]  #: column names of the one or two input texts
    num_labels: int  #: number of classes, or 1 for regression
    main_metric: str  #: metric used for best-dev selection and the comparison table
    dev_splits: tuple[str, ...] = ("dev",)  #: evaluation splits; the first one drives best-dev selection
    label_names: tuple[str, ...] = field(default=())

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def load(self, split: str, data_dir: str | None) -> Split:  # pragma: no cover - interface
        """Return ``split`` (``"train"`` or one of ``dev_splits``)."""
        raise NotImplementedError

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:  # pragma: no cover
        """Metrics of class ids (or regression values) ``predictions`` against ``labels``."""
        raise NotImplementedError
