"""The PrunedLoRA layer: a :class:`LoRALinear` whose rank shrinks during training.

Removing components replaces ``lora_A``/``lora_B`` by smaller parameters, in the optimizer too, gradients
and optimizer state sliced (:func:`peftbench.lora.keep_rank`), so after the last pruning event the layer
costs exactly what a LoRA layer of the final rank costs. The scaling stays ``alpha / init_r`` (fixed at construction, as in the reference
code). A checkpoint of a pruned layer loads into a fresh one through :class:`LoRALinear`'s own resizing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.lora import LoRALinear, keep_rank, recomputing


class PrunedLoRALinear(LoRALinear):
    peftbench_resizable = True  # a checkpoint may hold a pruned rank: _load_from_state_dict takes its shapes

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, target_r: int = 1):
        super().__init__(base, r, alpha, dropout)
        if not 1 <= target_r <= r:
            raise ValueError(f"target rank must be in 1..{r} (the initial rank), got {target_r}")
        self.init_r = r
        self.target_r = target_r
        #: original index (0..init_r-1) of every surviving component, in order: removed ids never come back
        self.component_ids = torch.arange(r, device=base.weight.device)
        #: ``Σ_x (a_j · x)²`` since the last pruning event (only while the activation criterion needs it)
        self.input_energy: torch.Tensor | None = None
        #: running ``Gᵀ G`` of B and ``G Gᵀ`` of A (only with ``curvature: ema``)
        self.curvature_ema: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_energy is None or not self.training:
            return super().forward(x)
        out = self.base(x)
        z = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # the adapter's dtype (train.autocast)
        if not recomputing():  # a batch counts once (gradient checkpointing recomputes the forward)
            self.input_energy += z.detach().float().square().flatten(0, -2).sum(0)
        return (out + F.linear(z, self.lora_B) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def keep_components(self, keep: torch.Tensor, new_b: torch.Tensor, new_a: torch.Tensor,
                        optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only components ``keep`` (indices into the current rank), taking their values from the
        updated full-rank ``new_b``/``new_a``; gradients and ``optimizer``'s state are sliced alike."""
        keep_rank(self, "lora_B", 1, keep, optimizer, new_b)
        keep_rank(self, "lora_A", 0, keep, optimizer, new_a)
        self.component_ids = self.component_ids[keep.to(self.component_ids.device)]
        if self.input_energy is not None:
            self.input_energy = torch.zeros(len(keep), device=keep.device)
        if self.curvature_ema is not None:
            self.curvature_ema = tuple(h[keep][:, keep] for h in self.curvature_ema)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init_r={self.init_r}, target_r={self.target_r}"
