"""The budget audit after training: each run's *measured* final adapter count against its sweep's target.

``peftbench budget`` checks what the methods predict before training; a method whose final size depends
on training (AdaLoRA's allocation, PrunedLoRA's pruning) can still end elsewhere. Every finished run is
therefore audited on what it measured: ``method_report["counts"]`` when the method reports counts (the
conventional key of ``peftbench_report``), else the trainer's count of trainable adapter parameters. The
audit is stored with the run (``audit`` column), printed by ``peftbench run`` when it misses, and marked
in ``peftbench table``. Reference methods (full fine-tuning, ``match_budget: false``) are not audited.
"""

from __future__ import annotations

from typing import Any

#: the table's mark for a cell with a run that missed its budget (legend in the table's footer)
MISS_MARK = "‼"


def measured_counts(run: dict[str, Any]) -> dict[str, int | None]:
    """``{"final", "peak", "nonzero"}`` measured on a run's trained model (stored run or result fields)."""
    counts = (run.get("method_report") or {}).get("counts")
    trainable = run.get("trainable") or {}
    if isinstance(counts, dict) and counts.get("final") is not None:
        final = int(counts["final"])
        return {"final": final, "peak": int(counts.get("peak", final)), "nonzero": int(counts.get("nonzero", final))}
    adapter = trainable.get("adapter")  # the trainer's count: every trainable parameter outside the head
    return {"final": adapter, "peak": adapter, "nonzero": trainable.get("adapter_nonzero", adapter)}


def audit(run: dict[str, Any], target: int | None, tolerance: float) -> dict[str, Any]:
    """The audit of a finished run: ``target`` is its adapter budget, ``None`` for a reference method."""
    counts = measured_counts(run)
    if not target:
        return {"target": None, "tolerance": tolerance, **counts, "miss": None, "ok": None, "reference": True}
    miss = (counts["final"] - target) / target if counts["final"] is not None else None
    return {"target": target, "tolerance": tolerance, **counts, "miss": miss,
            "ok": miss is not None and abs(miss) <= tolerance}


def stored_audit(run: dict[str, Any]) -> dict[str, Any]:
    """A stored run's audit; a run stored before audits existed gets its measured counts only (no verdict)."""
    return run.get("audit") or {**measured_counts(run), "ok": None}


def missed(run: dict[str, Any]) -> bool:
    return stored_audit(run).get("ok") is False


def miss_line(result: dict[str, Any]) -> str:
    """One line for the sweep's log about an audit that failed."""
    return (f"{MISS_MARK} BUDGET MISS: final adapter count {result['final']:,} is {result['miss']:+.2%} off the "
            f"target {result['target']:,} (tolerance {result['tolerance']:.1%})")


__all__ = ["MISS_MARK", "audit", "measured_counts", "miss_line", "missed", "stored_audit"]
