"""The DoRA layer: ``y = m ⊙ (W + s·B A) x / ‖W + s·B A‖_row + b`` on a frozen ``nn.Linear``.

DoRA splits the adapted weight into a direction, ``W + s·BA`` normalised per output unit, and a trainable
magnitude ``m`` (one scalar per output unit, initialised to the norms of ``W``'s rows, so a fresh adapter
leaves the output unchanged). The paper writes ``W ∈ R^{d×k}`` and takes column norms; in PyTorch's
``(out, in)`` layout the same vectors are the rows, hence ``dim=1``.

Built on the LoRA toolkit's :class:`~peftbench.lora.LoRALinear` (``lora_A``, ``lora_B``, ``scaling``, dropout,
loading a saved rank): DoRA only adds ``magnitude`` and the rescaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.lora import LoRALinear


class DoRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, scaling: float | None = None,
                 rescale_dropped_input: bool = True):
        if r < 1:
            raise ValueError(f"DoRA rank must be >= 1, got {r}")
        super().__init__(base, r, alpha, dropout, scaling)
        #: with dropout, whether the rescaled ``W x`` term sees the dropped input (HF PEFT) or the clean one
        self.rescale_dropped_input = rescale_dropped_input
        self.magnitude = nn.Parameter(torch.empty(self.out_features, device=base.weight.device,
                                                  dtype=base.weight.dtype))
        self.reset_magnitude()

    def reset_magnitude(self) -> None:
        """``m = ‖W + s·BA‖_row``: with B = 0 (LoRA's init) that is ``‖W‖_row`` and the output is unchanged."""
        if self.magnitude.device.type != "meta":
            with torch.no_grad():
                self.magnitude.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """``‖W + s·BA‖`` per output unit, without gradient.

        Treated as a constant in the backward pass, as the paper recommends (§4.3: "we suggest treating
        ‖V + ∆V‖_c as a constant, thereby detaching it from the gradient graph"): the gradient reaches
        ``m`` and ``B A`` through the numerator only, which saves the memory of the norm's graph.
        """
        with torch.no_grad():
            return torch.linalg.vector_norm(self.base.weight + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)  # W x + b
        scale = self.magnitude / self.weight_norm()  # m / ‖W + s·BA‖, one factor per output unit
        lora_x = self.dropout(x)
        lora_out = F.linear(F.linear(lora_x, self.lora_A), self.lora_B) * self.scaling
        if lora_x is x or not self.training or not self.rescale_dropped_input:
            # W x is the base output without its bias: no second matmul
            wx = base_out if self.base.bias is None else base_out - self.base.bias
        else:
            # dropout active: the rescaled W x sees the dropped input too, as in HF PEFT
            wx = F.linear(lora_x, self.base.weight)
        out = base_out + (scale - 1) * wx + scale * lora_out
        # the fp32 magnitude promotes the sum: give back the base layer's dtype, as a Linear does under
        # autocast (DeBERTa fills bf16 attention scores with the query's dtype minimum: fp32's overflows)
        return out.to(base_out.dtype)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``m ⊙ (W + s·BA) / ‖W + s·BA‖`` as its weight (export, inference)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            direction = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
            merged.weight.copy_((self.magnitude / self.weight_norm()).unsqueeze(1) * direction)
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora"
