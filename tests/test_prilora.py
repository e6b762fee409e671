"""PRILoRA: rank schedules, the |A|·EMA‖x‖ score, pruning (ratios, criteria, permanent masks), counts, export."""

import copy
import math

import pytest
import torch
from helpers import CrashAtStep
from peftbench.plugins.prilora import PRILoRA, PRILoRALinear, PRILoRAParams
from peftbench.plugins.prilora.layer import InputNorms
from peftbench.plugins.prilora.pruning import importance, prune_mask
from peftbench.plugins.prilora.ranks import layer_ranks
from torch import nn

import peftbench.testing
from peftbench import modeling
from peftbench.budget import model_shapes, solve_all
from peftbench.config import ModelConfig, parse_config
from peftbench.errors import ConfigError
from peftbench.hookspecs import TargetModule, TrainState
from peftbench.host import Host, PluginInfo
from peftbench.runner import run_sweep
from peftbench.runs import expand
from peftbench.schema import from_dict
from peftbench.store import Store
from peftbench.sweep import run_one
from peftbench.testing import tiny_config, tiny_model_config

# --- rank schedules --------------------------------------------------------------------------------------


def test_paper_schedule_on_twelve_layers():
    assert layer_ranks(12, 8) == [4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12]
    assert layer_ranks(12, 8, "decreasing") == [12, 11, 11, 10, 9, 8, 8, 7, 6, 5, 5, 4]
    assert layer_ranks(12, 8, "uniform") == [8] * 12


@pytest.mark.parametrize("num_layers", [1, 2, 3, 5, 6, 7, 12, 13, 24, 48])
@pytest.mark.parametrize("mean", [1.5, 3, 4.25, 8, 8 + 1 / 3, 16])
@pytest.mark.parametrize("schedule", ["increasing", "uniform", "decreasing"])
def test_schedules_sum_exactly_and_stay_within_one_of_the_ramp(num_layers, mean, schedule):
    spread = 0.5
    ranks = layer_ranks(num_layers, mean, schedule, spread)
    assert len(ranks) == num_layers and sum(ranks) == round(mean * num_layers)
    if schedule != "uniform" and num_layers > 1:
        low, high = mean * (1 - spread), mean * (1 + spread)
        ideal = [low + (high - low) * i / (num_layers - 1) for i in range(num_layers)]
        if schedule == "decreasing":
            ideal = ideal[::-1]
        assert all(abs(r - x) < 1 for r, x in zip(ranks, ideal))
        steps = [b - a for a, b in zip(ranks, ranks[1:])]
        assert all(s >= 0 for s in steps) if schedule == "increasing" else all(s <= 0 for s in steps)


def test_deberta_budget_equals_lora_r8_and_a_quarter_is_pruned(host):
    """The paper's setting: 12 layers, ranks 4 → 12, 1,327,104 parameters like LoRA r=8; half of A pruned."""
    config = parse_config({"tasks": ["rte"], "model": {"name_or_path": "microsoft/deberta-v3-base"},
                           "methods": [{"name": "prilora", "params": {"r": 3}}, {"name": "lora"}],
                           "budget": {"lora_rank": 8, "tolerance": 0.0}}, "<test>")
    shapes = model_shapes(config)
    solved = solve_all(config, host, shapes)
    prilora, lora = solved[("prilora", "rte")], solved[("lora", "rte")]
    assert prilora.params.r == 8  # solved from r=3
    assert prilora.counts.final == lora.counts.final == 1_327_104
    per_rank_a = 4 * 768 + 768 + 3072  # in_features of the six modules of a layer
    assert prilora.counts.nonzero == 1_327_104 - 96 * per_rank_a // 2 == 995_328  # about 3/4 of the adapter
    ranks = prilora.params.module_ranks(shapes.targets)
    by_layer = {t.layer: ranks[t.name] for t in shapes.targets}
    assert [by_layer[i] for i in range(12)] == layer_ranks(12, 8)


