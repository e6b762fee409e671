"""PRILoRA's pruning scores and masks (pure tensor functions, so the tests can check them by hand).

Scores, per criterion, for the matrix that is pruned (A is ``r × d_in``, B is ``d_out × r``):

* ``input_norm`` (the paper's): ``|A_kj| · EMA‖x_j‖`` -- the weight's magnitude times the running L2 norm of the
  input feature it multiplies (Wanda's score, restricted to the adapter);
* ``magnitude``: ``|A_kj|``;
* ``random``: uniform noise (same counts as the others, entries chosen at random);
* ``prune_b``: ``|B_ik| · EMA‖h_k‖`` with ``h = A x`` the rank-space activation B multiplies -- the same score
  one matrix later (defined here; the paper only reports that pruning B does worse).

The lowest-scoring ``⌊ratio · n⌋`` entries of every group are zeroed: ``n`` is a row's length (``grouping="row"``,
every output of the matrix keeps the same number of inputs) or the whole matrix (``grouping="matrix"``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Criterion = Literal["input_norm", "magnitude", "random", "prune_b", "none"]
Grouping = Literal["row", "matrix"]


def prune_count(ratio: float, n: int) -> int:
    """Entries pruned out of a group of ``n``: ``⌊ratio · n⌋`` (1e-9: 0.29 · 100 is 29, not 28)."""
    return math.floor(ratio * n + 1e-9)


def pruned_shape(criterion: Criterion, r: int, in_features: int, out_features: int) -> tuple[int, int]:
    """Shape of the matrix a criterion prunes: B (``out × r``) for ``prune_b``, A (``r × in``) otherwise."""
    return (out_features, r) if criterion == "prune_b" else (r, in_features)


def expected_pruned(criterion: Criterion, grouping: Grouping, ratio: float, r: int, in_features: int,
                    out_features: int) -> int:
    """How many entries one module has zeroed after a pruning event (for the budget's ``nonzero`` count)."""
    if criterion == "none":
        return 0
    rows, cols = pruned_shape(criterion, r, in_features, out_features)
    return rows * prune_count(ratio, cols) if grouping == "row" else prune_count(ratio, rows * cols)


def importance(criterion: Criterion, weight: torch.Tensor, norm_ema: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Score of every entry of ``weight`` (fp32, same shape); ``norm_ema`` holds one value per column."""
    if criterion in ("input_norm", "prune_b"):
        return weight.detach().float().abs() * norm_ema  # (rows, cols) · (cols,): column j scaled by EMA_j
    if criterion == "magnitude":
        return weight.detach().float().abs()
    if criterion == "random":
        # drawn on the generator's device (CPU) so that runs are reproducible whatever the accelerator
        return torch.rand(weight.shape, generator=generator).to(weight.device)
    raise ValueError(f"criterion {criterion!r} has no score")


def prune_mask(scores: torch.Tensor, ratio: float, grouping: Grouping) -> torch.Tensor:
    """Boolean mask of the entries to zero: the lowest ``⌊ratio · n⌋`` scores of every group."""
    drop = torch.zeros_like(scores, dtype=torch.bool)
    if grouping == "row":
        k = prune_count(ratio, scores.shape[1])
        drop.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    else:
        k = prune_count(ratio, scores.numel())
        drop.view(-1)[scores.reshape(-1).topk(k, largest=False).indices] = True
    return drop
