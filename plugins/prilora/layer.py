"""The PRILoRA layer: a :class:`LoRALinear` that also keeps the activation statistic its pruning score needs.

In training mode each forward pass updates ``norm_ema``, an exponential moving average of the L2 norm of every
feature over all tokens of the batch: of the module's input ``x`` (``statistic="input"``, the score of A) or of
the rank-space activation ``h = A x`` (``statistic="rank"``, the analogous score of B). The input statistic is
one reduction over ``x`` (sum of squares over the tokens, a single memory pass; ``torch.linalg.vector_norm``
over the token dimension is ~10× slower on CPU), then LoRA's own forward runs unchanged, fast merged path
included. The rank statistic costs one extra skinny GEMM (``A x``, which LoRA's merged path never forms); it
serves only the ``prune_b`` ablation. Evaluation skips both.
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
        norm = torch.sum(flat * flat, dim=0, dtype=torch.float32).sqrt_()
        if self.ema_started:
            self.norm_ema.lerp_(norm, 1.0 - self.ema)  # ema · old + (1 - ema) · new
        else:
            self.norm_ema.copy_(norm)
            self.ema_started = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.r:
            if self.statistic == "input":
                self.observe(x)  # the module's input x, before LoRA dropout
            elif self.statistic == "rank":
                self.observe(F.linear(x.detach(), self.lora_A.detach()))  # h = A x, before dropout
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, statistic={self.statistic}, ema={self.ema:g}"