@pytest.mark.parametrize("layers", [3, 5, 6])
@pytest.mark.parametrize("extra_units", [0, 1, 4])
def test_budget_solved_exactly_for_other_depths_and_targets(host, layers, extra_units):
    """Any budget that is a whole number of per-layer rank units is met exactly, whatever the depth."""
    model = tiny_model_config(layers=layers)
    config = parse_config({"tasks": ["toy"], "model": model, "methods": [{"name": "prilora"}],
                           "plugins": ["peftbench.testing"], "budget": {"lora_rank": 4}}, "<test>")
    shapes = model_shapes(config)
    unit = sum(t.in_features + t.out_features for t in shapes.targets) // layers
    target = 4 * layers * unit + extra_units * unit
    config = parse_config({**config.to_dict(), "budget": {"params": target, "tolerance": 0.0}}, "<test>")
    solved = solve_all(config, host)[("prilora", "toy")]
    assert solved.counts.final == target


def test_bad_params_name_the_key():
    with pytest.raises(ConfigError, match="criterion"):
        from_dict(PRILoRAParams, {"criterion": "input_nrom"}, "params")
    with pytest.raises(ConfigError, match="prune_ratio"):
        from_dict(PRILoRAParams, {"prune_ratio": 1.5}, "params")
    with pytest.raises(ConfigError, match="schedule"):
        from_dict(PRILoRAParams, {"schedule": "inverted"}, "params")
    targets = _targets(3)
    with pytest.raises(ConfigError, match="schedule lists 2 ranks but the model has 3"):
        PRILoRAParams(schedule=[4, 12]).module_ranks(targets)
    with pytest.raises(ConfigError, match="spread"):
        PRILoRAParams(r=1, spread=0.9).module_ranks(targets)


# --- the score and the pruning ---------------------------------------------------------------------------


def test_input_norm_ema_and_importance_by_hand():
    layer = PRILoRALinear(nn.Linear(3, 2), r=2, alpha=2, statistic="input", ema=0.9)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.25, 0.0]]))
    x1 = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]], [[0.0, 2.0, 2.0], [1.0, 2.0, 1.0]]])  # (batch, seq, 3)
    x2 = torch.tensor([[[2.0, 2.0, 0.0]], [[0.0, 1.0, 0.0]]])
    layer.train()
    layer(x1)
    layer(x2)
    layer.eval()
    layer(torch.full((1, 1, 3), 100.0))  # evaluation does not count
    norm1 = [math.sqrt(1 + 9 + 0 + 1), math.sqrt(0 + 1 + 4 + 4), math.sqrt(4 + 0 + 4 + 1)]  # over all 4 tokens
    norm2 = [math.sqrt(4 + 0), math.sqrt(4 + 1), 0.0]
    ema = [0.9 * a + 0.1 * b for a, b in zip(norm1, norm2)]  # the first batch initialises the average
    torch.testing.assert_close(layer.norm_ema, torch.tensor(ema))
    expected = torch.tensor([[1.0 * ema[0], 2.0 * ema[1], 3.0 * ema[2]], [0.5 * ema[0], 0.25 * ema[1], 0.0]])
    torch.testing.assert_close(importance("input_norm", layer.lora_A, layer.norm_ema), expected)
    # per row, ratio 1/3: the single lowest score of each row goes
    drop = prune_mask(expected, 1 / 3, "row")
    assert drop.tolist() == [[True, False, False], [False, False, True]]


def test_rank_statistic_is_the_norm_of_a_x():
    layer = PRILoRALinear(nn.Linear(4, 3), r=2, alpha=2, statistic="rank")
    x = torch.randn(5, 7, 4)
    layer.train()
    layer(x)
    torch.testing.assert_close(layer.norm_ema, (x.reshape(-1, 4) @ layer.lora_A.detach().T).norm(dim=0))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.29])
def test_pruned_fraction_per_row_and_per_matrix(ratio):
    scores = torch.rand(8, 100, generator=torch.Generator().manual_seed(0))
    drop = prune_mask(scores, ratio, "row")
    k = round(ratio * 100)
    assert drop.sum(dim=1).tolist() == [k] * 8
    # the dropped entries are the lowest of their row
    assert (scores.masked_fill(~drop, -1).amax(dim=1) < scores.masked_fill(drop, 2).amin(dim=1)).all()
    drop = prune_mask(scores, ratio, "matrix")
    assert int(drop.sum()) == round(ratio * 800)
    assert scores[drop].max() < scores[~drop].min()


