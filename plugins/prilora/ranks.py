"""PRILoRA's rank schedules: one integer rank per transformer layer, with an exact total.

The paper gives every layer its own rank, increasing linearly with depth. For a mean rank ``r`` and a relative
half-width ``spread`` the ideal (real-valued) rank of layer ``l`` of ``L`` is

    x_l = r_min + (r_max - r_min) · l / (L - 1),   r_min = r · (1 - spread),   r_max = r · (1 + spread)

(DeBERTaV3-base: r = 8, spread = 0.5 gives the paper's 4 → 12). The ideal ranks sum to ``r · L``; plain rounding
need not keep that sum for every depth, so the integers are chosen by the largest-remainder rule: floor every
``x_l``, then hand the missing units to the largest fractional parts. This equals nearest rounding whenever
nearest rounding already keeps the sum (it does on the paper's 12 layers: [4,5,5,6,7,8,8,9,10,11,11,12]), it is
never more than one unit away from ``x_l``, and an increasing ramp stays non-decreasing.
"""

from __future__ import annotations

import math

SCHEDULES = ("increasing", "uniform", "decreasing")


def round_to_total(ideal: list[float], total: int) -> list[int]:
    """Integers within one of ``ideal`` that sum to ``total`` (largest remainder; ties go to deeper layers)."""
    floors = [math.floor(x + 1e-9) for x in ideal]  # 1e-9: 4.999999 from float noise is 5
    missing = total - sum(floors)
    if not 0 <= missing <= len(ideal):
        raise ValueError(f"total {total} is not reachable by rounding {ideal}")
    # round the remainders so that float noise cannot break exact ties (which deeper layers win)
    order = sorted(range(len(ideal)), key=lambda i: (-round(ideal[i] - floors[i], 9), -i))
    for i in order[:missing]:
        floors[i] += 1
    return floors


def layer_ranks(num_layers: int, mean: float, schedule: str = "increasing", spread: float = 0.5) -> list[int]:
    """Per-layer ranks of a named schedule; their sum is ``round(mean · num_layers)`` exactly.

    ``increasing``: linear ramp from ``mean·(1-spread)`` (first layer) to ``mean·(1+spread)`` (last layer);
    ``decreasing``: the same ramp reversed; ``uniform``: ``mean`` everywhere (when ``mean · num_layers`` is not
    an integer the extra units go to the deepest layers).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a list of ranks, got {schedule!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    total = round(mean * num_layers)
    if schedule == "uniform" or num_layers == 1:
        return round_to_total([mean] * num_layers, total)
    low, high = mean * (1 - spread), mean * (1 + spread)
    ideal = [low + (high - low) * i / (num_layers - 1) for i in range(num_layers)]
    ranks = round_to_total(ideal, total)
    return ranks[::-1] if schedule == "decreasing" else ranks
