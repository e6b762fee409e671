"""The PRILoRA layer: a :class:`LoRALinear` that also keeps the activation statistic its pruning score needs.

In training mode each forward pass updates ``norm_ema``, an exponential moving average of the L2 norm of every
feature over all tokens of the batch: of the module's input ``x`` (``statistic="input"``, the score of A) or of
the rank-space activation ``h = A x`` (``statistic="rank"``, the analogous score of B). The input statistic is
the column sums of ``x ⊙ x`` taken as a GEMV (``1ᵀ (x ⊙ x)``: on CPU several times faster than a reduction
over the token dimension, and ``torch.linalg.vector_norm`` is slower still), computed once per input tensor:
the query, key and value maps of a block read the same ``x`` and share one :class:`InputNorms`. Then LoRA's
own forward runs unchanged, fast merged path included. The rank statistic costs one extra skinny GEMM
(``A x``, which LoRA's merged path never forms); it serves only the ``prune_b`` ablation. Evaluation skips both.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.lora import LoRALinear, recomputing

Statistic = Literal["input", "rank", "none"]


class InputNorms:
    """The per-feature L2 norm of the last input tensor seen, shared by the layers of one model: modules fed the
    same tensor (query, key, value) compute it once. Holds a weak reference only: no activation is kept alive."""

    def __init__(self):
        self.key: tuple[weakref.ref, int] | None = None
        self.norm: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.key is not None and self.key[0]() is x and self.key[1] == x._version:
            return self.norm
        self.norm = feature_norms(x)
        self.key = (weakref.ref(x), x._version)
        return self.norm


@torch.no_grad()
def feature_norms(x: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norm of every feature (last dim) of ``x`` over all its tokens. Autocast is switched off here: it
    would run the sum as a bf16/fp16 matmul, and a method statistic stays fp32 under mixed precision."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if flat.dtype != torch.float32:
        flat = flat.float()
    with torch.autocast(flat.device.type, enabled=False):
        return (flat.new_ones(1, flat.shape[0]) @ (flat * flat)).squeeze(0).sqrt_()


class PRILoRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, statistic: Statistic = "input",
                 ema: float = 0.9, input_norms: InputNorms | None = None):
        super().__init__(base, r, alpha, dropout)
        self.input_norms = input_norms or InputNorms()
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
    def observe(self, norm: torch.Tensor) -> None:
        """Fold a batch's per-feature L2 norms into ``norm_ema``."""
        if self.ema_started:
            self.norm_ema.lerp_(norm, 1.0 - self.ema)  # ema · old + (1 - ema) · new
        else:
            self.norm_ema.copy_(norm)
            self.ema_started = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.r and not recomputing():  # a batch counts once (checkpointing)
            if self.statistic == "input":
                self.observe(self.input_norms(x))  # the module's input x, before LoRA dropout
            elif self.statistic == "rank":
                self.observe(feature_norms(F.linear(x.detach().to(self.lora_A.dtype), self.lora_A.detach())))  # h = A x, before dropout
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, statistic={self.statistic}, ema={self.ema:g}"
