"""PrunedLoRA step time as ranks shrink, against LoRA at the final and at the initial rank.

PrunedLoRA physically removes pruned components (A, B and Adam's moments shrink), so once every module has
reached its target rank a step should cost what a LoRA step at that rank costs. One PrunedLoRA run through
the real trainer gives the whole curve: the trainer times every optimizer step and the method's
``rank_history`` says which rank each step ran at. Runs are interleaved with the LoRA baselines over
``--rounds`` rounds (see :mod:`benchmarks.common`), and the ratio compares medians from this one process.

    python -m benchmarks.prunedlora_step_time                      # MiniLM, RTE, CPU or GPU
    python -m benchmarks.prunedlora_step_time --steps 40 --rounds 1 --tiny   # seconds, toy model
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from benchmarks.common import bench_config, interleaved_runs, machine
from peftbench.testing import tiny_model_config


def rank_per_step(rank_history: list[dict[str, Any]], steps: int) -> list[float]:
    """Mean module rank during each optimizer step (an event at step s prunes before step s runs)."""
    ranks, events = [], sorted(rank_history, key=lambda e: e["step"])
    for step in range(steps):
        current = [e for e in events if e["step"] <= step][-1]["ranks"]
        ranks.append(sum(current.values()) / len(current))
    return ranks


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8, help="target (final) rank = the budget's LoRA rank")
    ap.add_argument("--init-ratio", type=int, default=4)
    ap.add_argument("--prune-every", type=int, default=4, help="K1 (the paper's 10 makes a longer run)")
    ap.add_argument("--prune-k", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--task", default="rte")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--settle", type=int, default=3, help="steps after the last event left out of the ratio")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (a smoke run, not a measurement)")
    args = ap.parse_args(argv)

    init_r = args.init_ratio * args.rank
    prunedlora = {"name": "prunedlora", "params": {"init_ratio": args.init_ratio, "prune_every": args.prune_every,
                                                    "prune_k": args.prune_k, "warmup_ratio": 0.05,
                                                    "final_ratio": 0.05}}
    methods = [prunedlora, {"name": "lora", "label": f"lora_r{args.rank}", "params": {"r": args.rank}},
               {"name": "lora", "label": f"lora_r{init_r}", "params": {"r": init_r}, "match_budget": False}]
    config = bench_config(methods, task=args.task, steps=args.steps, batch_size=args.batch_size,
                          max_length=args.max_length, device=args.device, precision=args.precision,
                          budget_rank=args.rank, model=tiny_model_config() if args.tiny else None,
                          num_threads=torch.get_num_threads())
    times: dict[str, list[float]] = {}  # LoRA baselines: every step
    by_rank: dict[float, list[float]] = {}
    events_s: list[float] = []
    settled_s: list[float] = []  # prunedlora after its last event (+ settle steps)
    for _, spec, result in interleaved_runs(config, args.rounds):
        if spec.method != "prunedlora":
            times.setdefault(spec.label, []).extend(result.step_times[3:])
            continue
        history = result.method_report["rank_history"]
        ranks = rank_per_step(history, len(result.step_times))
        event_steps = {e["step"] for e in history[1:]}
        last_event = max(event_steps)
        for step, (seconds, rank) in enumerate(zip(result.step_times, ranks)):
            if step < 3:
                continue  # first steps: allocator and thread-pool warm-up
            if step in event_steps:
                events_s.append(seconds)  # the step that runs a pruning event (scores + surgery)
                continue
            by_rank.setdefault(rank, []).append(seconds)
            if step > last_event + args.settle:
                settled_s.append(seconds)

    final_label = f"lora_r{args.rank}"
    lora_final = statistics.median(times[final_label])
    print(f"machine: {machine()}")
    print(f"task {config.tasks[0]}, batch {args.batch_size}, max_length {args.max_length}, {args.steps} steps × "
          f"{args.rounds} rounds; prunedlora init_r={init_r} → r={args.rank}, K1={args.prune_every}, "
          f"K2={args.prune_k}")
    print("median step time per rank level (prunedlora, event steps excluded):")
    for rank in sorted(by_rank, reverse=True):
        samples = by_rank[rank]
        print(f"  rank {rank:5.1f}: {statistics.median(samples) * 1e3:8.2f} ms  "
              f"({statistics.median(samples) / lora_final:.3f}× lora_r{args.rank}, n={len(samples)})")
    print(f"  event steps: {statistics.median(events_s) * 1e3:8.2f} ms (n={len(events_s)})")
    print(f"  after compaction: {statistics.median(settled_s) * 1e3:8.2f} ms (n={len(settled_s)})")
    for label in (f"lora_r{init_r}", final_label):
        print(f"{label}: {statistics.median(times[label]) * 1e3:8.2f} ms (n={len(times[label])})")
    ratio = statistics.median(settled_s) / lora_final
    verdict = "meets" if ratio <= 1.10 else "MISSES"
    print(f"prunedlora after compaction / lora_r{args.rank} median step time: {ratio:.3f}× "
          f"(target ≤ 1.10×: {verdict}; n={len(settled_s)})")
    return {"ratio": ratio, "by_rank": {k: statistics.median(v) for k, v in by_rank.items()},
            "lora_final_s": lora_final}


if __name__ == "__main__":
    main()
