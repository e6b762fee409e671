"""Base classes of a task plugin: where the data comes from and how predictions are scored.

A task also owns what differs between kinds of task (nanoGPT's habit: the loop sees data only through
``get_batch`` and ``estimate_loss``): the model it trains (:meth:`Task.load_model`), its loaders
(:meth:`Task.loaders`), the evaluation of a split (:meth:`Task.evaluate`), the checks of its splits' labels
(:meth:`Task.check_labels`) and the PEFT task type of an export. :class:`Task` is a sequence classifier (or
regressor) scored on logits; :class:`GenerationTask` a causal LM scored on greedy generations. The trainer,
memory planning, export, the harness and the sweep's data check call these and never branch on ``kind``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from .errors import ConfigError, DataError
from .fields import PositiveInt

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from .config import ModelConfig, TrainConfig
    from .data import Encoded
    from .runs import RunSpec


@dataclass
class Split:
    """One split of a task as plain columns: ``texts`` is one list per text field, ``labels`` aligned."""

    texts: list[list[str]]
    labels: list[float]
    source: str  #: where the split was read from (file path or hub id), for messages and the run record

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Loaders:
    """A run's data as a task gives it to the training loop (:meth:`Task.loaders`)."""

    train: Any  #: the shuffled training batches
    dev: dict[str, Any]  #: one loader per evaluation split (a tuning run: ``holdout``); the first drives selection
    final: dict[str, Any] = field(default_factory=dict)  #: splits evaluated once, at the end (``final_splits``)
    #: a generation task: each evaluation split's references (its responses), by example index
    references: dict[str, list[str]] = field(default_factory=dict)
    tokenizer: Any = None
    #: the split whose evaluations choose the checkpoint (``train.select: validation``), out of the training data
    select: dict[str, Any] = field(default_factory=dict)
    #: a generation task: each evaluation split's prompt + response batches, for its ``gold_logprob``
    gold: dict[str, Any] = field(default_factory=dict)


def selection_key(metrics: dict[str, Any], names: tuple[str, ...]) -> tuple[float, ...]:
    """``metrics``' values of ``names``, compared as a tuple, higher first; a metric an evaluation lacks counts as
    ``-inf`` (a causal-LM evaluation that only chooses, ``select_on: gold_logprob``, has no answers)."""
    return tuple(float(metrics.get(name, -math.inf)) for name in names)


