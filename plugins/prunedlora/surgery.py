"""Optimizer surgery: swap a parameter for a smaller one that keeps a subset of its entries.

Methods that physically shrink tensors during training (PrunedLoRA removes rank components) must keep the
optimizer consistent: the new parameter takes the old one's place in its param group, every per-parameter
state tensor of the old one's shape (Adam's ``exp_avg``/``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``,
SGD's ``momentum_buffer``) is sliced the same way, and everything else (``step``) is kept as is. The
optimizer then continues exactly as if the removed entries had never existed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def slice_tensor(tensor: torch.Tensor, keep_index_per_dim: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``tensor`` restricted to the kept indices of every dimension (``None``: keep the whole dimension)."""
    if len(keep_index_per_dim) != tensor.ndim:
        raise ValueError(f"keep_index_per_dim has {len(keep_index_per_dim)} entries for a {tensor.ndim}-d tensor")
    for dim, keep in enumerate(keep_index_per_dim):
        if keep is not None:
            tensor = tensor.index_select(dim, keep.to(tensor.device))
    return tensor


@torch.no_grad()
def shrink_parameter(old: nn.Parameter, keep_index_per_dim: Sequence[torch.Tensor | None],
                     value: torch.Tensor | None = None) -> nn.Parameter:
    """A new parameter holding the kept entries of ``value`` (default: of ``old``), with the kept part of
    ``old.grad`` as its gradient, so that an optimizer step taken next uses the surviving gradient."""
    source = old if value is None else value
    new = nn.Parameter(slice_tensor(source.detach(), keep_index_per_dim).contiguous(),
                       requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = slice_tensor(old.grad, keep_index_per_dim).contiguous()
    return new


@torch.no_grad()
def replace_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                      keep_index_per_dim: Sequence[torch.Tensor | None]) -> None:
    """Put ``new`` in ``old``'s place in ``optimizer`` and slice ``old``'s state to match.

    ``keep_index_per_dim`` has one entry per dimension of ``old``: a 1-d index tensor of the entries kept
    along that dimension, or ``None`` to keep it whole. State tensors shaped like ``old`` are sliced; scalar
    state (``step``) is kept. Raises ``KeyError`` if ``old`` is not in the optimizer.
    """
    expected = tuple(old.shape[d] if keep is None else len(keep) for d, keep in enumerate(keep_index_per_dim))
    if tuple(new.shape) != expected:
        raise ValueError(f"new parameter has shape {tuple(new.shape)}, the kept indices give {expected}")
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
        optimizer.state[new] = {
            key: slice_tensor(value, keep_index_per_dim).contiguous()
            if torch.is_tensor(value) and value.shape == old.shape else value
            for key, value in state.items()
        }
