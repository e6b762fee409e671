"""AdaLoRA plugin: parity with HF PEFT's AdaLoRA, budgets, schedule, end-to-end runs and export.

Parity (``test_parity_with_hf_peft``): same initial P/Λ/Q, same batches, float64 → the same sensitivity and
uncertainty EMAs, triplet scores, masks after every allocation round, final rank pattern and weights.
Accounted-for differences (see the plugin docstring): PEFT scales by ``alpha / (init_r + 1e-5)`` (we set our
layers' scale to that here); PEFT's ``(r, 1)`` Λ would get weight decay from our trainer's groups (the test
uses no weight decay); and PEFT 0.21.2 leaves its ``ranknum`` (the scale's divisor) trainable, so an
optimizer over its trainable parameters drifts the scale, unlike the reference code: the test freezes it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peftbench.plugins.adalora import (
    AdaLoRA,
    AdaLoRAParams,
    RankAllocator,
    SVDLinear,
    adalora_layers,
    budget_schedule,
    orthogonal_penalty,
    resolve_steps,
)

from peftbench import modeling
from peftbench.budget import model_shapes, solve_all
from peftbench.config import ModelConfig, parse_config
from peftbench.errors import BudgetError, ConfigError
from peftbench.hookspecs import TrainState
from peftbench.runner import make_host
from peftbench.runs import expand
from peftbench.schema import from_dict
from peftbench.sweep import run_one
from peftbench.testing import tiny_config, tiny_model_config

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models on a shared 2-core machine: more threads only spin (50× slower under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(dtype=torch.float64):
    mc = ModelConfig(**tiny_model_config())
    model = modeling.load_model(mc, num_labels=2, seed=0).to(dtype)
    targets = modeling.find_targets(model, modeling.target_patterns(mc, model), modeling.head_modules(mc, model))
    return model, targets


def batches(n, seed=0, batch=4, length=12):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1000, 2000, (batch, length), generator=g),
             "attention_mask": torch.ones(batch, length, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def state_for(total_steps, optimizer=None):
    return TrainState(step=0, total_steps=total_steps, epoch=0, optimizer=optimizer, lr_scheduler=None,
                      accelerator=None, seed=0)


def adalora_model(base, targets, **params):
    model = copy.deepcopy(base)
    modeling.freeze(model)
    method = AdaLoRA(AdaLoRAParams(**params))
    method.peftbench_inject(model=model, targets=targets)
    return model, method


# --- parity with HF PEFT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("delta_t", [1, 3])
def test_parity_with_hf_peft(delta_t):
    from peft import AdaLoraConfig
    from peft.tuners.adalora import AdaLoraModel

    base, targets = tiny_model()
    total, tinit, tfinal, init_r, target_r, alpha = 16, 2, 4, 4, 2, 8.0
    names = [t.name for t in targets]

    ref = copy.deepcopy(base)
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=alpha, target_modules=names, tinit=tinit,
                           tfinal=tfinal, deltaT=delta_t, total_step=total, beta1=0.85, beta2=0.85,
                           orth_reg_weight=0.1, lora_dropout=0.0)
    tuner = AdaLoraModel(ref, config, "default")
    ref.double()  # PEFT creates the adapter in float32
    for name, param in ref.named_parameters():
        if ".ranknum." in name:  # PEFT 0.21.2 leaves ranknum trainable (the reference keeps the scale fixed)
            assert param.requires_grad
            param.requires_grad_(False)

    ours, method = adalora_model(base, targets, init_r=init_r, target_r=target_r, alpha=alpha, tinit=tinit,
                                 tfinal=tfinal, deltaT=delta_t, gamma=0.1, budget_unit="triplets")
    layers = adalora_layers(ours)
    with torch.no_grad():
        for name, layer in layers.items():
            theirs = ref.get_submodule(name)
            layer.P.copy_(theirs.lora_B["default"])
            layer.Q.copy_(theirs.lora_A["default"])
            layer.E.copy_(theirs.lora_E["default"].view(-1))
            layer.scaling = alpha / (init_r + 1e-5)  # PEFT's scale (documented difference)

    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    state = state_for(total, opt_ours)
    method.peftbench_train_start(model=ours, state=state)
    allocator: RankAllocator = method.allocator
    where = {id(p): (stack, i) for stack in allocator.stacks for i, p in enumerate(stack.params)}

    masked_rounds = 0
    for step, batch in enumerate(batches(total)):
        state.step = step
        loss_ref = tuner(**batch).loss  # AdaLoraModel.forward adds the orthogonality loss
        loss_ours = ours(**batch).loss + method.peftbench_extra_loss(model=ours, state=state)
        torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-10, atol=0)
        for opt, loss in ((opt_ref, loss_ref), (opt_ours, loss_ours)):
            loss.backward()
            opt.step()
        tuner.update_and_allocate(step)
        method.peftbench_after_optimizer_step(model=ours, state=state)

        ra = tuner.rankallocator
        if step < total - tfinal:  # scores exist until the final mask is fixed
            scores = allocator.triplet_scores()
            for row, name in enumerate(names):
                layer = layers[name]
                for attr, peft_attr in (("P", "lora_B"), ("Q", "lora_A"), ("E", "lora_E")):
                    key = f"{name}.{peft_attr}.default"
                    stack, i = where[id(getattr(layer, attr))]
                    torch.testing.assert_close(stack.ipt[i], ra.exp_avg_ipt[key].view_as(stack.ipt[i]))
                    torch.testing.assert_close(stack.unc[i], ra.exp_avg_unc[key].view_as(stack.unc[i]))
                s = {k: ra._element_score(f"{name}.{k}.default") for k in ("lora_A", "lora_B", "lora_E")}
                expected = s["lora_E"].view(-1) + (s["lora_A"].mean(1) + s["lora_B"].mean(0))
                torch.testing.assert_close(scores[row], expected)
        for name in names:  # the same triplets masked, every step
            theirs = ref.get_submodule(name).lora_E["default"].detach().view(-1)
            assert torch.equal(layers[name].E.detach() == 0, theirs == 0), (step, name)
            torch.testing.assert_close(layers[name].E.detach(), theirs)
        masked_rounds += bool((allocator.mask == 0).any())

    assert masked_rounds >= 5  # several allocation rounds actually masked something
    pattern = config.rank_pattern
    final_ranks = {name: sum(pattern[f"{name}.lora_E.default"]) for name in names}
    assert method.peftbench_report(model=ours, state=state)["ranks"] == final_ranks
    assert sum(final_ranks.values()) == target_r * len(names)
    assert len(set(final_ranks.values())) > 1  # a non-uniform allocation, identical in both


def test_budget_schedule_matches_hf_peft():
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

    for tinit, tfinal, delta_t in ((10, 30, 1), (0, 1, 7), (25, 50, 10)):
        config = AdaLoraConfig(init_r=12, target_r=8, tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=120,
                               target_modules=["x"])
        ref = PeftRankAllocator(torch.nn.Module(), config, "default")
        ref.init_bgt, ref.target_bgt = 864, 576
        for step in range(120 - tfinal + 1):  # PEFT consults the schedule up to the final-mask step
            assert budget_schedule(step, 864, 576, tinit, tfinal, 120, delta_t) == ref.budget_schedule(step), step
    # the three phases: hold, cubic decrease, hold at the target
    assert budget_schedule(10, 300, 200, 10, 30, 100, 1) == (300, False)
    assert budget_schedule(40, 300, 200, 10, 30, 100, 1) == (int(100 * (1 - 30 / 60) ** 3 + 200), True)
    assert budget_schedule(70, 300, 200, 10, 30, 100, 1)[0] == 200


@pytest.mark.parametrize("squared", [False, True])
def test_orthogonal_penalty_matches_reference_loop(squared):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(d, 5, generator=g, dtype=torch.float64) for d in (16, 16, 40)]
    qs = [torch.randn(5, d, generator=g, dtype=torch.float64) for d in (40, 16, 16)]
    groups = {"P": [ps[:2], ps[2:]], "Q": [qs[:1], qs[1:]]}
    terms = [torch.linalg.matrix_norm(p.T @ p - torch.eye(5, dtype=p.dtype)) for p in ps]
    terms += [torch.linalg.matrix_norm(q @ q.T - torch.eye(5, dtype=q.dtype)) for q in qs]
    expected = sum(t ** 2 if squared else t for t in terms) / len(terms)
    torch.testing.assert_close(orthogonal_penalty(groups, squared=squared), expected)


# --- layer ---------------------------------------------------------------------------------------------------


def test_layer_matches_dense_update_and_starts_as_identity():
    base = torch.nn.Linear(6, 5)
    layer = SVDLinear(base, r=3, alpha=6.0)
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer(x), base(x))  # Λ = 0 at init
    assert layer.scaling == 2.0 and layer.P.shape == (5, 3) and layer.Q.shape == (3, 6) and layer.E.shape == (3,)
    with torch.no_grad():
        layer.E.copy_(torch.tensor([0.5, 0.0, -1.0]))
    torch.testing.assert_close(layer(x), x @ (base.weight + layer.delta_weight()).T + base.bias)
    torch.testing.assert_close(layer.merged()(x), layer(x))


# --- budgets -------------------------------------------------------------------------------------------------


def deberta_config(**adalora_params):
    return parse_config({"name": "b", "tasks": ["rte"],
                         "methods": [{"name": "adalora", "params": adalora_params}, {"name": "lora"}],
                         "model": {"name_or_path": "microsoft/deberta-v3-base",
                                   "target_modules": ["query_proj", "key_proj", "value_proj",
                                                      "attention.output.dense", "intermediate.dense",
                                                      "output.dense"]},
                         "budget": {"lora_rank": 8, "tolerance": 0.01}}, "<test>")


def test_budget_solver_deberta_numbers():
    """DeBERTaV3-base, 72 matrices, target LoRA r=8: init_r = 12 and average rank 8 (the paper's row); the
    parameter budget predicts the target itself, the triplet budget b(T) = 576 triplets at the mean cost."""
    config = deberta_config()
    host = make_host(config)
    shapes = model_shapes(config)
    solved = solve_all(config, host, shapes)[("adalora", "rte")]
    assert len(shapes.targets) == 72
    params = solved.params
    assert params.budget_unit == "params" and params.init_r == 12 and round(params.target_r * 72) == 576
    assert solved.target == 1_327_104
    assert solved.counts.peak == 12 * 165_960
    assert abs(solved.counts.final - solved.target) <= 10 and not solved.counts.estimate
    assert solved.counts.nonzero == solved.counts.peak - (864 - 576)

    config = deberta_config(budget_unit="triplets")  # the paper's rule: a prediction at the mean cost
    solved = solve_all(config, host, shapes)[("adalora", "rte")]
    assert solved.params.init_r == 12 and round(solved.params.target_r * 72) == 576
    assert solved.counts.final == 576 * 165_960 // 72 and abs(solved.miss) < 0.001 and solved.counts.estimate
    assert solved.counts.nonzero == solved.counts.peak - (864 - 576)


def test_budget_solver_honours_explicit_init_r_and_ratio(tmp_path, host):
    config = tiny_config(tmp_path, methods=[{"name": "adalora", "label": "ratio2", "params": {"init_ratio": 2.0}},
                                        {"name": "adalora", "label": "explicit", "params": {"init_r": 9}}])
    solved = solve_all(config, host)
    assert solved[("ratio2", "toy")].params.init_r == round(2 * solved[("ratio2", "toy")].params.target_r)
    assert solved[("explicit", "toy")].params.init_r == 9
    # init_r 9 passes params validation (above the default target_r 8) but not a LoRA r=16 budget
    too_small = tiny_config(tmp_path, methods=[{"name": "adalora", "params": {"init_r": 9}}], budget={"lora_rank": 16})
    with pytest.raises(BudgetError, match=r"init_r=9 is not above the average rank 15\.\d"):
        solve_all(too_small, host)


def test_param_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"params\.tinit: must be a whole number of steps or a fraction in \[0, 1\), got 2\.5$"):
        from_dict(AdaLoRAParams, {"tinit": 2.5}, "methods[0].params")
    with pytest.raises(ConfigError, match=r"init_r \(4\) must be larger than target_r"):
        from_dict(AdaLoRAParams, {"init_r": 4, "target_r": 4}, "methods[0].params")
    with pytest.raises(ConfigError, match=r"methods\[0\]\.params\.orth_norm"):
        from_dict(AdaLoRAParams, {"orth_norm": "nuclear"}, "methods[0].params")
    assert resolve_steps(0.25, 200) == 50 and resolve_steps(30, 200) == 30 and resolve_steps(0, 200) == 0


def test_schedule_that_leaves_no_budget_phase_is_a_clear_error():
    base, targets = tiny_model(torch.float32)
    model, method = adalora_model(base, targets, tinit=10, tfinal=10)
    with pytest.raises(ConfigError, match=r"tinit=10 \(10 steps\) and tfinal=10 \(10 steps\).*20 steps"):
        method.peftbench_train_start(model=model, state=state_for(20))


def _steps(model, method, opt, state, data, start, stop):
    for step in range(start, stop):
        state.step = step
        loss = model(**data[step]).loss + method.peftbench_extra_loss(model=model, state=state)
        loss.backward()
        opt.step()
        method.peftbench_after_optimizer_step(model=model, state=state)
        opt.zero_grad(set_to_none=True)


def _train(model, method, total, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    state = state_for(total, opt)
    method.peftbench_train_start(model=model, state=state)
    _steps(model, method, opt, state, batches(total, seed), 0, total)
    return state


def test_resumed_run_continues_exactly():
    """A run checkpointed mid-schedule (EMAs, mask, history in peftbench_state_dict) and resumed in a fresh
    model ends exactly like the uninterrupted run."""
    base, targets = tiny_model()
    total, cut, params = 16, 7, {"init_r": 4, "target_r": 2.0, "tinit": 2, "tfinal": 4, "deltaT": 2}
    data = batches(total, seed=5)
    torch.manual_seed(0)
    straight, method = adalora_model(base, targets, **params)
    state = _train(straight, method, total, seed=5)

    torch.manual_seed(0)
    first, method_a = adalora_model(base, targets, **params)
    opt_a = torch.optim.AdamW([p for p in first.parameters() if p.requires_grad], lr=5e-2)
    state_a = state_for(total, opt_a)
    method_a.peftbench_train_start(model=first, state=state_a)
    _steps(first, method_a, opt_a, state_a, data, 0, cut)
    saved = copy.deepcopy((method_a.peftbench_state_dict(), opt_a.state_dict(),
                           {n: p.detach() for n, p in first.named_parameters() if p.requires_grad}))

    torch.manual_seed(123)  # another adapter initialisation, overwritten by the checkpoint
    resumed, method_b = adalora_model(base, targets, **params)
    opt_b = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=5e-2)
    state_b = state_for(total, opt_b)
    method_b.peftbench_train_start(model=resumed, state=state_b)
    method_b.peftbench_load_state_dict(state_dict=saved[0])
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            if p.requires_grad:
                p.copy_(saved[2][n])
    opt_b.load_state_dict(saved[1])
    _steps(resumed, method_b, opt_b, state_b, data, cut, total)

    want, got = method.peftbench_report(model=straight, state=state), method_b.peftbench_report(model=resumed,
                                                                                                 state=state_b)
    assert got["ranks"] == want["ranks"] and got["rank_history"] == want["rank_history"]
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)


def test_conformance_kit():
    from peftbench.conformance import check_method

    check_method("adalora")
    check_method("adalora", {"budget_unit": "params", "deltaT": 2, "orth_norm": "squared"},
                 checks=["counts", "budget", "state"])


def test_params_budget_unit_fits_the_parameter_budget():
    base, targets = tiny_model(torch.float32)
    model, method = adalora_model(base, targets, init_r=6, target_r=3.0, budget_unit="params", tinit=0.2,
                                  tfinal=0.3)
    state = _train(model, method, 20)
    costs = [t.in_features + t.out_features + 1 for t in targets]
    budget = round(3.0 * sum(costs))
    final = method.peftbench_report(model=model, state=state)["counts"]["final"]
    assert abs(final - budget) <= max(costs) / 2
    counts = method.peftbench_count_trainable(targets=targets)
    assert counts.final == budget and counts.peak == 6 * sum(costs)


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["params", "triplets"])
def test_end_to_end_run_reports_ranks_history_and_counts(tmp_path, host, unit):
    config = tiny_config(tmp_path, methods=[{"name": "adalora", "params": {"deltaT": 2, "budget_unit": unit}}])
    solved = solve_all(config, host)[("adalora", "toy")]
    spec = expand(config, {("adalora", "toy"): solved})[0]
    result = run_one(spec, host, progress=False)
    report = result.method_report
    adalora, ranks, counts = report["adalora"], report["ranks"], report["counts"]
    assert len(set(ranks.values())) > 1
    cost = {t.name: t.in_features + t.out_features + 1 for t in tiny_model(torch.float32)[1]}
    assert counts["final"] == sum(r * cost[name] for name, r in ranks.items())
    masked = adalora["init_r"] * len(ranks) - sum(ranks.values())
    if unit == "triplets":
        assert sum(ranks.values()) == adalora["target_budget"]  # b(T) triplets kept at the end
        assert abs(counts["final"] - solved.counts.final) / solved.target < 0.05  # estimate: uniform allocation
    else:  # the kept triplets' parameters are the budget within half a triplet
        assert abs(counts["final"] - adalora["target_budget"]) <= max(cost.values()) / 2
        assert abs(adalora["target_budget"] - solved.counts.final) <= 1  # the count promised before training
    # the trainer's measurements agree with the report and with the counts promised before training
    assert counts["peak"] == result.trainable["adapter"] == solved.counts.peak
    assert counts["nonzero"] == result.trainable["adapter_nonzero"] == solved.counts.peak - masked
    history = report["rank_history"]
    assert history[0]["step"] == 0 and set(history[0]["ranks"].values()) == {adalora["init_r"]}
    assert history[-1]["step"] == result.steps - adalora["tfinal"] and history[-1]["ranks"] == ranks
    assert [h["step"] for h in history] == sorted(h["step"] for h in history) and len(history) > 3
    budgets = [h["adalora_budget"] for h in result.history if "adalora_budget" in h]
    assert budgets[-1] == adalora["target_budget"] and max(budgets) == adalora["initial_budget"]


# --- export --------------------------------------------------------------------------------------------------


def test_export_reproduces_outputs_in_peft():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base, targets = tiny_model()
    model, method = adalora_model(base, targets, init_r=4, target_r=2.0, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(adalora_layers(model).values()):
            layer.E.copy_(torch.randn(4, generator=g, dtype=layer.E.dtype) * (torch.rand(4, generator=g) < 0.6))
            if i == 3:
                layer.E.zero_()  # no triplet left: the module is left out of the adapter
    config, state = method.peftbench_export_peft(model=model)
    assert config["peft_type"] == "LORA" and targets[3].name not in config["target_modules"]
    for name in config["target_modules"]:
        r = config["rank_pattern"].get(name, config["r"])
        assert state[f"base_model.model.{name}.lora_A.weight"].shape[0] == r
        assert math.isclose(config["alpha_pattern"].get(name, config["lora_alpha"]) / r, 8.0 / 4)

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    loaded = set_peft_model_state_dict(lora, state)
    assert not loaded.unexpected_keys
    batch = batches(1, seed=3)[0]
    model.eval(), lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(**batch).logits, model(**batch).logits, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(base(**batch).logits, model(**batch).logits)


@pytest.mark.slow
def test_minilm_on_mrpc_allocates_ranks_unevenly(tmp_path, host, glue):
    """The real MiniLM on real MRPC (short): the global budget ends up spread unevenly over the 36 matrices."""
    config = parse_config({
        "name": "adalora-mrpc", "tasks": ["mrpc"], "model": {"name_or_path": "minilm"}, "data_dir": str(glue),
        "methods": [{"name": "adalora", "params": {"tinit": 0.1, "tfinal": 0.3}}], "budget": {"lora_rank": 8},
        "train": {"epochs": 1, "batch_size": 16, "lr": 2e-3, "max_length": 64, "max_train_samples": 480,
                  "max_eval_samples": 64, "num_threads": 1},
        "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs"), "save_adapters": False},
    }, "<test>")
    solved = solve_all(config, host)
    (spec,) = expand(config, solved)
    report = run_one(spec, host, progress=False).method_report
    ranks = report["ranks"]
    target = solved[("adalora", "mrpc")].target  # LoRA r=8: 288 triplets' worth of parameters
    assert len(ranks) == 36 and abs(report["counts"]["final"] - target) / target < 0.01
    assert max(ranks.values()) - min(ranks.values()) >= 3
    assert len(report["rank_history"]) > 5
