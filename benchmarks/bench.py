"""Speed of every method side by side: peftbench's methods, HF PEFT, full fine-tuning and the frozen floor.

One process, one model and the same real batches (RTE by default) for every method, each run through the
real trainer in interleaved rounds (:mod:`benchmarks.common`). Four measurements:

1. **comparison**: median train-step time (with its quartiles), tokens/s and peak memory of every method
   registered with the host (peftbench's built-ins and installed plugins; a method asked for with
   ``--methods`` but not installed is skipped, and the report says so), HF PEFT's LoRA and AdaLoRA, full
   fine-tuning, and the floor (``benchmarks.peft_baselines.FrozenFloor``: every weight frozen, backward
   still run down to the input embeddings);
2. **padding**: the same slice of an epoch with dynamic padding + length grouping vs every batch padded to
   ``max_length`` (``train.pad_to_max_length``);
3. **scaling**: step time vs sequence length (every batch padded to ``L``) and vs rank (the budget's LoRA
   rank, which every budget-matched method solves its own size for);
4. **checks**: each target of the speed issue with its measured ratio and meets / misses.

It prints the tables and writes them, with the machine's details, to ``docs/benchmarks.md``.

    python -m benchmarks.bench                     # CPU: MiniLM, RTE (about 15 min on 2 idle cores)
    python -m benchmarks.bench --gpu [--compile]   # DeBERTa-v3-base shape, random weights, bf16 autocast
                                                   # (+ a TF32 vs exact fp32 LoRA row)
    python -m benchmarks.bench --compare-compile   # + LoRA eager vs train.compile, side by side
    python -m benchmarks.bench --quick --out /tmp/bench.md   # a smoke run: tiny model, 4 steps per run
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from benchmarks.common import (
    REPO,
    bench_config,
    glue_dir,
    interleaved_runs,
    machine,
    machine_details,
    run_interleaved,
)
from peftbench.runner import make_host
from peftbench.testing import tiny_model_config

#: the methods the issue's targets name; any other registered method is benchmarked as well
EXPECTED = ("lora", "prilora", "prunedlora", "adalora", "hf_peft_lora", "hf_peft_adalora", "full", "floor")
#: methods whose size does not follow the budget's rank (left out of the rank sweep)
RANKLESS = ("full", "floor")
#: the AdaLoRA schedule both AdaLoRAs share (the plugin's defaults: fractions of the run's steps)
ADALORA_SCHEDULE = {"tinit": 0.13, "tfinal": 0.47, "deltaT": 1}

#: ``(check, numerator, denominator, target)``: median step-time ratios the issue asks for
TIME_TARGETS = [
    ("LoRA ≤ 0.95× HF PEFT LoRA", "lora", "hf_peft_lora", 0.95),
    ("LoRA ≤ 1.10× the floor", "lora", "floor", 1.10),
    ("PRILoRA ≤ 1.05× LoRA", "prilora", "lora", 1.05),
    ("AdaLoRA ≤ 0.8× HF PEFT AdaLoRA", "adalora", "hf_peft_adalora", 0.80),
    ("PrunedLoRA after compaction ≤ 1.10× LoRA at the final rank", "prunedlora", "lora", 1.10),
]
#: ``(check, method, HF PEFT baseline)``: peak memory no larger than PEFT's
MEMORY_TARGETS = [("LoRA peak memory ≤ HF PEFT LoRA's", "lora", "hf_peft_lora"),
                  ("AdaLoRA peak memory ≤ HF PEFT AdaLoRA's", "adalora", "hf_peft_adalora")]
PADDING_TARGET = 2.0
GLUE_TASKS = ("rte", "mrpc", "sst2", "cola", "stsb")


def method_entry(name: str, rank: int, steps: int) -> dict[str, Any]:
    """The config entry of method ``name`` at budget rank ``rank`` for runs of ``steps`` optimizer steps.

    Budget-matched methods solve their own size for LoRA r=``rank``; the HF PEFT baselines get the same
    shapes explicitly. PrunedLoRA prunes from ``2·r`` to ``r`` in one event at step 1, so that the rest of
    the run measures the compacted adapter; both AdaLoRAs run the same schedule from ``1.5·r`` to ``r``.
    """
    init_r = max(rank + 1, round(1.5 * rank))
    settings: dict[str, dict[str, Any]] = {
        "lora": {"params": {"alpha": 16}},
        "hf_peft_lora": {"params": {"r": rank, "alpha": 16}},
        "prilora": {"params": {"alpha": 16}},
        "prunedlora": {"params": {"init_ratio": 2, "prune_k": rank, "prune_every": 1,
                                  "warmup_ratio": 1 / steps, "final_ratio": 1 / steps}},
        "adalora": {"match_budget": False, "params": {"init_r": init_r, "target_r": rank, "alpha": 32,
                                                      "gamma": 0.1, **ADALORA_SCHEDULE}},
        "hf_peft_adalora": {"params": {"init_r": init_r, "target_r": rank, "alpha": 32, "orth_reg_weight": 0.1,
                                       **ADALORA_SCHEDULE}},
        "full": {"train": {"lr": 2e-5}},
    }
    return {"name": name, **settings.get(name, {})}


def timed_from(spec, result) -> int:
    """First step to time: after PrunedLoRA's last pruning event (and one more step, whose optimizer
    state was just resized), so that its times are those of the compacted adapter."""
    schedule = result.method_report.get("schedule") if spec.method == "prunedlora" else None
    return schedule["last_event"] + 2 if schedule else 0


@dataclass
class Setup:
    """What every benchmark of one invocation shares (model, data, batch, device)."""

    model: dict[str, Any] | None
    model_name: str
    task: str
    batch_size: int
    max_length: int
    device: str
    precision: str
    threads: int | None
    compile: bool
    budget_rank: int
    notes: list[str] = field(default_factory=list)

    def config(self, methods, steps, **train):
        train = {"group_by_length": False, "num_threads": self.threads, "compile": self.compile, **train}
        options = {"batch_size": self.batch_size, "max_length": self.max_length, "budget_rank": self.budget_rank}
        for key in options:
            if key in train:
                options[key] = train.pop(key)
        return bench_config(methods, task=self.task, steps=steps, model=self.model, device=self.device,
                            precision=self.precision, **options, **train)


# ---------------------------------------------------------------------------------------------------------
# The four measurements
# ---------------------------------------------------------------------------------------------------------


def available_methods(setup: Setup, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Registered methods to benchmark (``wanted`` or all), and the skipped ones with the reason."""
    host = make_host(setup.config([{"name": "lora"}], steps=1))
    registered = sorted(host.methods)
    names = wanted or [m for m in EXPECTED if m in registered] + [m for m in registered if m not in EXPECTED]
    skipped = {m: "not installed (no plugin registers it)" for m in (wanted or EXPECTED) if m not in registered}
    return [m for m in names if m in registered], skipped


