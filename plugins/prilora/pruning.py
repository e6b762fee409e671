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

``prune_b`` prunes exactly as many entries as ``input_norm`` prunes from A at the same ``prune_ratio`` and
``grouping``, so that the ablation compares criteria, not sparsity. ``⌊ratio · n⌋`` per row of B would not: rows
of B have ``r`` entries, and on odd ranks ``⌊r/2⌋ < r/2`` (6 % fewer entries on the paper's 4 → 12 ranks).
The count cannot be matched module by module: A of a feed-forward output map (``r × 3072``) loses more entries
at ratio 0.5 than its B (``768 × r``) has. It is matched **per layer** (the modules of one transformer layer,
which share their rank; modules outside the blocks form one more group): the layer's A-count is split over its
B matrices in proportion to their sizes (``⌊total · cumulative size / all sizes⌋`` differences), and inside a B
matrix over its rows as evenly as possible (``grouping="row"``: every row loses ``q`` or ``q + 1`` entries, the
``+1`` going to the rows whose next-lowest score is lowest) or by one threshold (``grouping="matrix"``). On a
transformer block the in- and out-features of the six maps have the same sum, so at ratio 0.5 every B matrix
loses exactly half its entries. Only if a group's A-count exceeds the size of its B matrices (targets with far
more inputs than outputs) is it capped at all of B; :func:`expected_pruned` predicts that too.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable
from typing import Literal

import torch

Criterion = Literal["input_norm", "magnitude", "random", "prune_b", "none"]
Grouping = Literal["row", "matrix"]


def prune_count(ratio: float, n: int) -> int:
    """Entries pruned out of a group of ``n``: ``⌊ratio · n⌋`` (1e-9: 0.29 · 100 is 29, not 28)."""
    return math.floor(ratio * n + 1e-9)


def expected_pruned(criterion: Criterion, grouping: Grouping, ratio: float,
                    modules: list[tuple[Hashable, int, int, int]]) -> list[int]:
    """Entries every module has zeroed after a pruning event (the budget's ``nonzero`` count and, for
    ``prune_b``, the count each B matrix is pruned to). ``modules``: ``(group, r, in_features, out_features)``
    per module, ``group`` its layer (the unit over which ``prune_b`` matches A's count)."""
    if criterion == "none":
        return [0] * len(modules)
    a_counts = [r * prune_count(ratio, d_in) if grouping == "row" else prune_count(ratio, r * d_in)
                for _, r, d_in, _ in modules]
    if criterion != "prune_b":
        return a_counts
    members = defaultdict(list)
    for i, (group, *_) in enumerate(modules):
        members[group].append(i)
    counts = [0] * len(modules)
    for idx in members.values():
        sizes = [modules[i][3] * modules[i][1] for i in idx]  # B is out × r
        for i, share in zip(idx, split_count(sum(a_counts[i] for i in idx), sizes)):
            counts[i] = share
    return counts


def split_count(total: int, sizes: list[int]) -> list[int]:
    """``min(total, Σ sizes)`` split in proportion to ``sizes``: differences of ``⌊total · cumsum / Σ⌋``."""
    whole = sum(sizes)
    total = min(total, whole)
    shares, done, cumulative = [], 0, 0
    for size in sizes:
        cumulative += size
        upto = total * cumulative // whole if whole else 0
        shares.append(upto - done)
        done = upto
    return shares


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


def prune_mask(scores: torch.Tensor, ratio: float, grouping: Grouping, count: int | None = None) -> torch.Tensor:
    """Boolean mask of the entries to zero: the lowest ``⌊ratio · n⌋`` scores of every group, or ``count``
    entries in all (``prune_b``): by one threshold over the matrix (``matrix``) or spread over the rows as evenly
    as possible (``row``: ``q = count // rows`` per row, one more on the ``count % rows`` rows whose
    ``(q + 1)``-th lowest score is lowest)."""
    drop = torch.zeros_like(scores, dtype=torch.bool)
    if grouping == "matrix":
        k = prune_count(ratio, scores.numel()) if count is None else count
        drop.view(-1)[scores.reshape(-1).topk(k, largest=False).indices] = True
        return drop
    if count is None:
        q, extra = prune_count(ratio, scores.shape[1]), 0
    else:
        q, extra = divmod(count, scores.shape[0])
    lowest = scores.topk(min(q + 1, scores.shape[1]), dim=1, largest=False)
    drop.scatter_(1, lowest.indices[:, :q], True)
    if extra:
        rows = lowest.values[:, q].topk(extra, largest=False).indices
        drop[rows, lowest.indices[rows, q]] = True
    return drop
