"""PRILoRA's step time against LoRA's at the same budget (the paper: no extra time or memory over LoRA).

Both run through the real trainer on the same real RTE batches (MiniLM by default), interleaved round by
round in one process (:mod:`benchmarks.common`). Target: PRILoRA median step time ≤ 1.05× LoRA's. The
permanent-mask variant (one batched multiply per step) and a PRILoRA without pruning (ranks only) are timed
too.

    python -m benchmarks.prilora_step_time                       # MiniLM, CPU or GPU, whatever is here
    python -m benchmarks.prilora_step_time --steps 60 --rounds 3 --model '{"name_or_path": "microsoft/deberta-v3-base", "random_init": true}'

Steps with a pruning event (one in ``prune_every``) are included in the median like every other step, and
their mean cost is reported apart from it.

On a machine shared with other jobs, whole runs drift apart; ``--alternate`` times the same training step
(forward, backward, AdamW, the method's after-step hook) of every method in turn, A B C A B C ..., on one
fixed batch, outside the trainer, so that drift hits every method alike step by step; it also reports the
process CPU time of each step, which other jobs on the machine do not inflate (use ``--threads 1``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from peftbench.plugins.lora import LoRA
from peftbench.plugins.prilora import PRILoRA

from benchmarks.common import bench_config, interleaved_runs, machine
from peftbench import modeling
from peftbench.config import ModelConfig
from peftbench.hookspecs import TrainState
from peftbench.schema import from_dict

METHODS = [
    {"name": "lora", "params": {"r": 8, "alpha": 16}},
    {"name": "prilora", "params": {"alpha": 16}},
    {"name": "prilora", "label": "prilora_permanent", "params": {"alpha": 16, "permanent": True}},
    {"name": "prilora", "label": "prilora_ranks_only", "params": {"alpha": 16, "criterion": "none"}},
]
TARGET = 1.05


def time_interleaved(config, rounds: int, warmup: int) -> dict[str, dict]:
    """Per-step times of every method (``warmup`` first steps of each run dropped), rounds interleaved."""
    times: dict[str, list[float]] = {}
    event_times: dict[str, list[float]] = {}
    info: dict[str, dict] = {}
    for _, spec, result in interleaved_runs(config, rounds):
        every = getattr(spec.params, "prune_every", 0) if getattr(spec.params, "criterion", "none") != "none" else 0
        steady, events = times.setdefault(spec.label, []), event_times.setdefault(spec.label, [])
        for i, t in enumerate(result.step_times[warmup:], start=warmup):
            (events if every and (i + 1) % every == 0 else steady).append(t)
        info[spec.label] = {"adapter": result.trainable["adapter"], "nonzero": result.trainable["adapter_nonzero"],
                            "peak_mem_bytes": result.peak_mem_bytes, "mem_kind": result.mem_kind}
    for label in times:
        every_step = times[label] + event_times[label]
        info[label].update(median=statistics.median(every_step), mean=statistics.mean(every_step),
                           steps=len(every_step),
                           event_mean=statistics.mean(event_times[label]) if event_times[label] else None)
    return info


def time_alternating(model: dict | None, steps: int, batch_size: int, max_length: int, warmup: int = 3):
    """Per-step times of every method, alternating step by step on one batch (the trainer's step, inlined)."""
    mc = ModelConfig(**(model or {"name_or_path": "minilm"}))
    base = modeling.load_model(mc, num_labels=2, seed=0)
    head = modeling.head_modules(mc, base)
    targets = modeling.find_targets(base, modeling.target_patterns(mc, base), head)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (batch_size, max_length), generator=generator),
             "attention_mask": torch.ones(batch_size, max_length, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,), generator=generator)}
    contestants = {}
    for spec in METHODS:
        cls = {"lora": LoRA, "prilora": PRILoRA}[spec["name"]]
        method = cls(from_dict(cls.Params, spec["params"]))
        net = copy.deepcopy(base)
        modeling.freeze(net)
        method.peftbench_inject(net, targets)
        modeling.unfreeze_head(net, head)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        state = TrainState(step=0, total_steps=steps, epoch=0, optimizer=optimizer, lr_scheduler=None,
                           accelerator=None, seed=0)
        if hasattr(method, "peftbench_train_start"):
            method.peftbench_train_start(state)
        adapter = sum(p.numel() for n, p in net.named_parameters()
                      if p.requires_grad and not any(n.startswith(h + ".") for h in head))
        contestants[spec.get("label", spec["name"])] = (net, method, optimizer, state, adapter)
    times: dict[str, list[float]] = {label: [] for label in contestants}
    cpu_times: dict[str, list[float]] = {label: [] for label in contestants}
    labels = list(contestants)
    for step in range(steps):
        for label in labels[step % len(labels):] + labels[:step % len(labels)]:  # rotate: no fixed order
            net, method, optimizer, state, _ = contestants[label]
            state.step = step
            started, cpu_started = time.perf_counter(), time.process_time()
            net(**batch).loss.backward()
            optimizer.step()
            if hasattr(method, "peftbench_after_optimizer_step"):
                method.peftbench_after_optimizer_step(state)
            optimizer.zero_grad(set_to_none=True)
            if step >= warmup:
                times[label].append(time.perf_counter() - started)
                cpu_times[label].append(time.process_time() - cpu_started)
    return {label: {"median": statistics.median(t), "mean": statistics.mean(t), "steps": len(t),
                    "cpu_median": statistics.median(cpu_times[label]), "cpu_mean": statistics.mean(cpu_times[label]),
                    "adapter": contestants[label][4], "event_mean": None} for label, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every method")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", type=json.loads, default=None, help="model config as JSON (default: MiniLM)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--alternate", action="store_true", help="alternate methods step by step (see above)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.alternate:
        stats = time_alternating(args.model, args.steps, args.batch_size, args.max_length)
        print(f"machine: {machine()}")
        print(f"{args.steps} steps per method, alternating step by step (first 3 dropped), one batch of "
              f"{args.batch_size} × {args.max_length} tokens")
        print(f"{'method':<20}{'median ms':>11}{'mean ms':>10}{'CPU median ms':>15}{'CPU mean ms':>13}{'adapter':>10}")
        for label, s in stats.items():
            print(f"{label:<20}{s['median'] * 1e3:>11.1f}{s['mean'] * 1e3:>10.1f}{s['cpu_median'] * 1e3:>15.1f}"
                  f"{s['cpu_mean'] * 1e3:>13.1f}{s['adapter']:>10,}")
        print("wall time:")
        print_ratios(stats)
        # process CPU time: what the step costs, whatever other jobs on the machine take from it
        print("process CPU time:")
        print_ratios({label: {**s, "median": s["cpu_median"], "mean": s["cpu_mean"]} for label, s in stats.items()})
        return

    # every batch padded to the same length: the comparison is about the adapters, not the batch mix
    config = bench_config(METHODS, steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                          model=args.model, device=args.device, num_threads=args.threads, group_by_length=False)
    stats = time_interleaved(config, rounds=args.rounds, warmup=3)
    print(f"machine: {machine()}")
    print(f"{args.steps} steps × {args.rounds} rounds per method (first 3 of each run dropped), "
          f"batch {args.batch_size}, length ≤ {args.max_length}")
    gpu = next(iter(stats.values()))["mem_kind"].startswith("cuda")
    print(f"{'method':<20}{'median ms':>11}{'mean ms':>10}{'event ms':>10}{'adapter':>10}{'nonzero':>10}"
          + (f"{'peak MB':>9}" if gpu else ""))
    for label, s in stats.items():
        event = f"{s['event_mean'] * 1e3:.1f}" if s["event_mean"] else "—"
        print(f"{label:<20}{s['median'] * 1e3:>11.1f}{s['mean'] * 1e3:>10.1f}{event:>10}{s['adapter']:>10,}"
              f"{s['nonzero']:>10,}" + (f"{s['peak_mem_bytes'] / 2 ** 20:>9.0f}" if gpu else ""))
    print_ratios(stats)


def print_ratios(stats: dict[str, dict]) -> None:
    lora = stats["lora"]
    for label in ("prilora", "prilora_permanent", "prilora_ranks_only"):
        median, mean = stats[label]["median"] / lora["median"], stats[label]["mean"] / lora["mean"]
        verdict = "meets" if median <= TARGET else "MISSES"
        print(f"{label} / lora: median step time {median:.3f}× (target ≤ {TARGET:.2f}×: {verdict}); "
              f"mean, pruning events included, {mean:.3f}×")


if __name__ == "__main__":
    main()
