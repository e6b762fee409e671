"""The LoRA toolkit: what a LoRA-family method plugin builds on.

* :class:`LoRALinear`: ``W x + b + scaling · B A dropout(x)`` on a frozen ``nn.Linear``, with the fused
  fp32 path :class:`MergedLoRAFunction` (``merge_is_exact`` says when it applies, ``merged_linear`` folds an
  update into a plain ``nn.Linear``). Subclass it to add state or change the forward pass (PRILoRA, DoRA).
* :func:`inject_lora` wraps a method's target modules in such layers; :func:`lora_layers` finds them again.
* :func:`recomputing`: whether a forward pass is gradient checkpointing's recomputation (forward statistics
  skip it).
* :func:`rank_cost`: the parameters one rank costs on a set of modules (``in + out`` each), for budgets.
* :func:`keep_rank` / :func:`resize_rank`: shrink or grow a parameter along its rank dimension in place,
  gradient and optimizer state included. A :class:`LoRALinear` loads a state dict of another rank by itself
  (``peftbench_resizable = True``: the host may hand it tensors of another shape).
* :func:`lora_peft_export`: factors → HF PEFT's adapter config and state dict, the one exporter.

The toolkit is part of peftbench's plugin API and is covered by its version (``peftbench.API_VERSION``, 2
since the toolkit exists): a change that breaks a method built on these names bumps the version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from torch import nn

from ..hookspecs import TargetModule
from ..modeling import replace_module
from .export import PREFIX, lora_peft_export, peft_alpha
from .layer import LoRALinear, MergedLoRAFunction, in_own_dtype, merge_is_exact, merged_linear, recomputing
from .resize import keep_rank, resize_rank

__all__ = ["PREFIX", "LoRALinear", "MergedLoRAFunction", "in_own_dtype", "inject_lora", "keep_rank", "lora_layers",
           "lora_peft_export", "merge_is_exact", "merged_linear", "peft_alpha", "rank_cost", "recomputing",
           "resize_rank"]


class _Shaped(Protocol):
    in_features: int
    out_features: int


def rank_cost(modules: _Shaped | Iterable[_Shaped]) -> int:
    """Parameters one rank costs: ``in + out`` per module (a row of A and a column of B), summed over
    ``modules`` (target modules or layers; one alone is allowed)."""
    if hasattr(modules, "in_features"):
        return modules.in_features + modules.out_features
    return sum(m.in_features + m.out_features for m in modules)


#: an adapter layer class: a :class:`LoRALinear` (subclasses included) or any other ``nn.Module``
Layer = TypeVar("Layer", bound=nn.Module)


def inject_lora(model: nn.Module, targets: list[TargetModule], rank_of: Callable[[TargetModule], int],
                alpha_of: Callable[[TargetModule], float], dropout: float = 0.0,
                layer_cls: type[Layer] = LoRALinear, **layer_kwargs) -> dict[str, Layer]:
    """Replace every target ``nn.Linear`` of ``model`` by ``layer_cls(base, rank, alpha, dropout, **layer_kwargs)``
    (``base``: the frozen ``nn.Linear`` it wraps); returns the new layers by name. ``layer_cls`` may be any
    ``nn.Module`` built that way, LoRA-shaped or not; a layer built otherwise goes in with
    :func:`peftbench.modeling.replace_module`, which this calls."""
    layers = {}
    for target in targets:
        base = model.get_submodule(target.name)
        layer = layer_cls(base, rank_of(target), alpha_of(target), dropout, **layer_kwargs)
        replace_module(model, target.name, layer)
        layers[target.name] = layer
    return layers


def lora_layers(model: nn.Module, layer_cls: type[Layer] = LoRALinear) -> dict[str, Layer]:
    """The ``layer_cls`` modules of ``model`` by name (every LoRA layer, subclasses included, by default; any
    other adapter layer class, e.g. a LoHa layer, alike)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, layer_cls)}
