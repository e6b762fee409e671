"""Causal-LM training throughput: peftbench's LoRA vs HF PEFT's LoRA on the same Llama-shaped model (CPU).

Both run through peftbench's trainer on the same GSM8K batches (prompt + answer, loss on the answer), in
interleaved rounds (:func:`benchmarks.common.run_interleaved`), so the ratio compares only the adapter
implementations. The model is a random-init Llama (``tiny-llama`` widened by ``--hidden``/``--layers``) with
MiniLM's tokenizer: no download. Prints a markdown table for ``docs/benchmarks.md``.

    nice -n 19 python -m benchmarks.llm_lora_vs_peft            # from the repository root
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, machine, run_interleaved
from peftbench.config import parse_config
from peftbench.toys import tiny_llama_config

GSM8K = REPO.parent / "shared" / "gsm8k"


def llm_config(args) -> object:
    heads = max(args.hidden // 32, 1)
    model = tiny_llama_config(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=heads,
                              num_key_value_heads=max(heads // 2, 1), head_dim=32)
    return parse_config({
        "name": "bench_llm", "model": model, "tasks": ["gsm8k"], "seeds": [0],
        "task_options": {"gsm8k": {"val_size": 8, "max_new_tokens": 1, "max_total_length": 512}},
        "methods": [{"name": "lora", "params": {"r": args.rank, "alpha": 2 * args.rank}},
                    {"name": "hf_peft_lora", "params": {"r": args.rank, "alpha": 2 * args.rank}}],
        "budget": {"lora_rank": args.rank, "min_evaluations": 1},
        "train": {"epochs": 100, "max_steps": args.steps, "batch_size": args.batch_size, "max_length": 512,
                  "eval_batch_size": 8, "max_eval_samples": 1, "lr": 1e-4, "log_every": 10 ** 6,
                  "precision": "fp32", "device": "cpu", "deterministic": False, "num_threads": args.threads},
        "data_dir": str(args.data_dir),
        "plugins": ["benchmarks.peft_baselines"],
        "output": {"save_adapters": False},
    }, "<bench_llm>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=GSM8K)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    stats = run_interleaved(llm_config(args), rounds=args.rounds, warmup=2, probe_memory=False)
    base = stats["hf_peft_lora"]
    print(f"<!-- python -m benchmarks.llm_lora_vs_peft {' '.join(sys.argv[1:] if argv is None else argv)}: {machine()}, "
          f"{time.perf_counter() - started:.0f} s -->")
    print(f"Llama-shaped, random init: hidden {args.hidden}, {args.layers} layers, vocab 30,522 (MiniLM's "
          f"tokenizer); LoRA r={args.rank} on q,k,v,o,gate,up,down; GSM8K batches of {args.batch_size}, fp32, "
          f"{args.threads} threads; {args.steps} steps × {args.rounds} rounds, first 2 of each run not timed.\n")
    print("| method | adapter params | median step (ms) | tokens/s | step × HF PEFT LoRA |")
    print("|---|---|---|---|---|")
    for label in ("lora", "hf_peft_lora"):
        s = stats[label]
        print(f"| {label} | {s['adapter']:,} | {1000 * s['median_step_s']:,.1f} | {s['tokens_per_s']:,.0f} | "
              f"{s['median_step_s'] / base['median_step_s']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
