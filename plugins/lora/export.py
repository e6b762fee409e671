"""LoRA adapters in HF PEFT's on-disk format (shared by every method whose adapter is LoRA-shaped).

PEFT computes ``scaling = lora_alpha / r`` per module. A method whose scale is fixed at an initial rank
(PrunedLoRA, AdaLoRA) exports ``lora_alpha = scaling · r_now`` per module through ``alpha_pattern``, so the
loaded adapter computes exactly the trained ``ΔW``.
"""

from __future__ import annotations

from collections import Counter

import torch

PREFIX = "base_model.model."


def lora_peft_export(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """``factors[module] = (A, B, scaling)`` with ``ΔW = scaling · B A`` → ``(adapter_config, state_dict)``.

    Modules whose rank fell to 0 are left out (PEFT cannot hold a rank-0 adapter; their ``ΔW`` is 0).
    """
    live = {name: f for name, f in factors.items() if f[0].shape[0] > 0}
    if not live:
        raise ValueError("every adapter has rank 0: nothing to export")
    ranks = {name: a.shape[0] for name, (a, _, _) in live.items()}
    alphas = {name: float(scaling * a.shape[0]) for name, (a, _, scaling) in live.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(live),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "task_type": None,
    }
    state = {}
    for name, (a, b, _) in live.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
    return config, state
