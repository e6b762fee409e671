"""The peftbench hook contract: every hook a plugin may implement, in one place.

peftbench is a pluggy host (project name ``"peftbench"``). Everything is a plugin, the built-ins included:

* A **plugin module** is what an entry point in the ``peftbench`` group (or ``--plugin module:attr``, or
  the config's ``plugins:`` list) names. It implements the *discovery hooks* below to contribute method
  classes and tasks, and declares ``PEFTBENCH_API_VERSION`` (the major version of this contract it
  was written against; see :data:`API_VERSION`).
* A **method** is a subclass of :class:`peftbench.method.Method`. For every run the host creates one
  instance with that run's solved hyperparameters, registers it with the plugin manager for the duration
  of the run, and unregisters it afterwards. Its ``@hookimpl`` methods are the *run hooks* below.
  Because exactly one method instance is registered at a time, a method never sees another method's calls.
* An **observer** is any other plugin object that implements run hooks (a logger, a tracker, a test
  recorder): it is called for every run. The built-in progress bar is one
  (:class:`peftbench.observers.ProgressBar`, registered for a run unless ``--no-progress``). Observers
  implement the hooks called once per run, per log point or per evaluation (``peftbench_train_start``,
  ``peftbench_on_log``, ``peftbench_on_evaluate``, ``peftbench_train_end``, ``peftbench_run_end``); the
  per-step hooks are for methods.

Pluggy passes arguments by name, so an implementation may accept any subset of a hook's arguments; pluggy
refuses, on registration, an implementation with an argument the hook does not pass or a ``@hookimpl``
whose name is no hook. Hooks marked *first result* stop at the first implementation that returns something
other than ``None``.

Call order for one run (the trainer, :mod:`peftbench.trainer`, reads top to bottom in the same order)::

    peftbench_count_trainable / peftbench_solve_budget   (budget check, before any training)
    peftbench_inject                                     (once, on the frozen base model)
    peftbench_in_budget_from                             (once: from which step evaluations count)
    peftbench_train_start                                (once, optimizer built)
    peftbench_load_state_dict                            (only when the run resumes from a checkpoint)
    for every optimizer step:
        peftbench_extra_loss                             (every micro-batch, added to the task loss)
        peftbench_after_backward                         (gradients of the full step, before clipping)
        peftbench_after_optimizer_step                   (after optimizer/scheduler step, before zero_grad)
        peftbench_on_log                                 (every ``train.log_every`` steps and the last)
        peftbench_before_evaluate, peftbench_on_evaluate (every ``train.eval_every`` steps, if set)
    at every epoch end but the last:
        peftbench_before_evaluate, peftbench_on_evaluate
        peftbench_state_dict                             (with ``output.checkpoint: true``)
    peftbench_train_end                                  (once, before the final evaluation)
    peftbench_before_evaluate, peftbench_on_evaluate     (the final evaluation)
    peftbench_report                                     (once, merged into the stored run record)
    peftbench_run_end                                    (once: the finished run's record, for observers)
    peftbench_export_peft                                (``peftbench export``: the adapter in PEFT format)

In-budget selection (the fairness rule). A method that prunes or reallocates starts over its budget. An
evaluation counts toward the reported ("best") dev metric only if the adapter is in its final, budget-matched
form then: from the step :func:`peftbench_in_budget_from` names on, and always at the final evaluation. The
best of every evaluation is kept too (``best_any``), for information only.

A run hook that no registered plugin implements is never called: the trainer checks once, before the
loop, so a method that needs none of them costs nothing per step.

Shape changes. A checkpoint is refused (before anything is modified; the run then starts from scratch)
unless its tensors have the model's names and shapes, except in modules whose class declares
``peftbench_resizable = True``. A method whose parameters change shape during training (pruned ranks) marks
its layer class so, and the saved shapes are restored either by the layer itself, in
``_load_from_state_dict`` (the host loads the run's tensors with ``model.load_state_dict(..., strict=False)``;
resize in place, keeping the same ``Parameter`` objects, so the optimizer's param groups stay valid), or by
the method's :func:`peftbench_load_state_dict`, which runs before the tensors are loaded. The conformance
kit's ``state`` check restores every method through the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

    from .method import Method
    from .record import RunRecord
    from .runs import RunSpec
    from .task import Task

#: Major version of the plugin API: these hooks and the LoRA toolkit (:mod:`peftbench.lora`). Bumped only when
#: either changes incompatibly; a plugin module declares the version it targets as ``PEFTBENCH_API_VERSION``.
#: 2 added the toolkit; version 1 plugins still load (with a note naming what to change), others are refused.
API_VERSION = 2

hookspec = pluggy.HookspecMarker("peftbench")
hookimpl = pluggy.HookimplMarker("peftbench")


# ---------------------------------------------------------------------------------------------------------
# Types passed to and returned by hooks
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetModule:
    """One ``nn.Linear`` of the base model that adapters attach to (same list for every method of a run)."""

    name: str  #: dotted module path, e.g. ``bert.encoder.layer.3.attention.self.query``
    layer: int | None  #: transformer block index parsed from the name (``None`` outside the blocks)
    num_layers: int  #: number of transformer blocks in the model
    in_features: int
    out_features: int
    pattern: str  #: the ``target_modules`` entry it matched, e.g. ``"query"``


@dataclass(frozen=True)
class ParamCounts:
    """Trainable adapter parameters of a method (the head, trained by every method, is counted apart).

    ``final``: adapter parameters still in effect at the end of training, i.e. what an exported adapter holds
    (budget matching compares this with the target; a rank component masked out for good does not count);
    ``peak``: the largest trainable count at any point (differs from ``final`` for methods that start big
    and prune); ``nonzero``: expected number of non-zero adapter parameters at the end (differs for methods
    that zero entries inside tensors they keep, like PRILoRA's pruning of A). ``estimate``: ``final`` is a
    prediction that training may miss (e.g. AdaLoRA's triplet budget, whose count depends on the allocation);
    the measured counts are audited after every run either way.
    """

    final: int
    peak: int
    nonzero: int
    estimate: bool = False


@dataclass
class TrainState:
    """The trainer's state as seen by run hooks. Plugins may read everything and write ``logs``.

    The trainer passes its :class:`peftbench.trainer.LoopState`, a subclass that adds the loop's own
    bookkeeping (history, best-so-far...); rely on the fields below only.
    """

    step: int  #: optimizer steps completed before the current one (0-based index of the current step)
    total_steps: int  #: optimizer steps the run will take
    epoch: int
    optimizer: torch.optim.Optimizer  #: the plain torch optimizer (unwrapped); plugins may edit its state
    lr_scheduler: Any
    accelerator: Any  #: the ``accelerate.Accelerator`` of the run
    seed: int
    #: scalars a plugin wants shown in the progress bar and kept in the metrics history (e.g. current budget)
    logs: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Discovery hooks: implemented by plugin modules, called once when the host loads plugins
# ---------------------------------------------------------------------------------------------------------


@hookspec
def peftbench_add_methods() -> list[type[Method]]:
    """Contribute PEFT methods.

    Called once at start-up on every loaded plugin. Return a list of :class:`peftbench.method.Method`
    subclasses; each class's ``name`` must be unique across all plugins (a duplicate is reported as a failed
    plugin, not silently shadowed).
    """


@hookspec
def peftbench_add_tasks() -> list[Task]:
    """Contribute tasks (datasets plus metrics).

    Called once at start-up. Return a list of :class:`peftbench.task.Task` instances with unique names.
    """


# ---------------------------------------------------------------------------------------------------------
# Budget hooks: implemented by methods; called before training (``peftbench budget``, and first in ``run``)
# ---------------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def peftbench_count_trainable(model: nn.Module, targets: list[TargetModule], head: list[str]) -> ParamCounts:
    """Count the trainable parameters this method (with its current params) adds to ``targets``.

    Called before training on a *meta-device* model (shapes only, no memory): work from the shapes in
    ``targets`` (and ``model`` if the method trains base weights). ``head`` names the modules every method
    trains (pooler, classifier); they are counted apart, so leave them out. Must agree exactly with what
    :func:`peftbench_inject` creates (the conformance kit checks this). Returns :class:`ParamCounts`.
    """


@hookspec(firstresult=True)
def peftbench_solve_budget(model: nn.Module, targets: list[TargetModule], head: list[str], target: int,
                           tolerance: float) -> Any:
    """Solve this method's size hyperparameters so its final trainable count matches ``target``.

    ``target`` is the adapter budget in parameters (by default LoRA r=8 on the same ``targets``);
    ``tolerance`` the accepted relative miss. Return a new params object (same dataclass as
    ``method.params``) whose ``peftbench_count_trainable(...).final`` is as close to ``target`` as the
    method can get; the host audits the result and stops with exit 2 if it misses by more than
    ``tolerance``. Return ``None`` for methods that do not take part in budget matching (full fine-tuning).
    """


# ---------------------------------------------------------------------------------------------------------
# Run hooks: implemented by the method instance of the current run (and by observers)
# ---------------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def peftbench_inject(model: nn.Module, targets: list[TargetModule]) -> bool:
    """Attach the method's adapters to ``model`` in place (adapter injection).

    Called once per run, on CPU, before the model is moved to its device. Every parameter of ``model`` is
    frozen when this is called; create trainable parameters (or unfreeze existing ones). The classifier head
    is made trainable by the host afterwards. Return ``True`` (first result).
    """


@hookspec(firstresult=True)
def peftbench_in_budget_from(total_steps: int) -> int:
    """The number of completed optimizer steps from which this method's adapter is in its final,
    budget-matched form, in a run of ``total_steps`` steps (a pure function of the params and
    ``total_steps``: ``peftbench budget`` calls it before training to show which evaluations will count).

    Dev evaluations before that step are kept in the history but never become the reported metric; the final
    evaluation (after :func:`peftbench_train_end`) always counts. Not implemented: 0 (LoRA, whose size never
    changes). AdaLoRA: the step that freezes its final mask; PrunedLoRA: the step after its last pruning event.
    """


@hookspec
def peftbench_train_start(model: nn.Module, state: TrainState) -> None:
    """Called once after the optimizer and scheduler exist, before the first batch.

    Use it to set up per-run state that depends on ``state.total_steps`` or on the device
    (schedules, buffers, forward hooks).
    """


@hookspec
def peftbench_extra_loss(model: nn.Module, state: TrainState) -> torch.Tensor | None:
    """An extra loss term added to the task loss (regularisation), for every micro-batch.

    Return a scalar tensor (it is added as is, so include its weight) or ``None``. The results of all
    implementations are summed.
    """


@hookspec
def peftbench_after_backward(model: nn.Module, state: TrainState) -> None:
    """Called once per optimizer step after the gradients of the whole (accumulated) step exist, before
    gradient clipping and ``optimizer.step()``. ``state.step`` is the index of the step about to be taken.

    For gradient-based pruning and importance estimates that must see the raw gradient. A plugin that
    changes parameter shapes here must also update ``state.optimizer`` (its param groups and state).
    """


@hookspec
def peftbench_after_optimizer_step(model: nn.Module, state: TrainState) -> None:
    """Called once per optimizer step after ``optimizer.step()`` and the scheduler step, before
    ``zero_grad()`` (gradients are still present). ``state.step`` is the index of the step just taken.

    For masking, magnitude pruning and rank reallocation that act on the updated weights.
    """


@hookspec
def peftbench_on_log(model: nn.Module, state: TrainState, record: dict[str, Any]) -> None:
    """Called at every log point (every ``train.log_every`` optimizer steps, and after the last) with the
    record just added to the run's history: ``step``, ``epoch``, ``loss`` (mean training loss since the
    previous log point, averaged over processes), ``lr`` and the scalars of ``state.logs``.

    For observers (loggers, trackers, the progress bar); ``record`` is a copy, changing it changes nothing.
    The loss is read from the device here anyway, so an observer adds no host-device sync.
    """


@hookspec
def peftbench_before_evaluate(model: nn.Module, state: TrainState) -> Callable[[], None] | None:
    """Called before every dev evaluation: put the adapter in the form it is evaluated in, and return a
    function that undoes it (called right after the evaluation), or ``None``.

    For methods whose training-time adapter is larger than the one they report: PRILoRA applies its current
    pruning mask, so its dev metrics are those of the pruned adapter, then restores the entries it zeroed,
    so that training continues exactly as without the evaluation.
    """


@hookspec
def peftbench_on_evaluate(model: nn.Module, state: TrainState, metrics: dict[str, float], in_budget: bool) -> None:
    """Called after every dev evaluation with the dev metrics (observers: loggers, trackers): at
    ``train.eval_every`` steps, at every epoch end but the last, and once after ``peftbench_train_end``.
    ``metrics`` holds the first dev split's metrics unprefixed and the others' as ``<split>_<metric>``;
    ``in_budget``: whether this evaluation counts toward the reported metric (an observer that shows a "best so
    far" takes only those, like the run's result).
    """


@hookspec
def peftbench_state_dict(model: nn.Module, state: TrainState) -> dict[str, Any]:
    """Training state the method keeps outside the model's parameters and buffers and the optimizer
    (importance scores, schedule counters, masks held in Python), for resumable checkpoints
    (``output.checkpoint: true``). Called at every epoch end but the last.

    Return a dict of tensors, numbers, strings, lists and dicts: it is saved with ``torch.save`` and loaded
    with ``weights_only=True``, so no other objects. The dicts of all implementations are merged, so use keys
    unique to your plugin. A method that implements any of ``peftbench_extra_loss``,
    ``peftbench_after_backward``, ``peftbench_after_optimizer_step`` or ``peftbench_on_evaluate`` is resumed
    only if it implements this hook and :func:`peftbench_load_state_dict`; otherwise its runs take no
    checkpoints and restart from scratch.
    """


@hookspec
def peftbench_load_state_dict(model: nn.Module, state: TrainState, state_dict: dict[str, Any]) -> None:
    """Restore what :func:`peftbench_state_dict` returned, when a run resumes from a checkpoint.

    Called right after ``peftbench_train_start`` (which runs as on a fresh start), before the first batch,
    with ``state.step``, ``state.epoch`` and ``state.logs`` already set to the checkpoint's, and *before* the
    model's trainable tensors and buffers, the optimizer and the scheduler are loaded. The checkpoint's
    tensor names and shapes have been checked by then (see *Shape changes* above): a method whose layers do
    not restore a saved shape themselves gives its parameters the saved shapes here (and updates
    ``state.optimizer``'s param groups to match), then the host copies the saved values in.
    """


@hookspec
def peftbench_train_end(model: nn.Module, state: TrainState) -> None:
    """Called once after the last optimizer step, before the final dev evaluation (final pruning events,
    freezing masks)."""


@hookspec(firstresult=True)
def peftbench_export_peft(model: nn.Module, targets: list[TargetModule]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The trained adapter in HF PEFT's format, for ``peftbench export``.

    Called after training on the trained model. Return ``(adapter_config, state_dict)``: ``adapter_config``
    is the dict written to ``adapter_config.json`` (e.g. ``peft_type: "LORA"``, ``r``, ``lora_alpha``,
    ``target_modules``, ``rank_pattern``, ``alpha_pattern``), ``state_dict`` maps PEFT's key names
    (``base_model.model.<module>.lora_A.weight``) to tensors. Methods whose adapters are not LoRA-shaped may
    fold them into LoRA form (AdaLoRA: ``B·diag(E)`` and ``A`` of the kept triplets). The host adds the head
    (``modules_to_save``). Return ``None`` if the method cannot be exported.
    """


@hookspec
def peftbench_report(model: nn.Module, state: TrainState) -> dict[str, Any]:
    """Method-specific results to store with the run (JSON-serialisable). All returned dicts are merged into
    the run record's ``method_report``. Conventional keys, read by ``peftbench plot`` and tables:

    * ``ranks``: ``{module_name: final_rank}``
    * ``rank_history``: ``[{"step": int, "ranks": {module_name: rank}}, ...]`` (methods that change ranks)
    * ``counts``: ``{"final": int, "peak": int, "nonzero": int}`` measured on the trained model
    * ``sparsity``: fraction of zero entries in the adapter (methods that prune entries)
    """


@hookspec
def peftbench_run_end(spec: RunSpec, record: RunRecord) -> None:
    """Called once when a run has finished training, after its final evaluation and ``peftbench_report``,
    with the run (``spec``) and its :class:`peftbench.record.RunRecord`: the fields the store will keep of it,
    as they will be stored: ``best`` (the reported, best in-budget dev metrics) and ``best_step``, ``final``,
    ``steps``, the measured counts (``trainable``), the costs (``median_step_s``, ``tokens_per_s``,
    ``peak_mem_bytes``, ``train_s``, ``adapter_bytes``...) and ``method_report``. The sweep adds ``budget``,
    ``audit`` and ``artifacts`` when it stores the run (``None`` here).

    For observers (trackers, loggers: :class:`peftbench.trackers.Tracker` logs ``best/`` and ``final/``
    metrics here): read the record, never the trainer's state, whose other fields are not part of this
    contract. Not called for a run that failed.
    """
