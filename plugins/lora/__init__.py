"""LoRA (Hu et al., 2021): ``W + (alpha / r) · B A`` on each target ``nn.Linear``; A random, B zero.

Numerically equivalent to HF PEFT's LoRA (``tests/test_lora_parity.py``). Per-module ranks and alphas
(``rank_pattern`` / ``alpha_pattern``, PEFT's semantics: a key matches a module whose name ends with it)
serve methods with non-uniform ranks.

The layer, injection and export live in the public toolkit :mod:`peftbench.lora`; this plugin is only the
method. API version 1 plugins imported the toolkit's names from here: they still resolve, with a
``DeprecationWarning`` (:func:`__getattr__`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import peftbench.lora as toolkit
from peftbench.fields import Dropout, Rank
from peftbench.hookspecs import ParamCounts, hookimpl
from peftbench.method import Description, Method, scale_range

PEFTBENCH_API_VERSION = 2
__version__ = "1.0"
__all__ = ["LoRA", "LoRAParams"]


@dataclass
class LoRAParams:
    r: Rank = 8
    alpha: float = 16.0
    dropout: Dropout = 0.0
    #: ``lora_only`` also trains the bias of each target module
    bias: Literal["none", "lora_only"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)  #: module-name suffix -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  #: module-name suffix -> alpha

    def rank_of(self, name: str) -> int:
        return _lookup(self.rank_pattern, name, self.r)

    def alpha_of(self, name: str) -> float:
        return _lookup(self.alpha_pattern, name, self.alpha)


def _lookup(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


class LoRA(Method):
    name = "lora"
    Params = LoRAParams
    description = "LoRA (Hu et al.): W + (alpha/r)·B·A on every target module"

    def _rank(self, target) -> int:
        return self.params.rank_of(target.name)

    def _count(self, targets) -> int:
        bias = sum(t.out_features for t in targets) if self.params.bias == "lora_only" else 0
        return sum(self._rank(t) * toolkit.rank_cost(t) for t in targets) + bias

    @hookimpl
    def peftbench_count_trainable(self, targets):
        n = self._count(targets)
        return ParamCounts(final=n, peak=n, nonzero=n)

    @hookimpl
    def peftbench_solve_budget(self, targets, target):
        per_rank = toolkit.rank_cost(targets)
        bias = sum(t.out_features for t in targets) if self.params.bias == "lora_only" else 0
        r = max(1, round((target - bias) / per_rank))
        return self.with_params(r=r, rank_pattern={})

    def describe(self, targets) -> Description:
        """Scale ``alpha / r`` (per module with rank/alpha patterns); LoRA is the reference: no deviations."""
        return Description(scale_range([self.params.alpha_of(t.name) / self._rank(t) for t in targets]))

    @hookimpl
    def peftbench_inject(self, model, targets):
        layers = toolkit.inject_lora(model, targets, self._rank, lambda t: self.params.alpha_of(t.name),
                                     self.params.dropout)
        if self.params.bias == "lora_only":
            for layer in layers.values():
                if layer.base.bias is not None:
                    layer.base.bias.requires_grad_(True)
        return True

    @hookimpl
    def peftbench_report(self, model):
        """Measured counts (the budget audit's): A and B of every layer, and the biases trained with them."""
        layers = toolkit.lora_layers(model).values()
        tensors = [p for m in layers for p in (m.lora_A, m.lora_B)]
        if self.params.bias == "lora_only":
            tensors += [m.base.bias for m in layers if m.base.bias is not None]
        n = sum(p.numel() for p in tensors)
        return {"counts": {"final": n, "peak": n, "nonzero": sum(int(p.count_nonzero()) for p in tensors)}}

    @hookimpl
    def peftbench_export_peft(self, model):
        if self.params.bias != "none":
            return None  # PEFT keeps trained biases in the base layer: not exported here
        layers = toolkit.lora_layers(model)
        return toolkit.lora_peft_export({n: (m.lora_A, m.lora_B, m.scaling) for n, m in layers.items()})


@hookimpl
def peftbench_add_methods():
    return [LoRA]


#: API version 1 names, now in the toolkit: resolved with a warning (see :func:`__getattr__`)
_MOVED = ("LoRALinear", "inject_lora", "lora_layers", "lora_peft_export")


def __getattr__(name: str) -> Any:
    """``from peftbench.plugins.lora import inject_lora`` (API version 1) still works, with a warning."""
    if name in _MOVED:
        return _moved(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _moved(module: str, name: str) -> Any:
    warnings.warn(f"{module}.{name} moved to peftbench.lora.{name} (the LoRA toolkit, API version 2): import it "
                  "from peftbench.lora and declare PEFTBENCH_API_VERSION = 2", DeprecationWarning, stacklevel=3)
    return getattr(toolkit, name)
