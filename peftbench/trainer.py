"""One training loop for every method (CPU or GPU): read it top to bottom.

Method-specific behaviour enters only through the run hooks of :mod:`peftbench.hookspecs`; a hook no
plugin implements is skipped without a call, so plain LoRA pays nothing for AdaLoRA's machinery.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import modeling
from .checkpoint import Checkpoint
from .data import load_task_data, make_loader
from .hookspecs import TrainState
from .host import Host
from .method import Method
from .runs import RunSpec


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    best: dict[str, float]  #: dev metrics at the best evaluation (by the task's main metric)
    final: dict[str, float]  #: dev metrics after the last step
    best_step: int
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


def train(spec: RunSpec, host: Host, method: Method, progress: bool = True,
          checkpoint: Checkpoint | None = None) -> RunResult:
    started = time.perf_counter()
    cfg = spec.train
    task = host.task(spec.task)

    # --- reproducibility and device ------------------------------------------------------------------
    set_seed(spec.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if cfg.device == "cuda" and use_cpu:
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "fp32"
    # several processes (accelerate launch) split every batch between them: train.batch_size stays the batch of
    # an optimizer step, and a run gives the same result on any number of processes
    accelerator = Accelerator(cpu=use_cpu, mixed_precision={"fp32": "no"}.get(precision, precision),
                              gradient_accumulation_steps=cfg.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    processes = accelerator.num_processes

    # --- model: frozen base + the method's adapters + the shared head ----------------------------------
    tokenizer = modeling.load_tokenizer(spec.model)
    model = modeling.load_model(spec.model, task.num_labels, spec.seed, cfg.classifier_dropout)
    head = modeling.head_modules(spec.model, model)
    targets = modeling.find_targets(model, modeling.target_patterns(spec.model, model), head)
    modeling.freeze(model)
    host.hook.peftbench_inject(model=model, targets=targets)
    head_count = modeling.unfreeze_head(model, head)
    head_names = modeling.head_parameter_names(model, head)

    # --- data ------------------------------------------------------------------------------------------
    train_data = load_task_data(task, "train", spec.data_dir, tokenizer, cfg.max_length, cfg.max_train_samples)
    dev_data = {split: load_task_data(task, split, spec.data_dir, tokenizer, cfg.max_length, cfg.max_eval_samples)
                for split in task.dev_splits}
    pad_id = tokenizer.pad_token_id or 0
    train_loader = make_loader(train_data, cfg.batch_size, True, cfg.group_by_length, spec.seed, pad_id,
                               task.is_regression, pad_to=cfg.max_length if cfg.pad_to_max_length else None)
    if processes > 1:
        train_loader = torch.utils.data.DataLoader(train_loader.dataset, collate_fn=train_loader.collate_fn,
                                                   batch_sampler=ShortBatchLast(train_loader.batch_sampler))
    dev_loaders = {split: make_loader(data, cfg.eval_batch_size, False, True, 0, pad_id, task.is_regression)
                   for split, data in dev_data.items()}

    # --- optimizer: AdamW over trainable parameters only, no decay on biases and LayerNorm -------------
    optimizer = torch.optim.AdamW(param_groups(model, cfg, head_names), lr=cfg.lr,
                                  fused=not use_cpu and torch.cuda.is_available())
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    dev_loaders = {split: accelerator.prepare(loader) for split, loader in dev_loaders.items()}
    if cfg.compile:
        model = torch.compile(model)
    raw_model = accelerator.unwrap_model(model)
    state = TrainState(step=0, total_steps=total_steps, epoch=0, optimizer=optimizer.optimizer,
                       lr_scheduler=scheduler, accelerator=accelerator, seed=spec.seed)
    has = {name: host.implemented(name) for name in (
        "peftbench_train_start", "peftbench_extra_loss", "peftbench_after_backward",
        "peftbench_after_optimizer_step", "peftbench_on_evaluate", "peftbench_train_end", "peftbench_report")}
    if torch.cuda.is_available() and not use_cpu:
        torch.cuda.reset_peak_memory_stats()

    # --- evaluation and best-dev bookkeeping -------------------------------------------------------------
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": -math.inf, "metrics": {}, "step": 0, "state": None}

    def evaluate() -> dict[str, float]:
        metrics = {}
        for i, (split, loader) in enumerate(dev_loaders.items()):
            split_metrics = predict_and_score(model, loader, task, accelerator)
            prefix = "" if i == 0 else f"{split}_"
            metrics.update({prefix + k: v for k, v in split_metrics.items()})
        record = {"step": state.step, "epoch": state.epoch, **metrics, **state.logs}
        history.append(record)
        if has["peftbench_on_evaluate"]:
            host.hook.peftbench_on_evaluate(model=raw_model, state=state, metrics=metrics)
        score = metrics[task.main_metric]
        if score > best["score"]:
            best.update(score=score, metrics=metrics, step=state.step,
                        state=trainable_state(raw_model) if spec.save_adapters else None)
        model.train()
        return metrics

    # --- the loop ----------------------------------------------------------------------------------------
    if has["peftbench_train_start"]:
        host.hook.peftbench_train_start(model=raw_model, state=state)
    bar = tqdm(total=total_steps, desc=f"{spec.label}/{spec.task}/s{spec.seed}", disable=not progress,
               dynamic_ncols=True, leave=False)
    tokens = 0  #: this process' tokens since this (re)start
    resumed_tokens = 0  #: every process' tokens before the checkpoint the run resumed from
    running_loss = torch.zeros((), device=accelerator.device)
    micro_batches = 0
    step_times: list[float] = []
    train_started = last_step_end = time.perf_counter()
    model.train()
    resumed = checkpoint.restore(raw_model, state, scheduler, accelerator, host) if checkpoint else None
    if resumed:  # continue after the epoch end it was taken at, with the loop's bookkeeping as it was then
        history[:], step_times[:] = resumed["history"], resumed["step_times"]
        best.update(resumed["best"])
        resumed_tokens, micro_batches = resumed["tokens"], resumed["micro_batches"]
        running_loss += resumed["running_loss"].to(running_loss.device)
        train_started -= resumed["train_s"]
        last_step_end = time.perf_counter()
        train_loader.set_epoch(state.epoch)  # the epoch's data order (the sampler is seeded by epoch)
        bar.update(state.step)
    while state.step < total_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if has["peftbench_extra_loss"]:
                    extra = [x for x in host.hook.peftbench_extra_loss(model=raw_model, state=state) if x is not None]
                    if extra:
                        loss = loss + sum(extra)
                running_loss += loss.detach()  # logged and checked for divergence, regularisers included
                micro_batches += 1
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if has["peftbench_after_backward"]:
                        host.hook.peftbench_after_backward(model=raw_model, state=state)
                    if cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(raw_model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if accelerator.sync_gradients and has["peftbench_after_optimizer_step"]:
                    host.hook.peftbench_after_optimizer_step(model=raw_model, state=state)
                optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            now = time.perf_counter()
            step_times.append(now - last_step_end)
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                # averaged over processes: all of them log the same loss and stop on divergence together
                mean_loss = accelerator.reduce(running_loss, reduction="mean").item() / max(micro_batches, 1)
                if not math.isfinite(mean_loss):
                    raise Diverged(f"training loss became {mean_loss} at step {state.step}")
                running_loss.zero_()
                micro_batches = 0
                history.append({"step": state.step, "epoch": state.epoch, "loss": mean_loss,
                                "lr": scheduler.get_last_lr()[0], **state.logs})
                bar.set_postfix(loss=f"{mean_loss:.4f}", best=f"{best['score']:.4f}", refresh=False)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
                evaluate()
            last_step_end = time.perf_counter()  # evaluation and logging are not part of a step's time
            if state.step >= total_steps:
                break
        state.epoch += 1
        if state.step < total_steps:  # epoch end (the last one is evaluated after train_end below)
            evaluate()
            if checkpoint:  # totals over all processes (collectives: on every one), then one writer
                run_tokens = resumed_tokens + int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device),
                                                                     reduction="sum"))
                mean_running_loss = accelerator.reduce(running_loss, reduction="mean")
                if accelerator.is_main_process:  # every process restores from it
                    checkpoint.save(raw_model, state, scheduler, accelerator, host, loop={
                        "history": history, "best": best, "step_times": step_times, "tokens": run_tokens,
                        "micro_batches": micro_batches, "running_loss": mean_running_loss,
                        "train_s": time.perf_counter() - train_started})
            last_step_end = time.perf_counter()
    train_s = time.perf_counter() - train_started
    bar.close()

    if has["peftbench_train_end"]:
        host.hook.peftbench_train_end(model=raw_model, state=state)
    final = evaluate()
    report = {}
    if has["peftbench_report"]:
        for part in host.hook.peftbench_report(model=raw_model, state=state):
            report.update(part or {})

    tokens = resumed_tokens + int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device),
                                                     reduction="sum"))  # every process' tokens
    adapter = [p for n, p in raw_model.named_parameters() if p.requires_grad and n not in head_names]
    trainable = {
        "adapter": sum(p.numel() for p in adapter),
        "adapter_nonzero": sum(int(torch.count_nonzero(p)) for p in adapter),
        "head": head_count,
        "model_total": sum(p.numel() for p in raw_model.parameters()),
    }
    if torch.cuda.is_available() and not use_cpu:
        peak, mem_kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        import resource

        peak, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_process_max_rss"
    return RunResult(
        best=best["metrics"], final=final, best_step=best["step"], history=history, trainable=trainable,
        wall_s=time.perf_counter() - started, train_s=train_s, tokens_per_s=tokens / max(train_s, 1e-9),
        peak_mem_bytes=int(peak), mem_kind=mem_kind, steps=state.step, step_times=step_times, method_report=report,
        best_state=best["state"],
    )


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


@torch.no_grad()
def predict_and_score(model, loader, task, accelerator) -> dict[str, float]:
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits, batch_labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        predictions.append(logits.float().squeeze(-1) if task.is_regression else logits.argmax(-1))
        labels.append(batch_labels)
    preds = torch.cat(predictions).cpu().numpy()
    gold = torch.cat(labels).cpu().numpy()
    return task.compute_metrics(preds, gold.astype(np.float64) if task.is_regression else gold)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