@dataclass
class Task:
    """A supervised sentence(-pair) classification or regression task: a sequence-classification head on the
    model, scored on its logits."""

    #: the kind of model the task trains, for display and identity: ``classification`` or ``causal_lm``
    #: (:class:`GenerationTask`); what differs by kind is in the methods below, not in branches on this name
    kind: ClassVar[str] = "classification"
    #: ``task_type`` of the exported ``adapter_config.json`` (``None``: PEFT's default, a plain ``PeftModel``)
    peft_task_type: ClassVar[str | None] = None
    #: the version of the task's scoring, in its runs' identity when set: results scored another way (an
    #: earlier metric) are other runs, retrained rather than mixed with these in a table
    scoring: ClassVar[str | None] = None
    #: metrics that break a tie on the main metric when a checkpoint is chosen, in order (higher is better): on
    #: a small selection split a coarse main metric ties often (GSM8K's strict match at 0 on every evaluation),
    #: and the earliest evaluation would win, the one trained least
    tie_break: ClassVar[tuple[str, ...]] = ()

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

    def selection_key(self, metrics: dict[str, float]) -> tuple[float, ...]:
        """What chooses between evaluations (checkpoints) and between grid points (tuning):
        :func:`selection_key` of the main metric, then the tie-break metrics in order."""
        return selection_key(metrics, (self.main_metric, *self.tie_break))

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

    # -- what differs by kind: the model, the data, the evaluation ------------------------------------------

    def load_model(self, mc: ModelConfig, seed: int, classifier_dropout: float | None = None,
                   meta: bool = False) -> nn.Module:
        """The base model this task trains (:func:`peftbench.modeling.load_model`): a sequence classifier."""
        from .modeling import load_model

        return load_model(mc, self.num_labels, seed, classifier_dropout, meta=meta)

    def loaders(self, spec: RunSpec, tokenizer, model: nn.Module) -> Loaders:
        """The run's loaders (:func:`peftbench.data.task_loaders`)."""
        from .data import task_loaders

        train, dev, select = task_loaders(spec, self, tokenizer)
        return Loaders(train, dev, tokenizer=tokenizer, select=select)

    def evaluate(self, model: nn.Module, split: str, loader, data: Loaders, accelerator
                 ) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, list]]:
        """The metrics of one evaluation split, what the run keeps of its final evaluation (none here), and the
        per-example predictions with their gold labels (``{"predictions", "labels"}``: class ids or values)."""
        metrics, examples = predict_and_score(model, loader, self, accelerator)
        return metrics, [], examples

    def check_labels(self, split: str, data: Split, where: str) -> None:
        """Every label is one of the task's classes (a finite number for regression)."""
        labels = np.asarray(data.labels, dtype=np.float64)
        if self.is_regression:
            bad = ~np.isfinite(labels)
            problem = "is not a finite number"
        else:
            bad = ~((labels == np.round(labels)) & (labels >= 0) & (labels < self.num_labels))
            problem = f"is outside the task's labels 0..{self.num_labels - 1}"
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: example {i}: label {data.labels[i]!r} {problem} "
                            f"({int(bad.sum())} such label(s))")

    def check_fits(self, data_dir: str | None, tokenizer: Callable[[], Any], max_length: int) -> None:
        """Before training: every example fits ``max_length`` (``tokenizer()`` gives the model's tokenizer);
        classification truncates: nothing to check."""

    def encode_train(self, data_dir: str | None, tokenizer, max_length: int) -> Encoded:
        """The training split as the trainer encodes it (memory planning reads its lengths)."""
        from .data import load_task_data

        return load_task_data(self, "train", data_dir, tokenizer, max_length, None)

    def check_loader(self, split: str, data_dir: str | None, tokenizer, train: TrainConfig):
        """Batches of ``split`` on which an exported adapter's logits are compared with the run's model."""
        from .data import load_task_data, make_loader

        data = load_task_data(self, split, data_dir, tokenizer, train.max_length, train.max_eval_samples)
        return make_loader(data, train.eval_batch_size, False, True, 0, tokenizer.pad_token_id or 0,
                           self.is_regression)


def predict_and_score(model, loader, task, accelerator) -> tuple[dict[str, float], dict[str, list]]:
    """The task's metrics of the model's predictions (class ids, or regression values) on ``loader``, and the
    predictions with the gold labels (in the loader's order: length-sorted, the same for every run of a task)."""
    import torch

    model.eval()
    predictions, labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            logits, batch_labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            predictions.append(logits.float().squeeze(-1) if task.is_regression else logits.argmax(-1))
            labels.append(batch_labels)
        preds = torch.cat(predictions).cpu().numpy()
        gold = torch.cat(labels).cpu().numpy()
    gold = gold.astype(np.float64) if task.is_regression else gold
    return task.compute_metrics(preds, gold), {"predictions": preds.tolist(), "labels": gold.tolist()}


#: the evaluation splits whose scores only choose, never reported: the validation split held out of a run's
#: training data (checkpoints, :func:`peftbench.data.selection_split`) and a tuning run's held-out part (grid
#: points, :mod:`peftbench.tuning`)
CHOOSING_SPLITS = ("validation", "holdout")


def per_example_scores(task: GenerationTask, texts: dict[int, str | None], references: list[str],
                       metrics: dict[str, float], gold: tuple[list[float], list[int]] | None) -> dict[str, Any]:
    """A generation split's per-example record: ``predictions``, each example's correctness by the main metric
    (1.0 or 0.0) against ``labels`` of 1, and ``metrics``: per metric, numerators (``predictions``) and
    denominators (``labels``) whose pooled ratio is the reported value: each example's score over 1 for every
    metric of :meth:`GenerationTask.score` that is a mean over examples (a corpus-level one is left out), the
    summed log-probability over the token count for ``gold_logprob``."""
    scores = {i: task.score([text], [references[i]]) for i, text in texts.items()}
    per_metric = {}
    for name in next(iter(scores.values()), {}):
        values = [float(score[name]) for score in scores.values()]
        if math.isclose(sum(values) / len(values), metrics.get(name, math.nan), abs_tol=1e-9):
            per_metric[name] = {"predictions": values, "labels": [1.0] * len(values)}
    if gold:
        per_metric["gold_logprob"] = {"predictions": list(gold[0]), "labels": [float(t) for t in gold[1]]}
    right = per_metric.get(task.main_metric, {}).get("predictions") or [
        float(score[task.main_metric]) for score in scores.values()]
    return {"predictions": right, "labels": [1.0] * len(right), "metrics": per_metric}


