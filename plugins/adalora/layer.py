"""The AdaLoRA layer: ``y = W x + b + scale · P diag(E) Q dropout(x)`` on a frozen ``nn.Linear``.

``P`` (d_out × r) and ``Q`` (r × d_in) are the left and right singular vectors, ``E`` (r) the singular values
Λ of the SVD-form update (HF PEFT calls them ``lora_B``, ``lora_A`` and ``lora_E``). ``E`` starts at zero
and ``P``, ``Q`` at N(0, 0.02²) as in the reference code, so a fresh adapter leaves the output unchanged.
A triplet (column i of P, E[i], row i of Q) is switched off by zeroing ``E[i]``; ``P`` and ``Q`` keep their
full initial rank, and ``scale = alpha / init_r`` never changes when triplets are masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SVDLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        if r < 1:
            raise ValueError(f"AdaLoRA initial rank must be >= 1, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.alpha = alpha
        #: fixed by the initial rank: masking triplets does not rescale the update (the author found it hurt)
        self.scaling = alpha / r
        self.init_std = init_std
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.P = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.E = nn.Parameter(torch.zeros(r, **factory))
        self.Q = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.reset_parameters()

    @property
    def r(self) -> int:
        """The initial (allocated) rank; the rank in effect is ``(E != 0).sum()``."""
        return self.E.shape[0]

    def reset_parameters(self) -> None:
        if self.P.device.type != "meta":
            nn.init.normal_(self.P, std=self.init_std)
            nn.init.normal_(self.Q, std=self.init_std)
            nn.init.zeros_(self.E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # diag(E) and the scale act on the r channels of Q x (cheap), not on the d_out-wide output, and
        # addmm adds the update inside the GEMM: no extra passes over the layer's output.
        h = F.linear(self.dropout(x), self.Q) * (self.E * self.scaling)
        flat = torch.addmm(out.reshape(-1, self.out_features), h.reshape(-1, self.r), self.P.t())
        return flat.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.P * self.E) @ self.Q * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into the weight (for export and inference)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, init_r={self.r}, scaling={self.scaling:g}"
