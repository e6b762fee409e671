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

from peftbench.lora import MergedLoRAFunction, in_own_dtype, merge_is_exact, merged_linear


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
        # diag(E) and the scale folded into Q (an r × d_in product): autograd takes the gradients of E and Q
        # from that product's. In fp32 the update then rides LoRA's merged path, one GEMM with W + s·P (E⊙Q)
        # instead of three (the largest cost at small batches, where the base GEMMs are cheap).
        scaled_q = self.Q * (self.E * self.scaling).unsqueeze(1)
        if merge_is_exact(x, self.base.weight, self.Q, self.dropout, self.training):
            return MergedLoRAFunction.apply(x, self.base.weight, self.base.bias, scaled_q, self.P, 1.0)
        if in_own_dtype(x, self.Q):
            out = self.base(x)
            update = F.linear(F.linear(self.dropout(x.to(self.Q.dtype)), scaled_q), self.P)
            return (out + update).to(out.dtype)
        out = self.base(x)
        # otherwise (bf16/fp16, dropout): the low-rank path, one token-sized r-wide activation saved per layer;
        # addmm adds the update inside the GEMM, no extra pass over the layer's output
        h = F.linear(self.dropout(x), scaled_q)
        flat = torch.addmm(out.reshape(-1, self.out_features), h.reshape(-1, self.r), self.P.t())
        return flat.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.P * self.E) @ self.Q * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into the weight (for export and inference)."""
        return merged_linear(self.base, self.delta_weight())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, init_r={self.r}, scaling={self.scaling:g}"