def comparison(setup: Setup, methods: list[str], steps: int, rounds: int, warmup: int) -> dict[str, dict]:
    config = setup.config([method_entry(m, setup.budget_rank, steps) for m in methods], steps)
    stats = run_interleaved(config, rounds=rounds, warmup=warmup, timed_from=timed_from)
    for entry in stats.values():
        ranks = (entry["report"] or {}).get("ranks")
        if ranks:
            entry["final_rank"] = statistics.mean(ranks.values())
    return stats


def padding(setup: Setup, examples: int, max_length: int, rounds: int) -> dict[str, float]:
    """Seconds for one pass over ``examples`` training examples with LoRA: dynamic padding and length
    grouping vs every batch padded to ``max_length`` (data loading and collation included)."""
    methods = [{"name": "lora", "label": "dynamic", "params": {"alpha": 16},
                "train": {"group_by_length": True, "pad_to_max_length": False}},
               {"name": "lora", "label": "fixed", "params": {"alpha": 16},
                "train": {"group_by_length": False, "pad_to_max_length": True}}]
    steps = math.ceil(examples / setup.batch_size)
    config = setup.config(methods, steps, max_length=max_length, max_train_samples=examples, epochs=1)
    epochs: dict[str, list[float]] = {"dynamic": [], "fixed": []}
    for _, spec, result in interleaved_runs(config, rounds):
        epochs[spec.label].append(sum(result.step_times))  # every step, the first included: an epoch
    return {label: min(times) for label, times in epochs.items()}  # min: the least disturbed pass


def scaling(setup: Setup, methods: list[str], seq_lengths: list[int], ranks: list[int], steps: int,
            batch_size: int, rank_length: int) -> dict[str, dict[str, dict[int, tuple[float, float]]]]:
    """Median step time (wall, CPU) of every method at every sequence length (rank = the budget's) and at
    every rank (length ``rank_length``); batches padded to the length, one run per point, methods interleaved."""
    out: dict[str, dict[str, dict[int, tuple[float, float]]]] = {"length": {}, "rank": {}}
    warmup = 1 if steps > 1 else 0
    for length in seq_lengths:
        config = setup.config([method_entry(m, setup.budget_rank, steps) for m in methods], steps,
                              batch_size=batch_size, max_length=length, pad_to_max_length=True)
        for label, entry in run_interleaved(config, rounds=1, warmup=warmup, probe_memory=False,
                                            timed_from=timed_from).items():
            out["length"].setdefault(label, {})[length] = (entry["median_step_s"], entry["median_cpu_step_s"])
    ranked = [m for m in methods if m not in RANKLESS]
    for rank in ranks:
        config = setup.config([method_entry(m, rank, steps) for m in ranked], steps, batch_size=batch_size,
                              max_length=rank_length, pad_to_max_length=True, budget_rank=rank)
        for label, entry in run_interleaved(config, rounds=1, warmup=warmup, probe_memory=False,
                                            timed_from=timed_from).items():
            out["rank"].setdefault(label, {})[rank] = (entry["median_step_s"], entry["median_cpu_step_s"])
    return out


