"""Resumable per-epoch checkpoints (``output.checkpoint: true``): the one owner of a run's tensor I/O.

At every epoch end but the last, the trainer writes ``<output.dir>/<run_id>/checkpoint.pt``: the model's
:func:`run_tensors` (trainable parameters and all buffers), the optimizer, the scheduler (and the fp16 grad
scaler), every RNG (torch, CUDA, numpy, Python), the trainer's whole loop state
(:class:`peftbench.trainer.LoopState`: step, epoch, logs, history, best-so-far, step times, tokens, the loss
summed since the last log point, training seconds) and the method's own state from
``peftbench_state_dict``. A run that was killed or failed restarts from the newest checkpoint when the sweep
is run again; on CPU the result equals an uninterrupted run's bit for bit. The file is deleted when the run
finishes. The conformance kit checks every method's state through this same class.

Shapes: a checkpoint is refused (before anything is modified) unless its tensors have the model's names and
shapes, except in modules that declare ``peftbench_resizable = True`` and take a saved shape themselves in
``_load_from_state_dict`` (the tensors are loaded with ``model.load_state_dict(strict=False)``).

Safety: tensors and plain data only, written with ``torch.save`` to a temporary file that is atomically
renamed (a kill mid-write leaves the previous checkpoint intact) and read back with ``weights_only=True`` (no
pickled code runs on load).

A method whose per-step hooks may keep state outside the model and the optimizer is resumable only if it
implements ``peftbench_state_dict``/``peftbench_load_state_dict``; otherwise its runs take no checkpoints
and restart from scratch, which is slower but never wrong.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write

FORMAT = 2  #: 2: the trainer's whole loop state under "loop"

#: run hooks called during the loop, where a method could keep state that a checkpoint must carry
STATEFUL_HOOKS = ("peftbench_extra_loss", "peftbench_after_backward", "peftbench_after_optimizer_step",
                  "peftbench_on_evaluate")


def unresumable(method: Any) -> str | None:
    """Why ``method``'s runs cannot be resumed from a checkpoint, or ``None`` when they can."""
    hooks = set(method.implemented_hooks())
    stateful = sorted(hooks.intersection(STATEFUL_HOOKS))
    if stateful and not {"peftbench_state_dict", "peftbench_load_state_dict"} <= hooks:
        return (f"method {method.name!r} implements {', '.join(stateful)} but not peftbench_state_dict and "
                "peftbench_load_state_dict, so its training state could not be restored")
    return None


