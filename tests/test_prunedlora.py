"""PrunedLoRA: the pruning math, optimizer surgery, the schedule, budgets, export, and end-to-end runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peftbench.plugins.prunedlora import (
    PrunedLoRA,
    PrunedLoRALinear,
    PrunedLoRAParams,
    plan_schedule,
    pruning,
)
from torch import nn

from peftbench import modeling
from peftbench.budget import solve_all
from peftbench.config import ModelConfig, load_config
from peftbench.data import load_task_data, make_loader
from peftbench.errors import BudgetError, ConfigError
from peftbench.hookspecs import TrainState, hookimpl
from peftbench.host import PluginInfo
from peftbench.lora import lora_layers
from peftbench.runs import expand
from peftbench.schema import from_dict
from peftbench.sweep import run_one
from peftbench.testing import TOY_TASKS, tiny_config, tiny_model_config

# ---------------------------------------------------------------------------------------------------------
# helpers: a tiny model with PrunedLoRA injected, trained a few steps so that B is not zero
# ---------------------------------------------------------------------------------------------------------


def _tiny(init_r=16, r=4, seed=0, train_steps=30):
    """(model, targets, batches); cached per arguments (callers prune copies), so tests share the training."""
    if (init_r, r, seed, train_steps) not in _TRAINED:
        _TRAINED[(init_r, r, seed, train_steps)] = _train_tiny(init_r, r, seed, train_steps)
    model, targets, batches = _TRAINED[(init_r, r, seed, train_steps)]
    return copy.deepcopy(model), targets, batches


_TRAINED: dict[tuple, tuple] = {}


def _train_tiny(init_r, r, seed, train_steps):
    mc = ModelConfig(**tiny_model_config())
    model = modeling.load_model(mc, 2, seed)
    head = modeling.head_modules(mc, model)
    targets = modeling.find_targets(model, modeling.target_patterns(mc, model), head)
    modeling.freeze(model)
    PrunedLoRA(PrunedLoRAParams(r=r, init_r=init_r)).peftbench_inject(model, targets)
    modeling.unfreeze_head(model, head)
    data = load_task_data(TOY_TASKS[0], "train", None, modeling.load_tokenizer(mc), 32, None)
    batches = list(make_loader(data, 32, True, False, seed, 0, False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(train_steps):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, targets, batches


def _state(model, step=0, total_steps=100):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return TrainState(step=step, total_steps=total_steps, epoch=0, optimizer=optimizer, lr_scheduler=None,
                      accelerator=None, seed=0)


def _prune_once(model, batch, **params):
    """One pruning event (through the hooks) on a copy of ``model``, with the gradient of ``batch``."""
    model = copy.deepcopy(model)
    method = PrunedLoRA(PrunedLoRAParams(r=4, init_r=16, prune_every=1, warmup_ratio=0, final_ratio=0, **params))
    state = _state(model)
    method.peftbench_train_start(model=model, state=state)
    model.zero_grad()
    model(**batch).loss.backward()
    method.peftbench_after_backward(state=state)
    return model, method


def _loss(model, batch) -> float:
    with torch.no_grad():
        return model(**batch).loss.item()


# ---------------------------------------------------------------------------------------------------------
# the pruning math
# ---------------------------------------------------------------------------------------------------------


def test_recovery_update_is_the_constrained_minimiser_of_the_quadratic_model():
    torch.manual_seed(0)
    n, r = 12, 5
    w, g = torch.randn(1, n, r), 0.1 * torch.randn(1, n, r)
    curvature = pruning.rank_curvature(g)
    h = pruning.damped(curvature, torch.ones(1, r, dtype=torch.bool), 0.1)[0]
    h_inv = torch.linalg.inv(h)
    scores, _, _ = pruning.gradient_scores(w.double(), g.double(), h_inv[None])

    def model_change(delta):  # ⟨G, Δ⟩ + ½ tr(Δ H Δᵀ)
        return (g[0].double() * delta).sum() + 0.5 * torch.trace(delta @ h @ delta.T)

    for j in range(r):
        # brute force: column j is -w_j, the free columns solve the stationarity condition
        free = [k for k in range(r) if k != j]
        delta = torch.zeros(n, r, dtype=torch.float64)
        delta[:, j] = -w[0, :, j].double()
        rhs = -g[0][:, free].double() - delta[:, j:j + 1] * h[j, free]
        delta[:, free] = torch.linalg.solve(h[free][:, free], rhs.T).T
        predicted = -0.5 * torch.trace(g[0].double() @ h_inv @ g[0].double().T) + scores[0, j]
        assert model_change(delta).item() == pytest.approx(predicted.item(), rel=1e-6, abs=1e-9)

    # prune_components applies exactly that minimiser for the lowest score
    updated = w.clone()
    removed = pruning.prune_components([(updated, g, curvature)], 1, recovery="full", damping=0.1)
    j = int(scores[0].argmin())
    assert removed.tolist() == [[j]]
    residual = w[0].double() - g[0].double() @ h_inv
    expected = -g[0].double() @ h_inv - residual[:, j:j + 1] * h_inv[j][None] / h_inv[j, j]
    assert torch.allclose(updated[0].double() - w[0].double(), expected, atol=1e-4)
    assert torch.all(updated[0, :, j] == 0)


def test_compensation_moves_the_removed_column_onto_the_survivors():
    torch.manual_seed(1)
    w, g = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    curvature = pruning.rank_curvature(g)
    h_inv = torch.linalg.inv(pruning.damped(curvature, torch.ones(1, 4, dtype=torch.bool), 1e-2)[0]).float()
    fixed = torch.tensor([[3.0, 0.0, 2.0, 1.0]])  # remove component 1
    updated = w.clone()
    pruning.prune_components([(updated, g, curvature)], 1, fixed_scores=fixed, recovery="compensation")
    expected = w[0] - w[0, :, 1:2] * h_inv[1][None] / h_inv[1, 1]
    assert torch.allclose(updated[0], expected, atol=1e-5)
    plain = w.clone()
    pruning.prune_components([(plain, g, curvature)], 1, fixed_scores=fixed, recovery="none")
    assert torch.equal(plain[0, :, [0, 2, 3]], w[0, :, [0, 2, 3]]) and torch.all(plain[0, :, 1] == 0)


def test_batched_pruning_equals_module_by_module():
    torch.manual_seed(2)
    b, gb = torch.randn(3, 10, 6), torch.randn(3, 10, 6)
    a, ga = torch.randn(3, 7, 6), torch.randn(3, 7, 6)
    stacked = [(b.clone(), gb, pruning.rank_curvature(gb)), (a.clone(), ga, pruning.rank_curvature(ga))]
    removed = pruning.prune_components(stacked, 2)
    for m in range(3):
        single = [(b[m:m + 1].clone(), gb[m:m + 1], pruning.rank_curvature(gb[m:m + 1])),
                  (a[m:m + 1].clone(), ga[m:m + 1], pruning.rank_curvature(ga[m:m + 1]))]
        assert torch.equal(pruning.prune_components(single, 2)[0], removed[m])
        assert torch.allclose(single[0][0][0], stacked[0][0][m], atol=1e-5)
        assert torch.allclose(single[1][0][0], stacked[1][0][m], atol=1e-5)
    keep = pruning.keep_indices(removed, 6)
    for m in range(3):
        assert sorted(keep[m].tolist() + removed[m].tolist()) == list(range(6))


def test_recovery_increases_the_loss_less_than_plain_removal():
    # a fixed batch gives the gradient; 6 of 16 components leave every module in one event
    for seed in range(3):
        model, _, batches = _tiny(seed=seed)
        batch = batches[0]
        before = _loss(model, batch)
        plain = _loss(_prune_once(model, batch, prune_k=6, recovery=False)[0], batch) - before
        recovered = _loss(_prune_once(model, batch, prune_k=6)[0], batch) - before
        assert recovered < plain, (seed, recovered, plain)
        assert abs(recovered) < 0.02  # the split compensation nearly preserves the function


def test_split_recovery_beats_applying_both_factor_updates_in_full():
    # each factor's compensation alone replaces the removed b_j a_jᵀ; applying both in full counts it twice
    changes = {"split": [], "both": []}
    for seed in range(3):
        model, _, batches = _tiny(seed=seed)
        before = _loss(model, batches[0])
        for factors in changes:
            pruned = _prune_once(model, batches[0], prune_k=6, recovery_factors=factors)[0]
            changes[factors].append(abs(_loss(pruned, batches[0]) - before))
    assert sum(changes["split"]) < sum(changes["both"])


def test_activation_criterion_tracks_the_input_energy_of_each_component():
    torch.manual_seed(3)
    layer = PrunedLoRALinear(nn.Linear(6, 5), r=4, alpha=4.0, target_r=2)
    x = torch.randn(2, 3, 6)
    layer.input_energy = torch.zeros(4)
    layer.eval()
    layer(x)  # evaluation passes do not count
    assert torch.all(layer.input_energy == 0)
    layer.train()
    out = layer(x)
    assert torch.allclose(layer.input_energy, (x.reshape(-1, 6) @ layer.lora_A.T).square().sum(0), atol=1e-5)
    layer.input_energy = None
    assert torch.allclose(layer(x), out)  # the tracking path computes the same output


# ---------------------------------------------------------------------------------------------------------
# physical shrinking (the toolkit's keep_rank: tests/test_lora_toolkit.py)
# ---------------------------------------------------------------------------------------------------------


def test_step_on_shrunk_tensors_equals_step_on_masked_full_tensors():
    torch.manual_seed(4)
    layer = PrunedLoRALinear(nn.Linear(8, 6), r=6, alpha=6.0, target_r=2)
    layer.base.requires_grad_(False)
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(16, 8), torch.randn(16, 6)

    def backward(module):
        module.zero_grad()
        ((module(x) - y) ** 2).mean().backward()

    for _ in range(3):
        backward(layer)
        optimizer.step()
    masked = copy.deepcopy(layer)
    masked_optimizer = torch.optim.AdamW([masked.lora_A, masked.lora_B], lr=1e-2, weight_decay=0.1)
    masked_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # no shared step tensors
    removed, keep = torch.tensor([1, 4]), torch.tensor([0, 2, 3, 5])

    backward(layer)
    backward(masked)
    # masked: zero the removed components, their gradients and their Adam moments, keep full shapes
    with torch.no_grad():
        for p, dim in ((masked.lora_B, 1), (masked.lora_A, 0)):
            for tensor in (p, p.grad, masked_optimizer.state[p]["exp_avg"], masked_optimizer.state[p]["exp_avg_sq"]):
                tensor.index_fill_(dim, removed, 0.0)
    # shrunk: the same gradient step on physically smaller tensors
    layer.keep_components(keep, layer.lora_B.detach(), layer.lora_A.detach(), optimizer)
    assert layer.r == 4 and layer.lora_B.grad.shape == (6, 4) and layer.component_ids.tolist() == keep.tolist()
    for _ in range(3):
        optimizer.step()
        masked_optimizer.step()
        assert torch.allclose(layer.lora_B, masked.lora_B[:, keep], atol=1e-7, rtol=0)
        assert torch.allclose(layer.lora_A, masked.lora_A[keep], atol=1e-7, rtol=0)
        assert torch.all(masked.lora_B[:, removed] == 0) and torch.all(masked.lora_A[removed] == 0)
        backward(layer)
        backward(masked)  # the removed components get zero gradients: the masked run stays masked
    assert torch.allclose(layer(x), masked(x), atol=1e-6)


def test_pruning_event_shrinks_parameters_gradients_and_optimizer_state():
    model, _, batches = _tiny(train_steps=5)
    method = PrunedLoRA(PrunedLoRAParams(r=4, init_r=16, prune_every=1, warmup_ratio=0, final_ratio=0))
    state = _state(model)
    method.peftbench_train_start(model=model, state=state)
    model(**batches[0]).loss.backward()
    state.optimizer.step()  # moments exist for the full-rank tensors
    model.zero_grad()
    model(**batches[1]).loss.backward()
    method.peftbench_after_backward(state=state)
    optimized = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    for layer in method.layers.values():
        assert layer.r == 14 and layer.lora_A.grad.shape == (14, layer.in_features)
        for p in (layer.lora_A, layer.lora_B):
            assert id(p) in optimized and state.optimizer.state[p]["exp_avg"].shape == p.shape
    state.optimizer.step()  # runs on the shrunk tensors
    assert state.logs["rank"] == 14 and method.rank_history[-1]["step"] == 0


# ---------------------------------------------------------------------------------------------------------
# schedule, params, budget
# ---------------------------------------------------------------------------------------------------------


def test_schedule_places_the_events_between_warmup_and_the_final_phase():
    params = PrunedLoRAParams(r=8, init_r=32)  # K1 = 10, K2 = 2: 12 events
    schedule = plan_schedule(params, 200)
    assert (schedule.first, schedule.every, schedule.events, schedule.last, schedule.end) == (20, 10, 12, 130, 180)
    spread = plan_schedule(PrunedLoRAParams(r=8, init_r=32, prune_every=None), 100)
    assert spread.first == 10 and spread.every == 6 and spread.last < spread.end == 90
    assert plan_schedule(PrunedLoRAParams(r=8, init_r=8), 10).events == 0
    with pytest.raises(ConfigError, match="prune_every=10.*do not fit.*prune_every: null"):
        plan_schedule(params, 100)
    with pytest.raises(ConfigError, match="do not fit"):
        plan_schedule(PrunedLoRAParams(r=8, init_r=512, prune_every=None), 100)


@pytest.mark.parametrize("raw, key", [
    ({"criterion": "norm"}, "criterion"), ({"init_r": 4, "r": 8}, "init_r"), ({"prune_k": 0}, "prune_k"),
    ({"warmup_ratio": 0.6, "final_ratio": 0.5}, "warmup_ratio"), ({"recovery_factors": "C"}, "recovery_factors"),
    ({"prune_every": 0}, "prune_every"), ({"curvature": "hessian"}, "curvature"), ({"damping": 0}, "damping"),
])
def test_bad_params_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(PrunedLoRAParams, raw, "methods[0].params")


def test_budget_solver_matches_the_target_with_init_r_above_it(tmp_path):
    config = tiny_config(tmp_path, methods=[{"name": "prunedlora"}])
    model = modeling.load_model(config.model, 2, 0, meta=True)
    targets = modeling.find_targets(model, modeling.target_patterns(config.model, model),
                                    modeling.head_modules(config.model, model))
    per_rank = sum(t.in_features + t.out_features for t in targets)
    method = PrunedLoRA()
    solved = method.peftbench_solve_budget(targets=targets, target=8 * per_rank)
    assert (solved.r, solved.init_r) == (8, 32)
    counts = PrunedLoRA(solved).peftbench_count_trainable(targets=targets)
    assert (counts.final, counts.peak, counts.nonzero) == (8 * per_rank, 32 * per_rank, 8 * per_rank)
    assert PrunedLoRA(PrunedLoRAParams(init_r=24)).peftbench_solve_budget(targets=targets, target=8 * per_rank).init_r == 24
    with pytest.raises(BudgetError, match="init_r=6"):
        PrunedLoRA(PrunedLoRAParams(r=4, init_r=6)).peftbench_solve_budget(targets=targets, target=8 * per_rank)


# ---------------------------------------------------------------------------------------------------------
# end to end through the trainer
# ---------------------------------------------------------------------------------------------------------


class _ComponentRecorder:
    """Surviving component ids of every module after every optimizer step, and the optimizer's shapes."""

    def __init__(self):
        self.ids: list[dict[str, list[int]]] = []
        self.optimizer_in_sync = True

    @hookimpl
    def peftbench_after_optimizer_step(self, model, state):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, PrunedLoRALinear)}
        self.ids.append({n: m.component_ids.tolist() for n, m in layers.items()})
        optimized = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
        for m in layers.values():
            for p in (m.lora_A, m.lora_B):
                moments = state.optimizer.state.get(p, {})
                self.optimizer_in_sync &= id(p) in optimized and moments.get("exp_avg", p).shape == p.shape