def checks(stats: dict[str, dict], epochs: dict[str, float] | None, skipped: dict[str, str]) -> list[list[str]]:
    """One row per target: the measured ratio and whether it meets the target."""
    rows = []

    def missing(*labels):
        absent = [label for label in labels if label not in stats]
        return ", ".join(f"{label}: {skipped.get(label, 'not run')}" for label in absent)

    for check, num, den, target in TIME_TARGETS:
        if missing(num, den):
            rows.append([check, "—", f"≤ {target:.2f}×", f"not measured ({missing(num, den)})", "—", "—"])
            continue
        ratio = stats[num]["median_step_s"] / stats[den]["median_step_s"]
        cpu = stats[num]["median_cpu_step_s"] / stats[den]["median_cpu_step_s"]
        # no adapter can make a step cheaper than the frozen model's: floor / baseline bounds the ratio
        bound = f"{stats['floor']['median_step_s'] / stats[den]['median_step_s']:.3f}×" if "floor" in stats else "—"
        rows.append([check, f"{ratio:.3f}×", f"≤ {target:.2f}×", "meets" if ratio <= target else "MISSES",
                     f"{cpu:.3f}×", bound])
    for check, ours, theirs in MEMORY_TARGETS:
        if missing(ours, theirs):
            rows.append([check, "—", "≤ 1.00×", f"not measured ({missing(ours, theirs)})", "—", "—"])
            continue
        ratio = stats[ours]["peak_mem_bytes"] / stats[theirs]["peak_mem_bytes"]
        rows.append([check, f"{ratio:.3f}×", "≤ 1.00×", "meets" if ratio <= 1 else "MISSES", "—", "—"])
    check = f"Epoch with dynamic padding + length grouping ≥ {PADDING_TARGET:g}× faster than fixed padding"
    if epochs:
        speedup = epochs["fixed"] / epochs["dynamic"]
        rows.append([check, f"{speedup:.2f}×", f"≥ {PADDING_TARGET:.2f}×",
                     "meets" if speedup >= PADDING_TARGET else "MISSES", "—", "—"])
    else:
        rows.append([check, "—", f"≥ {PADDING_TARGET:.2f}×", "not measured (--sections without padding)", "—", "—"])
    return rows


def variant_entries(kind: str, rank: int, steps: int) -> list[dict[str, Any]]:
    """The two LoRA runs of a side-by-side comparison, identical but for one setting: ``compile``
    (``train.compile`` off / on) or ``tf32`` (fp32 with ``train.tf32``, which runs LoRA's unmerged form, vs
    exact fp32 with TF32 off, which runs the merged form, ``peftbench/lora/layer.py``)."""
    lora = method_entry("lora", rank, steps)
    if kind == "compile":
        variants = {"eager": {"compile": False}, "compiled": {"compile": True}}
    else:  # precision fp32 for both: autocast would take the unmerged path whatever TF32 is
        variants = {"exact fp32": {"tf32": False, "precision": "fp32"}, "tf32": {"tf32": True, "precision": "fp32"}}
    return [{**lora, "label": label, "train": {**lora.get("train", {}), **train}} for label, train in variants.items()]


def side_by_side(setup: Setup, kind: str, steps: int, rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """The two runs of :func:`variant_entries`, interleaved, every batch padded to the max length (static
    shapes: a compiled model would otherwise recompile for new lengths during the timed steps). Per label: the
    median first step (it includes compilation) and the median step time after ``warmup`` steps (at least 1)."""
    config = setup.config(variant_entries(kind, setup.budget_rank, steps), steps, pad_to_max_length=True)
    first: dict[str, list[float]] = {}
    steady: dict[str, list[float]] = {}
    for _, spec, result in interleaved_runs(config, rounds):
        first.setdefault(spec.label, []).append(result.step_times[0])
        steady.setdefault(spec.label, []).extend(result.step_times[max(1, warmup):])
    return {label: {"first_step_s": statistics.median(first[label]),
                    "median_step_s": statistics.median(steady[label]), "steps_timed": len(steady[label])}
            for label in first}


def side_by_side_table(results: dict[str, dict[str, float]]) -> tuple[list[str], list[list[Any]]]:
    """One row per variant; the ratios are over the first (the baseline: eager, or exact fp32)."""
    base = next(iter(results.values()))
    headers = ["run", "first step (s)", "median step after it (ms)", "steps/s", "steps/s ÷ first row's",
               "steps timed"]
    return headers, [[label, f"{r['first_step_s']:.2f}", f"{r['median_step_s'] * 1e3:,.1f}",
                      f"{1 / r['median_step_s']:.2f}", f"{base['median_step_s'] / r['median_step_s']:.3f}×",
                      r["steps_timed"]] for label, r in results.items()]


#: why a TF32 row has no numbers on a CPU
TF32_ON_CPU = "TF32 does not apply on the CPU (it is a CUDA tensor-core mode): the TF32 row awaits a GPU"


#: the checks table's columns: the verdict is on wall time (the issue's measure), CPU time is shown beside it
#: and the lowest ratio any adapter could reach here: the frozen floor's step over the baseline's
CHECK_HEADERS = ["target", "measured", "target", "verdict", "CPU-time ratio", "floor ÷ baseline"]


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.0f}"


