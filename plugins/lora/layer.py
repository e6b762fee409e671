"""The LoRA layer: ``y = W x + b + (alpha / r) · B A dropout(x)`` on a frozen ``nn.Linear``.

Kept deliberately plain so that other methods can build on it: PRILoRA masks entries of ``lora_A`` and
reads the input statistics, PrunedLoRA shrinks ``r`` in place. Initialisation follows Hu et al. and HF PEFT
(A Kaiming-uniform, B zero), so a fresh adapter leaves the model's output unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, scaling: float | None = None):
        super().__init__()
        if r < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.alpha = alpha
        #: fixed at construction: methods that later shrink r keep the scale (alpha / initial r)
        self.scaling = scaling if scaling is not None else (alpha / r if r else 0.0)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        self.reset_parameters()

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def reset_parameters(self) -> None:
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input ``x`` (without the base output)."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.r == 0:
            return out
        return out + self.lora_delta(x)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapter folded into the weight (for export and inference)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"