@pytest.mark.parametrize("params", [
    {"prune_every": None},
    {"prune_every": 2, "criterion": "activation", "recovery": False},
    {"prune_every": None, "criterion": "taylor", "curvature": "ema"},
])
def test_run_ends_at_the_target_count_and_removed_components_never_return(host, tmp_path, params):
    recorder = _ComponentRecorder()
    host.add_plugin(recorder, PluginInfo("recorder", "object"))
    config = tiny_config(tmp_path, methods=[{"name": "prunedlora", "params": params}],
                         train={"epochs": 3, "num_threads": 1})
    solved = solve_all(config, host)
    (spec,) = expand(config, solved)
    result = run_one(spec, host, progress=False)
    budget = solved[("prunedlora", "toy")]
    report = result.method_report

    assert result.trainable["adapter"] == report["counts"]["final"] == budget.counts.final == budget.target
    assert report["counts"]["peak"] == budget.counts.peak == 4 * budget.target
    assert set(report["ranks"].values()) == {spec.params.r}
    history = [sum(e["ranks"].values()) for e in report["rank_history"]]
    assert history == sorted(history, reverse=True) and len(history) == report["schedule"]["events"] + 1
    assert report["rank_history"][-1]["step"] < report["schedule"]["final_phase_from"]
    removed: dict[str, set[int]] = {}
    for before, after in zip(recorder.ids, recorder.ids[1:]):
        for name in after:
            assert set(after[name]) <= set(before[name])  # survivors only shrink
            removed.setdefault(name, set()).update(set(before[name]) - set(after[name]))
            assert not removed[name] & set(after[name])  # a removed component never comes back
    assert recorder.optimizer_in_sync


