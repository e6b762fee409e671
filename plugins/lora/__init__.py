"""LoRA (Hu et al., 2021): ``W + (alpha / r) · B A`` on each target ``nn.Linear``; A random, B zero.

Numerically equivalent to HF PEFT's LoRA (``tests/test_lora_parity.py``). Per-module ranks and alphas
(``rank_pattern`` / ``alpha_pattern``, PEFT's semantics: a key matches a module whose name ends with it)
make the layer reusable by methods with non-uniform ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from peftbench.hookspecs import ParamCounts, TargetModule, hookimpl
from peftbench.method import Method
from peftbench.modeling import replace_module

from .export import lora_peft_export
from .layer import LoRALinear

PEFTBENCH_API_VERSION = 1
__version__ = "1.0"
__all__ = ["LoRA", "LoRAParams", "LoRALinear", "inject_lora", "lora_layers", "lora_peft_export"]


@dataclass
class LoRAParams:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    #: ``lora_only`` also trains the bias of each target module
    bias: Literal["none", "lora_only"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)  #: module-name suffix -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  #: module-name suffix -> alpha

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def rank_of(self, name: str) -> int:
        return _lookup(self.rank_pattern, name, self.r)

    def alpha_of(self, name: str) -> float:
        return _lookup(self.alpha_pattern, name, self.alpha)


def _lookup(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def inject_lora(model: nn.Module, targets: list[TargetModule], rank_of: Callable[[TargetModule], int],
                alpha_of: Callable[[TargetModule], float], dropout: float = 0.0,
                layer_cls: type[LoRALinear] = LoRALinear, **layer_kwargs) -> dict[str, LoRALinear]:
    """Wrap every target ``nn.Linear`` of ``model`` in ``layer_cls``; returns the new layers by name."""
    layers = {}
    for target in targets:
        base = model.get_submodule(target.name)
        layer = layer_cls(base, rank_of(target), alpha_of(target), dropout, **layer_kwargs)
        replace_module(model, target.name, layer)
        layers[target.name] = layer
    return layers


def lora_layers(model: nn.Module, layer_cls: type[nn.Module] = LoRALinear) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, layer_cls)}


def lora_count(targets: list[TargetModule], rank_of: Callable[[TargetModule], int]) -> int:
    return sum(rank_of(t) * (t.in_features + t.out_features) for t in targets)


class LoRA(Method):
    name = "lora"
    Params = LoRAParams
    description = "LoRA (Hu et al.): W + (alpha/r)·B·A on every target module"

    def _rank(self, target: TargetModule) -> int:
        return self.params.rank_of(target.name)

    def _count(self, targets: list[TargetModule]) -> int:
        bias = sum(t.out_features for t in targets) if self.params.bias == "lora_only" else 0
        return lora_count(targets, self._rank) + bias

    @hookimpl
    def peftbench_count_trainable(self, targets):
        n = self._count(targets)
        return ParamCounts(final=n, peak=n, nonzero=n)

    @hookimpl
    def peftbench_solve_budget(self, targets, target):
        per_rank = sum(t.in_features + t.out_features for t in targets)
        bias = sum(t.out_features for t in targets) if self.params.bias == "lora_only" else 0
        r = max(1, round((target - bias) / per_rank))
        return self.with_params(r=r, rank_pattern={})

    @hookimpl
    def peftbench_inject(self, model, targets):
        layers = inject_lora(model, targets, self._rank, lambda t: self.params.alpha_of(t.name), self.params.dropout)
        if self.params.bias == "lora_only":
            for layer in layers.values():
                if layer.base.bias is not None:
                    layer.base.bias.requires_grad_(True)
        return True

    @hookimpl
    def peftbench_export_peft(self, model):
        if self.params.bias != "none":
            return None  # PEFT keeps trained biases in the base layer: not exported here
        return lora_peft_export({n: (m.lora_A, m.lora_B, m.scaling) for n, m in lora_layers(model).items()})


@hookimpl
def peftbench_add_methods():
    return [LoRA]
