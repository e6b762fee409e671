"""A run's model, built one way for training, export, the conformance kit, budgets and the Ray worker.

:func:`assemble` loads the task's base model (:meth:`peftbench.task.Task.load_model`), finds the target modules
and the head, freezes the base, lets the active method inject its adapters, unfreezes the head, makes every
trainable tensor fp32 and, if asked, turns on activation checkpointing. :func:`resolve_precision` is the one rule
for ``train.precision: auto``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import modeling

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from .config import ModelConfig
    from .hookspecs import TargetModule
    from .host import Host
    from .task import Task


@dataclass
class Assembled:
    """What :func:`assemble` built."""

    model: nn.Module
    targets: list[TargetModule]  #: the adapted modules (:func:`peftbench.modeling.find_targets`)
    head: list[str]  #: the head's module names: trained by every method, exported as ``modules_to_save``
    head_count: int = 0  #: the head's parameters (0 when nothing was injected: the head stays as loaded)
    injected: Any = None  #: what ``peftbench_inject`` returned

    @property
    def head_names(self) -> set[str]:
        """The head's parameter names."""
        return modeling.head_parameter_names(self.model, self.head)


def assemble(mc: ModelConfig, task: Task, host: Host, seed: int, classifier_dropout: float | None = None, *,
             meta: bool = False, inject: bool = True, checkpointing: bool = False) -> Assembled:
    """Frozen base + the active method's adapters + the shared head, with the trainable parameters in fp32.

    ``seed`` seeds the new head (and ``random_init`` weights); the method's own initialisation follows from it.
    ``inject=False``: the base as loaded, with its targets and head, nothing frozen or injected (what budgets
    count on, with ``meta=True``: shapes only, no memory; ``host`` is not used then). ``checkpointing``: activation checkpointing of
    every layer (``train.gradient_checkpointing``)."""
    model = task.load_model(mc, seed, classifier_dropout, meta=meta)
    head = modeling.head_modules(mc, model)
    targets = modeling.find_targets(model, modeling.target_patterns(mc, model), head)
    if not inject:
        return Assembled(model, targets, head)
    modeling.freeze(model)
    injected = host.hook.peftbench_inject(model=model, targets=targets)
    head_count = modeling.unfreeze_head(model, head)
    modeling.trainable_to_fp32(model)  # adapters built on half-precision weights (model.dtype) took their dtype
    if checkpointing:
        enable_checkpointing(model)
    return Assembled(model, targets, head, head_count, injected)


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every layer, non-reentrant: works with a frozen base (reentrant checkpointing
    needs an input that requires a gradient). Forward statistics skip the recomputation
    (:func:`peftbench.lora.recomputing`)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def resolve_precision(precision: str, weights: str, bf16_gpu: bool) -> str:
    """``train.precision`` as a run trains with it: ``auto`` is autocast of the weights' dtype (``model.dtype``)
    for half-precision weights, on the CPU too; for fp32 weights bf16 on a GPU that has it (``bf16_gpu``), else
    fp32. An explicit precision that contradicts half-precision weights is a config error
    (:meth:`peftbench.config.Config.check_train`)."""
    if precision != "auto":
        return precision
    return weights if weights != "fp32" else "bf16" if bf16_gpu else "fp32"
