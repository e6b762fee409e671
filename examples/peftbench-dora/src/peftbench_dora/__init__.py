"""DoRA (Liu et al., ICML 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353).

Algorithm: every target ``nn.Linear`` with frozen weight ``W`` (shape ``out × in``) computes

    y = m ⊙ (W + s·B A) x / ‖W + s·B A‖_row + b,      s = alpha / r

``A`` (``r × in``, Kaiming-uniform) and ``B`` (``out × r``, zero) are LoRA's factors; the magnitude ``m``
(``out`` values, trainable) starts at ``‖W‖_row``, so the model's output is unchanged at initialisation.
The norm is treated as a constant in the backward pass (the paper's §4.3). Trainable parameters per module:
``r·(in + out) + out`` — LoRA's plus the magnitude vector.

Budget matching: the rank is solved so the total count meets the sweep's budget. Because ``m`` adds a fixed
``out`` per module, one uniform rank usually misses a LoRA-rank budget by about half a rank (6.25 % on
DeBERTaV3-base at LoRA r=8); with ``budget_ranks: mixed`` (the default, a choice the paper does not face)
the solver gives every module rank ``r`` or ``r + 1`` — the largest modules first — to land within a fraction
of a percent, recorded as ``rank_pattern``. ``budget_ranks: uniform`` keeps one rank (nearest).

Differences from HF PEFT (``LoraConfig(use_dora=True)``): none in the forward and backward pass (equal
outputs and gradients, peftbench's ``tests/test_example_plugin.py``). Where the paper is silent: with dropout, the rescaled
``W x`` term sees the dropped input, as in HF PEFT (``rescale_dropped_input: true``; ``false`` feeds it the
clean input, so dropout acts on the ``BA`` path only); and the ``mixed`` budget ranks above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peftbench.fields import Dropout, Rank
from peftbench.hookspecs import ParamCounts, TargetModule, hookimpl
from peftbench.lora import inject_lora, lora_layers, lora_peft_export, rank_cost
from peftbench.method import Method

from .layer import DoRALinear

#: the major version of peftbench's hook contract this plugin is written against (``peftbench.API_VERSION``)
PEFTBENCH_API_VERSION = 2
__version__ = "0.1.0"
__all__ = ["DoRA", "DoRAParams", "DoRALinear"]


@dataclass
class DoRAParams:
    r: Rank = 8  #: rank of ``B A`` (solved by budget matching)
    alpha: float = 16.0  #: ``s = alpha / r``
    dropout: Dropout = 0.0  #: dropout on the adapter's input
    #: per-module ranks (full module name -> rank); filled by the ``mixed`` budget solver
    rank_pattern: dict[str, Rank] = field(default_factory=dict)
    #: how the budget solver picks ranks: ``mixed`` (r or r+1 per module, closest to the budget) or ``uniform``
    budget_ranks: Literal["mixed", "uniform"] = "mixed"
    #: with dropout, the rescaled ``W x`` term sees the dropped input (HF PEFT) or, if false, the clean one
    rescale_dropped_input: bool = True

    def rank_of(self, name: str) -> int:
        return self.rank_pattern.get(name, self.r)


def dora_count(targets: list[TargetModule], rank_of) -> int:
    """Trainable parameters of DoRA on ``targets``: LoRA's ``r·(in + out)`` plus ``out`` magnitudes each."""
    return sum(rank_of(t.name) * rank_cost(t) + t.out_features for t in targets)


class DoRA(Method):
    name = "dora"
    Params = DoRAParams
    description = "DoRA (Liu et al.): magnitude m ⊙ direction (W + s·BA)/‖W + s·BA‖ on every target module"

    @hookimpl
    def peftbench_count_trainable(self, targets):
        n = dora_count(targets, self.params.rank_of)
        return ParamCounts(final=n, peak=n, nonzero=n)

    @hookimpl
    def peftbench_solve_budget(self, targets, target, tolerance):
        magnitudes = sum(t.out_features for t in targets)
        per_rank = rank_cost(targets)
        uniform = self.with_params(r=max(1, round((target - magnitudes) / per_rank)), rank_pattern={})
        miss = abs(dora_count(targets, uniform.rank_of) - target)
        if self.params.budget_ranks == "uniform" or miss <= tolerance * target:
            return uniform
        # mixed: rank r everywhere, then r + 1 on the largest modules while that brings the count closer
        r = max(1, math.floor((target - magnitudes) / per_rank))
        remaining = target - dora_count(targets, lambda name: r)
        pattern = {}
        for t in sorted(targets, key=rank_cost, reverse=True):  # stable
            if abs(remaining - rank_cost(t)) < abs(remaining):
                pattern[t.name] = r + 1
                remaining -= rank_cost(t)
        return self.with_params(r=r, rank_pattern=pattern)

    @hookimpl
    def peftbench_inject(self, model, targets):
        inject_lora(model, targets, lambda t: self.params.rank_of(t.name), lambda t: self.params.alpha,
                    self.params.dropout, layer_cls=DoRALinear,
                    rescale_dropped_input=self.params.rescale_dropped_input)
        return True

    @hookimpl
    def peftbench_export_peft(self, model):
        """HF PEFT's format: ``LoraConfig(use_dora=True)`` with ``lora_magnitude_vector`` per module."""
        layers = lora_layers(model, DoRALinear)
        factors = {name: (layer.lora_A, layer.lora_B, layer.scaling) for name, layer in layers.items()}
        return lora_peft_export(factors, magnitudes={name: layer.magnitude for name, layer in layers.items()})


@hookimpl
def peftbench_add_methods():
    return [DoRA]
