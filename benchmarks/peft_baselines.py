"""HF PEFT baselines as benchmark-only peftbench method plugins.

Wrapping PEFT's own layers as methods lets them run through exactly the same trainer, data and timing
as peftbench's methods, so a ratio compares only the adapter implementations.
Load with ``plugins: [benchmarks.peft_baselines]`` (run from the repository root).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftbench.hookspecs import ParamCounts, hookimpl
from peftbench.lora import rank_cost
from peftbench.method import Method

PEFTBENCH_API_VERSION = 2


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
        n = self.params.r * rank_cost(targets)
        return ParamCounts(n, n, n)

    @hookimpl
    def peftbench_inject(self, model, targets):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.params.r, lora_alpha=self.params.alpha, target_modules=[t.name for t in targets],
                            lora_dropout=0.0, bias="none")
        inject_adapter_in_model(config, model)
        return True


@dataclass
class PeftAdaLoRAParams:
    init_r: int = 12
    target_r: int = 8
    alpha: float = 32.0
    tinit: float = 0.13  #: steps (>= 1) or a fraction of the run's steps (< 1), as in peftbench's adalora
    tfinal: float = 0.47
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1


class HFPeftAdaLoRA(Method):
    """HF PEFT's ``AdaLoraModel`` driven the documented way: ``update_and_allocate(step)`` after every
    optimizer step, and the orthogonality loss that ``AdaLoraModel.forward`` adds to the task loss."""

    name = "hf_peft_adalora"
    Params = PeftAdaLoRAParams
    description = "HF PEFT's AdaLoRA (benchmark baseline)"
    matches_budget = False

    @hookimpl
    def peftbench_count_trainable(self, targets):
        per_rank = rank_cost(targets) + len(targets)  # a triplet adds its singular value
        return ParamCounts(round(self.params.target_r * per_rank), self.params.init_r * per_rank,
                           self.params.init_r * per_rank - (self.params.init_r - self.params.target_r) * len(targets))

    @hookimpl
    def peftbench_inject(self, model, targets):
        from peft import AdaLoraConfig
        from peft.tuners.adalora import AdaLoraModel

        p = self.params
        # total_step is known only at train start; a placeholder passes AdaLoraConfig's check until then
        config = AdaLoraConfig(init_r=p.init_r, target_r=p.target_r, lora_alpha=p.alpha, lora_dropout=0.0,
                               target_modules=[t.name for t in targets], deltaT=p.deltaT, beta1=p.beta1,
                               beta2=p.beta2, orth_reg_weight=p.orth_reg_weight, total_step=2 ** 31)
        self.tuner = AdaLoraModel(model, config, "default")  # injects into `model` in place
        for name, param in model.named_parameters():
            if ".ranknum." in name:  # peft 0.21.2 leaves it trainable; the reference code keeps the scale fixed
                param.requires_grad_(False)
        return True

    @hookimpl
    def peftbench_train_start(self, state):
        config = self.tuner.peft_config["default"]
        config.total_step = state.total_steps
        config.tinit, config.tfinal = (round(v * state.total_steps) if v < 1 else int(v)
                                       for v in (self.params.tinit, self.params.tfinal))

    @hookimpl
    def peftbench_extra_loss(self):
        # AdaLoraModel.forward's orthogonal regularisation (peft 0.21.2), run here because the trainer calls
        # the wrapped model itself rather than the AdaLoraModel around it
        regu_loss, num_param = 0, 0
        for n, p in self.tuner.model.named_parameters():
            if ("lora_A" in n or "lora_B" in n) and "default" in n:
                para_cov = p @ p.T if "lora_A" in n else p.T @ p
                eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
                eye.requires_grad = False
                num_param += 1
                regu_loss += torch.norm(para_cov - eye, p="fro")
        return self.params.orth_reg_weight * regu_loss / num_param

    @hookimpl
    def peftbench_after_optimizer_step(self, state):
        self.tuner.update_and_allocate(state.step)


class FrozenFloor(Method):
    """The cost floor of every adapter method: the frozen model, with backward still run through every layer.

    Every base weight stays frozen and no adapter is added; the output of the input embeddings is made to
    require grad (HF's ``enable_input_require_grads``), so backward runs from the loss through every block
    down to the embeddings, as for an adapter in the first block. The head (pooler, classifier) trains, as
    for every method. An adapter method's step costs this plus its own work.
    """

    name = "floor"
    description = "frozen model, backward to the input embeddings (benchmark floor)"
    matches_budget = False

    @hookimpl
    def peftbench_count_trainable(self):
        return ParamCounts(0, 0, 0)

    @hookimpl
    def peftbench_inject(self, model):
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
        return True


@hookimpl
def peftbench_add_methods():
    return [HFPeftLoRA, HFPeftAdaLoRA, FrozenFloor]
