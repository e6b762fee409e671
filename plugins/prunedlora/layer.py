"""The PrunedLoRA layer: a :class:`LoRALinear` whose rank shrinks in place during training.

Removing components replaces ``lora_A``/``lora_B`` by smaller ``nn.Parameter`` objects (the caller swaps
them into the optimizer), so after the last pruning event the layer costs exactly what a LoRA layer of the
final rank costs. The scaling stays ``alpha / init_r`` (fixed at construction, as in the reference code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from peftbench.plugins.lora.layer import LoRALinear
from torch import nn

from .surgery import shrink_parameter


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
        z = F.linear(self.dropout(x), self.lora_A)
        self.input_energy += z.detach().float().square().flatten(0, -2).sum(0)
        return self.base(x) + F.linear(z, self.lora_B) * self.scaling

    @torch.no_grad()
    def keep_components(self, keep: torch.Tensor, new_b: torch.Tensor, new_a: torch.Tensor,
                        swap: Callable[[nn.Parameter, nn.Parameter, list], None]) -> None:
        """Keep only components ``keep`` (indices into the current rank), taking their values from the
        updated full-rank ``new_b``/``new_a``; ``swap(old, new, keep_index_per_dim)`` updates the optimizer."""
        for name, value, index in (("lora_B", new_b, [None, keep]), ("lora_A", new_a, [keep, None])):
            old = getattr(self, name)
            new = shrink_parameter(old, index, value.to(old.dtype))
            swap(old, new, index)
            setattr(self, name, new)
        self.component_ids = self.component_ids[keep.to(self.component_ids.device)]
        if self.input_energy is not None:
            self.input_energy = torch.zeros(len(keep), device=keep.device)
        if self.curvature_ema is not None:
            self.curvature_ema = tuple(h[keep][:, keep] for h in self.curvature_ema)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint of a pruned adapter has smaller A/B than a freshly injected one: take its shapes
        for name in ("lora_A", "lora_B"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                old = getattr(self, name)
                setattr(self, name, nn.Parameter(torch.empty(saved.shape, dtype=old.dtype, device=old.device),
                                                 requires_grad=old.requires_grad))
                if name == "lora_A":  # the original ids are not saved: number the loaded components afresh
                    self.component_ids = torch.arange(saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init_r={self.init_r}, target_r={self.target_r}"
