"""One training loop for every method (CPU or GPU): read it top to bottom.

Method-specific behaviour enters only through the run hooks of :mod:`peftbench.hookspecs`; a hook no
plugin implements is skipped without a call, so plain LoRA pays nothing for AdaLoRA's machinery.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from . import modeling, schedule
from .assembly import assemble, resolve_precision
from .checkpoint import Checkpoint
from .costs import PeakMemory
from .export import adapter_file_bytes
from .hookspecs import TrainState
from .host import Host
from .method import Method
from .observers import ProgressBar, observing
from .record import RunRecord
from .runs import RunSpec
from .schedule import evaluates_every
from .task import Loaders
from .trackers import run_trackers


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    """What training one run gives: the :class:`~peftbench.record.RunRecord` fields marked ``result`` (by
    name, or computed from these: the median step time), and what the store does not keep (weights,
    generations)."""

    #: the reported dev metrics, at the selected checkpoint (``train.select``): the best in-budget evaluation on
    #: the validation split (by the task's main metric), the final model, or the best in-budget dev evaluation
    best: dict[str, float]
    #: dev metrics after the last step (``select: validation``: only when that is the selected checkpoint, else
    #: empty: dev is scored once)
    final: dict[str, float]
    best_step: int  #: the selected checkpoint's step
    #: dev metrics at the best of all evaluations, over-budget ones included (information; ``select: validation``:
    #: only when that is the selected checkpoint, else empty)
    best_any: dict[str, float]
    best_any_step: int
    in_budget_from: int  #: completed steps from which evaluations count (:func:`peftbench_in_budget_from`)
    evaluations: int  #: dev evaluations in the run
    in_budget_evals: int  #: those that counted toward ``best``
    history: list[dict[str, Any]]  #: one entry per evaluation / log point
    trainable: dict[str, int]  #: measured counts: adapter (dense), nonzero, head, total model
    wall_s: float
    train_s: float
    tokens_per_s: float
    peak_mem_bytes: int
    mem_kind: str
    steps: int
    step_times: list[float] = field(default_factory=list)  #: seconds per optimizer step (evaluation excluded)
    method_report: dict[str, Any] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None  #: trainable weights at the best evaluation (CPU)
    adapter_bytes: int | None = None  #: size of the exported adapter file (:func:`exported_bytes`)
    #: memory in use over the run, sampled every 50 ms: ``{"avg", "p99", "samples"}`` (same kind as the peak)
    mem_stats: dict[str, int] | None = None
    #: seconds spent evaluating (generation, for a causal-LM task): the choosing evaluations, inside ``train_s``,
    #: and the reported splits' scoring after it
    eval_s: float = 0.0
    #: a causal-LM task: the reported checkpoint's generations (dev and test, those its metrics score), one
    #: ``{checkpoint: "selected", step, split, index, reference, generation}`` each (``generation`` ``None``: ran
    #: into a length cap), written to the run's ``generations.jsonl``
    generations: list[dict[str, Any]] = field(default_factory=list)
    #: per-example predictions of the reported scorings, per split (dev splits, then final ones: a test set):
    #: ``{"predictions": [...], "labels": [...]}`` (a generation task adds ``metrics``: :func:`peftbench.task.per_example_scores`)
    #: (regression: values; classification: label ids; causal LM: correctness 0/1 against labels of 1)
    dev_predictions: dict[str, dict[str, list]] = field(default_factory=dict)
    #: trainable weights after the last step (CPU, evaluated form), for ``peftbench export --checkpoint final``:
    #: only with ``output.save_adapters`` and where the selected checkpoint is another one
    final_state: dict[str, torch.Tensor] | None = None


@dataclass
class LoopState(TrainState):
    """Everything the loop changes: the run hooks' :class:`TrainState` plus the loop's own bookkeeping.

    The checkpoint saves and restores it whole (:meth:`state_dict`, :meth:`load_state_dict`), so a resumed
    run continues with the state an uninterrupted one has at that epoch end.
    """

    history: list[dict[str, Any]] = field(default_factory=list)  #: one entry per evaluation / log point
    in_budget_from: int = 0  #: evaluations from this completed step on count toward ``best_*`` (and the final)
    best_score: float = -math.inf  #: the task's main dev metric at the best in-budget evaluation so far
    #: that evaluation's main metric and the task's tie-breaking ones (:attr:`peftbench.task.Task.tie_break`)
    best_key: tuple[float, ...] = (-math.inf,)
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int = 0
    #: trainable weights at the best in-budget evaluation (CPU), in its evaluated form (PRILoRA: pruned)
    best_weights: dict[str, torch.Tensor] | None = None
    best_predictions: dict[str, dict[str, list]] = field(default_factory=dict)  #: ``select: dev``: the best's
    best_generations: list[dict[str, Any]] = field(default_factory=list)  #: ``select: dev``: the best's (causal LM)
    best_any_score: float = -math.inf  #: the same over every evaluation, over-budget ones included (information)
    best_any_key: tuple[float, ...] = (-math.inf,)  #: its selection key (:meth:`peftbench.task.Task.selection_key`)
    best_any_metrics: dict[str, float] = field(default_factory=dict)
    best_any_step: int = 0
    evaluations: int = 0
    in_budget_evals: int = 0
    step_times: list[float] = field(default_factory=list)  #: seconds per optimizer step (evaluation excluded)
    running_loss: torch.Tensor | None = None  #: loss summed since the last log point (on the device)
    micro_batches: int = 0  #: micro-batches summed into ``running_loss``
    tokens: int = 0  #: every process' tokens up to the last :meth:`count_tokens`
    new_tokens: torch.Tensor | None = None  #: this process' tokens since then (on the device: no sync per batch)
    train_started: float = 0.0  #: ``time.perf_counter()`` when training began (moved back by a resume)
    eval_s: float = 0.0  #: seconds spent evaluating so far

    def count_tokens(self) -> int:
        """Every process' tokens so far (a collective: call it on every process)."""
        self.tokens += int(self.accelerator.reduce(self.new_tokens, reduction="sum"))
        self.new_tokens.zero_()
        return self.tokens

    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain data for a checkpoint (collectives: call it on every process)."""
        self.count_tokens()
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SAVED}
        saved["running_loss"] = self.accelerator.reduce(self.running_loss, reduction="mean")  # every process'
        saved["train_s"] = time.perf_counter() - self.train_started
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        saved = dict(saved)
        self.running_loss.copy_(saved.pop("running_loss"))
        self.train_started = time.perf_counter() - saved.pop("train_s")
        self.logs.clear()
        self.logs.update(saved.pop("logs"))
        for name, value in saved.items():
            setattr(self, name, value)
        # a tuple again (and, from a checkpoint written before tie-breaking, the saved best score alone)
        self.best_key = tuple(saved.get("best_key", (self.best_score,)))
        self.best_any_key = tuple(saved.get("best_any_key", (self.best_any_score,)))


#: live objects and per-process counters: rebuilt by every (re)start, not saved
_NOT_SAVED = {"optimizer", "lr_scheduler", "accelerator", "new_tokens", "train_started"}


@dataclass
class Run:
    """What :func:`setup` builds for one run: fixed during training (what changes is in ``state``)."""

    spec: RunSpec
    task: Any
    accelerator: Accelerator
    model: torch.nn.Module  #: as prepared by accelerate (DDP-wrapped; compiled in place), for forward passes
    raw_model: torch.nn.Module  #: the unwrapped model, what hooks see
    optimizer: Any
    scheduler: Any
    train_loader: Any
    dev_loaders: dict[str, Any]
    head_names: set[str]
    head_count: int
    hooks: set[str]  #: the run hooks some registered plugin implements; the others are never called
    state: LoopState
    use_cpu: bool
    started: float  #: ``time.perf_counter()`` at the start of setup
    targets: list = field(default_factory=list)  #: the adapted modules (:func:`peftbench.modeling.find_targets`)
    head: list[str] = field(default_factory=list)  #: the head's module names (exported as ``modules_to_save``)
    memory: PeakMemory | None = None  #: measures the run's peak memory (set by :func:`train`)
    #: the loaders of the task's final-only splits (prepared), evaluated once at the end
    final_loaders: dict[str, Any] = field(default_factory=dict)
    data: Loaders | None = None  #: what the task gave (:meth:`peftbench.task.Task.loaders`), for its evaluation
    generations: list[dict[str, Any]] = field(default_factory=list)  #: of the reported scoring (:class:`RunResult`)
    #: the loaders whose evaluations choose the checkpoint (``train.select``): the validation split, the dev
    #: splits themselves (``dev``), or none (``final``)
    select_loaders: dict[str, Any] = field(default_factory=dict)


def train(spec: RunSpec, host: Host, method: Method, progress: bool = True,
          checkpoint: Checkpoint | None = None) -> RunResult:
    """Train one run (``method`` is registered with ``host`` for it): set up, loop, evaluate.

    ``progress``: show a progress bar (the :class:`~peftbench.observers.ProgressBar` observer); the run's
    experiment trackers (``output.trackers``, :mod:`peftbench.trackers`) are observers of it too;
    ``checkpoint``: resume from it if it holds a usable checkpoint, and save to it at every epoch end.
    """
    bar = ProgressBar(f"{spec.label}/{spec.task}/s{spec.seed}", host.task(spec.task).main_metric)
    tf32 = spec.train.tf32 and spec.train.device != "cpu" and torch.cuda.is_available()
    with (observing(host, *([bar] if progress else []), *run_trackers(spec)), tf32_matmuls(tf32),
          PeakMemory(cpu=_uses_cpu(spec.train)) as memory):
        result = loop(setup(spec, host, memory), host, checkpoint)
        if host.implemented("peftbench_run_end"):  # observers get the finished run as the store will keep it
            host.hook.peftbench_run_end(spec=spec, record=RunRecord.from_result(spec, result, host.plugin_specs()))
        return result


@contextmanager
def tf32_matmuls(enabled: bool):
    """TF32 for fp32 matmuls while the block runs if ``enabled`` (``train.tf32``), the previous setting after.
    The fp32 LoRA layers then take their unmerged path (:func:`~peftbench.lora.merge_is_exact`)."""
    previous = torch.get_float32_matmul_precision()
    if enabled:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def loop(run: Run, host: Host, checkpoint: Checkpoint | None) -> RunResult:
    """The training loop, from ``peftbench_train_start`` to the final evaluation."""
    cfg, state, has, hook = run.spec.train, run.state, run.hooks, host.hook
    model, raw_model, accelerator = run.model, run.raw_model, run.accelerator
    if "peftbench_train_start" in has:
        hook.peftbench_train_start(model=raw_model, state=state)
    state.train_started = time.perf_counter()
    model.train()
    if checkpoint and checkpoint.restore(raw_model, state, host):  # continue after the epoch end it was taken at
        run.train_loader.set_epoch(state.epoch)  # the epoch's data order (the sampler is seeded by epoch)
    last_step_end = time.perf_counter()
    while state.step < state.total_steps:
        for batch in run.train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if "peftbench_extra_loss" in has:
                    extra = [x for x in hook.peftbench_extra_loss(model=raw_model, state=state) if x is not None]
                    if extra:
                        loss = loss + sum(extra)
                state.running_loss += loss.detach()  # logged and checked for divergence, regularisers included
                state.micro_batches += 1
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if "peftbench_after_backward" in has:
                        hook.peftbench_after_backward(model=raw_model, state=state)
                    if cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(raw_model.parameters(), cfg.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                # not after a step the fp16 grad scaler skipped (inf/nan gradients): statistics would turn nan
                if (accelerator.sync_gradients and "peftbench_after_optimizer_step" in has
                        and not accelerator.optimizer_step_was_skipped):
                    hook.peftbench_after_optimizer_step(model=raw_model, state=state)
                run.optimizer.zero_grad(set_to_none=True)
            state.new_tokens += batch["attention_mask"].sum()  # stays on the device: no sync per micro-batch
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            state.step_times.append(time.perf_counter() - last_step_end)
            if state.step % cfg.log_every == 0 or state.step == state.total_steps:
                log(run, host)
            if evaluates_every(cfg, state.step) and state.step < state.total_steps and run.select_loaders:
                evaluate(run, host)
            last_step_end = time.perf_counter()  # evaluation and logging are not part of a step's time
            if state.step >= state.total_steps:
                break
        state.epoch += 1
        if state.step < state.total_steps:  # epoch end (the last one is evaluated after train_end below)
            if not evaluates_every(cfg, state.step) and run.select_loaders:  # else evaluated at this step already
                evaluate(run, host)
            if checkpoint:  # on every process (totals over processes are collectives); the main one writes
                checkpoint.save(raw_model, state, host)
            last_step_end = time.perf_counter()
    train_s = time.perf_counter() - state.train_started

    if "peftbench_train_end" in has:
        hook.peftbench_train_end(model=raw_model, state=state)
    # train_end left every method in its final form: the final evaluation always counts
    final = evaluate(run, host, final=True) if run.select_loaders else {}
    report: dict[str, Any] = {}
    if "peftbench_report" in has:
        for part in hook.peftbench_report(model=raw_model, state=state):
            report.update(part or {})
    return result(run, final, score_reported(run, host), report, train_s, host)


def log(run: Run, host: Host) -> None:
    """A log point: the mean loss since the previous one goes into the history (the one host-device sync)."""
    state = run.state
    # averaged over processes: all of them log the same loss and stop on divergence together
    mean_loss = run.accelerator.reduce(state.running_loss, reduction="mean").item() / max(state.micro_batches, 1)
    if not math.isfinite(mean_loss):
        raise Diverged(f"training loss became {mean_loss} at step {state.step}")
    state.running_loss.zero_()
    state.micro_batches = 0
    record = {"step": state.step, "epoch": state.epoch, "loss": mean_loss, "lr": run.scheduler.get_last_lr()[0],
              **state.logs}
    state.history.append(record)
    if "peftbench_on_log" in run.hooks:
        host.hook.peftbench_on_log(model=run.raw_model, state=state, record=dict(record))


def evaluate(run: Run, host: Host, final: bool = False) -> dict[str, float]:
    """An evaluation of the splits that choose the checkpoint (``run.select_loaders``, the first unprefixed),
    into the history; keeps the best in-budget evaluation so far (the selected one) and the best of all
    (information only).

    It draws nothing from the training RNG (a DataLoader iterator takes a seed from it): training is the same
    whether and how often it evaluates."""
    state, select = run.state, run.spec.train.select
    started = time.perf_counter()
    metrics, examples, generations = {}, {}, []
    with evaluated_form(run, host), torch.random.fork_rng(devices=[]):
        for i, (split, loader) in enumerate(run.select_loaders.items()):
            prefix = "" if i == 0 else f"{split}_"
            scored, examples[split], kept = score_split(run, split, loader)
            generations += kept if select == "dev" else ()  # dev's, kept if this becomes the reported evaluation
            metrics.update({prefix + k: v for k, v in scored.items()})
        in_budget = final or state.step >= state.in_budget_from
        keep_best(run, metrics, in_budget, examples, generations)  # weights in the evaluated form (PRILoRA: pruned)
    state.eval_s += time.perf_counter() - started
    # of the selection split (``train.select``: the validation split, or dev)
    state.history.append({"step": state.step, "epoch": state.epoch, **metrics, "in_budget": in_budget, **state.logs})
    if "peftbench_on_evaluate" in run.hooks:
        host.hook.peftbench_on_evaluate(model=run.raw_model, state=state, metrics=metrics, in_budget=in_budget)
    run.model.train()
    return metrics


def keep_best(run: Run, metrics: dict[str, float], in_budget: bool, examples: dict[str, Any],
              generations: list[dict[str, Any]] = ()) -> None:
    """Count an evaluation and keep it if it is the best so far (of all; of the in-budget ones, with the trainable
    weights as they were evaluated, needed to score dev (``select: dev``: the test split) at it and to export it)."""
    state, select = run.state, run.spec.train.select
    key = run.task.selection_key(metrics)
    score = key[0]
    state.evaluations += 1
    if key > state.best_any_key:
        state.best_any_key, state.best_any_score, state.best_any_metrics, state.best_any_step = \
            key, score, metrics, state.step
    if in_budget:
        state.in_budget_evals += 1
        if key > state.best_key:
            state.best_key, state.best_score, state.best_metrics, state.best_step = key, score, metrics, state.step
            keep = run.spec.save_adapters or select == "validation" or (select == "dev" and run.final_loaders)
            state.best_weights = trainable_state(run.raw_model) if keep else None
            state.best_predictions = {split: e for split, e in examples.items() if e is not None
                                      } if select == "dev" else {}
            state.best_generations = list(generations)


def score_reported(run: Run, host: Host) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
    """The reported metrics and per-example predictions, all of one checkpoint, the selected one: ``select:
    validation`` and ``final``: every dev split scored once, here, with the selected checkpoint's weights in
    place, in the method's evaluated form; ``select: dev``: the best in-budget dev evaluation's. A causal-LM
    task's final splits (a test set) are scored here, once, at the same weights; ``run.generations`` gets the
    generations of exactly these scorings."""
    state, select = run.state, run.spec.train.select
    started = time.perf_counter()
    metrics, examples = {}, {}
    best = state.best_weights if select != "final" else None
    with swapped_in(run.raw_model, best), evaluated_form(run, host), torch.random.fork_rng(devices=[]):
        if select == "final":  # the only candidate: the final model, in budget by construction
            state.best_step = state.best_any_step = state.step
            state.evaluations = state.in_budget_evals = 1
            state.best_weights = trainable_state(run.raw_model) if run.spec.save_adapters else None
        if select == "dev":  # dev was scored at the selected evaluation already
            metrics, examples = dict(state.best_metrics), dict(state.best_predictions)
            run.generations += state.best_generations
        for i, (split, loader) in enumerate(run.dev_loaders.items() if select != "dev" else ()):
            prefix = "" if i == 0 else f"{split}_"
            scored, examples[split], kept = score_split(run, split, loader)
            run.generations += kept
            metrics.update({prefix + k: v for k, v in scored.items()})
        for split, loader in run.final_loaders.items():  # a test set, scored once like dev
            scored, examples[split], kept = score_split(run, split, loader)
            run.generations += kept
            metrics.update({f"{split}_{k}": v for k, v in scored.items()})
    state.eval_s += time.perf_counter() - started
    return metrics, {split: e for split, e in examples.items() if e is not None}


@contextmanager
def evaluated_form(run: Run, host: Host):
    """The adapter as the method reports it while the block runs (``peftbench_before_evaluate``: PRILoRA with its
    pruning mask applied), as it was before after it."""
    undo = []
    if "peftbench_before_evaluate" in run.hooks:
        undo = [u for u in host.hook.peftbench_before_evaluate(model=run.raw_model, state=run.state) if u]
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


@contextmanager
def swapped_in(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None):
    """``weights`` (trainable weights saved by :func:`trainable_state`) in ``model`` while the block runs, its own
    after it (nothing changes with ``None``). A pruned layer takes the saved rank (``peftbench_resizable``)."""
    if weights is None:
        yield
        return
    own = trainable_state(model)
    model.load_state_dict(weights, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(own, strict=False)


def score_split(run: Run, split: str, loader
                ) -> tuple[dict[str, float], dict[str, list] | None, list[dict[str, Any]]]:
    """One split's metrics, per-example predictions and what a run keeps of it (a causal-LM task's generations),
    as the task evaluates it (:meth:`peftbench.task.Task.evaluate`: logits or greedy generations)."""
    metrics, kept, examples = run.task.evaluate(run.model, split, loader, run.data, run.accelerator)
    return metrics, examples, kept


def result(run: Run, final: dict[str, float], reported: tuple[dict[str, float], dict], report: dict[str, Any],
           train_s: float, host: Host) -> RunResult:
    """The run's :class:`RunResult`: the reported metrics (:func:`score_reported`), measured counts, throughput,
    peak memory and the exported adapter's size."""
    state, raw_model = run.state, run.raw_model
    best, predictions = reported
    best_any = state.best_any_metrics
    if run.spec.train.select != "dev":  # dev was scored once, at the selected checkpoint
        final = best if state.best_step == state.step else {}
        best_any = best if state.best_any_step == state.best_step else {}
    tokens = state.count_tokens()
    adapter = [p for n, p in raw_model.named_parameters() if p.requires_grad and n not in run.head_names]
    trainable = {
        "adapter": sum(p.numel() for p in adapter),
        "adapter_nonzero": sum(int(torch.count_nonzero(p)) for p in adapter),
        "head": run.head_count,
        "model_total": sum(p.numel() for p in raw_model.parameters()),
    }
    # read before sizing the adapter, which is no part of training
    memory = run.memory or PeakMemory(cpu=run.use_cpu)
    peak, mem_kind = memory.peak()
    return RunResult(
        best=best, final=final, best_step=state.best_step, best_any=best_any,
        best_any_step=state.best_any_step, in_budget_from=state.in_budget_from, evaluations=state.evaluations,
        in_budget_evals=state.in_budget_evals, history=state.history,
        trainable=trainable, wall_s=time.perf_counter() - run.started, train_s=train_s,
        tokens_per_s=tokens / max(train_s, 1e-9), peak_mem_bytes=int(peak), mem_kind=mem_kind, steps=state.step,
        step_times=state.step_times, method_report=report, best_state=state.best_weights,
        adapter_bytes=exported_bytes(run, host), eval_s=state.eval_s, mem_stats=memory.stats(),
        # each says its checkpoint: the run's one reported checkpoint, that of its metrics and its export
        generations=[{"checkpoint": "selected", "step": state.best_step, **g} for g in run.generations],
        dev_predictions=predictions, final_state=final_weights(run, host),
    )