def test_checkpoint_state_restores_pruned_shapes_into_a_fresh_model():
    model, targets, batches = _tiny(train_steps=5)
    pruned, method = _prune_once(model, batches[0], prune_k=6)
    saved = method.peftbench_state_dict()
    fresh = copy.deepcopy(model)  # the injected full-rank model, as a resumed run builds it
    restored = PrunedLoRA(method.params)
    state = _state(fresh)
    restored.peftbench_train_start(model=fresh, state=state)
    restored.peftbench_load_state_dict(model=fresh, state_dict=saved)  # the method's Python state only
    trained = {name: p for name, p in pruned.named_parameters() if p.requires_grad}
    fresh.load_state_dict(trained, strict=False)  # what the host does next: each layer takes the saved rank
    assert restored.ranks() == method.ranks() == {t.name: 10 for t in targets}
    assert restored.rank_history == method.rank_history and restored._next_event == method._next_event
    optimized = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    assert all(id(layer.lora_A) in optimized for layer in restored.layers.values())  # resized in place
    assert _loss(fresh, batches[1]) == _loss(pruned, batches[1])


def test_exported_adapter_gives_the_same_outputs_in_hf_peft():
    peft = pytest.importorskip("peft")
    model, targets, batches = _tiny(train_steps=10)
    base = copy.deepcopy(model)
    # non-uniform final ranks: modules of the first layer lose more components than the others
    method = PrunedLoRA(PrunedLoRAParams(r=4, init_r=16))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PrunedLoRALinear)}
    for name, layer in layers.items():
        keep = torch.arange(0, layer.r, 2 if ".0." in name else 3)
        layer.keep_components(keep, layer.lora_B.detach(), layer.lora_A.detach())
    config, state_dict = method.peftbench_export_peft(model=model, targets=targets)
    assert config["peft_type"] == "LORA" and config["rank_pattern"]

    # the same frozen base without adapters (the head is trained by the host and exported apart)
    for name in layers:
        modeling.replace_module(base, name, base.get_submodule(name).base)
    kwargs = {k: v for k, v in config.items() if k != "peft_type"}
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
    result = peft.set_peft_model_state_dict(peft_model, state_dict)
    assert not [k for k in result.missing_keys if "lora_" in k]
    peft_model.eval()
    model.eval()
    with torch.no_grad():
        batch = {k: v for k, v in batches[1].items() if k != "labels"}
        assert torch.allclose(peft_model(**batch).logits, model(**batch).logits, atol=1e-5)