def comparison_table(stats: dict[str, dict]) -> tuple[list[str], list[list[Any]]]:
    def ratio(label, base, key="median_step_s"):
        return f"{stats[label][key] / stats[base][key]:.3f}" if base in stats else "—"

    headers = ["method", "adapter params", "mean final rank", "median step (ms)", "IQR (ms)", "steps timed",
               "median CPU time (ms)", "tokens/s", "peak memory (MiB)", "step × floor", "step × lora", "step × HF PEFT LoRA",
               "memory × HF PEFT LoRA"]
    rows = []
    for label, s in stats.items():
        rank = f"{s['final_rank']:.2f}" if "final_rank" in s else "—"
        rows.append([label, f"{s['adapter']:,}", rank, f"{s['median_step_s'] * 1e3:,.1f}",
                     f"{s['q1_step_s'] * 1e3:,.0f}–{s['q3_step_s'] * 1e3:,.0f}", s["steps_timed"],
                     f"{s['median_cpu_step_s'] * 1e3:,.1f}",
                     f"{s['tokens_per_s']:,.0f}", _mb(s["peak_mem_bytes"]), ratio(label, "floor"),
                     ratio(label, "lora"), ratio(label, "hf_peft_lora"),
                     ratio(label, "hf_peft_lora", "peak_mem_bytes")])
    return headers, rows


def memory_table(stats: dict[str, dict]) -> tuple[list[str], list[list[Any]]] | None:
    if not all("memory" in s for s in stats.values()):
        return None
    parts = ["params", "grads", "optimizer", "activations", "total"]
    return (["method"] + [f"{p} (MiB)" for p in parts],
            [[label] + [_mb(s["memory"][p]) for p in parts] for label, s in stats.items()])


def scaling_table(curves: dict[str, dict[int, tuple[float, float]]], key: str,
                  cpu: bool) -> tuple[list[str], list[list[Any]]]:
    """One row per method: the step time at every point (``wall / CPU`` ms with ``cpu``) and the growth."""
    points = sorted({p for curve in curves.values() for p in curve})
    unit = "wall / CPU ms" if cpu else "ms"
    headers = ["method"] + [f"{key} = {p} ({unit})" for p in points] + [f"{key} {points[-1]} / {key} {points[0]}"]
    rows = []
    for label, curve in curves.items():
        cells = [(f"{curve[p][0] * 1e3:,.0f} / {curve[p][1] * 1e3:,.0f}" if cpu else f"{curve[p][0] * 1e3:,.1f}")
                 if p in curve else "—" for p in points]
        growth = "—"
        if points[0] in curve and points[-1] in curve:
            first, last = curve[points[0]], curve[points[-1]]
            growth = f"{last[0] / first[0]:.2f}×" + (f" / {last[1] / first[1]:.2f}×" if cpu else "")
        rows.append([label, *cells, growth])
    return headers, rows


def table(headers, rows, fmt: str) -> str:
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


FLOOR_DEFINITION = (
    "**Floor** (`benchmarks/peft_baselines.py`, `FrozenFloor`): the same model with every base weight frozen "
    "and no adapter; a forward hook makes the output of the input (word) embeddings require grad (HF's "
    "`enable_input_require_grads`), so backward runs from the loss through every transformer block down to "
    "the embeddings. The head (pooler and classifier) trains as for every method, with the same AdamW. An "
    "adapter method's step is this floor plus its own work; the floor even does a little more than LoRA in "
    "the first block (it computes the gradient with respect to that block's input, which LoRA never needs).")
MEMORY_DEFINITION = {
    "cpu_train_state_estimate": (
        "**Peak memory on CPU** is an account of what training holds, per run "
        "(`benchmarks/common.py`, `TrainMemoryProbe`): all weights + one gradient per trainable parameter + "
        "AdamW's two moments + the largest total, over the steps, of the distinct tensors autograd saved for "
        "backward in one step. The process's peak RSS cannot separate methods that share one process, and "
        "allocator slack and short-lived temporaries (shared by all methods) are not counted."),
    "cuda_max_allocated": "**Peak memory on GPU** is `torch.cuda.max_memory_allocated()` of each run.",
}
METHOD_NOTES = (
    "Method settings (`benchmarks/bench.py`, `method_entry`): LoRA, PRILoRA and PrunedLoRA are solved to the "
    "budget of LoRA r={rank} on the same target modules; HF PEFT LoRA is r={rank}, alpha 16 (as LoRA); "
    "both AdaLoRAs run {init_r} → {rank} with the same schedule ({schedule}) and orthogonality weight 0.1; "
    "PrunedLoRA starts at 2·r and prunes to r in a single event at step 1, and only its steps after that event "
    "(and one more) are timed, so its row is the compacted adapter, at the same final rank as LoRA's row.")
