"""The PEFT bridge's support matrix (docs/peft-bridge.md): for every ``peft.PeftType``, supported or why not, its
size key, and whether its solved size meets a LoRA r=8 budget (1 % tolerance) on MiniLM, DeBERTaV3-base and
Llama-3.2-3B shapes, counted offline on the meta device as ``peftbench budget`` does.

    python -m benchmarks.peft_matrix > /tmp/matrix.md     # ~15 min on 2 busy CPU cores (a meta Llama per count)
    python -m benchmarks.peft_matrix LOHA OFT             # those rows only
"""

from __future__ import annotations

import sys
import warnings

from peftbench.plugins.peft import TUNERS, UNSUPPORTED, _config_class

from peftbench import modeling
from peftbench.config import ModelConfig
from peftbench.errors import PeftbenchError
from peftbench.host import Host
from peftbench.lora import rank_cost

MODELS = {"MiniLM": ("minilm", "classification"), "DeBERTaV3-base": ("microsoft/deberta-v3-base", "classification"),
          "Llama-3.2-3B": ("meta-llama/Llama-3.2-3B", "causal_lm")}
TOLERANCE = 0.01


def cell(host: Host, name: str, shapes) -> str:
    model, targets, head = shapes
    cls = host.method(name)
    target = 8 * rank_cost(targets)
    try:
        if not cls.matches_budget:
            with host.activate(cls()):
                counts = host.hook.peftbench_count_trainable(model=model, targets=targets, head=head)
            return f"reference ({counts.final:,})"
        with host.activate(cls()):
            solved = host.hook.peftbench_solve_budget(model=model, targets=targets, head=head, target=target,
                                                      tolerance=TOLERANCE)
        with host.activate(cls(solved)):
            final = host.hook.peftbench_count_trainable(model=model, targets=targets, head=head).final
    except PeftbenchError as exc:
        return f"no: {str(exc).split(': ')[-1][:60]}"
    miss = (final - target) / target
    key = solved.size_key
    pattern = getattr(solved, TUNERS[cls.peft_type].pattern or "", None) or {}
    size = "/".join(str(v) for v in sorted({getattr(solved, key), *pattern.values()}))
    return f"{'yes' if abs(miss) <= TOLERANCE else 'nearest'} ({key}={size}, {miss:+.1%})"


def main() -> None:
    warnings.filterwarnings("ignore")
    host = Host()
    shapes = {}
    for label, (name, kind) in MODELS.items():
        mc = ModelConfig(name_or_path=name)
        model = modeling.load_model(mc, 2, seed=0, meta=True, kind=kind)
        head = modeling.head_modules(mc, model)
        shapes[label] = (model, modeling.find_targets(model, modeling.target_patterns(mc, model), head), head)
    print("| PeftType | PEFT config | bridge | size key | " + " | ".join(MODELS) + " |")
    print("|---|---|---|---|" + "---|" * len(MODELS))
    import peft

    only = {t.upper() for t in sys.argv[1:]}  # a few types' rows (e.g. after a PEFT upgrade)
    for peft_type in (t.value for t in peft.PeftType if not only or t.value in only):
        config = _config_class(peft_type).__name__
        if peft_type in UNSUPPORTED:
            print(f"| {peft_type} | {config} | no: {UNSUPPORTED[peft_type]} | — |" + " — |" * len(MODELS))
            continue
        name = f"peft:{peft_type.lower()}"
        cells = [cell(host, name, shapes[label]) for label in MODELS]
        print(f"| {peft_type} | {config} | `{name}` | {TUNERS[peft_type].size_key or 'fixed'} | "
              + " | ".join(cells) + " |", flush=True)
    print(f"\npeft {peft.__version__}; target LoRA r=8 on each model's six (Llama: seven) projections per block, "
          f"tolerance {TOLERANCE:.0%}", file=sys.stdout)


if __name__ == "__main__":
    main()
