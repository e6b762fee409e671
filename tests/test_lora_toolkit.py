"""The public LoRA toolkit (peftbench.lora): the fused autograd function, the layer's fast and exact paths,
rank resizing with optimizer state, loading a saved adapter of another rank, the per-rank cost, the exporter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peftbench import modeling
from peftbench.config import ModelConfig
from peftbench.lora import (
    PREFIX,
    LoRALinear,
    MergedLoRAFunction,
    inject_lora,
    keep_rank,
    lora_layers,
    lora_peft_export,
    peft_alpha,
    rank_cost,
    resize_rank,
)
from peftbench.testing import tiny_model_config

# --- the fused autograd function and the layer ------------------------------------------------------------


@pytest.mark.parametrize("trains_base", [True, False])
def test_merged_lora_function_passes_gradcheck_in_float64(trains_base):
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape, grad=True):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_(grad)

    x = tensor(2, 5, 6)  # a batch of sequences: the function flattens the token dimensions itself
    weight, bias = tensor(4, 6, grad=trains_base), tensor(4, grad=trains_base)
    lora_a, lora_b = tensor(3, 6), tensor(4, 3)
    assert torch.autograd.gradcheck(lambda *t: MergedLoRAFunction.apply(*t, 0.7), (x, weight, bias, lora_a, lora_b))


def test_merged_lora_function_computes_the_textbook_lora_output():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 7, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), None
    lora_a, lora_b = torch.randn(2, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    expected = x @ weight.T + 0.5 * (x @ lora_a.T) @ lora_b.T
    torch.testing.assert_close(MergedLoRAFunction.apply(x, weight, bias, lora_a, lora_b, 0.5), expected)


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_merged_and_unmerged_paths_agree(x_requires_grad):
    torch.manual_seed(0)
    merged = LoRALinear(nn.Linear(24, 40), r=4, alpha=8)
    nn.init.normal_(merged.lora_B, std=0.1)
    merged.base.requires_grad_(False)
    unmerged = copy.deepcopy(merged)
    unmerged.merge_in_fp32 = False
    x = torch.randn(3, 7, 24)
    results = []
    for layer in (merged, unmerged):
        inp = x.clone().requires_grad_(x_requires_grad)
        out = layer(inp)
        (out * torch.linspace(-1, 1, 40)).sum().backward()
        results.append((out, inp.grad, layer.lora_A.grad, layer.lora_B.grad))
    assert merged.can_merge(x) and not unmerged.can_merge(x)
    for a, b in zip(*results):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_merge_is_skipped_where_it_would_not_be_exact():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=0.1)
    x = torch.randn(2, 8)
    assert not layer.train().can_merge(x)  # dropout acts on the adapter's input only
    assert layer.eval().can_merge(x)
    assert not layer.can_merge(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.can_merge(x)


def test_a_fresh_layer_is_the_identity_and_merged_equals_the_adapted_layer():
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(6, 5), r=3, alpha=6)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    nn.init.normal_(layer.lora_B)
    torch.testing.assert_close(layer.merged()(x), layer(x))


# --- rank resizing with optimizer state -------------------------------------------------------------------


def _adam_steps(params, steps=2, **kwargs):
    optimizer = torch.optim.AdamW(params, lr=0.1, **kwargs)
    for _ in range(steps):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_keep_rank_swaps_in_a_smaller_parameter_with_sliced_gradient_and_adam_state():
    module = nn.Module()
    module.weight, other = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(3))
    old = module.weight
    optimizer = _adam_steps([other, old])
    before = {k: v.clone() for k, v in optimizer.state[old].items()}
    old.grad = torch.randn(4, 6)
    keep = torch.tensor([5, 0, 2])
    new = keep_rank(module, "weight", 1, keep, optimizer)
    assert module.weight is new and optimizer.param_groups[0]["params"] == [other, new] and old not in optimizer.state
    assert torch.equal(new, old[:, keep]) and torch.equal(new.grad, old.grad[:, keep])
    assert torch.equal(optimizer.state[new]["exp_avg"], before["exp_avg"][:, keep])
    assert torch.equal(optimizer.state[new]["exp_avg_sq"], before["exp_avg_sq"][:, keep])
    assert torch.equal(optimizer.state[new]["step"], before["step"])
    optimizer.step()  # runs on the smaller tensor
    with pytest.raises(KeyError, match="not in the optimizer"):
        keep_rank(module, "weight", 1, torch.tensor([0]), torch.optim.SGD([other]))


def test_keep_rank_takes_the_values_from_an_updated_tensor():
    module = nn.Linear(5, 2, bias=False).double()
    value = torch.arange(10.0).view(2, 5)  # float32: cast to the parameter's dtype
    keep_rank(module, "weight", 1, torch.tensor([1, 3]), value=value)
    assert module.weight.dtype == torch.float64 and module.weight.tolist() == [[1.0, 3.0], [6.0, 8.0]]


def test_a_parameter_replaced_after_a_step_trains_on_while_the_old_graph_is_alive():
    """The reason keep_rank makes a new parameter: a resized leaf would clash with the graph that used it."""
    layer = LoRALinear(nn.Linear(6, 5), r=4, alpha=4)
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1)
    loss = layer(torch.randn(3, 6)).square().sum()
    loss.backward()  # `loss` keeps its graph (and the parameters' grad accumulators) alive
    optimizer.step()
    keep = torch.tensor([0, 2])
    keep_rank(layer, "lora_B", 1, keep, optimizer)
    keep_rank(layer, "lora_A", 0, keep, optimizer)
    layer(torch.randn(3, 6)).square().sum().backward()
    optimizer.step()
    assert layer.r == 2 and loss is not None


def test_resize_rank_shrinks_in_place_and_the_optimizer_steps_as_if_alone():
    torch.manual_seed(0)
    full = nn.Parameter(torch.randn(5, 3))
    alone = nn.Parameter(full.detach()[:2].clone())
    full_opt, alone_opt = _adam_steps([full]), torch.optim.AdamW([alone], lr=0.1)
    alone_opt.load_state_dict({"state": {0: {k: v[:2].clone() if v.dim() else v.clone()
                                             for k, v in full_opt.state[full].items()}},
                               "param_groups": full_opt.state_dict()["param_groups"]})
    alone.data = full.detach()[:2].clone()
    resize_rank(full, 0, 2, full_opt)
    for _ in range(3):
        for p, opt in ((full, full_opt), (alone, alone_opt)):
            p.square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(full, alone)


def test_resize_rank_grows_in_place_with_inert_zeros_in_data_gradient_and_adam_state():
    torch.manual_seed(0)
    param, reference = nn.Parameter(torch.randn(3, 4)), None
    reference = nn.Parameter(param.detach().clone())
    optimizer, reference_opt = _adam_steps([param], weight_decay=0.1), _adam_steps([reference], weight_decay=0.1)
    resize_rank(param, 0, 5, optimizer)
    assert param.shape == (5, 4) and torch.all(param[3:] == 0)
    assert optimizer.state[param]["exp_avg"].shape == (5, 4) and torch.all(optimizer.state[param]["exp_avg"][3:] == 0)
    for p, opt in ((param, optimizer), (reference, reference_opt)):
        p[:3].square().sum().backward()  # the new rows get zero gradient
        opt.step()
    assert torch.equal(param[:3], reference) and torch.all(param[3:] == 0)


# --- a layer loads a saved adapter of another rank --------------------------------------------------------


@pytest.mark.parametrize("saved_rank", [3, 8, 11])
def test_a_layer_takes_the_rank_of_a_saved_state_in_place(saved_rank):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    trained = LoRALinear(copy.deepcopy(base), r=saved_rank, alpha=16, scaling=2.0)
    nn.init.normal_(trained.lora_B)
    fresh = LoRALinear(copy.deepcopy(base), r=8, alpha=16, scaling=2.0)
    params = (fresh.lora_A, fresh.lora_B)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert LoRALinear.peftbench_resizable
    fresh.load_state_dict(trained.state_dict())
    assert fresh.r == saved_rank and (fresh.lora_A, fresh.lora_B) == params  # the same Parameter objects
    x = torch.randn(4, 6)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    fresh(x).sum().backward()
    optimizer.step()  # the optimizer, built before the load, steps the resized tensors


def test_a_saved_state_for_another_module_shape_is_refused():
    fresh = LoRALinear(nn.Linear(6, 5), r=4, alpha=8)
    other = LoRALinear(nn.Linear(7, 5), r=2, alpha=8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(other.state_dict())


# --- injection, the per-rank cost, the exporter -----------------------------------------------------------


def _tiny():
    mc = ModelConfig(**tiny_model_config())
    model = modeling.load_model(mc, 2, seed=0)
    head = modeling.head_modules(mc, model)
    return model, modeling.find_targets(model, modeling.target_patterns(mc, model), head)


def test_inject_and_find_layers_and_the_per_rank_cost_is_what_one_rank_holds():
    model, targets = _tiny()
    layers = inject_lora(model, targets, lambda t: 1, lambda t: 2.0)
    assert list(lora_layers(model)) == [t.name for t in targets] and layers == lora_layers(model)
    one_rank = sum(p.numel() for layer in layers.values() for p in (layer.lora_A, layer.lora_B))
    assert rank_cost(targets) == one_rank == rank_cost(layers.values())
    assert rank_cost(targets[0]) == targets[0].in_features + targets[0].out_features


def test_exporter_writes_modal_rank_and_alpha_and_patterns_for_the_rest():
    def factors(r, scaling, d=4):
        return torch.randn(r, d), torch.randn(d, r), scaling

    config, state = lora_peft_export({"a.q": factors(4, 2.0), "a.k": factors(4, 2.0), "b.q": factors(6, 16 / 6),
                                      "b.k": factors(2, 0.5), "c.q": factors(0, 2.0)})
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)
    assert config["rank_pattern"] == {"b.q": 6, "b.k": 2} and config["alpha_pattern"] == {"b.k": 1.0, "b.q": 16.0}
    assert config["target_modules"] == ["a.k", "a.q", "b.k", "b.q"]  # rank 0 is left out
    assert not config["use_dora"] and set(state) == {f"{PREFIX}{m}.lora_{x}.weight" for m in config["target_modules"]
                                                      for x in "AB"}
    assert state[f"{PREFIX}b.q.lora_B.weight"].shape == (4, 6)
    for module, scaling in (("a.q", 2.0), ("b.q", 16 / 6), ("b.k", 0.5)):  # PEFT's alpha / r: the trained scale
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        assert alpha / config["rank_pattern"].get(module, config["r"]) == scaling
    with pytest.raises(ValueError, match="rank 0"):
        lora_peft_export({"c.q": factors(0, 2.0)})


def test_exporter_adds_dora_magnitudes():
    a, b, m = torch.randn(2, 3), torch.randn(5, 2), torch.randn(5)
    config, state = lora_peft_export({"q": (a, b, 1.5)}, magnitudes={"q": m})
    assert config["use_dora"] and torch.equal(state[f"{PREFIX}q.lora_magnitude_vector"], m)


@pytest.mark.parametrize("alpha,r", [(16.0, 12), (8.0, 6), (0.5, 49), (1.5, 98)])  # (alpha / r) · r is off by 1 ulp for the last two
def test_peft_alpha_is_the_short_alpha_that_divides_back_to_the_trained_scale(alpha, r):
    assert peft_alpha(alpha / r, r) == alpha and peft_alpha(alpha / r, r) / r == alpha / r
    assert peft_alpha(0.1, 3) == pytest.approx(0.3, rel=1e-15)  # no float gives 0.1 exactly: the nearest
