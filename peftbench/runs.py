"""Expanding a config into runs (method × task × seed) with stable ids."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .config import ADDED_MODEL_KEYS, ADDED_TRAIN_KEYS, Config, ModelConfig, TrainConfig, data_dir_for
from .schema import to_dict

#: the model-selection rule of ``best``: the best dev evaluation at which the method was within its budget
SELECTION = "in_budget"
#: how evaluations sit in training: at most one per step, drawing nothing from the training RNG (earlier, each
#: one drew a DataLoader seed, so ``eval_every`` changed the dropout noise of later steps)
EVALUATION = "once_per_step_rng_isolated"
#: how the reported split is scored: once per run, at the checkpoint ``train.select`` chose (earlier, ``best`` was
#: the best of every dev evaluation: the reported split chose the checkpoint)
SCORING = "dev_once_at_selected"
#: constants of this version in a run's identity, not :class:`RunSpec` fields
IDENTITY_CONSTANTS = ("selection", "evaluation", "scoring")


@dataclass
class RunSpec:
    sweep: str
    label: str  #: row name (method variant)
    method: str  #: registered method name
    params: Any  #: the method's solved Params dataclass
    task: str
    seed: int
    model: ModelConfig
    train: TrainConfig
    data_dir: str | None
    save_adapters: bool = True
    #: content fingerprint of each split the run reads (``{"train": ..., "dev": ...}``): changed data is a new run;
    #: ``scoring``: the task's :attr:`~peftbench.task.Task.scoring` version, where it has one
    data: dict[str, str] = field(default_factory=dict)
    #: a tuning run (:mod:`peftbench.tuning`): ``{"holdout", "split_seed", "point", "index"}``; it trains on the
    #: training set minus the held-out part and evaluates on that part only
    tuning: dict[str, Any] | None = None
    #: a run at a tuned setting: ``{"values", "grid", "holdout", "split_seed", "seeds"}`` (how it was chosen)
    tuned: dict[str, Any] | None = None
    #: where the run reports besides the store (``output.trackers``, ``output.dir``): not part of its identity
    trackers: list[str] = field(default_factory=list)
    out_dir: str | None = None
    #: the task's options as the config gives them (``task_options.<task>``), None without any
    task_options: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """Everything that determines the result (and nothing that does not, like the sweep name or the data's
        path: its content is in ``data``)."""
        # training keys added later are left out at their default: older runs keep their ids
        train = {k: v for k, v in to_dict(self.train).items() if k not in ADDED_TRAIN_KEYS or v != ADDED_TRAIN_KEYS[k]}
        model = to_dict(self.model)
        if isinstance(model, dict):
            model = {k: v for k, v in model.items() if k not in ADDED_MODEL_KEYS or v != ADDED_MODEL_KEYS[k]}
        identity = {
            "method": self.method, "params": to_dict(self.params), "task": self.task, "seed": self.seed,
            "model": model, "train": train, "label": self.label,
            # how `best` is selected: a result stored under the earlier rule (best of any evaluation, over-budget
            # ones included) is another run, retrained rather than reported as in budget
            "selection": SELECTION,
            # a run trained before evaluations stopped touching the training RNG is retrained too
            "evaluation": EVALUATION,
            # a run that reported its best of N dev evaluations (and trained the head at the method's rate) is
            # retrained too
            "scoring": SCORING,
        }
        if self.data:
            identity["data"] = dict(self.data)
        for role in ("tuning", "tuned", "task_options"):  # absent from untuned runs: their ids stay as they were
            if getattr(self, role) is not None:
                identity[role] = getattr(self, role)
        return identity

    def stored(self, plugins: list[str]) -> dict[str, Any]:
        """The spec as the store keeps it: the identity, plus what finds the run's inputs again but does not
        determine its result (so not in its id): the plugins its method and task came from (``plugins:``,
        ``--plugin``; for ``peftbench export``) and the data folder it read (for ``export --check``)."""
        stored = {**self.identity(), "plugins": plugins} if plugins else self.identity()
        stored["data_dir"] = os.path.abspath(self.data_dir) if self.data_dir else None
        return stored

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand(config: Config, solved: dict[tuple[str, str], Any],
           data: dict[str, dict[str, str]] | None = None, seeds: list[int] | None = None) -> list[RunSpec]:
    """All runs of ``config``; ``solved[(label, task)]`` holds each method's budget-solved params, ``data[task]``
    the content fingerprints of the task's splits (:func:`peftbench.sweep.check_data`); ``seeds``: other seeds
    than the sweep's (the tuning seeds)."""
    runs = []
    for method in config.methods:
        for task in config.tasks:
            for seed in config.seeds if seeds is None else seeds:
                runs.append(RunSpec(
                    sweep=config.name, label=method.label, method=method.name,
                    params=solved[(method.label, task)].params, task=task, seed=seed, model=config.model,
                    train=config.train_for(method, task), data_dir=data_dir_for(config),
                    save_adapters=config.output.save_adapters, data=(data or {}).get(task, {}),
                    trackers=list(config.output.trackers), out_dir=config.output.dir,
                    task_options=dict(config.task_options[task]) if config.task_options.get(task) else None,
                ))
    return runs