def _targets(num_layers: int, width: int = 16) -> list[TargetModule]:
    return [TargetModule(f"blocks.{i}", i, num_layers, width, width, "blocks") for i in range(num_layers)]


class _Blocks(nn.Module):
    def __init__(self, num_layers: int, width: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(num_layers))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def _injected(seed: int = 0, num_layers: int = 2, **params) -> tuple[PRILoRA, nn.Module]:
    torch.manual_seed(seed)
    model = _Blocks(num_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    method = PRILoRA(PRILoRAParams(**{"r": 4, "alpha": 8, **params}))
    method.peftbench_inject(model, _targets(num_layers))
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_B.normal_()  # B starts at zero: give it values so that B can be pruned and scored
    model.train()
    model(torch.randn(3, 5, 16))  # one batch of statistics
    return method, model


def test_random_criterion_prunes_per_row_at_random_and_reproducibly():
    method, _ = _injected(criterion="random")
    by_magnitude = {n: prune_mask(importance("magnitude", m.lora_A), 0.5, "row") for n, m in method.layers.items()}
    method.peftbench_train_start(_state(None, total_steps=10))
    method.prune()
    zeros = {n: m.lora_A == 0 for n, m in method.layers.items()}
    for name, layer in method.layers.items():
        assert zeros[name].sum(dim=1).tolist() == [8] * layer.r  # half of every row of A
        assert not torch.equal(zeros[name], by_magnitude[name])  # not the magnitude choice
        assert not (layer.lora_B == 0).any()  # B untouched
    again, _ = _injected(criterion="random")
    again.peftbench_train_start(_state(None, total_steps=10))
    again.prune()
    assert all(torch.equal(zeros[n], m.lora_A == 0) for n, m in again.layers.items())  # same seed, same entries


def test_prune_b_prunes_b_by_its_rank_space_score():
    method, _ = _injected(criterion="prune_b", r=8, spread=0.0)
    before = {n: (m.lora_A.clone(), m.lora_B.clone(), m.norm_ema.clone()) for n, m in method.layers.items()}
    method.prune()
    for name, layer in method.layers.items():
        a, b, ema = before[name]
        assert torch.equal(layer.lora_A, a)  # A untouched
        expected_drop = prune_mask(b.abs() * ema, 0.5, "row")  # |B_ik| · EMA‖(A x)_k‖, half of each row of B
        assert torch.equal(layer.lora_B == 0, expected_drop)
        assert (layer.lora_B == 0).sum(dim=1).tolist() == [4] * 16


def test_magnitude_and_none_criteria():
    method, _ = _injected(criterion="magnitude")
    a = {n: m.lora_A.clone() for n, m in method.layers.items()}
    method.prune()
    for name, layer in method.layers.items():
        assert torch.equal(layer.lora_A == 0, prune_mask(a[name].abs(), 0.5, "row"))
    method, _ = _injected(criterion="none")
    assert all(m.statistic == "none" and m.norm_ema.numel() == 0 for m in method.layers.values())


# --- training: ongoing vs permanent pruning, counts ------------------------------------------------------


def _state(optimizer, step: int = 0, total_steps: int = 20) -> TrainState:
    return TrainState(step=step, total_steps=total_steps, epoch=0, optimizer=optimizer, lr_scheduler=None,
                      accelerator=None, seed=0)


def _train(method: PRILoRA, model: nn.Module, steps: int, on_step=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    state = _state(optimizer, total_steps=steps)
    method.peftbench_train_start(state)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        state.step = step
        x = torch.randn(4, 6, 16, generator=generator)
        loss = (model(x) - x.flip(-1)).pow(2).mean()
        loss.backward()
        optimizer.step()
        method.peftbench_after_optimizer_step(state)
        if on_step:
            on_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
    method.peftbench_train_end(state)


def test_ongoing_pruning_lets_entries_regrow_and_ends_pruned():
    method, model = _injected(prune_every=5)
    regrown = []

    def check(step, _):
        if (step + 1) % 5 == 1 and step > 0:  # the step after an event: the zeros have been trained again
            regrown.append(sum(int((m.lora_A == 0).sum()) for m in method.layers.values()))

    _train(method, model, steps=12, on_step=check)
    assert method.events == 3  # after steps 5 and 10, and the final one
    assert regrown and all(n == 0 for n in regrown)  # re-prune mode: Adam's momentum revives every zero
    for layer in method.layers.values():  # the final event leaves exactly half of every row of A
        assert (layer.lora_A == 0).sum(dim=1).tolist() == [8] * layer.r


def test_permanent_mask_and_optimizer_state_stay_zero():
    method, model = _injected(prune_every=3, permanent=True)
    masks = {}

    def check(step, optimizer):
        if step + 1 < 3:
            return
        for name, layer in method.layers.items():
            zero = layer.lora_A == 0
            masks.setdefault(name, zero.clone())
            assert torch.equal(zero, masks[name])  # the first event's mask, unchanged
            state = optimizer.state[layer.lora_A]
            assert not state["exp_avg"][zero].any() and not state["exp_avg_sq"][zero].any()

    _train(method, model, steps=10, on_step=check)
    assert method.events == 1  # later events would pick the same entries: skipped
    assert masks and all(torch.equal(m.lora_A == 0, masks[n]) for n, m in method.layers.items())


@pytest.mark.parametrize("params", [
    {},  # defaults: increasing ranks, |A|·‖x‖, half of every row of A
    {"criterion": "prune_b", "grouping": "matrix", "prune_ratio": 0.25},
    {"schedule": [2, 6], "permanent": True, "prune_every": 3},
])
def test_end_to_end_counts_and_report(host, tmp_path, params):
    config = tiny_config(tmp_path, methods=[{"name": "prilora", "params": {"alpha": 8, **params}}])
    solved = solve_all(config, host)[("prilora", "toy")]
    (spec,) = expand(config, {("prilora", "toy"): solved})
    result = run_one(spec, host, progress=False)
    report = result.method_report
    assert result.trainable["adapter"] == solved.counts.final == report["counts"]["final"]
    assert result.trainable["adapter_nonzero"] == solved.counts.nonzero == report["counts"]["nonzero"]
    assert report["layer_ranks"] == [2, 6]  # r = 4 over two layers, spread 0.5
    assert report["sparsity"] == pytest.approx(1 - solved.counts.nonzero / solved.counts.final)
    assert report["nonzero_A"] + report["nonzero_B"] == report["counts"]["nonzero"]
    if params.get("criterion") == "prune_b":
        assert report["sparsity_A"] == 0 and report["sparsity_B"] == pytest.approx(0.25, abs=0.01)
    else:
        assert report["sparsity_A"] == 0.5 and report["sparsity_B"] == 0
    assert report["prune_events"] >= 1


def _sweep(tmp_path, method, *observers):
    config = tiny_config(tmp_path, methods=[method], output={"checkpoint": True},
                         train={"epochs": 3, "batch_size": 32, "max_length": 24, "eval_every": 5})
    host = Host()
    host.add_plugin(peftbench.testing, PluginInfo("peftbench.testing", "object"))
    for i, observer in enumerate(observers):
        host.add_plugin(observer, PluginInfo(f"observer{i}", "object"))
    store = Store(config.output.db)
    try:
        run_sweep(config, host, store, progress=False, log=lambda line: None)
        return store.runs(status=None)[0]
    finally:
        store.close()


@pytest.mark.parametrize("params", [{"prune_every": 3}, {"criterion": "random", "permanent": True, "prune_every": 5}])
def test_resumed_run_equals_an_uninterrupted_run(tmp_path, params):
    """Events, EMA counters, the random generator and permanent masks are restored from a checkpoint."""
    method = {"name": "prilora", "params": {"alpha": 8, **params}}
    whole = _sweep(tmp_path / "whole", method)
    crashed = _sweep(tmp_path / "resumed", method, CrashAtStep(19))  # 8 steps per epoch: after epoch 2's
    assert crashed["status"] == "failed"
    assert (tmp_path / "resumed" / "runs" / crashed["run_id"] / "checkpoint.pt").exists()
    resumed = _sweep(tmp_path / "resumed", method)
    assert resumed["status"] == "done" and resumed["run_id"] == whole["run_id"]
    for key in ("history", "best", "final", "trainable", "method_report"):
        assert whole[key] == resumed[key], key


# --- export to HF PEFT -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["alpha_over_rank", "constant"])
def test_export_loads_into_peft_with_the_same_outputs(scaling):
    peft = pytest.importorskip("peft")
    mc = ModelConfig(**tiny_model_config(layers=3))
    base = modeling.load_model(mc, num_labels=2, seed=0)
    ours = copy.deepcopy(base)
    head = modeling.head_modules(mc, ours)
    targets = modeling.find_targets(ours, modeling.target_patterns(mc, ours), head)
    modeling.freeze(ours)
    method = PRILoRA(PRILoRAParams(r=4, alpha=8, scaling=scaling))
    method.peftbench_inject(ours, targets)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    ids = torch.randint(1000, 3000, (3, 9), generator=generator)
    ours.train()
    ours(input_ids=ids)  # statistics for the score
    method.prune()
    ours.eval()

    config, state_dict = method.peftbench_export_peft(ours, targets)
    ranks = {name: config["rank_pattern"].get(name, config["r"]) for name in config["target_modules"]}
    assert config["peft_type"] == "LORA" and sorted(set(ranks.values())) == [2, 4, 6]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{k: v for k, v in config.items()
                                                                          if k != "peft_type"}))
    result = peft.set_peft_model_state_dict(theirs, state_dict)
    assert not [k for k in result.missing_keys if "lora_" in k] and not result.unexpected_keys
    theirs.eval()
    expected = ours(input_ids=ids).logits
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, base.eval()(input_ids=ids).logits, atol=1e-4)  # the adapter matters


