"""HF PEFT baselines as benchmark-only peftbench method plugins.

Wrapping PEFT's own layers as methods lets them run through exactly the same trainer, data and timing
as peftbench's methods, so a ratio compares only the adapter implementations.
Load with ``plugins: [benchmarks.peft_baselines]`` (run from the repository root).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.hookspecs import ParamCounts, hookimpl
from peftbench.method import Method

PEFTBENCH_API_VERSION = 1


@dataclass
class PeftLoRAParams:
    r: int = 8
    alpha: float = 16.0


class HFPeftLoRA(Method):
    name = "hf_peft_lora"
    Params = PeftLoRAParams
    description = "HF PEFT's LoRA layers (benchmark baseline)"
    matches_budget = False

    @hookimpl
    def peftbench_count_trainable(self, targets):
        n = sum(self.params.r * (t.in_features + t.out_features) for t in targets)
        return ParamCounts(n, n, n)

    @hookimpl
    def peftbench_inject(self, model, targets):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.params.r, lora_alpha=self.params.alpha, target_modules=[t.name for t in targets],
                            lora_dropout=0.0, bias="none")
        inject_adapter_in_model(config, model)
        return True


@hookimpl
def peftbench_add_methods():
    return [HFPeftLoRA]