SIDE_BY_SIDE_NOTES = """\
## torch.compile and TF32: what the side-by-side rows measure

* **`--compare-compile`** trains the same LoRA run without and with `train.compile` (in-place
  `torch.compile`, inductor), interleaved, every batch padded to the max length, and prints steps/s of each
  and their ratio, with the first step (which includes compilation) apart. Recorded 2026-11-30 on a 2-core
  AMD EPYC CPU machine, no GPU, **shared** with another benchmark sweep and another engineer's jobs (run
  under `nice -n 19`, one thread, so wall times are inflated and noisy):
  `python -m benchmarks.bench --tiny --compare-compile --sections "" --steps 16 --rounds 2 --warmup 1
  --threads 1 --task toy_pair` (the 2-layer width-32 model, batch 32 × 64, 30 steps timed per run): eager
  67.8 ms, compiled 53.3 ms per step, **1.27×** the steps/s; the compiled run's first step 18.5 s (median of
  2, inductor's on-disk cache warm; 80 s with a cold cache in an earlier `--quick` run). At this size the
  step is mostly Python and kernel-launch overhead; a GPU-sized model awaits the GPU run.
* **TF32 row** (with `--gpu`): LoRA in fp32 with `train.tf32: true`, which runs the unmerged LoRA form on
  TF32 tensor cores, against exact fp32 with TF32 off, which runs the merged form `x (W + s·B·A)ᵀ`
  (`peftbench/lora/layer.py`, `merge_is_exact`). Its ratio is **what the exact merged fp32 path costs** on a
  GPU. TF32 is CUDA-only: on a CPU (`--gpu --device cpu`) the row reports that it does not apply; it awaits
  the first GPU run.

"""

WHAT_CHANGED = """\
## What the profile showed, and what changed

Profiled with `torch.profiler`, per-layer micro-benchmarks and CPU-time runs through the trainer (MiniLM,
CPU, fp32, one thread); root causes, not symptoms:

* **The LoRA layer** (`peftbench/lora/layer.py`). peftbench's LoRA and HF PEFT's ran the same textbook form
  `base(x) + B(A(x)) · s`, so with the same trainer and batches they cost the same; HF PEFT's injection
  was ruled out as a cause (it leaves exactly the same parameters trainable: the counts match). Both cost
  far more over the floor than LoRA's extra FLOPs (2·r·(d_in + d_out) per token against d_in·d_out): per
  adapted module that form runs six skinny GEMMs, two of which (`h Bᵀ` forward, `∂h A` backward) write a
  full tokens × d tensor, plus a scale multiply and an add over the d_out-wide output in each direction,
  and autograd computes `∂B = gᵀ h` in the layout that is several times slower than `(hᵀ g)ᵀ` for a skinny
  product on CPU. Fix: in exact fp32 the layer folds the update into the weight for both big GEMMs
  (`y = x (W + s B A)ᵀ + b`, `∂x = g (W + s B A)`; forming the d_out × d_in merge costs r/tokens of a GEMM
  and is recomputed in backward rather than stored) and gets `∂A`, `∂B` from four rank-r products in their
  fast layout (`MergedLoRAFunction`): no extra pass over any tokens × d tensor, and only `x` is saved for
  backward (PEFT's form also keeps `A x`). Same values up to fp32 rounding (`tests/test_lora_parity.py`
  compares outputs and gradients with HF PEFT at 1e-5; `tests/test_benchmarks.py` checks the custom
  backward with `gradcheck` and against the unmerged path). Under autocast, TF32 or active dropout the
  update stays unmerged (a low-precision `W + ΔW` would round the small ΔW away); that path puts the scale
  on the r channels and adds the update inside the GEMM (`addmm`). Layers of other plugins get the fast
  path where they call `LoRALinear.forward`. What remains over the floor is the four rank-r products,
  which read the layer's input and output gradient once more each: LoRA's own work.
* **Data** (`peftbench/data.py`): subsetting a tokenized split was a Python loop over examples (now one
  vectorised gather), and flattening the tokenizer output uses `itertools.chain` instead of a generator.
  Tokenization is cached on disk per (split, tokenizer, max_length) and collation is one vectorised gather
  per batch; `train.pad_to_max_length` exists to measure what dynamic padding saves.
* **AdaLoRA** (`plugins/adalora/`): importance EMAs, triplet scores, the global threshold and the masks are
  batched over the modules of one shape (a few kernels per shape group per step, where HF PEFT's allocator loops
  over every parameter), and the SVD-form update folds `diag(E)` and the scale into Q and rides LoRA's merged
  fp32 path (`W + s·P (E ⊙ Q)`, one GEMM per layer instead of three). An AdaLoRA step costs what a LoRA step
  costs (0.984× on SST-2 batches, `docs/benchmarks-methods.md`).
* **PRILoRA** (`plugins/prilora/layer.py`): the per-feature input norm is `1ᵀ (x ⊙ x)` (a GEMV; the reduction
  over the token dimension it replaced was several times slower on CPU) and is computed once per input
  tensor, shared by the query, key and value maps (the 2026-11-23 report measured 1.095× LoRA's step before
  this change, the 2026-11-24 one 1.048× after it; 0.995× when the two alternate step by step on one batch,
  `docs/benchmarks-methods.md`).
* **LoRA over the floor, profiled again** (`torch.profiler` over 6 trainer steps of each, 2 threads, same
  batches, 2026-11-24): LoRA's step exceeds the floor's by about 100 ms, of which about 50 ms are the four
  rank-r products per module (memory-bound: each reads a tokens × d tensor for r = 8 outputs), about 6 ms the
  copy of W that each merge starts from (forward and backward), and most of the rest autograd-function and
  AdamW overhead over 72 small tensors. Folding the rank-r products into the big GEMMs (`x [W + sBA; A]ᵀ`
  forward, `g [W + sBA | B]` backward, so x and g are read once less) measured no faster per layer (108 vs
  107 ms for a layer's six projections at 2,048 tokens): the wider GEMMs cost what the skinny ones saved.
  Dropout's `bernoulli_` alone is about 100 ms of every step (floor and adapters alike, 12 % of the floor's
  step); a faster dropout would speed up every method and raise every ratio to the floor, so it is left as
  transformers implements it. At this model size the ≤ 1.10× floor target needs an adapter costing under a
  tenth of a frozen step; LoRA's own work is about 12–16 % of it here.
* **Left as they were, after checking**: run hooks a method does not implement are never called (one check
  per run); the optimizer holds only trainable parameters (frozen weights get neither gradients nor AdamW
  state); evaluation batches are sorted by length; the trainer's one per-step `int(mask.sum())` is also
  the sync that makes GPU step times real.
"""