def _sync_worker(rank: int, world: int, init_file: str, results) -> None:
    from peftbench.plugins.prilora import sync_statistics

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layers = [PRILoRALinear(nn.Linear(4, 3), r=2, alpha=2.0) for _ in range(2)]
        for i, layer in enumerate(layers):  # every process saw different inputs
            layer.norm_ema.copy_(torch.arange(4.0) * (rank + 1) + i)
        sync_statistics(layers)
        results.put((rank, [layer.norm_ema.tolist() for layer in layers]))
    finally:
        torch.distributed.destroy_process_group()


def test_feature_norms_are_averaged_over_processes_before_pruning(tmp_path):
    """Under DDP each process sees a shard of the batch: its EMAs must be averaged, or replicas prune
    different entries and drift apart."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_sync_worker, args=(rank, 2, str(tmp_path / "init"), results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    got = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    expected = [[1.5 * j + i for j in range(4)] for i in range(2)]  # mean of (rank + 1) · j + i over ranks 0, 1
    assert got[0] == got[1] == expected


def test_modules_fed_the_same_tensor_share_one_norm_computation():
    shared = InputNorms()
    q, k = (PRILoRALinear(nn.Linear(4, 3), r=2, alpha=2.0, input_norms=shared) for _ in range(2))
    x = torch.randn(2, 5, 4)
    q(x)
    first = shared.norm
    k(x)
    assert shared.norm is first  # reused, not recomputed
    assert torch.allclose(k.norm_ema, x.reshape(-1, 4).norm(dim=0)) and torch.equal(q.norm_ema, k.norm_ema)
    x.mul_(2)  # changed in place: a new statistic
    k(x)
    assert shared.norm is not first and torch.allclose(shared.norm, 2 * first)


# --- prune_b prunes as many entries as pruning A; describe() for `peftbench budget` -----------------------


@pytest.mark.parametrize("r", [3, 5, 7])
def test_prune_b_prunes_exactly_as_many_entries_as_pruning_a_on_odd_ranks(r):
    """⌊ratio · r⌋ per row of B pruned fewer entries on odd ranks; now B loses A's count, rows as even as can be."""
    by_a, _ = _injected(criterion="input_norm", r=r, spread=0.0)
    by_b, _ = _injected(criterion="prune_b", r=r, spread=0.0)
    by_a.prune()
    by_b.prune()
    for (name, a_layer), b_layer in zip(by_a.layers.items(), by_b.layers.values()):
        pruned_a = int((a_layer.lora_A == 0).sum())
        assert pruned_a == r * 8
        assert int((b_layer.lora_B == 0).sum()) == pruned_a == by_b.counts[name]  # old code: 16 · ⌊r/2⌋
        assert not (b_layer.lora_A == 0).any()
        per_row = (b_layer.lora_B == 0).sum(dim=1)
        assert set(per_row.tolist()) == {r // 2, r // 2 + 1}  # spread over the rows as evenly as possible


def test_prune_mask_with_a_count_spreads_it_over_rows_by_score():
    scores = torch.tensor([[0.1, 0.2, 0.9], [0.1, 0.8, 0.9], [0.1, 0.3, 0.9]])
    drop = prune_mask(scores, 0.5, "row", count=5)  # one per row, and two more: the rows whose 2nd-lowest is low
    assert drop.sum(dim=1).tolist() == [2, 1, 2]
    assert drop[:, 0].all() and not drop[:, 2].any()
    assert int(prune_mask(scores, 0.5, "matrix", count=4).sum()) == 4


def test_expected_pruned_matches_a_count_per_layer_and_caps_at_b():
    from peftbench.plugins.prilora.pruning import expected_pruned

    # one transformer-like layer of rank 5: the output map's A (5 × 64) loses more than its B (16 × 5) holds
    layer = [(0, 5, 16, 16), (0, 5, 16, 64), (0, 5, 64, 16)]
    a = expected_pruned("input_norm", "row", 0.5, layer)
    b = expected_pruned("prune_b", "row", 0.5, layer)
    assert a == [40, 40, 160] and sum(b) == sum(a) == 240
    assert b == [40, 160, 40]  # half of every B: in proportion to B's sizes 80, 320, 80
    assert expected_pruned("prune_b", "row", 0.5, [(None, 4, 64, 4)]) == [16]  # capped at all of B (4 × 4)
    assert expected_pruned("none", "row", 0.5, layer) == [0, 0, 0]


def test_end_to_end_prune_b_on_odd_ranks_predicts_and_matches_input_norm(host, tmp_path):
    """Tiny BERT (FFN maps 32 → 64 → 32), ranks 3 and 5: prune_b's nonzero count is input_norm's, exactly."""
    methods = [{"name": "prilora", "label": c, "params": {"alpha": 8, "spread": 0.25, "criterion": c}}
               for c in ("prune_b", "input_norm")]
    config = tiny_config(tmp_path, methods=methods)
    solved = solve_all(config, host)
    assert solved[("prune_b", "toy")].counts.nonzero == solved[("input_norm", "toy")].counts.nonzero
    (spec,) = [s for s in expand(config, solved) if s.label == "prune_b"]
    report = run_one(spec, host, progress=False).method_report
    assert report["layer_ranks"] == [3, 5]
    assert report["counts"]["nonzero"] == solved[("prune_b", "toy")].counts.nonzero
    assert report["sparsity_A"] == 0 and report["sparsity_B"] == 0.5  # every B exactly half


def test_describe_shows_per_layer_scales_and_deviation_switches(host):
    targets = _targets(3)
    default = PRILoRA(PRILoRAParams(r=8, alpha=16)).describe(targets)
    assert default.scale == "4.00→1.33"  # alpha / r_l over ranks 4, 8, 12
    assert default.deviations == ["scaling=alpha_over_rank[open]"]  # not stated by the paper: always shown
    ablation = PRILoRA(PRILoRAParams(r=8, alpha=16, scaling="constant", permanent=True, criterion="prune_b"))
    described = ablation.describe(targets)
    assert described.scale == "2.00"
    assert described.deviations == ["criterion=prune_b", "permanent=True", "scaling=constant[open]"]
    config = parse_config({"tasks": ["toy"], "model": tiny_model_config(), "plugins": ["peftbench.testing"],
                           "methods": [{"name": "prilora", "params": {"alpha": 8}}, {"name": "lora"}],
                           "budget": {"lora_rank": 4}}, "<test>")
    from peftbench.budget import BUDGET_HEADERS, budget_rows

    rows = {row[0]: dict(zip(BUDGET_HEADERS, row)) for row in budget_rows(solve_all(config, host))}
    assert rows["prilora"]["scale"] == "4.00→1.33"  # alpha 8 over ranks 2 → 6 (r = 4 on two layers)
    assert rows["prilora"]["deviations"] == "scaling=alpha_over_rank[open]"
    assert rows["lora"]["scale"] == "4.00" and rows["lora"]["deviations"] == "—"
