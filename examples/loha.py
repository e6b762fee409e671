"""LoHa (Hyeon-Woo et al., "FedPara", ICLR 2022; as in LyCORIS and HF PEFT): a method that is not LoRA-shaped.

Every target ``nn.Linear`` with frozen weight ``W`` computes ``y = W x + b + ΔW x`` with

    ΔW = s · (B₁ A₁) ⊙ (B₂ A₂),      s = alpha / r

a Hadamard product of two rank-``r`` products (``B``: ``out × r``, ``A``: ``r × in``), so ``ΔW`` can reach rank
``r²`` for ``2 r (in + out)`` trainable parameters per module. Initialisation as HF PEFT's: ``B₁``, ``A₁``,
``B₂`` Kaiming-uniform, ``A₂`` zero, so ``ΔW = 0`` at the start.

A local plugin, a single file: ``peftbench run sweep.yaml --plugin examples/loha.py`` (or ``plugins:
[examples/loha.py]`` in the config). The guide (docs/writing-a-method-plugin.md) walks through it: the layer is
its own ``nn.Module``, put in place of each target with ``peftbench.modeling.replace_module``, and the export is
HF PEFT's own LoHa format (``LoHaConfig``), built here. tests/test_loha_example.py runs the conformance kit on
it and reloads an export with HF PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftbench.fields import Rank
from peftbench.hookspecs import ParamCounts, hookimpl
from peftbench.lora import PREFIX, lora_layers, rank_cost
from peftbench.method import Description, Method, scale_range
from peftbench.modeling import replace_module

PEFTBENCH_API_VERSION = 2


class LoHaLinear(nn.Module):
    """``W x + b + s · ((B₁ A₁) ⊙ (B₂ A₂)) x`` on a frozen ``nn.Linear``; parameter names as HF PEFT's."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scaling = base, alpha / r  # the base stays a child module: frozen, untouched
        out_features, in_features = base.weight.shape
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r, **like))  # B₁
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features, **like))  # A₁
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r, **like))  # B₂
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_features, **like))  # A₂ = 0: ΔW = 0
        if base.weight.device.type != "meta":  # a meta model (budget counting) has shapes only
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(x, self.delta_weight())


@dataclass
class LoHaParams:
    r: Rank = 8  #: rank of each of the two products (solved by budget matching)
    alpha: float = 8.0  #: ``s = alpha / r``; PEFT's LoHaConfig default is ``alpha = r = 8``


class LoHa(Method):
    name = "loha"
    Params = LoHaParams
    description = "LoHa (FedPara): W + (alpha/r)·(B1·A1)⊙(B2·A2) on every target module"

    @hookimpl
    def peftbench_count_trainable(self, targets):
        n = 2 * self.params.r * rank_cost(targets)  # two rank-r products per module
        return ParamCounts(final=n, peak=n, nonzero=n)

    @hookimpl
    def peftbench_solve_budget(self, targets, target):
        return self.with_params(r=max(1, round(target / (2 * rank_cost(targets)))))

    def describe(self, targets) -> Description:
        return Description(scale_range([self.params.alpha / self.params.r]))

    @hookimpl
    def peftbench_inject(self, model, targets):
        for target in targets:
            base = model.get_submodule(target.name)
            replace_module(model, target.name, LoHaLinear(base, self.params.r, self.params.alpha))
        return True

    @hookimpl
    def peftbench_export_peft(self, model):
        """HF PEFT's LoHa format: ``LoHaConfig`` and the four factors of every module under PEFT's names."""
        layers = lora_layers(model, LoHaLinear)  # the LoHaLinear modules by name
        config = {"peft_type": "LOHA", "r": self.params.r, "alpha": self.params.alpha,
                  "target_modules": sorted(layers), "rank_pattern": {}, "alpha_pattern": {},
                  "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                  "init_weights": True, "inference_mode": True, "task_type": None}
        state = {f"{PREFIX}{name}.{key}": p.detach().to("cpu", torch.float32).contiguous()
                 for name, layer in layers.items() for key, p in layer.named_parameters(recurse=False)}
        return config, state


@hookimpl
def peftbench_add_methods():
    return [LoHa]