def final_weights(run: Run, host: Host) -> dict[str, torch.Tensor] | None:
    """The trainable weights after the last step, in the evaluated form (``peftbench export --checkpoint
    final``); ``None`` without ``output.save_adapters`` or where they are the selected checkpoint's."""
    if not run.spec.save_adapters or run.state.best_step == run.state.step:
        return None
    with evaluated_form(run, host):
        return trainable_state(run.raw_model)


def exported_bytes(run: Run, host: Host) -> int | None:
    """Bytes of the adapter ``peftbench export`` writes for this run (:func:`peftbench.export.adapter_file_bytes`):
    of the best evaluation's weights, swapped in for the measurement and back (only the run's own
    ``trainable.safetensors`` holds them; the final weights stay for observers), or of the final weights
    without ``output.save_adapters``. ``None`` if the method cannot be exported, or its export fails: a
    measurement never fails a trained run."""
    try:
        with swapped_in(run.raw_model, run.state.best_weights):
            return adapter_file_bytes(run.raw_model, run.targets, run.head, host)
    except Exception as exc:  # e.g. every rank pruned to 0: `peftbench export` fails too
        import warnings

        warnings.warn(f"the exported adapter's size of run {run.spec.run_id} is unknown: {type(exc).__name__}: {exc}",
                      stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------------------------
# setup: everything the loop needs, built in a fixed order (the random generators are consumed in it)
# ---------------------------------------------------------------------------------------------------------


def setup(spec: RunSpec, host: Host, memory: PeakMemory | None = None) -> Run:
    """Seed, device, model with the method's adapters, data, optimizer and scheduler, and the loop state
    (``memory``: what measures the run's peak memory)."""
    started = time.perf_counter()
    cfg, task = spec.train, host.task(spec.task).with_options(spec.task_options)
    accelerator, use_cpu = _accelerator(spec)
    tokenizer = modeling.load_tokenizer(spec.model)
    built = assemble(spec.model, task, host, spec.seed, cfg.classifier_dropout,
                     checkpointing=cfg.gradient_checkpointing)
    model, head_names = built.model, built.head_names
    data = task.loaders(spec, tokenizer, model)
    train_loader = _multi_process(data.train, accelerator.num_processes)
    dev_loaders, final_loaders, select_loaders = data.dev, data.final, data.select

    # AdamW over trainable parameters only, no decay on biases and LayerNorm
    optimizer = torch.optim.AdamW(param_groups(model, cfg, head_names), lr=cfg.lr,
                                  fused=not use_cpu and torch.cuda.is_available())
    total_steps = schedule.total_steps(cfg, len(train_loader))
    scheduler = lr_scheduler(optimizer, cfg, total_steps)

    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    dev_loaders = {split: accelerator.prepare(loader) for split, loader in dev_loaders.items()}
    final_loaders = {split: accelerator.prepare(loader) for split, loader in final_loaders.items()}
    select_loaders = dev_loaders if cfg.select == "dev" else {
        split: accelerator.prepare(loader) for split, loader in select_loaders.items()}
    data.gold = {split: accelerator.prepare(loader) for split, loader in data.gold.items()}  # gold_logprob's
    if cfg.compile:
        # in place, not torch.compile's wrapper: parameter names, counts, method reports and exports stay those
        # of an uncompiled run; a fresh dynamo cache per run (graphs of an earlier run's model would be reused)
        torch._dynamo.reset()
        model.compile()
    device = accelerator.device
    state = LoopState(step=0, total_steps=total_steps, epoch=0, optimizer=optimizer.optimizer,
                      lr_scheduler=scheduler, accelerator=accelerator, seed=spec.seed,
                      running_loss=torch.zeros((), device=device),
                      new_tokens=torch.zeros((), dtype=torch.long, device=device))
    hooks = {name for name in RUN_HOOKS if host.implemented(name)}
    if host.implemented("peftbench_in_budget_from"):  # else always in budget (LoRA): no hook call at all
        state.in_budget_from = host.hook.peftbench_in_budget_from(total_steps=total_steps) or 0
    if torch.cuda.is_available() and not use_cpu:
        torch.cuda.reset_peak_memory_stats()
    return Run(spec, task, accelerator, model, accelerator.unwrap_model(model), optimizer, scheduler, train_loader,
               dev_loaders, head_names, built.head_count, hooks, state, use_cpu, started, built.targets, built.head,
               memory, final_loaders=final_loaders, data=data, select_loaders=select_loaders)


def lr_scheduler(optimizer, cfg, total_steps: int):
    """Warmup over ``warmup_steps`` (else ``int(warmup_ratio × total_steps)``, as HF PEFT rounds its 10 %), then
    linear or cosine decay to 0 (transformers' schedules)."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    schedule_fn = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}
    return schedule_fn[cfg.lr_scheduler](optimizer, warmup, total_steps)


#: the run hooks the loop calls (each only if some registered plugin implements it)
RUN_HOOKS = ("peftbench_train_start", "peftbench_extra_loss", "peftbench_after_backward",
             "peftbench_after_optimizer_step", "peftbench_on_log", "peftbench_before_evaluate",
             "peftbench_on_evaluate", "peftbench_train_end", "peftbench_report")


def _accelerator(spec: RunSpec) -> tuple[Accelerator, bool]:
    """Seeded generators and the run's accelerator (CPU, or the GPU with its precision)."""
    cfg = spec.train
    set_seed(spec.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    use_cpu = _uses_cpu(cfg)
    if cfg.device == "cuda" and use_cpu:
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    precision = resolve_precision(cfg.precision, spec.model.dtype, not use_cpu and torch.cuda.is_bf16_supported())
    _fresh_accelerator_state()
    # several processes (accelerate launch) split every batch between them: train.batch_size stays the batch of
    # an optimizer step, and a run gives the same result on any number of processes
    if not cfg.autocast:  # half-precision weights and fp32 adapters each compute in their own dtype
        precision = "fp32"
    accelerator = Accelerator(cpu=use_cpu, mixed_precision={"fp32": "no"}.get(precision, precision),
                              gradient_accumulation_steps=cfg.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    return accelerator, use_cpu


def _uses_cpu(cfg) -> bool:
    return cfg.device == "cpu" or not torch.cuda.is_available()


def _fresh_accelerator_state() -> None:
    """accelerate keeps one global state per process and refuses a second ``Accelerator`` with other settings
    ("AcceleratorState has already been initialized"), but a sweep changes precision (and device) between
    runs: start each run from a fresh state, keeping the process group of an ``accelerate launch``."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=int(os.environ.get("WORLD_SIZE", "1")) == 1)


def _multi_process(train_loader, processes: int):
    """With several processes, the train loader with its short batch (if any) last (:class:`ShortBatchLast`)."""
    if processes == 1:
        return train_loader
    return torch.utils.data.DataLoader(train_loader.dataset, collate_fn=train_loader.collate_fn,
                                       batch_sampler=ShortBatchLast(train_loader.batch_sampler))


class ShortBatchLast(torch.utils.data.Sampler):
    """The batches of ``batch_sampler`` with the short one (if any) moved to the end of the epoch: split between
    processes, accelerate skips a short batch anywhere else (``group_by_length`` shuffles it in) and completes
    the last one with examples from the first."""

    def __init__(self, batch_sampler):
        self.sampler, self.batch_size = batch_sampler, batch_sampler.batch_size  # accelerate's set_epoch finds it

    def __iter__(self):
        return iter(sorted(self.sampler, key=lambda batch: len(batch) < self.batch_size))  # stable sort

    def __len__(self) -> int:
        return len(self.sampler)


def param_groups(model: torch.nn.Module, cfg, head_names: set[str]) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups: (adapter | head) × (decay | no decay)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
        groups.setdefault((name in head_names, no_decay), []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
         "lr": (cfg.head_lr or cfg.lr) if is_head else cfg.lr}
        for (is_head, no_decay), params in groups.items()
    ]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