def test_peftbench_export_of_a_stored_run_reproduces_it_in_hf_peft(tmp_path):
    pytest.importorskip("peft")
    from helpers import train_one

    from peftbench.export import export_run, load_with_peft, rebuild

    config = tiny_config(tmp_path, methods=[{"name": "prunedlora", "params": {"prune_every": None}}],
                         train={"epochs": 2})
    host, run = train_one(config)
    out = export_run(run, tmp_path / "export", host)
    ours, theirs = rebuild(run, host)[0], load_with_peft(run, out, host)
    batch = modeling.load_tokenizer(config.model)(["a good and happy film", "awful"], padding=True,
                                                  return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# real data (slow)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_on_sst2_learns_well_above_chance(glue, tmp_path):
    from peftbench.config import parse_config

    config = parse_config({
        "name": "prunedlora-sst2", "model": {"name_or_path": "minilm"}, "tasks": ["sst2"], "seeds": [0],
        "methods": [{"name": "prunedlora", "params": {"prune_every": None}}], "budget": {"lora_rank": 4},
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "max_length": 64, "max_train_samples": 600,
                  "max_eval_samples": 300, "num_threads": 2, "warmup_ratio": 0.06},
        "data_dir": str(glue), "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")},
    }, "<test>")
    from peftbench.runner import make_host

    host = make_host(config)
    (spec,) = expand(config, solve_all(config, host))
    result = run_one(spec, host, progress=False)
    assert set(result.method_report["ranks"].values()) == {4}
    assert result.best["accuracy"] > 0.7