@dataclass
class GenerationOptions:
    """Options every generation task has (``task_options.<task>`` in a config)."""

    #: the prompt; ``{query}`` is replaced by the example's question or instruction
    prompt_template: str = "{query}"
    max_new_tokens: PositiveInt = 300  #: greedy generation stops after this many new tokens ...
    max_total_length: PositiveInt = 800  #: ... or at this many tokens, prompt included (past either cap: scored wrong)
    val_size: PositiveInt = 50  #: validation questions sampled from the training data (and removed from it)
    val_seed: int = 0  #: seed of that sample: the same questions for every method and seed
    #: how that sample is drawn: ``peftbench`` (numpy's ``default_rng(val_seed)``), or ``hf_peft`` as HF PEFT's
    #: MetaMathQA comparison draws it (``np.random.seed(val_seed)``, a shuffle of ``arange``, the first ``val_size``)
    val_sample: Literal["peftbench", "hf_peft"] = "peftbench"
    #: the switches below reproduce HF PEFT's MetaMathQA protocol (``protocol: hf_peft_metamathqa`` sets them all;
    #: docs/causal_lm.md); off, peftbench's own protocol
    #: training examples whose ``f"{query} {response}"`` is longer than this many characters are dropped
    max_chars: PositiveInt | None = None
    #: the loss on every token, prompt included (else on the response and its EOS only)
    loss_on_prompt: bool = False
    #: one string ``prompt + response`` tokenized with the tokenizer's own special tokens and cut to
    #: ``train.max_length``; no EOS appended: the first padding position of a batch is the EOS and is trained on
    #: (the longest example of a batch has none), as HF PEFT pads with EOS. Else ``[BOS] prompt``, then
    #: ``" " + response`` tokenized apart, then EOS
    answer_prefix_joined: bool = False
    #: training order: ``shuffle`` (seeded, length-grouped batches if ``train.group_by_length``), or ``bucket``: the
    #: file's order in buckets of 20 batches, each sorted longest first, one pass (HF PEFT's ``BucketIterator``)
    order: Literal["shuffle", "bucket"] = "shuffle"
    #: what the evaluations that only choose (:data:`CHOOSING_SPLITS`: a checkpoint, a grid point) score:
    #: ``answers``, greedy generations scored as the reported splits are (the main metric and its tie-breaks), or
    #: ``gold_logprob`` alone, teacher-forced, with no generation: a choice by likelihood, seconds instead of
    #: minutes per evaluation, for models too small for the answers to tell checkpoints apart (SmolLM2-135M's
    #: strict match is 0 on nearly every evaluation). The reported splits are always answered.
    select_on: Literal["answers", "gold_logprob"] = "answers"

    def __post_init__(self):
        if "{query}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{query}}, got {self.prompt_template!r}")


