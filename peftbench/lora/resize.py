"""Rank resizing: shrink or grow a parameter along its rank dimension together with its optimizer state.

Methods that change ranks during training (PrunedLoRA removes rank components) must keep the optimizer
consistent: the gradient and every per-parameter state tensor of the parameter's shape (Adam's
``exp_avg``/``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``, SGD's ``momentum_buffer``) are resized the same way,
and everything else (``step``) is kept as is. After a shrink the optimizer continues exactly as if the removed
entries had never existed; after a grow the new entries start from zero gradient and zero moments.

Two forms, for two moments:

* :func:`keep_rank`, during training: a *new* parameter takes the old one's place in its module and in the
  optimizer's param group. Not the old one resized: autograd remembers a leaf's shape for as long as a graph
  that used it is alive (e.g. the last step's loss), and would reject a gradient of the new shape.
* :func:`resize_rank`, when loading (no graph yet): in place (``param.data``), so the parameter keeps its
  identity and an optimizer built before the load stays valid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def keep_rank(module: nn.Module, name: str, dim: int, keep: torch.Tensor,
              optimizer: torch.optim.Optimizer | None = None, value: torch.Tensor | None = None) -> nn.Parameter:
    """Replace parameter ``module.<name>`` by one holding only the entries ``keep`` (a 1-d index, in that order)
    along ``dim``, taken from ``value`` (a tensor of the current shape, e.g. a factor updated by a recovery
    step; default: the parameter itself). The gradient is sliced alike; in ``optimizer`` the new parameter
    takes the old one's place and the old one's state, sliced. Returns the new parameter."""
    old = getattr(module, name)
    select = lambda t: t.index_select(dim, keep.to(t.device)).contiguous()  # noqa: E731
    source = old.detach() if value is None else value.to(old.dtype)
    new = nn.Parameter(select(source), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = select(old.grad)
    if optimizer is not None:
        _swap(optimizer, old, new, select)
    setattr(module, name, new)
    return new


@torch.no_grad()
def resize_rank(param: nn.Parameter, dim: int, size: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Give ``param`` ``size`` entries along ``dim`` in place: the first ``size`` are kept when it shrinks,
    zeros are appended when it grows (in the gradient and ``optimizer``'s state too)."""

    def resize(t: torch.Tensor) -> torch.Tensor:
        if size <= t.shape[dim]:
            return t.narrow(dim, 0, size).contiguous().clone()
        pad = list(t.shape)
        pad[dim] = size - t.shape[dim]
        return torch.cat([t, t.new_zeros(pad)], dim)

    shape = param.shape
    param.data = resize(param.detach())
    if param.grad is not None:
        param.grad = resize(param.grad)
    state = optimizer.state.get(param) if optimizer is not None else None
    for key, value in (state or {}).items():
        if torch.is_tensor(value) and value.shape == shape:
            state[key] = resize(value)


def _swap(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
          resize: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Put ``new`` in ``old``'s place in ``optimizer``, with ``old``'s state resized (``KeyError`` if absent)."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                break
        else:
            continue
        break
    else:
        raise KeyError("the parameter to replace is not in the optimizer's param groups")
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {key: resize(value) if torch.is_tensor(value) and value.shape == old.shape else value
                                for key, value in state.items()}
