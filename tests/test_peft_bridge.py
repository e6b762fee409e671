"""The PEFT bridge (``peft:<type>``): every supported tuner passes the conformance kit, budgets are solved by
counting, exported adapters reload with plain PEFT, and bridged LoRA trains exactly like the built-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from peftbench.plugins.peft import TUNERS, UNSUPPORTED  # noqa: E402

from peftbench import modeling  # noqa: E402
from peftbench.errors import ConfigError  # noqa: E402
from peftbench.export import export_run, load_with_peft, rebuild  # noqa: E402
from peftbench.host import Host  # noqa: E402
from peftbench.lora import rank_cost  # noqa: E402
from peftbench.testing import check_method, tiny_config  # noqa: E402

# Kit options per tuner on the kit's tiny model (hidden 32, FFN 64): defaults sized for real models are cut to
# fit it (WaveFT's 2,592 frequencies exceed a 32x32 matrix), and tuners whose size moves in steps get the budget
# (LoRA rank) and tolerance that their steps allow there; the budget check still fails when the solver misses it.
KIT = {
    "oft": {"budget_ranks": (4,), "tolerance": 0.07},  # block size 16: 3,360 of 3,584
    "boft": {"budget_ranks": (4,), "tolerance": 0.13},
    "randlora": {"budget_ranks": (4,), "tolerance": 0.04},
    "glora": {"budget_ranks": (16,), "tolerance": 0.15},
    "lily": {"budget_ranks": (16,), "tolerance": 0.1},
    "fourierft": {"params": {"n_frequency": 64}, "budget_ranks": (4,)},
    "waveft": {"params": {"n_frequency": 64}, "budget_ranks": (4,)},
    "vblora": {"params": {"vector_length": 8, "num_vectors": 16}, "tolerance": 0.02},
    "lokr": {"budget_ranks": (4,)},  # a full-rank d/2 x d/2 factor holds 4,144 at most on the tiny model
    "miss": {"params": {"r": 8}},
    "shira": {"params": {"r": 4}, "budget_ranks": (4, 8)},
    "c3a": {"params": {"block_size": 16}, "budget_ranks": (4,), "tolerance": 0.15},
    "road": {"params": {"group_size": 8}},
    "psoft": {"params": {"r": 4}, "budget_ranks": (4,), "tolerance": 0.05},  # r <= 32: 6,720 at most
    "pvera": {"params": {"r": 16}},
    "tinylora": {"params": {"u": 8}},
    "osf": {"params": {"effective_rank": 4}, "tolerance": 0.02},
    "supertuning": {"budget_ranks": (4,), "tolerance": 0.05},  # r=4: 3,744 of 3,584
}


def _kit(peft_type: str) -> tuple[dict | None, dict]:
    options = dict(KIT.get(peft_type.lower(), {}))
    return options.pop("params", None), options


@pytest.mark.parametrize("peft_type", sorted(TUNERS))
def test_tuner_passes_the_conformance_kit(peft_type):
    params, options = _kit(peft_type)
    check_method(f"peft:{peft_type.lower()}", params, **options)


def test_every_supported_tuner_is_a_registered_method_and_every_peft_type_is_accounted_for():
    host = Host()
    assert {f"peft:{t.lower()}" for t in TUNERS} <= set(host.methods)
    assert set(TUNERS) | set(UNSUPPORTED) == {t.value for t in peft.PeftType}
    assert not set(TUNERS) & set(UNSUPPORTED)


# ---------------------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------------------


def _shapes(host):
    config = tiny_config(Path("/tmp"))
    model = modeling.load_model(config.model, 2, seed=0, meta=True)
    head = modeling.head_modules(config.model, model)
    return model, modeling.find_targets(model, modeling.target_patterns(config.model, model), head), head


def _solve(host, name, params=None, rank=8, tolerance=0.01):
    model, targets, head = _shapes(host)
    cls = host.method(name)
    method = cls(cls.Params(**(params or {})))
    target = rank * rank_cost(targets)
    with host.activate(method):
        solved = host.hook.peftbench_solve_budget(model=model, targets=targets, head=head, target=target,
                                                  tolerance=tolerance)
    with host.activate(cls(solved)):
        counts = host.hook.peftbench_count_trainable(model=model, targets=targets, head=head)
    return solved, counts.final, target


def test_the_solver_mixes_per_module_sizes_where_peft_takes_a_pattern(host):
    # FourierFT: n_frequency per module; a budget that is no multiple of the module count needs a mix
    solved, final, target = _solve(host, "peft:fourierft", {"n_frequency": 8}, rank=1, tolerance=0.001)
    assert final == target  # 896 on 12 modules: 74 frequencies on 4 of them, 75 on 8
    assert solved.n_frequency_pattern and set(solved.n_frequency_pattern.values()) == {solved.n_frequency + 1}


def test_a_fixed_size_tuner_is_an_unmatched_reference_with_its_count(tmp_path):
    from peftbench.budget import budget_rows
    from peftbench.runner import make_host, solve_budgets

    config = tiny_config(tmp_path, methods=["lora", {"name": "peft:ia3"}, {"name": "peft:loha"}])
    host = make_host(config)
    solved = solve_budgets(config, host)
    rows = {row[0]: row for row in budget_rows(solved)}
    assert rows["peft:ia3"][7] == "reference" and rows["peft:ia3"][6] == "—"
    assert rows["peft:loha"][3] == rows["lora"][3]  # LoHa r=2 has exactly LoRA r=4's count
    assert not solved[("peft:ia3", "toy")].matched and solved[("peft:loha", "toy")].matched


def test_match_budget_nearest_solves_a_coarse_knob_and_lists_it_as_a_reference(tmp_path):
    from peftbench.errors import BudgetError
    from peftbench.runner import make_host, solve_budgets

    config = tiny_config(tmp_path, methods=[{"name": "peft:oft"}])
    with pytest.raises(BudgetError, match="nearest achievable 3,360"):
        solve_budgets(config, make_host(config))
    config = tiny_config(tmp_path, methods=[{"name": "peft:oft", "match_budget": "nearest"}])
    solved = solve_budgets(config, make_host(config))[("peft:oft", "toy")]
    assert solved.params.oft_block_size == 16 and solved.counts.final == 3360 and not solved.matched


def test_a_grid_over_the_size_key_is_refused_and_other_fields_are_open(tmp_path):
    from peftbench.runner import make_host, solve_budgets

    tune = {"holdout": 0.25, "seeds": [0]}
    config = tiny_config(tmp_path, methods=[{"name": "peft:loha", "tune": {"params.r": [2, 4]}}], tune=tune)
    # LoHa's r is what its budget solver sets: refused as such (a count change is refused alike)
    with pytest.raises(ConfigError, match="peft:loha's budget solver sets|changes peft:loha's trainable count"):
        solve_budgets(config, make_host(config))
    config = tiny_config(tmp_path, methods=[{"name": "peft:loha", "tune": {"params.alpha": [4, 16]}}], tune=tune)
    solve_budgets(config, make_host(config))


def test_a_wrong_tuner_name_is_a_config_error_listing_the_supported_ones(tmp_path):
    from peftbench.errors import PluginError
    from peftbench.runner import make_host

    with pytest.raises(PluginError, match=r"unknown method 'peft:lohaa' \(did you mean 'peft:loha'.*peft:vera"):
        make_host(tiny_config(tmp_path, methods=[{"name": "peft:lohaa"}]))
    for peft_type, reason in [("PREFIX_TUNING", "prompt-learning"), ("LOHAA", "unknown PEFT type")]:
        with pytest.raises(ConfigError, match=f"peft_type: .*{reason}.*supported: LORA, LOHA"):
            make_host(tiny_config(tmp_path, methods=[{"name": "peft", "params": {"peft_type": peft_type}}]))


def test_the_generic_spelling_is_the_same_method(tmp_path):
    from peftbench.runner import make_host, solve_budgets

    config = tiny_config(tmp_path, methods=[{"name": "peft:loha", "params": {"alpha": 4}},
                                            {"name": "peft", "params": {"peft_type": "loha", "options": {"alpha": 4}}}])
    solved = solve_budgets(config, make_host(config))
    assert solved[("peft", "toy")].counts == solved[("peft:loha", "toy")].counts
    assert solved[("peft", "toy")].params.options["r"] == solved[("peft:loha", "toy")].params.r


def test_budgets_are_counted_offline_on_deberta_and_llama_shapes(host):
    from peftbench.config import ModelConfig

    for name in ("microsoft/deberta-v3-base", "meta-llama/Llama-3.2-3B"):
        mc = ModelConfig(name_or_path=name)
        model = modeling.load_model(mc, 2, seed=0, meta=True, causal_lm="Llama" in name)
        head = modeling.head_modules(mc, model)
        targets = modeling.find_targets(model, modeling.target_patterns(mc, model), head)
        cls = host.method("peft:loha")
        with host.activate(cls(cls.Params(r=4))):
            counts = host.hook.peftbench_count_trainable(model=model, targets=targets, head=head)
        assert counts.final == 8 * rank_cost(targets)  # LoHa: two rank-r pairs, so r=4 counts as LoRA r=8


# ---------------------------------------------------------------------------------------------------------
# Training and export
# ---------------------------------------------------------------------------------------------------------


def test_bridged_lora_trains_exactly_like_the_builtin(tmp_path):
    from peftbench.runner import make_host, solve_budgets
    from peftbench.runs import expand
    from peftbench.sweep import run_one

    losses = {}
    for name, params in (("lora", {"r": 4, "alpha": 8}), ("peft:lora", {"r": 4, "lora_alpha": 8})):
        # same rank, scale, init stream (A kaiming-uniform then B zero, in module order) and training
        config = tiny_config(tmp_path, methods=[{"name": name, "params": params, "match_budget": False}],
                             train={"deterministic": True})
        host = make_host(config)
        (spec,) = expand(config, solve_budgets(config, host))
        result = run_one(spec, host, progress=False)
        losses[name] = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses["lora"]) >= 4
    # the first losses agree to float precision; later ones drift by rounding (the built-in's exact fp32 path
    # multiplies W + s·B·A, PEFT adds s·B·(A·x) to W·x), well inside what training moves them
    assert losses["peft:lora"][:2] == pytest.approx(losses["lora"][:2], rel=1e-4)
    assert losses["peft:lora"] == pytest.approx(losses["lora"], rel=2e-3)
    assert max(losses["lora"]) - min(losses["lora"]) > 0.02  # training moved them 10x the tolerance


@pytest.mark.parametrize("peft_type,params", [("LOHA", {}), ("LOKR", {}), ("OFT", {"oft_block_size": 8}),
                                              ("VERA", {"r": 16}), ("FOURIERFT", {"n_frequency": 64})])
def test_exported_adapter_reloads_with_plain_peft_and_reproduces_the_predictions(tmp_path, peft_type, params):
    from helpers import train_one

    from peftbench.data import load_task_data, make_loader
    from peftbench.modeling import load_tokenizer

    config = tiny_config(tmp_path, methods=[{"name": f"peft:{peft_type.lower()}", "params": params,
                                             "match_budget": False}], train={"epochs": 1, "lr": 2e-2})
    host, run = train_one(config)
    out = export_run(run, tmp_path / "export", host)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == peft_type
    assert set(adapter_config["modules_to_save"]) == {"classifier", "bert.pooler"}

    ours, theirs = rebuild(run, host)[0], load_with_peft(run, out, host)
    base = modeling.load_model(config.model, 2, seed=run["seed"]).eval()
    tokenizer = load_tokenizer(config.model)
    data = load_task_data(host.task("toy"), "dev", None, tokenizer, config.train.max_length, None)
    batch = next(iter(make_loader(data, 64, False, True, 0, tokenizer.pad_token_id, False)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected, got = ours(**inputs).logits, theirs(**inputs).logits
        # the adapter itself moved the outputs (not only the head): its effect survives the export
        head_only = base.load_state_dict({k: v for k, v in ours.state_dict().items()
                                          if k.startswith(("classifier", "bert.pooler"))}, strict=False)
        assert not head_only.unexpected_keys
        assert not torch.allclose(base(**inputs).logits, expected, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