def side_by_side_sections(setup: Setup, args, sides: dict[str, dict | str]) -> list[str]:
    """The report's sections for ``--compare-compile`` and the ``--gpu`` TF32 row, as measured by this run."""
    lines = []
    titles = {"compile": ("torch.compile, side by side", "LoRA without and with `train.compile`"),
              "tf32": ("TF32 vs the exact merged path, side by side",
                       "LoRA in fp32 with `train.tf32: true` (unmerged) and with TF32 off (merged, exact)")}
    for kind, measured in sides.items():
        title, what = titles[kind]
        lines += [f"## {title}", ""]
        if isinstance(measured, str):  # not measurable here: why
            lines += [f"{measured}.", ""]
            continue
        lines += [f"{what}, the same batches (every batch padded to {setup.max_length}), {args.steps} steps × "
                  f"{args.rounds} interleaved rounds; first step (compilation included) and the median step "
                  "after it reported apart.", "", table(*side_by_side_table(measured), "github"), ""]
    return lines


def write_report(path: Path, setup: Setup, args, details: dict[str, str], stats, epochs, curves, rows,
                 skipped: dict[str, str], took: float, command: str, sides: dict | None = None) -> None:
    sides = sides or {}
    lines = [
        "# Benchmarks", "",
        f"Generated by `{command}` ({time.strftime('%Y-%m-%d %H:%M')}, {took / 60:.1f} min). Every number "
        "below was measured in that one process: each method ran through peftbench's trainer on the same "
        "model and the same real batches, in interleaved rounds, and every ratio compares medians from this "
        "run. Regenerate with the same command (`python -m benchmarks.bench --help` for the options).", "",
        "## Machine", "",
        table(["", ""], list(details.items()), "github"), "",
    ]
    lines += [f"* {note}" for note in setup.notes] + ([""] if setup.notes else [])
    lines += [
        "## Setup", "",
        f"* Model: {setup.model_name}; task {setup.task}"
        f"{' (real GLUE data)' if setup.task in GLUE_TASKS else ''}; batch {setup.batch_size}; max length {setup.max_length} "
        f"(dynamic padding, batches in random order: the same batches for every method); device "
        f"{setup.device}, precision {setup.precision}{', torch.compile' if setup.compile else ''}; "
        f"{args.steps} steps per run × {args.rounds} rounds, first {args.warmup} steps of each run not timed.",
        "* " + METHOD_NOTES.format(rank=setup.budget_rank, init_r=max(setup.budget_rank + 1,
                                                                     round(1.5 * setup.budget_rank)),
                                   schedule=", ".join(f"{k} {v}" for k, v in ADALORA_SCHEDULE.items())),
        f"* {FLOOR_DEFINITION}",
        "* **Step time**: wall time from the end of one optimizer step to the end of the next (data loading, "
        "forward, backward, clipping, optimizer, method hooks; evaluation excluded). **Tokens/s**: real "
        "(non-padding) tokens over the run's training time, median over rounds.",
    ]
    kinds = {s.get("mem_kind") for s in stats.values()} if stats else set()
    lines += [f"* {MEMORY_DEFINITION.get(kind, f'Peak memory: {kind}.')}" for kind in sorted(kinds, key=str)]
    if skipped:
        lines += ["* Skipped: " + "; ".join(f"`{m}`: {why}" for m, why in skipped.items()) + "."]
    lines += ["", "## Checks", "",
              "Verdicts compare median wall-clock step times (memory: peak memory). The CPU-time ratio beside "
              "them compares the median CPU time this process spent per step, which the other processes on "
              "a shared machine do not inflate. *floor ÷ baseline* is the ratio a method would reach if its "
              "adapter cost nothing (the frozen floor's step over the baseline's): where it is above a target, "
              "the base model's cost alone decides the verdict at this model size and batch.", "",
              table(CHECK_HEADERS, rows, "github"), ""]
    if stats:
        lines += ["## Step time, throughput and memory", "", table(*comparison_table(stats), "github"), ""]
        memory = memory_table(stats)
        if memory:
            lines += ["Memory by part:", "", table(*memory, "github"), ""]
    if epochs:
        lines += [
            "## Dynamic padding", "",
            f"LoRA, one pass over the same {args.padding_examples} training examples ({setup.task}, batch "
            f"{setup.batch_size}, max length {args.padding_max_length}); fastest of {args.padding_rounds} "
            "interleaved passes each, data loading and collation included.", "",
            table(["batches", "epoch (s)", "speed-up"],
                  [["dynamic padding + length grouping", f"{epochs['dynamic']:.2f}",
                    f"{epochs['fixed'] / epochs['dynamic']:.2f}×"],
                   [f"fixed: every batch padded to {args.padding_max_length}", f"{epochs['fixed']:.2f}", "1.00×"]],
                  "github"), ""]
    if curves and (curves["length"] or curves["rank"]):
        cpu = not torch.cuda.is_available()
        lines += ["## How cost grows", "",
                  f"Median step time{' (wall-clock / CPU time of this process)' if cpu else ''}, batch "
                  f"{args.scaling_batch_size}, every batch padded to the length, {args.scaling_steps} steps per "
                  "point (the first not timed; PrunedLoRA: the steps after its pruning event), one run per point.", ""]
        if curves["length"]:
            lines += [f"Sequence length (budget rank {setup.budget_rank}):", "",
                      table(*scaling_table(curves["length"], "L", cpu), "github"), ""]
        if curves["rank"]:
            lines += [f"Rank (the budget's LoRA rank; length {args.rank_length}; full fine-tuning and the floor "
                      "do not depend on it):", "", table(*scaling_table(curves["rank"], "r", cpu), "github"), ""]
    lines += side_by_side_sections(setup, args, sides)
    lines += [SIDE_BY_SIDE_NOTES, WHAT_CHANGED]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                   help="comma-separated method names (default: every registered method)")
    p.add_argument("--sections", type=lambda s: set(s.split(",")), default={"comparison", "padding", "scaling"},
                   help="any of comparison,padding,scaling (default: all)")
    p.add_argument("--task", default="rte")
    # short runs in more rounds: load bursts from other processes spread over every method
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per comparison run")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of every method")
    p.add_argument("--warmup", type=int, default=2, help="steps at the start of each run not timed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--budget-rank", type=int, default=8, help="the budget: LoRA of this rank")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--padding-examples", type=int, default=128, help="training examples in the padding pass")
    p.add_argument("--padding-max-length", type=int, default=320, help="max length there (RTE's in the GLUE config)")
    p.add_argument("--padding-rounds", type=int, default=2)
    p.add_argument("--seq-lengths", type=_ints, default=[32, 64, 128])
    p.add_argument("--ranks", type=_ints, default=[4, 8, 16, 32])
    p.add_argument("--rank-length", type=int, default=64, help="sequence length of the rank sweep")
    p.add_argument("--scaling-steps", type=int, default=4)
    p.add_argument("--scaling-batch-size", type=int, default=16)
    p.add_argument("--gpu", action="store_true",
                   help="the GPU setup: DeBERTa-v3-base shape with random weights, bf16 autocast, fused AdamW")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    p.add_argument("--compare-compile", action="store_true",
                   help="also time LoRA without and with train.compile side by side (steps/s ratio, first step "
                        "with compilation apart)")
    p.add_argument("--model", default=None,
                   help="minilm (default on CPU) | deberta-v3-base (default with --gpu) | a local model folder")
    p.add_argument("--tiny", action="store_true", help="shrink the model to 2 layers of width 32 (tests)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: cuda with --gpu, else auto)")
    p.add_argument("--precision", default=None, help="auto | fp32 | bf16 | fp16 (default: bf16 with --gpu)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds: tiny model, 4 steps, 1 round, small sweeps (not a measurement)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's machine section")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md", help="the markdown report")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p