class Checkpoint:
    """The checkpoint file of one run (the runner makes one per run; the trainer saves and restores)."""

    def __init__(self, path: str | os.PathLike, run_id: str, log: Callable[[str], Any] = print):
        self.path, self.run_id, self.log = Path(path), run_id, log

    # -- saving ------------------------------------------------------------------------------------------

    def save(self, model: torch.nn.Module, state, host) -> None:
        """Write the checkpoint of the run: ``model``'s :func:`run_tensors`, ``state`` (the trainer's
        :class:`~peftbench.trainer.LoopState`, whole, with its optimizer and scheduler) and the method's
        ``peftbench_state_dict``. Call it on every process (the loop state's totals over processes are
        collectives); the main process writes."""
        loop = state.state_dict()
        accelerator = state.accelerator
        if not accelerator.is_main_process:  # every process restores from the main one's file
            return
        method_state: dict[str, Any] = {}
        if host.implemented("peftbench_state_dict"):
            for part in host.hook.peftbench_state_dict(model=model, state=state):
                method_state.update(part or {})
        scaler = getattr(accelerator, "scaler", None)
        payload = {
            "format": FORMAT, "run_id": self.run_id,
            "model": _cpu(run_tensors(model)),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_state(),
            "loop": _cpu(loop),
            "method": _cpu(method_state),
        }
        with atomic_write(self.path) as f:  # a reader sees the old or the new checkpoint, never half of one
            torch.save(payload, f)

    # -- restoring ---------------------------------------------------------------------------------------

    def restore(self, model: torch.nn.Module, state, host) -> bool:
        """Load the checkpoint into the run, if there is a usable one (``state``: the fresh run's loop state,
        after ``peftbench_train_start``); returns whether it did. Whether it is usable is decided before
        anything is modified: an unusable one is ignored (logged) and the run starts from scratch."""
        if not self.path.exists():
            return False
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable (disk error, foreign file): never worth failing the run for
            self.log(f"ignoring unreadable checkpoint {self.path} ({type(exc).__name__}: {exc}); starting from scratch")
            return False
        try:
            problem = self._mismatch(saved, model, state)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a file of another layout
            problem = f"malformed ({type(exc).__name__}: {exc})"
        if problem:
            self.log(f"ignoring checkpoint {self.path}: {problem}; starting from scratch")
            return False
        state.load_state_dict(saved["loop"])  # step, epoch and logs first: the method's hook sees them
        if host.implemented("peftbench_load_state_dict"):  # before the tensors: it may give them their shapes
            host.hook.peftbench_load_state_dict(model=model, state=state, state_dict=saved["method"])
        load_run_tensors(model, saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.lr_scheduler.load_state_dict(saved["scheduler"])
        scaler = getattr(state.accelerator, "scaler", None)
        if saved["scaler"] is not None and scaler is not None:
            scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"], self.log)
        self.log(f"resumed from {self.path} at epoch {state.epoch}, step {state.step}")
        return True

    def _mismatch(self, saved: Any, model: torch.nn.Module, state) -> str | None:
        """What makes ``saved`` unusable for this run, checked before anything is modified."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            return f"unknown format {saved.get('format') if isinstance(saved, dict) else type(saved).__name__!r}"
        if saved["run_id"] != self.run_id:
            return f"it belongs to run {saved['run_id']}"
        loop = saved["loop"]
        if loop["total_steps"] != state.total_steps or loop["step"] > state.total_steps:
            return f"it was taken for {loop['total_steps']} steps, the run now takes {state.total_steps}"
        problem = tensor_mismatch(model, saved["model"])
        if problem:
            return problem
        groups = [len(g["params"]) for g in saved["optimizer"]["param_groups"]]
        if groups != [len(g["params"]) for g in state.optimizer.param_groups]:
            return "the optimizer's parameter groups differ"
        return None

    def remove(self) -> None:
        """Delete the checkpoint (the run finished: it would never be read again)."""
        self.path.unlink(missing_ok=True)
        for stale in self.path.parent.glob(f"{self.path.name}.*.tmp"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# the model's tensors in a run's state
# ---------------------------------------------------------------------------------------------------------


def run_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes in ``model``: its trainable parameters and all its buffers, persistent or not
    (frozen weights are rebuilt identically by a fresh run). A checkpoint holds exactly these."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update(model.named_buffers())
    return tensors


def tensor_mismatch(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> str | None:
    """Why the saved :func:`run_tensors` do not fit ``model``, or ``None``. A shape may differ only in a module
    that restores saved shapes itself (``peftbench_resizable = True``, see :mod:`peftbench.hookspecs`)."""
    current = run_tensors(model)
    if set(saved) != set(current):
        missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
        return f"its tensors differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})"
    persistent = set(model.state_dict(keep_vars=True))
    for name, tensor in saved.items():
        if tensor.shape == current[name].shape:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        if name not in persistent or not getattr(owner, "peftbench_resizable", False):
            return (f"tensor shapes differ, e.g. {name}: {tuple(tensor.shape)} vs {tuple(current[name].shape)} "
                    f"(and {type(owner).__name__} does not declare peftbench_resizable)")
    return None


def load_run_tensors(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved :func:`run_tensors` (checked by :func:`tensor_mismatch`) into ``model``: the parameters and
    persistent buffers through ``load_state_dict``, so a resizable module takes the saved shapes itself in its
    ``_load_from_state_dict``; the non-persistent buffers (which ``load_state_dict`` skips) directly."""
    persistent = set(model.state_dict(keep_vars=True))
    result = model.load_state_dict({n: t for n, t in saved.items() if n in persistent}, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected tensors in a checked checkpoint: {result.unexpected_keys[:3]}")
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in saved.items():
            if name not in persistent:
                buffers[name].copy_(tensor)


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_state(rng: dict[str, Any], log: Callable[[str], Any] = print) -> None:
    torch.set_rng_state(rng["torch"])
    saved_gpus = len(rng["cuda"])
    visible = torch.cuda.device_count() if saved_gpus and torch.cuda.is_available() else 0
    for device in range(min(saved_gpus, visible)):  # a resume may see fewer GPUs than the run that saved
        torch.cuda.set_rng_state(rng["cuda"][device], device)
    if saved_gpus > visible:
        log(f"the checkpoint holds the random state of {saved_gpus} GPU(s), {visible} visible now: restored "
            f"{visible}; the rest start fresh (GPU-side randomness, e.g. dropout, then differs from an unbroken run)")
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(rng["python"])
