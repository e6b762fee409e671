"""peftbench's LoRA equals HF PEFT's LoRA: same A/B → same outputs and gradients, same trainable count."""

import copy

import pytest
import torch

from peftbench import modeling
from peftbench.config import ModelConfig
from peftbench.testing import tiny_model_config

peft = pytest.importorskip("peft")


def _tiny_model():
    mc = ModelConfig(**tiny_model_config())
    model = modeling.load_model(mc, num_labels=2, seed=0)
    model.eval()  # dropout off: outputs must be comparable
    return mc, model


@pytest.mark.parametrize("r,alpha,rank_pattern", [(4, 8, {}), (8, 32, {}), (4, 8, {"query": 2, "intermediate.dense": 6})])
def test_outputs_gradients_and_counts_match_peft(host, r, alpha, rank_pattern):
    mc, base = _tiny_model()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    head = modeling.head_modules(mc, ours)
    targets = modeling.find_targets(ours, modeling.target_patterns(mc, ours), head)
    method = host.method("lora")(host.method("lora").Params(r=r, alpha=alpha, rank_pattern=rank_pattern))
    modeling.freeze(ours)
    with host.activate(method):
        host.hook.peftbench_inject(model=ours, targets=targets)
        counts = host.hook.peftbench_count_trainable(model=ours, targets=targets, head=head)

    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[t.name for t in targets], lora_dropout=0.0,
                             bias="none", rank_pattern=rank_pattern)
    theirs = peft.get_peft_model(theirs, config)

    # same (non-zero) A and B in both
    generator = torch.Generator().manual_seed(1)
    ours_modules = dict(ours.named_modules())
    for target in targets:
        mine = ours_modules[target.name]
        peft_layer = theirs.base_model.model.get_submodule(target.name)
        a = torch.randn(mine.lora_A.shape, generator=generator) * 0.1
        b = torch.randn(mine.lora_B.shape, generator=generator) * 0.1
        with torch.no_grad():
            mine.lora_A.copy_(a)
            mine.lora_B.copy_(b)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)

    ids = torch.randint(1000, 3000, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    labels = torch.tensor([0, 1, 1])
    out_ours = ours(input_ids=ids, attention_mask=mask, labels=labels)
    out_theirs = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    assert not torch.allclose(out_ours.logits, base(input_ids=ids, attention_mask=mask).logits, atol=1e-4)

    out_ours.loss.backward()
    out_theirs.loss.backward()
    for target in targets:
        mine = ours_modules[target.name]
        peft_layer = theirs.base_model.model.get_submodule(target.name)
        torch.testing.assert_close(mine.lora_A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.lora_B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-5, rtol=0)

    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    theirs_trainable = sum(p.numel() for n, p in theirs.named_parameters() if p.requires_grad and "lora_" in n)
    assert ours_trainable == theirs_trainable == counts.final
