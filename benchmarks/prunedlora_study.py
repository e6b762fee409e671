"""How much one pruning event changes the loss, per recovery variant (the numbers in the plugin docstring).

Trains PrunedLoRA's over-parameterized adapter a few steps without pruning, then runs one pruning event
(through the plugin's hooks, on a copy of the model) that removes ``k`` components from every module, with
the gradient of one fixed batch, and prints a table of the loss change on that batch and on held-out batches
for every recovery variant: none, the compensation-only readings (the default among them) and the notes' full
derived update (Newton part included) at the default and a heavy damping; then every criterion ablation in
both readings (the gradient criterion's recovery, and none: the authors' baselines)::

    python -m benchmarks.prunedlora_study --task sst2 --data-dir ../shared/glue --k 8 16

The output of that command is in docs/protocol.md ("PrunedLoRA's recovery update").
"""

from __future__ import annotations

import argparse
import copy

import torch
from peftbench.plugins.prunedlora import PrunedLoRA, PrunedLoRAParams
from tabulate import tabulate

from peftbench import modeling
from peftbench.config import ModelConfig
from peftbench.data import load_task_data, make_loader
from peftbench.hookspecs import TrainState
from peftbench.host import Host

VARIANTS = {
    "no recovery": {"recovery": False},
    "compensation, split (default)": {},
    "compensation, both in full": {"recovery_factors": "both"},
    "compensation, B only": {"recovery_factors": "B"},
    "compensation, A only": {"recovery_factors": "A"},
    "full derived update (notes), both, damping 0.01": {"recovery_update": "full", "recovery_factors": "both"},
    "full update, both, damping 1": {"recovery_update": "full", "recovery_factors": "both", "damping": 1.0},
    "full update, split, damping 0.01": {"recovery_update": "full"},
    "full update, split, damping 1": {"recovery_update": "full", "damping": 1.0},
    "taylor criterion, no recovery (authors' baseline)": {"criterion": "taylor", "recovery": False},
    "taylor criterion + default recovery": {"criterion": "taylor"},
    "activation criterion, no recovery (authors' baseline)": {"criterion": "activation", "recovery": False},
    "activation criterion + default recovery": {"criterion": "activation"},
}


def prune_once(model, batch, init_r: int, k: int, **params):
    """A copy of ``model`` after one pruning event scored on ``batch``."""
    model = copy.deepcopy(model)
    method = PrunedLoRA(PrunedLoRAParams(r=init_r - k, init_r=init_r, prune_k=k, prune_every=1, warmup_ratio=0,
                                         final_ratio=0, **params))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    state = TrainState(step=0, total_steps=2, epoch=0, optimizer=optimizer, lr_scheduler=None, accelerator=None,
                       seed=0)
    method.peftbench_train_start(model=model, state=state)
    if params.get("criterion") == "activation":  # it accumulates the layer inputs of training passes
        model.train()
        with torch.no_grad():
            model(**batch)
        model.eval()
    model.zero_grad()
    model(**batch).loss.backward()  # evaluation mode: no dropout, every variant sees the same gradient
    method.peftbench_after_backward(state=state)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--init-r", type=int, default=32)
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16], help="components removed per module")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=3, help="held-out batches")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    task = Host().task(args.task)
    mc = ModelConfig(args.model)
    model = modeling.load_model(mc, task.num_labels, args.seed)
    head = modeling.head_modules(mc, model)
    targets = modeling.find_targets(model, modeling.target_patterns(mc, model), head)
    modeling.freeze(model)
    PrunedLoRA(PrunedLoRAParams(r=1, init_r=args.init_r)).peftbench_inject(model=model, targets=targets)
    modeling.unfreeze_head(model, head)
    needed = (args.train_steps + 1 + args.held_out) * args.batch_size
    data = load_task_data(task, "train", args.data_dir, modeling.load_tokenizer(mc), 128, needed)
    batches = iter(make_loader(data, args.batch_size, True, True, args.seed, 0, task.is_regression))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(args.train_steps):
        model(**next(batches)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    scored, held = next(batches), [next(batches) for _ in range(args.held_out)]
    model.eval()

    def losses(m) -> tuple[float, float]:
        with torch.no_grad():
            return m(**scored).loss.item(), sum(m(**b).loss.item() for b in held) / len(held)

    base = losses(model)
    print(f"model {mc.name_or_path} ({sum(p.numel() for p in model.parameters()):,} parameters) on {args.task}, "
          f"{args.train_steps} steps trained at rank {args.init_r} (batch {args.batch_size}, seed {args.seed}): "
          f"loss {base[0]:.4f} (scored batch), {base[1]:.4f} (mean of {args.held_out} held-out batches)")
    print(f"Δloss after one event removing k of {args.init_r} components from each of {len(targets)} modules\n")
    rows = {name: [] for name in VARIANTS}
    for k in args.k:
        for name, params in VARIANTS.items():
            after = losses(prune_once(model, scored, args.init_r, k, **params))
            rows[name] += [f"{after[0] - base[0]:+.4f}", f"{after[1] - base[1]:+.4f}"]
    headers = ["variant"] + [f"k={k} {where}" for k in args.k for where in ("scored", "held-out")]
    print(tabulate([[name, *cells] for name, cells in rows.items()], headers=headers, tablefmt="pipe",
                   disable_numparse=True))


if __name__ == "__main__":
    main()