# ---------------------------------------------------------------------------------------------------------
# the criterion ablations in both readings; describe() for `peftbench budget`
# ---------------------------------------------------------------------------------------------------------


def _prune_with(model, batch, **params):
    """One event like :func:`_prune_once`, after a training pass that feeds the activation criterion."""
    model = copy.deepcopy(model)
    method = PrunedLoRA(PrunedLoRAParams(r=4, init_r=16, prune_every=1, warmup_ratio=0, final_ratio=0, **params))
    state = _state(model)
    method.peftbench_train_start(model=model, state=state)
    model.train()
    with torch.no_grad():
        model(**batch)
    model.eval()
    model.zero_grad()
    model(**batch).loss.backward()
    method.peftbench_after_backward(state=state)
    return method


@pytest.mark.parametrize("criterion", ["activation", "taylor", "gradient"])
def test_no_recovery_leaves_the_survivors_untouched_and_the_default_recovery_moves_them(criterion):
    model, _, batches = _tiny()
    before = {name: (m.lora_B.detach().clone(), m.lora_A.detach().clone())
              for name, m in lora_layers(model, PrunedLoRALinear).items()}
    for recovery in (False, True):
        method = _prune_with(model, batches[0], prune_k=3, criterion=criterion, recovery=recovery)
        for name, layer in method.layers.items():
            assert layer.r == 13
            b, a = before[name]
            ids = layer.component_ids
            untouched = torch.equal(layer.lora_B, b[:, ids]) and torch.equal(layer.lora_A, a[ids])
            assert untouched == (not recovery), (name, recovery)


