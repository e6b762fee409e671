"""AdaLoRA's train-step time against HF PEFT's AdaLoRA on the same model and batches (target ≤ 0.8×).

Both run the same AdaLoRA (init_r 12 → target_r 8, every step a reallocation as in the RTE/MRPC scripts,
γ = 0.1) through the real trainer on the same real RTE batches (MiniLM by default), interleaved round by
round in one process. HF PEFT's is driven as documented (``update_and_allocate`` after each optimizer step,
its forward's orthogonality loss): see ``benchmarks/peft_baselines.py``. LoRA r=8 is timed for reference
(the paper: AdaLoRA 11–16 % slower per epoch than LoRA).

    python -m benchmarks.adalora_step_time                       # MiniLM, CPU or GPU, whatever is here
    python -m benchmarks.adalora_step_time --batch-size 8 --max-length 64 --threads 1
    python -m benchmarks.adalora_step_time --model '{"name_or_path": "microsoft/deberta-v3-base", "random_init": true}'

A run has three phases with different per-step work (warm-up: importance EMAs only; budget phase: EMAs,
scores and a global reallocation every step; final phase: the fixed mask only). Medians are printed over
all steps and per phase.
"""

from __future__ import annotations

import argparse
import json
import statistics

from peftbench.plugins.adalora import resolve_steps

from benchmarks.common import bench_config, interleaved_runs, machine

SCHEDULE = {"tinit": 0.13, "tfinal": 0.47, "deltaT": 1}  # the plugin's defaults
METHODS = [
    {"name": "adalora", "match_budget": False,
     "params": {"init_r": 12, "target_r": 8, "alpha": 32, "gamma": 0.1, **SCHEDULE}},
    {"name": "hf_peft_adalora",
     "params": {"init_r": 12, "target_r": 8, "alpha": 32, "orth_reg_weight": 0.1, **SCHEDULE}},
    {"name": "lora", "match_budget": False, "params": {"r": 8, "alpha": 16}},
]
TARGET = 0.8
PHASES = ("all", "warm-up", "budget", "final")


def phase_of(step: int, total: int) -> str:
    tinit, tfinal = resolve_steps(SCHEDULE["tinit"], total), resolve_steps(SCHEDULE["tfinal"], total)
    return "warm-up" if step <= tinit else "budget" if step < total - tfinal else "final"


def time_interleaved(config, rounds: int, warmup: int) -> dict[str, dict]:
    times: dict[str, dict[str, list[float]]] = {}
    info: dict[str, dict] = {}
    for _, spec, result in interleaved_runs(config, rounds):
        phases = times.setdefault(spec.label, {phase: [] for phase in PHASES})
        for step, seconds in enumerate(result.step_times):
            if step >= warmup:
                phases["all"].append(seconds)
                phases[phase_of(step, result.steps)].append(seconds)
        info[spec.label] = {"adapter": result.trainable["adapter"], "peak_mem_bytes": result.peak_mem_bytes,
                            "mem_kind": result.mem_kind, "ranks": result.method_report.get("ranks")}
    for label, phases in times.items():
        info[label]["median"] = {phase: statistics.median(t) if t else float("nan") for phase, t in phases.items()}
        info[label]["steps"] = len(phases["all"])
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every method")
    parser.add_argument("--task", default="rte", help="GLUE task whose real batches are timed (sst2: short ones)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", type=json.loads, default=None, help="model config as JSON (default: MiniLM)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    # every batch padded to the same length: the comparison is about the adapters, not the batch mix
    config = bench_config(METHODS, task=args.task, steps=args.steps, batch_size=args.batch_size,
                          max_length=args.max_length, model=args.model, device=args.device,
                          num_threads=args.threads, group_by_length=False)
    stats = time_interleaved(config, rounds=args.rounds, warmup=3)
    print(f"machine: {machine()}")
    print(f"{args.steps} steps × {args.rounds} rounds per method (first 3 of each run dropped), {args.task}, batch "
          f"{args.batch_size}, length {args.max_length}, schedule {SCHEDULE}")
    print(f"{'method':<18}" + "".join(f"{p + ' ms':>14}" for p in PHASES) + f"{'adapter':>11}")
    for label, s in stats.items():
        print(f"{label:<18}" + "".join(f"{s['median'][p] * 1e3:>14.1f}" for p in PHASES) + f"{s['adapter']:>11,}")
    ours, peft, lora = stats["adalora"]["median"], stats["hf_peft_adalora"]["median"], stats["lora"]["median"]
    ratio = ours["all"] / peft["all"]
    print(f"adalora / hf_peft_adalora median step time: {ratio:.3f}× (target ≤ {TARGET:.2f}×: "
          f"{'meets' if ratio <= TARGET else 'MISSES'}); per phase: "
          + ", ".join(f"{p} {ours[p] / peft[p]:.3f}×" for p in PHASES[1:]))
    print(f"adalora / lora: {ours['all'] / lora['all']:.3f}×; hf_peft_adalora / lora: {peft['all'] / lora['all']:.3f}×")


if __name__ == "__main__":
    main()
