"""Shared benchmark harness: time methods side by side, in one process, through the real trainer.

Every method (peftbench's and the HF PEFT baselines in :mod:`benchmarks.peft_baselines`) runs the same
``peftbench.trainer.train`` loop on the same real batches; the trainer records the wall time of every
optimizer step (evaluation excluded). Methods are run in interleaved rounds (A B C, A B C, ...) so that
machine drift hits all of them alike, and each ratio compares medians measured in this one run.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from peftbench.budget import solve_all
from peftbench.config import parse_config
from peftbench.host import PluginInfo
from peftbench.runner import make_host, run_one
from peftbench.runs import expand

REPO = Path(__file__).resolve().parent.parent
GLUE = REPO.parent / "shared" / "glue"


def bench_config(methods: list[dict[str, Any]], task: str = "rte", steps: int = 30, batch_size: int = 32,
                 max_length: int = 128, model: dict[str, Any] | None = None, device: str = "auto",
                 precision: str = "auto", budget_rank: int = 8, **train: Any):
    """A config whose runs each take ``steps`` optimizer steps on real GLUE batches (toy data if absent)."""
    data_dir = str(GLUE) if (GLUE / "RTE").exists() else None
    if data_dir is None and task in ("rte", "mrpc", "sst2", "cola", "stsb"):
        task = "toy_pair"
    data = {
        "name": "bench", "tasks": [task], "methods": methods, "seeds": [0],
        "model": model or {"name_or_path": "minilm"},
        "budget": {"lora_rank": budget_rank},
        "train": {"epochs": 100, "max_steps": steps, "batch_size": batch_size, "max_length": max_length,
                  "eval_batch_size": 256, "max_eval_samples": 32, "lr": 1e-4, "log_every": 10 ** 6,
                  "device": device, "precision": precision, "deterministic": False, **train},
        "data_dir": data_dir,
        "plugins": ["peftbench.testing", "benchmarks.peft_baselines"],
        "output": {"save_adapters": False},
    }
    return parse_config(data, "<benchmark>")


def run_interleaved(config, rounds: int = 2, warmup: int = 3, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Median step time, tokens/s and peak memory of every method label of ``config``."""
    host = make_host(config)
    runs = expand(config, solve_all(config, host))
    samples: dict[str, list[float]] = {r.label: [] for r in runs}
    stats: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for spec in runs:
            result = run_one(spec, host, progress=progress)
            samples[spec.label].extend(result.step_times[warmup:])
            entry = stats.setdefault(spec.label, {"tokens_per_s": [], "peak_mem_bytes": 0})
            entry["tokens_per_s"].append(result.tokens_per_s)
            entry["peak_mem_bytes"] = max(entry["peak_mem_bytes"], result.peak_mem_bytes)
            entry["mem_kind"] = result.mem_kind
            entry["adapter"] = result.trainable["adapter"]
            entry["report"] = result.method_report
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for label, times in samples.items():
        stats[label]["median_step_s"] = statistics.median(times)
        stats[label]["steps_timed"] = len(times)
        stats[label]["tokens_per_s"] = statistics.median(stats[label]["tokens_per_s"])
    return stats


def ratio_lines(stats: dict[str, dict[str, Any]], checks: list[tuple[str, str, float]]) -> list[str]:
    """``numerator / denominator`` median-step-time ratios against their targets, one line each."""
    lines = []
    for num, den, target in checks:
        ratio = stats[num]["median_step_s"] / stats[den]["median_step_s"]
        verdict = "meets" if ratio <= target else "MISSES"
        lines.append(f"{num} / {den} median step time: {ratio:.3f}× (target ≤ {target:.2f}×: {verdict})")
    return lines


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def with_params(methods: list[dict[str, Any]], **params: Any) -> list[dict[str, Any]]:
    return [dataclasses.replace(m) if dataclasses.is_dataclass(m) else {**m, "params": {**m.get("params", {}), **params}}
            for m in methods]


__all__ = ["bench_config", "run_interleaved", "ratio_lines", "machine", "PluginInfo"]
