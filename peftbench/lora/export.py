"""LoRA-shaped adapters in HF PEFT's on-disk format: the one exporter of every LoRA-family method.

PEFT computes ``scaling = lora_alpha / r`` per module. The exporter takes each module's factors and the scale
it trained with, whatever produced it (LoRA's ``alpha / r``, PRILoRA's per-layer ranks, PrunedLoRA's and
AdaLoRA's scale fixed at an initial rank, DoRA's magnitudes on top), and writes the most common rank and
alpha as ``r``/``lora_alpha`` and the other modules' values in ``rank_pattern``/``alpha_pattern``, so the
loaded adapter computes exactly the trained ``ΔW``.
"""

from __future__ import annotations

from collections import Counter

import torch

#: where PEFT's ``PeftModel`` keeps the wrapped model: every key of an exported state dict starts with it
PREFIX = "base_model.model."


def peft_alpha(scaling: float, r: int) -> float:
    """PEFT's ``lora_alpha`` for a module of rank ``r`` trained with ``scaling``: ``scaling · r``, written
    as the short number it usually is (16.0, not 16.000000000000004) when that divides back to ``scaling``."""
    alpha = float(scaling * r)
    short = float(f"{alpha:.12g}")
    return short if short / r == scaling else alpha


def lora_peft_export(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                     magnitudes: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``factors[module] = (A, B, scaling)`` with ``ΔW = scaling · B A`` → ``(adapter_config, state_dict)``.

    ``magnitudes[module]``: DoRA's magnitude vector (exported as ``use_dora``). Modules whose rank fell to 0
    are left out (PEFT cannot hold a rank-0 adapter; their ``ΔW`` is 0).
    """
    live = {name: f for name, f in factors.items() if f[0].shape[0] > 0}
    if not live:
        raise ValueError("every adapter has rank 0: nothing to export")
    ranks = {name: a.shape[0] for name, (a, _, _) in live.items()}
    alphas = {name: peft_alpha(scaling, a.shape[0]) for name, (a, _, scaling) in live.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(live),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": magnitudes is not None, "init_lora_weights": True, "inference_mode": True, "task_type": None,
    }
    state = {}
    for name, (a, b, _) in live.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = _cpu(a)
        state[f"{PREFIX}{name}.lora_B.weight"] = _cpu(b)
        if magnitudes is not None:
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = _cpu(magnitudes[name])
    return config, state


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU, in float32 at least (a half-precision adapter is widened, a float64 one kept exact)."""
    return tensor.detach().to("cpu", torch.promote_types(tensor.dtype, torch.float32)).contiguous()
