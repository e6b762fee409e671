"""Resumable per-epoch checkpoints (``output.checkpoint: true``).

At every epoch end but the last, the trainer writes ``<output.dir>/<run_id>/checkpoint.pt``: the trainable
parameters and the buffers of the model, the optimizer, the scheduler (and the fp16 grad scaler), every RNG
(torch, CUDA, numpy, Python), the loop's bookkeeping (step, epoch, history, best-so-far, the loss summed since
the last log point) and the method's own state from ``peftbench_state_dict``. A run that was killed or failed
restarts from the newest checkpoint when the sweep is run again; on CPU the result equals an uninterrupted
run's bit for bit. The file is deleted when the run finishes.

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

FORMAT = 1

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

    def save(self, model: torch.nn.Module, state, scheduler, accelerator, host, loop: dict[str, Any]) -> None:
        """Write the checkpoint (``loop``: the trainer's bookkeeping, see :meth:`restore`)."""
        method_state: dict[str, Any] = {}
        if host.implemented("peftbench_state_dict"):
            for part in host.hook.peftbench_state_dict(model=model, state=state):
                method_state.update(part or {})
        payload = {
            "format": FORMAT, "run_id": self.run_id,
            "model": _cpu(_resumable_tensors(model)),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) is not None else None,
            "rng": _rng_state(),
            "state": {"step": state.step, "epoch": state.epoch, "total_steps": state.total_steps,
                      "logs": dict(state.logs)},
            "loop": _cpu(loop),
            "method": _cpu(method_state),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # atomic: a reader sees the old or the new checkpoint, never half of one

    # -- restoring ---------------------------------------------------------------------------------------

    def restore(self, model: torch.nn.Module, state, scheduler, accelerator, host) -> dict[str, Any] | None:
        """Load the checkpoint into the run, if there is a usable one: returns the loop bookkeeping saved by
        :meth:`save` (and sets ``state.step``/``epoch``/``logs``), or ``None`` to start from scratch."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable (disk error, foreign file): never worth failing the run for
            self.log(f"ignoring unreadable checkpoint {self.path} ({type(exc).__name__}: {exc}); starting from scratch")
            return None
        try:
            problem = self._mismatch(saved, model, state, host)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a file of another layout
            problem = f"malformed ({type(exc).__name__}: {exc})"
        if problem:
            self.log(f"ignoring checkpoint {self.path}: {problem}; starting from scratch")
            return None
        state.step, state.epoch = saved["state"]["step"], saved["state"]["epoch"]
        state.logs.clear()
        state.logs.update(saved["state"]["logs"])
        if host.implemented("peftbench_load_state_dict"):  # first: it may restore shapes the tensors need
            host.hook.peftbench_load_state_dict(model=model, state=state, state_dict=saved["method"])
        model.load_state_dict(saved["model"], strict=False)  # a peftbench_resizable layer takes the saved shape
        with torch.no_grad():  # then every tensor, non-persistent buffers included
            current = _resumable_tensors(model)
            for name, tensor in saved["model"].items():
                current[name].copy_(tensor)
        state.optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"] is not None and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"])
        self.log(f"resumed from {self.path} at epoch {state.epoch}, step {state.step}")
        return saved["loop"]

    def _mismatch(self, saved: Any, model: torch.nn.Module, state, host) -> str | None:
        """What makes ``saved`` unusable for this run, checked before anything is modified."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            return f"unknown format {saved.get('format') if isinstance(saved, dict) else type(saved).__name__!r}"
        if saved["run_id"] != self.run_id:
            return f"it belongs to run {saved['run_id']}"
        if saved["state"]["total_steps"] != state.total_steps or saved["state"]["step"] > state.total_steps:
            return f"it was taken for {saved['state']['total_steps']} steps, the run now takes {state.total_steps}"
        if host.implemented("peftbench_load_state_dict"):
            return None  # the method may reshape its parameters on load; a misfit then fails loudly
        current = _resumable_tensors(model)
        stored = saved["model"]
        if set(stored) != set(current):
            missing, extra = sorted(set(current) - set(stored)), sorted(set(stored) - set(current))
            return f"its tensors differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})"
        wrong = [n for n, t in stored.items() if t.shape != current[n].shape]
        if wrong:
            return f"tensor shapes differ, e.g. {wrong[0]}: {tuple(stored[wrong[0]].shape)} vs {tuple(current[wrong[0]].shape)}"
        groups = [len(g["params"]) for g in saved["optimizer"]["param_groups"]]
        if groups != [len(g["params"]) for g in state.optimizer.param_groups]:
            return "the optimizer's parameter groups differ"
        return None

    def remove(self) -> None:
        """Delete the checkpoint (the run finished: it would never be read again)."""
        self.path.unlink(missing_ok=True)
        for stale in self.path.parent.glob(f"{self.path.name}.*.tmp"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)


def _resumable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers: what training changes (frozen weights are rebuilt identically)."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update(model.named_buffers())
    return tensors


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


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(rng["python"])