def test_describe_lists_the_recovery_reading_and_the_fixed_scale():
    default = PrunedLoRA(PrunedLoRAParams(r=8, init_r=32)).describe([])
    assert default.scale == "1.00 (α/r_final 4.00)"
    assert default.deviations == ["recovery_update=compensation", "recovery_factors=split", "warmup_ratio=0.1",
                                  "damping=0.01·mean(diag H)"]
    baseline = PrunedLoRA(PrunedLoRAParams(r=8, init_r=32, criterion="activation", recovery=False)).describe([])
    assert baseline.deviations == ["criterion=activation", "warmup_ratio=0.1"]  # the authors' baseline reading
    ours = PrunedLoRA(PrunedLoRAParams(r=8, init_r=32, criterion="taylor")).describe([])
    assert ours.deviations[:4] == ["criterion=taylor", "recovery=True", "recovery_update=compensation",
                                   "recovery_factors=split"]
    notes = PrunedLoRA(PrunedLoRAParams(r=8, init_r=32, alpha=16, recovery_update="full", recovery_factors="both",
                                        warmup_ratio=0.0)).describe([])
    assert notes.scale == "0.50 (α/r_final 2.00)" and notes.deviations == ["alpha=16", "damping=0.01·mean(diag H)"]


def test_the_ablation_config_has_both_readings_of_every_criterion(host):
    config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "prunedlora_ablation.yaml"))
    params = {m.label: m.params for m in config.methods if m.name == "prunedlora"}
    for criterion, short in (("activation", "act"), ("taylor", "taylor")):
        assert params[f"prunedlora-{short}+recovery"].get("recovery", True) is True
        assert params[f"prunedlora-{short}-norecovery"]["recovery"] is False
        assert params[f"prunedlora-{short}-norecovery"]["criterion"] == criterion
