"""The PRILoRA layer: a :class:`LoRALinear` that also keeps the activation statistic its pruning score needs.

In training mode each forward pass updates ``norm_ema``, an exponential moving average of the L2 norm of every
feature over all tokens of the batch: of the module's input ``x`` (``statistic="input"``, the score of A) or of
the rank-space activation ``h = A x`` (``statistic="rank"``, the analogous score of B). That is one reduction
over a tensor the forward pass computes anyway, with no extra pass over the data; evaluation skips it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from peftbench.plugins.lora import LoRALinear
from torch import nn

Statistic = Literal["input", "rank", "none"]


class PRILoRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, statistic: Statistic = "input",
                 ema: float = 0.9):
        super().__init__(base, r, alpha, dropout)
        if statistic not in ("input", "rank", "none"):
            raise ValueError(f"statistic must be 'input', 'rank' or 'none', got {statistic!r}")
        self.statistic = statistic
        self.ema = ema
        size = {"input": self.in_features, "rank": r, "none": 0}[statistic]
        # fp32 whatever the weights' dtype; not persistent: it is training state, not part of the adapter
        self.register_buffer("norm_ema", torch.zeros(size, device=base.weight.device, dtype=torch.float32),
                             persistent=False)
        # the first batch initialises the average (no bias towards zero); a flag, not a counter, so that a
        # compiled forward sees one change, not a new constant every step
        self.ema_started = False

    @torch.no_grad()
    def observe(self, activation: torch.Tensor) -> None:
        """Fold the per-feature L2 norm of ``activation`` (over every token of the batch) into ``norm_ema``."""
        flat = activation.detach().reshape(-1, activation.shape[-1])
        norm = torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32)
        if self.ema_started:
            self.norm_ema.lerp_(norm, 1.0 - self.ema)  # ema · old + (1 - ema) · new
        else:
            self.norm_ema.copy_(norm)
            self.ema_started = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.r == 0:
            return out
        track = self.statistic if self.training else "none"
        if track == "input":
            self.observe(x)  # the module's input x, before LoRA dropout
        hidden = F.linear(self.dropout(x), self.lora_A)
        if track == "rank":
            self.observe(hidden)
        return out + F.linear(hidden, self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, statistic={self.statistic}, ema={self.ema:g}"
