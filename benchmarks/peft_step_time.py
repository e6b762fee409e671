"""Training-step time of every method of configs/peft_zoo.yaml against LoRA on MiniLM (CPU), at the sizes
``peftbench budget`` solves: one optimizer step (forward, backward, AdamW) on a batch of 16 random 128-token
inputs, median of ``--steps`` after 2 warm-up steps, each method injected into a fresh model as the trainer does.

    python -m benchmarks.peft_step_time [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from peftbench import modeling
from peftbench.config import load_config
from peftbench.runner import make_host, solve_budgets


def step_times(config, host, solved, label: str, steps: int) -> list[float]:
    spec = next(s for s in solved.values() if s.label == label)
    method = host.method(spec.method)(spec.params)
    model = modeling.load_model(config.model, 2, seed=0)
    head = modeling.head_modules(config.model, model)
    targets = modeling.find_targets(model, modeling.target_patterns(config.model, model), head)
    modeling.freeze(model)
    with host.activate(method):
        host.hook.peftbench_inject(model=model, targets=targets)
    modeling.unfreeze_head(model, head)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (16, 128), generator=generator)
    labels = torch.randint(0, 2, (16,), generator=generator)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", default="configs/peft_zoo.yaml")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    host = make_host(config)
    solved = solve_budgets(config, host)
    labels = [m.label for m in config.methods]
    medians = {}
    for label in labels:
        medians[label] = statistics.median(step_times(config, host, solved, label, args.steps))
        print(f"{label:16s} {1000 * medians[label]:8.1f} ms  {medians[label] / medians['lora']:5.2f}x LoRA",
              flush=True)


if __name__ == "__main__":
    main()