@dataclass
class GenerationTask(Task):
    """A causal-LM task: train on ``prompt + response`` (loss on the response only), evaluate by greedy
    generation from the prompt. A split's ``texts`` are ``[prompts, responses]`` (the template applied); its
    ``labels`` are unused. Subclasses define ``Options`` (a :class:`GenerationOptions`), ``load`` and ``score``."""

    kind: ClassVar[str] = "causal_lm"
    peft_task_type: ClassVar[str | None] = "CAUSAL_LM"  #: PeftModel.from_pretrained gives a PeftModelForCausalLM
    Options: ClassVar[type] = GenerationOptions
    #: whether :meth:`score` gets the text of a generation that ran into a cap (a
    #: :class:`~peftbench.generation.Capped`) instead of ``None``
    scores_unfinished: ClassVar[bool] = False
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

    def trained_form(self, split: Split) -> Split:
        """An evaluation split with its responses as the training split has them (the gold of its
        ``gold_logprob``): as they are, unless a task trains on another form of them."""
        return split

    def score(self, generations: list[str | None], references: list[str]) -> dict[str, float]:  # pragma: no cover
        """Metrics of ``generations`` (``None``: ran past a length cap, always wrong) against the references
        (the splits' responses)."""
        raise NotImplementedError

    # -- what differs by kind: the model, the data, the evaluation ------------------------------------------

    def load_model(self, mc: ModelConfig, seed: int, classifier_dropout: float | None = None,
                   meta: bool = False) -> nn.Module:
        """A causal (decoder-only) language model."""
        from .modeling import load_model

        return load_model(mc, 0, seed, classifier_dropout, meta=meta, causal_lm=True)

    def loaders(self, spec: RunSpec, tokenizer, model: nn.Module) -> Loaders:
        """Training on prompt + response, generation from the prompts (:func:`peftbench.lm_data.lm_loaders`);
        training batches ask for the response's logits only where the model's forward can."""
        from .lm_data import lm_loaders
        from .modeling import takes_logits_to_keep

        train, dev, final, references, select, gold = lm_loaders(spec, self, tokenizer,
                                                                 trim_logits=takes_logits_to_keep(model))
        return Loaders(train, dev, final, references, tokenizer, select, gold)

    def evaluate(self, model: nn.Module, split: str, loader, data: Loaders, accelerator
                 ) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, list] | None]:
        """Metrics of greedy generations (:func:`peftbench.generation.generate_and_score`) and ``gold_logprob``,
        the teacher-forced mean log-probability per token of the split's gold responses
        (:func:`peftbench.generation.gold_logprob`); the generations, one ``{split, index, reference,
        generation}`` each; and the per-example record of :func:`per_example_scores` (the paired tests of
        :mod:`peftbench.stats`). With ``select_on: gold_logprob``, a split that only chooses gets
        ``gold_logprob`` alone."""
        from .generation import generate_and_score, gold_logprob, gold_logprobs, pooled_logprob

        if self.options.select_on == "gold_logprob" and split in CHOOSING_SPLITS:
            return {"gold_logprob": gold_logprob(model, data.gold[split], accelerator)}, [], None
        references = data.references[split]
        metrics, texts = generate_and_score(model, loader, self, accelerator, data.tokenizer, references)
        gold = gold_logprobs(model, data.gold[split], accelerator) if split in data.gold else None
        if gold:
            metrics["gold_logprob"] = pooled_logprob(*gold)
        return metrics, [{"split": split, "index": i, "reference": references[i], "generation": text}
                         for i, text in texts.items()], per_example_scores(self, texts, references, metrics, gold)

    def check_labels(self, split: str, data: Split, where: str) -> None:
        """A generation task's labels are unused."""

    def encode_train(self, data_dir: str | None, tokenizer, max_length: int) -> Encoded:
        """Prompt + response, as the trainer encodes them."""
        from .lm_data import encode_lm

        return encode_lm(self.load("train", data_dir), tokenizer, max_length, with_response=True,
                         joined=self.options.answer_prefix_joined)

    def check_fits(self, data_dir: str | None, tokenizer: Callable[[], Any], max_length: int) -> None:
        """Every prompt leaves room for a response within ``max_length`` (a :class:`DataError` naming the example
        otherwise), checked before training as the trainer encodes them (the encodings are cached for it): an
        evaluation split's prompts alone (generation) and with their responses (``gold_logprob``)."""
        from .lm_data import encode_lm

        joined = self.options.answer_prefix_joined
        for split in ("train", *self.dev_splits, *self.final_splits):
            data = self.load(split, data_dir)
            encode_lm(self.trained_form(data) if split != "train" else data, tokenizer(), max_length,
                      with_response=True, joined=joined)
            if split != "train":
                encode_lm(data, tokenizer(), max_length, with_response=False, joined=joined)

    def check_loader(self, split: str, data_dir: str | None, tokenizer, train: TrainConfig):
        """The prompts of ``split``: agreement of the next-token predictions after each."""
        from . import lm_data

        data = lm_data.encode_lm(self.load(split, data_dir), tokenizer, train.max_length, with_response=False,
                                 joined=self.options.answer_prefix_joined)
        return lm_data.make_lm_loader(data, train.eval_batch_size, True, True, 0, lm_data.pad_id(tokenizer))
