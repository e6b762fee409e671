"""Base class of a task plugin: where the data comes from and how predictions are scored."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError
from .fields import PositiveInt


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

    #: how the trainer builds the model and evaluates it: ``classification`` (a sequence-classification head,
    #: scored on logits) or ``causal_lm`` (:class:`GenerationTask`: a causal LM, scored on generations)
    kind: ClassVar[str] = "classification"

    name: str  #: lower-case id used in configs, e.g. ``"rte"``
    text_fields: tuple[str, ...]  #: column names of the one or two input texts
    num_labels: int  #: number of classes, or 1 for regression
    main_metric: str  #: metric used for best-dev selection and the comparison table
    dev_splits: tuple[str, ...] = ("dev",)  #: evaluation splits; the first one drives best-dev selection
    label_names: tuple[str, ...] = field(default=())
    #: splits evaluated once, at the end of a run (e.g. a test set too large to evaluate every few steps); their
    #: metrics go into ``final`` with the split's name as prefix
    final_splits: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def with_options(self, options: dict[str, Any] | None, where: str = "") -> Task:
        """This task configured by the config's ``task_options.<name>`` (a task without options takes none)."""
        if options:
            raise ConfigError(f"{where}task_options.{self.name}: task {self.name!r} takes no options "
                              f"(given {sorted(options)})")
        return self

    def load(self, split: str, data_dir: str | None) -> Split:  # pragma: no cover - interface
        """Return ``split`` (``"train"`` or one of ``dev_splits``)."""
        raise NotImplementedError

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:  # pragma: no cover
        """Metrics of class ids (or regression values) ``predictions`` against ``labels``."""
        raise NotImplementedError


@dataclass
class GenerationOptions:
    """Options every generation task has (``task_options.<task>`` in a config)."""

    #: the prompt; ``{query}`` is replaced by the example's question or instruction
    prompt_template: str = "{query}"
    max_new_tokens: PositiveInt = 300  #: greedy generation stops after this many new tokens ...
    max_total_length: PositiveInt = 800  #: ... or at this many tokens, prompt included (past either cap: scored wrong)
    val_size: PositiveInt = 50  #: validation questions sampled from the training data (and removed from it)
    val_seed: int = 0  #: seed of that sample: the same questions for every method and seed

    def __post_init__(self):
        if "{query}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{query}}, got {self.prompt_template!r}")


@dataclass
class GenerationTask(Task):
    """A causal-LM task: train on ``prompt + response`` (loss on the response only), evaluate by greedy
    generation from the prompt. A split's ``texts`` are ``[prompts, responses]`` (the template applied); its
    ``labels`` are unused. Subclasses define ``Options`` (a :class:`GenerationOptions`), ``load`` and ``score``."""

    kind: ClassVar[str] = "causal_lm"
    Options: ClassVar[type] = GenerationOptions
    options: Any = None

    def __post_init__(self):
        if self.options is None:
            self.options = self.Options()

    def with_options(self, options: dict[str, Any] | None, where: str = "") -> GenerationTask:
        from .schema import from_dict, to_dict

        if not options:
            return self
        values = {**to_dict(self.options), **options}
        return replace(self, options=from_dict(self.Options, values, f"task_options.{self.name}", where))

    def prompt(self, query: str) -> str:
        return self.options.prompt_template.replace("{query}", query)

    def score(self, generations: list[str | None], references: list[str]) -> dict[str, float]:  # pragma: no cover
        """Metrics of ``generations`` (``None``: ran past a length cap, always wrong) against the references
        (the splits' responses)."""
        raise NotImplementedError
