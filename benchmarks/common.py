"""Shared benchmark harness: time methods side by side, in one process, through the real trainer.

Every method (peftbench's and the HF PEFT baselines in :mod:`benchmarks.peft_baselines`) runs the same
``peftbench.trainer.train`` loop on the same real batches; the trainer records the wall time of every
optimizer step (evaluation excluded). Methods are run in interleaved rounds (A B C, A B C, ...) so that
machine drift hits all of them alike, and each ratio compares medians measured in this one run.

Memory: on a GPU the trainer's ``torch.cuda.max_memory_allocated`` of each run. On a CPU the process's
peak RSS is shared by every run of the process and says nothing per method, so :class:`TrainMemoryProbe`
(:mod:`peftbench.memory`, beside the prediction of ``peftbench budget --memory``) adds up what training
holds instead (see its docstring); it runs in the first round only.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from peftbench.budget import solve_all
from peftbench.config import parse_config
from peftbench.hookspecs import hookimpl
from peftbench.host import PluginInfo
from peftbench.memory import TrainMemoryProbe
from peftbench.runner import make_host
from peftbench.runs import RunSpec, expand
from peftbench.sweep import run_one

REPO = Path(__file__).resolve().parent.parent
GLUE = REPO.parent / "shared" / "glue"


def glue_dir() -> Path | None:
    """Real GLUE data: ``$PEFTBENCH_GLUE_DIR``, else ``../shared/glue`` beside the repository."""
    for candidate in (os.environ.get("PEFTBENCH_GLUE_DIR"), GLUE):
        if candidate and (Path(candidate) / "RTE" / "train.tsv").exists():
            return Path(candidate)
    return None


def bench_config(methods: list[dict[str, Any]], task: str = "rte", steps: int = 30, batch_size: int = 32,
                 max_length: int = 128, model: dict[str, Any] | None = None, device: str = "auto",
                 precision: str = "auto", budget_rank: int = 8, **train: Any):
    """A config whose runs each take ``steps`` optimizer steps on real GLUE batches (toy data if absent)."""
    data_dir = glue_dir()
    if data_dir is None and task in ("rte", "mrpc", "sst2", "cola", "stsb"):
        task = "toy_pair"
    data = {
        "name": "bench", "tasks": [task], "methods": methods, "seeds": [0],
        "model": model or {"name_or_path": "minilm"},
        "budget": {"lora_rank": budget_rank},
        "train": {"epochs": 100, "max_steps": steps, "batch_size": batch_size, "max_length": max_length,
                  "eval_batch_size": 256, "max_eval_samples": 32, "lr": 1e-4, "log_every": 10 ** 6,
                  "device": device, "precision": precision, "deterministic": False, **train},
        "data_dir": str(data_dir) if data_dir else None,
        "plugins": ["peftbench.testing", "benchmarks.peft_baselines"],
        "output": {"save_adapters": False},
    }
    return parse_config(data, "<benchmark>")


class StepClock:
    """Process CPU time of every optimizer step (a run-hook observer), beside the trainer's wall times.

    On a machine shared with other processes the wall time of a step depends on their load; the CPU time
    this process spends does not (with one torch thread; with several it includes OpenMP spin-waits).
    Step ``i`` spans from the end of step ``i - 1``'s optimizer update to the end of its own.
    """

    def __init__(self):
        self.times: list[float] = []

    @hookimpl
    def peftbench_train_start(self):
        self.times, self._last = [], time.process_time()

    @hookimpl
    def peftbench_after_optimizer_step(self):
        now = time.process_time()
        self.times.append(now - self._last)
        self._last = now


def interleaved_runs(config, rounds: int, observers: Callable[[int, RunSpec], list] | None = None,
                     progress: bool = False) -> Iterator[tuple[int, RunSpec, Any]]:
    """Train every run of ``config`` through the real trainer, ``rounds`` times, interleaved (A B C, A B C,
    ...) so that machine drift hits every method alike; yields ``(round, spec, result)`` after each run.

    ``observers(round, spec)``: run-hook plugins registered for that run only (unregistered after it, and
    closed if they have a ``close``)."""
    host = make_host(config)
    runs = expand(config, solve_all(config, host))
    for round_index in range(rounds):
        for spec in runs:
            plugins = observers(round_index, spec) if observers else []
            for i, plugin in enumerate(plugins):
                host.pm.register(plugin, name=f"benchmark-observer-{i}")
            try:
                result = run_one(spec, host, progress=progress)
            finally:
                for plugin in plugins:
                    host.pm.unregister(plugin)
                    if hasattr(plugin, "close"):
                        plugin.close()
            yield round_index, spec, result
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_interleaved(config, rounds: int = 2, warmup: int = 3, progress: bool = False,
                    probe_memory: bool | None = None,
                    timed_from: Callable[[RunSpec, Any], int] | None = None) -> dict[str, dict[str, Any]]:
    """Median step time (wall and CPU), tokens/s and peak memory of every method label of ``config``.

    ``warmup``: steps at the start of each run left out of the timing; ``timed_from(spec, result)`` may
    raise it per run (e.g. past PrunedLoRA's last pruning event). ``probe_memory`` (default: on CPU) runs
    :class:`TrainMemoryProbe` in the first round and reports its total as ``peak_mem_bytes``.
    """
    probe_memory = not torch.cuda.is_available() if probe_memory is None else probe_memory
    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}
    stats: dict[str, dict[str, Any]] = {}
    clock = StepClock()
    probes: dict[str, TrainMemoryProbe] = {}

    def observers(round_index: int, spec: RunSpec) -> list:
        if probe_memory and round_index == 0:
            probes[spec.label] = TrainMemoryProbe()
            return [clock, probes[spec.label]]
        return [clock]

    for _, spec, result in interleaved_runs(config, rounds, observers, progress):
        probe = probes.pop(spec.label, None)
        start = max(warmup, timed_from(spec, result) if timed_from else 0)
        samples.setdefault(spec.label, []).extend(result.step_times[start:])
        cpu_samples.setdefault(spec.label, []).extend(clock.times[start:])
        entry = stats.setdefault(spec.label, {"tokens_per_s": [], "peak_mem_bytes": 0, "method": spec.method})
        entry["tokens_per_s"].append(result.tokens_per_s)
        if probe:
            entry["memory"] = probe.result
            entry["peak_mem_bytes"], entry["mem_kind"] = probe.result["total"], "cpu_train_state_estimate"
        elif not probe_memory:
            entry["peak_mem_bytes"] = max(entry["peak_mem_bytes"], result.peak_mem_bytes)
            entry["mem_kind"] = result.mem_kind
        entry["adapter"] = result.trainable["adapter"]
        entry["report"] = result.method_report
    for label, times in samples.items():
        if not times:
            raise ValueError(f"{label}: no step left to time; raise the steps per run above the warm-up")
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        stats[label].update(median_step_s=statistics.median(times), q1_step_s=quartiles[0],
                            q3_step_s=quartiles[2], steps_timed=len(times),
                            tokens_per_s=statistics.median(stats[label]["tokens_per_s"]),
                            median_cpu_step_s=statistics.median(cpu_samples[label]))
    return stats


def ratio_lines(stats: dict[str, dict[str, Any]], checks: list[tuple[str, str, float]]) -> list[str]:
    """``numerator / denominator`` median-step-time ratios against their targets, one line each."""
    lines = []
    for num, den, target in checks:
        ratio = stats[num]["median_step_s"] / stats[den]["median_step_s"]
        verdict = "meets" if ratio <= target else "MISSES"
        lines.append(f"{num} / {den} median step time: {ratio:.3f}× (target ≤ {target:.2f}×: {verdict})")
    return lines


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def machine_details() -> dict[str, str]:
    """The machine as a table for reports: hardware, load, library versions."""
    import peft
    import transformers

    details = {"CPU": f"{cpu_name()} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        details["RAM"] = f"{pages * page_size / 2 ** 30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        details["GPU"] = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        details["GPU"] = "none"
    if hasattr(os, "getloadavg"):
        details["load average at start (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    details["software"] = (f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
                           f"{transformers.__version__}, peft {peft.__version__}, {platform.platform()}")
    return details


def with_params(methods: list[dict[str, Any]], **params: Any) -> list[dict[str, Any]]:
    return [dataclasses.replace(m) if dataclasses.is_dataclass(m) else {**m, "params": {**m.get("params", {}), **params}}
            for m in methods]


__all__ = ["bench_config", "interleaved_runs", "run_interleaved", "ratio_lines", "machine", "machine_details", "glue_dir",
           "TrainMemoryProbe", "PluginInfo"]