def model_setup(args) -> tuple[dict[str, Any] | None, str]:
    name = args.model or ("deberta-v3-base" if args.gpu else "minilm")
    if name == "deberta-v3-base":
        # modeling.BUILTIN_CONFIGS has its exact shape (hidden 768, 12 layers, 12 heads, 3072, vocab 128100,
        # relative attention, 256 buckets, ...): built offline with random weights; MiniLM's token ids fit
        model = {"name_or_path": "microsoft/deberta-v3-base", "random_init": True, "tokenizer": "minilm"}
        label = "DeBERTa-v3-base shape (random weights, MiniLM tokenizer ids)"
    elif name == "minilm":
        model, label = {"name_or_path": "minilm"}, "all-MiniLM-L6-v2 (6 layers, hidden 384, pretrained)"
    else:
        model, label = {"name_or_path": name}, name
    if args.tiny:
        tiny = tiny_model_config()["config_overrides"]
        tiny = {**tiny, "vocab_size": 30522, "pooler_hidden_size": tiny["hidden_size"]}  # DeBERTa sizes its pooler apart
        model = {**model, "random_init": True, "config_overrides": tiny}
        label += ", shrunk to 2 layers of width 32 (a smoke run, not a measurement)"
    return model, label


def side_by_sides(setup: Setup, args) -> dict[str, dict | str]:
    """``--compare-compile``: LoRA eager vs compiled; ``--gpu``: LoRA in fp32 with TF32 vs exact (a string saying
    why where it cannot be measured)."""
    sides: dict[str, dict | str] = {}
    kinds = (["compile"] if args.compare_compile else []) + (["tf32"] if args.gpu else [])
    for kind in kinds:
        if kind == "tf32" and (setup.device == "cpu" or not torch.cuda.is_available()):
            sides[kind] = TF32_ON_CPU
            print(f"tf32: {TF32_ON_CPU}")
            continue
        print(f"{kind}: LoRA side by side ({args.steps} steps × {args.rounds} rounds)", flush=True)
        sides[kind] = side_by_side(setup, kind, args.steps, args.rounds, args.warmup)
        print(table(*side_by_side_table(sides[kind]), "simple"))
    return sides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:  # 4 steps: the fewest that leave PrunedLoRA a timed step after its pruning event
        args.tiny = True
        args.steps, args.rounds, args.warmup = 4, 1, 0
        args.padding_examples, args.padding_rounds, args.padding_max_length = 32, 1, 64
        args.seq_lengths, args.ranks, args.rank_length = [16, 32], [4, 8], 16
        args.scaling_steps, args.scaling_batch_size = 4, 8
        args.budget_rank = min(args.budget_rank, 4)
    if args.gpu and args.device is None and not torch.cuda.is_available():
        print("bench: --gpu needs a CUDA device (pass --device cpu to try the GPU setup on CPU)", file=sys.stderr)
        return 2
    model, model_name = model_setup(args)
    device = args.device or ("cuda" if args.gpu else "auto")
    task, notes = args.task, list(args.note)
    if task in GLUE_TASKS and glue_dir() is None:
        task = "toy_pair"
        notes.append(f"No GLUE data found ($PEFTBENCH_GLUE_DIR or ../shared/glue): the toy pair task stands in "
                     f"for {args.task}.")
    setup = Setup(model=model, model_name=model_name, task=task, batch_size=args.batch_size,
                  max_length=args.max_length, device=device, precision=args.precision or ("bf16" if args.gpu else "auto"),
                  threads=args.threads, compile=args.compile, budget_rank=args.budget_rank, notes=notes)
    if args.threads:
        torch.set_num_threads(args.threads)
    details = machine_details()
    command = "python -m benchmarks.bench" + ("" if argv is None and len(sys.argv) <= 1 else
                                              " " + " ".join(argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    print(f"machine: {machine()}")

    methods, skipped = available_methods(setup, args.methods)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    stats = epochs = curves = None
    if "comparison" in args.sections:
        print(f"comparison: {', '.join(methods)} ({args.steps} steps × {args.rounds} rounds)", flush=True)
        stats = comparison(setup, methods, args.steps, args.rounds, args.warmup)
        print(table(*comparison_table(stats), "simple"))
    if "padding" in args.sections:
        print(f"padding: {args.padding_examples} examples, max length {args.padding_max_length}", flush=True)
        epochs = padding(setup, args.padding_examples, args.padding_max_length, args.padding_rounds)
        print(f"  dynamic + grouping {epochs['dynamic']:.2f} s, fixed {epochs['fixed']:.2f} s "
              f"({epochs['fixed'] / epochs['dynamic']:.2f}×)")
    if "scaling" in args.sections:
        print(f"scaling: lengths {args.seq_lengths}, ranks {args.ranks}", flush=True)
        curves = scaling(setup, methods, args.seq_lengths, args.ranks, args.scaling_steps, args.scaling_batch_size,
                         args.rank_length)
        for key, name in (("length", "L"), ("rank", "r")):
            if curves[key]:
                print(table(*scaling_table(curves[key], name, not torch.cuda.is_available()), "simple"))
    sides = side_by_sides(setup, args)
    rows = checks(stats or {}, epochs, skipped)
    print(table(CHECK_HEADERS, rows, "simple"))
    took = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        details["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if not args.no_write:
        write_report(args.out, setup, args, details, stats, epochs, curves, rows, skipped, took, command, sides)
        print(f"wrote {args.out}")
    print(f"took {took / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
