"""AdaLoRA's rank allocator and orthogonality penalty, batched across modules.

Same-shape tensors of different modules (every ``Q`` of the attention maps, every ``P`` of the FFN
up-projections, all ``E``) are handled as one stacked ``(G, ...)`` tensor, so the importance EMAs, the triplet
scores and the global threshold cost a handful of kernels per shape group instead of a Python loop with a
dozen ops per parameter (HF PEFT's ``RankAllocator``). Masking never reads a value back to the host, and
the frozen final mask is applied with one ``_foreach_mul_`` per step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftbench.lora import rank_cost

from .layer import SVDLinear


def budget_schedule(step: int, initial: int, target: int, tinit: int, tfinal: int, total_steps: int,
                    delta_t: int) -> tuple[int, bool]:
    """The budget b(t) at (0-based) step ``step`` and whether to reallocate at that step.

    Hold ``initial`` for steps ``<= tinit``, decrease it cubically to ``target`` at ``total_steps - tfinal``,
    hold ``target`` afterwards; reallocate every ``delta_t`` steps in between (the reference code's and HF
    PEFT's ``budget_schedule``, including ``int()`` truncation; the paper's printed formula has a typo).
    """
    if step <= tinit:
        return initial, False
    if step > total_steps - tfinal:
        return target, True
    remaining = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((initial - target) * remaining ** 3 + target), step % delta_t == 0


@dataclass
class _Stack:
    """Same-shape adapter tensors of several modules, scored as one ``(G, *shape)`` tensor."""

    params: list[nn.Parameter]
    modules: torch.Tensor  #: (G,) row of each tensor's module in the (M, r) triplet table
    reduce_dim: int | None  #: dim averaged into one score per triplet (1: P's rows, 2: Q's columns; None: E)
    ipt: torch.Tensor  #: Ī, the EMA of the sensitivity |w · ∂L/∂w|
    unc: torch.Tensor  #: Ū, the EMA of the uncertainty |I − Ī|

    @torch.no_grad()
    def update(self, beta1: float, beta2: float) -> None:
        weights = torch.stack(self.params)
        grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        ipt = (weights * grads).abs_()
        self.ipt.mul_(beta1).add_(ipt, alpha=1 - beta1)
        self.unc.mul_(beta2).add_(ipt.sub_(self.ipt).abs_(), alpha=1 - beta2)

    def triplet_scores(self) -> torch.Tensor:
        """Per-triplet score ``(G, r)``: s = Ī·Ū, averaged over the singular vector."""
        score = self.ipt * self.unc
        return score if self.reduce_dim is None else score.mean(self.reduce_dim)


class RankAllocator:
    """Importance scores, the budget schedule and the masks of every :class:`SVDLinear` of a model.

    ``budget_unit="triplets"`` counts the budget in triplets (paper, reference code, HF PEFT);
    ``"params"`` counts it in adapter parameters, a kept triplet of module m costing ``d_in + d_out + 1``:
    the top-scored triplets whose summed cost is nearest to b(t) are kept, so the final count is within half
    a triplet of a parameter budget whatever the allocation.
    """

    def __init__(self, layers: dict[str, SVDLinear], *, target: int, tinit: int, tfinal: int, total_steps: int,
                 delta_t: int, beta1: float, beta2: float, budget_unit: Literal["triplets", "params"] = "triplets",
                 history_points: int = 100):
        self.names = list(layers)
        self.layers = list(layers.values())
        ranks = {layer.r for layer in self.layers}
        if len(ranks) != 1:
            raise ValueError(f"every AdaLoRA layer needs the same initial rank, got {sorted(ranks)}")
        self.r = ranks.pop()
        device = self.layers[0].E.device
        self.beta1, self.beta2 = beta1, beta2
        self.tinit, self.tfinal, self.total_steps, self.delta_t = tinit, tfinal, total_steps, delta_t
        self.final_step = total_steps - tfinal  # the step that fixes the final mask
        self.budget_unit = budget_unit
        #: parameters a triplet of each module costs: a column of P, a row of Q and its singular value
        self.cost = torch.tensor([[rank_cost(layer) + 1] * self.r for layer in self.layers],
                                 device=device)
        self.initial = self.cost.numel() if budget_unit == "triplets" else int(self.cost.sum())
        self.target = target
        if not 0 < target < self.initial:
            raise ValueError(f"the target budget ({target} {budget_unit}) must be below the initial budget "
                             f"({self.initial}) and above 0")
        self.budget = self.initial
        self.stacks = self._group("P", 1) + self._group("Q", 2) + self._group("E", None)
        self.mask = torch.ones(len(self.layers), self.r, dtype=torch.bool, device=device)
        self.final_mask: torch.Tensor | None = None
        self._final_rows: list[torch.Tensor] = []
        rounds = max(1, (self.final_step - tinit) // delta_t)
        self._record_every = delta_t * max(1, -(-rounds // history_points))
        self.history: list[tuple[int, torch.Tensor]] = [(0, self.mask.sum(1))]

    def _group(self, attr: str, reduce_dim: int | None) -> list[_Stack]:
        by_shape = defaultdict(list)
        for i, layer in enumerate(self.layers):
            by_shape[tuple(getattr(layer, attr).shape)].append(i)
        stacks = []
        for rows in by_shape.values():
            params = [getattr(self.layers[i], attr) for i in rows]
            zeros = torch.zeros(len(rows), *params[0].shape, device=params[0].device, dtype=params[0].dtype)
            stacks.append(_Stack(params, torch.tensor(rows, device=zeros.device), reduce_dim, zeros,
                                 zeros.clone()))
        return stacks

    @property
    def shape_groups(self) -> dict[str, list[list[nn.Parameter]]]:
        """``{"P": [...], "Q": [...]}``: the singular-vector tensors grouped by shape."""
        groups: dict[str, list[list[nn.Parameter]]] = {"P": [], "Q": []}
        for stack in self.stacks:
            if stack.reduce_dim is not None:
                groups["P" if stack.reduce_dim == 1 else "Q"].append(stack.params)
        return groups

    # --- importance ----------------------------------------------------------------------------------------

    def update_importance(self) -> None:
        for stack in self.stacks:
            stack.update(self.beta1, self.beta2)
        # one inf/nan gradient would poison the EMAs for good and mask every triplet while the run "succeeds";
        # fail the run instead (fp16 steps the grad scaler skipped never get here)
        if not all(bool(torch.isfinite(stack.ipt).all()) and bool(torch.isfinite(stack.unc).all())
                   for stack in self.stacks):
            raise FloatingPointError("AdaLoRA's importance scores became non-finite (inf/nan gradients)")

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """``(M, r)``: s(E_i) + mean s over column i of P + mean s over row i of Q, for every module."""
        vectors = torch.zeros_like(self.mask, dtype=self.stacks[0].ipt.dtype)
        values = None
        for stack in self.stacks:
            if stack.reduce_dim is None:
                values = torch.zeros_like(vectors).index_copy_(0, stack.modules, stack.triplet_scores())
            else:
                vectors.index_add_(0, stack.modules, stack.triplet_scores())
        return values + vectors  # HF PEFT's order of additions: E + (P + Q)

    # --- allocation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def allocate(self, budget: int) -> torch.Tensor:
        """The ``(M, r)`` keep-mask of the top triplets under ``budget`` (one threshold across all modules)."""
        scores = self.triplet_scores().flatten()
        if self.budget_unit == "triplets":
            masked = scores.numel() - budget
            if masked <= 0:
                return torch.ones_like(self.mask)
            # keep what scores above the masked-th smallest score (HF PEFT's kthvalue rule: ties are masked)
            return (scores > torch.kthvalue(scores, masked).values).view_as(self.mask)
        # the best-scored triplets whose summed cost is nearest to the budget (still one threshold): the one
        # that crosses it is kept if that lands closer, so the count is within half a triplet of the budget
        # (a plain "while it fits" cap can fall a whole triplet short: 1.2 % of DeBERTa's 0.33M budget)
        order = scores.argsort(descending=True)
        cost = self.cost.flatten()[order]
        total = cost.cumsum(0)
        before = total - cost
        keep = (before <= budget) & (total + before <= 2 * budget)
        return torch.empty_like(keep).scatter_(0, order, keep).view_as(self.mask)

    @torch.no_grad()
    def apply(self, mask: torch.Tensor, rows: list[torch.Tensor] | None = None) -> None:
        """Zero the singular values of the masked triplets, in every layer at once."""
        self.mask = mask
        if rows is None:
            rows = list(mask.to(self.layers[0].E.dtype).unbind(0))
        torch._foreach_mul_([layer.E for layer in self.layers], rows)

    def step(self, step: int) -> None:
        """Called after the optimizer step ``step`` (0-based), while the gradients are still present."""
        if step < self.final_step:
            self.update_importance()
            self.budget, due = budget_schedule(step, self.initial, self.target, self.tinit, self.tfinal,
                                               self.total_steps, self.delta_t)
            if due:
                self.apply(self.allocate(self.budget))
                if step % self._record_every == 0:
                    self.history.append((step, self.mask.sum(1)))
        elif step == self.final_step:
            self.budget = self.target
            self.final_mask = self.allocate(self.target)
            self.apply(self.final_mask)
            self._final_rows = list(self.final_mask.to(self.layers[0].E.dtype).unbind(0))
            self.history.append((step, self.final_mask.sum(1)))
            for stack in self.stacks:  # scores are no longer needed: free the EMAs
                stack.ipt = stack.unc = torch.empty(0)
        else:
            # the optimizer revives masked singular values (their gradient is not zero): zero them again
            self.apply(self.final_mask, self._final_rows)

    # --- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a resumed run needs besides the model's tensors (plain tensors and numbers only)."""
        return {"ipt": [s.ipt for s in self.stacks], "unc": [s.unc for s in self.stacks], "mask": self.mask,
                "final_mask": self.final_mask, "budget": self.budget,
                "history": [{"step": step, "ranks": ranks} for step, ranks in self.history]}

    def load_state_dict(self, state: dict) -> None:
        device = self.mask.device
        for stack, ipt, unc in zip(self.stacks, state["ipt"], state["unc"], strict=True):
            stack.ipt, stack.unc = ipt.to(device), unc.to(device)
        self.mask, self.budget = state["mask"].to(device), state["budget"]
        self.final_mask = None if state["final_mask"] is None else state["final_mask"].to(device)
        if self.final_mask is not None:
            self._final_rows = list(self.final_mask.to(self.layers[0].E.dtype).unbind(0))
        self.history = [(h["step"], h["ranks"].to(device)) for h in state["history"]]

    # --- reporting -----------------------------------------------------------------------------------------

    def ranks(self) -> dict[str, int]:
        return dict(zip(self.names, self.mask.sum(1).tolist()))

    def rank_history(self) -> list[dict]:
        return [{"step": step, "ranks": dict(zip(self.names, ranks.tolist()))} for step, ranks in self.history]


def orthogonal_penalty(groups: dict[str, list[list[nn.Parameter]]], squared: bool = False) -> torch.Tensor:
    """Mean over all P and Q matrices of ``‖PᵀP − I‖_F`` and ``‖QQᵀ − I‖_F`` (squared if ``squared``).

    One batched Gram matrix per shape group; the reference code and HF PEFT loop over every parameter.
    """
    total, count = 0.0, 0
    for kind, stacks in groups.items():
        for params in stacks:
            m = torch.stack(params)
            gram = m.mT @ m if kind == "P" else m @ m.mT
            eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
            sq = (gram - eye).square().sum((-2, -1))
            total = total + (sq.sum() if squared else sq.sqrt().sum())
            count += len(params)
    return total / count
