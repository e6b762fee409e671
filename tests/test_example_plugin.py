"""The example third-party plugin (examples/peftbench-dora): DoRA is correct (identity at init, parity with
HF PEFT's DoRA), counts and budgets right, registered through its entry point, and runs through the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from peftbench import modeling
from peftbench.budget import model_shapes, solve_all
from peftbench.cli import main
from peftbench.config import ModelConfig, parse_config
from peftbench.host import Host
from peftbench.store import Store
from peftbench.testing import tiny_model_config

peftbench_dora = pytest.importorskip(
    "peftbench_dora", reason="the example plugin is not installed: pip install -e examples/peftbench-dora")
peft = pytest.importorskip("peft")

from peftbench_dora import DoRA, DoRALinear, DoRAParams  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "peftbench-dora"


@pytest.fixture(scope="module")
def tiny():
    """The tiny random BERT (eval mode), its target modules and a batch."""
    mc = ModelConfig(**tiny_model_config())
    model = modeling.load_model(mc, 2, seed=0).eval()
    head = modeling.head_modules(mc, model)
    targets = modeling.find_targets(model, modeling.target_patterns(mc, model), head)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 1000, (3, 12), generator=generator),
             "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    batch["attention_mask"][0, 8:] = 0
    return model, targets, batch


def _dora(model, targets, **params):
    model = copy.deepcopy(model)
    modeling.freeze(model)
    DoRA(DoRAParams(**params)).peftbench_inject(model, targets)
    return model


def _outputs(model, batch):
    out = model(**batch, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


def _peft_dora(base, targets, ours, **config):
    """HF PEFT's DoRA on a copy of ``base`` with ``ours``'s A, B and magnitude values."""
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, target_modules=[t.name for t in targets],
                                                            **config))
    with torch.no_grad():
        for t in targets:
            mine, their = ours.get_submodule(t.name), theirs.base_model.model.get_submodule(t.name)
            their.lora_A["default"].weight.copy_(mine.lora_A)
            their.lora_B["default"].weight.copy_(mine.lora_B)
            their.lora_magnitude_vector["default"].weight.copy_(mine.magnitude)
            assert their.scaling["default"] == pytest.approx(mine.scaling)
    return theirs


def _perturb(model, targets, seed=1):
    """Trained-looking adapters: random B (A is random already) and magnitudes off their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in targets:
            layer = model.get_submodule(t.name)
            layer.lora_B.normal_(0.0, 0.2, generator=generator)
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=generator))


def test_at_initialisation_the_output_equals_the_base_model(tiny):
    base, targets, batch = tiny
    ours = _dora(base, targets, r=4, alpha=8).eval()
    with torch.no_grad():
        for mine, reference in zip(_outputs(ours, batch), _outputs(base, batch)):
            assert torch.equal(mine, reference)  # m / ‖W‖ = 1 and B = 0: exactly the base output
    layer = ours.get_submodule(targets[0].name)
    assert isinstance(layer, DoRALinear)
    assert torch.equal(layer.magnitude, torch.linalg.vector_norm(layer.base.weight, dim=1))


def test_outputs_match_hf_peft_dora_on_the_same_weights(tiny):
    base, targets, batch = tiny
    pattern = {targets[0].name: 6, targets[5].name: 2}  # non-uniform ranks, as the budget solver makes
    ours = _dora(base, targets, r=4, alpha=8, rank_pattern=pattern)
    _perturb(ours, targets)
    theirs = _peft_dora(base, targets, ours, r=4, lora_alpha=8, rank_pattern=pattern)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        hidden, logits = _outputs(ours, batch)
        their_hidden, their_logits = _outputs(theirs, batch)
        base_hidden, _ = _outputs(base, batch)
    assert (hidden - base_hidden).abs().max() > 1e-2  # the adapters do change the output ...
    torch.testing.assert_close(hidden, their_hidden, atol=1e-5, rtol=0)  # ... exactly as PEFT's DoRA does
    torch.testing.assert_close(logits, their_logits, atol=1e-5, rtol=0)


def test_training_mode_with_dropout_matches_hf_peft(tiny):
    """With dropout active the rescaled ``W x`` sees the dropped input, as in PEFT: same masks (same RNG
    stream), same outputs."""
    base, targets, batch = tiny
    ours = _dora(base, targets, r=4, alpha=8, dropout=0.2)
    _perturb(ours, targets)
    theirs = _peft_dora(base, targets, ours, r=4, lora_alpha=8, lora_dropout=0.2)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    hidden, _ = _outputs(ours, batch)
    torch.manual_seed(5)
    their_hidden, _ = _outputs(theirs, batch)
    torch.testing.assert_close(hidden, their_hidden, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_match_hf_peft_so_the_norm_is_detached(dropout):
    """Gradients of A, B and m equal PEFT's, whose norm ‖W + s·BA‖ gets no gradient (the paper's §4.3); a
    norm that kept its graph would give B and m other gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(16, 24).requires_grad_(False)  # frozen base, as the host leaves it
    ours = DoRALinear(copy.deepcopy(holder.lin), r=4, alpha=8, dropout=dropout)
    theirs = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                                target_modules=["lin"]), copy.deepcopy(holder)).lin
    with torch.no_grad():
        ours.lora_B.normal_(0.0, 0.3)
        ours.magnitude.mul_(1 + 0.3 * torch.randn(24))
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    ours.train(), theirs.train()
    x, weights = torch.randn(7, 16), torch.randn(7, 24)
    torch.manual_seed(1)
    mine = ours(x)
    torch.manual_seed(1)
    their = theirs(x)
    torch.testing.assert_close(mine, their, atol=1e-6, rtol=1e-6)
    (mine * weights).sum().backward()
    (their * weights).sum().backward()
    for grad, their_grad in ((ours.magnitude.grad, theirs.lora_magnitude_vector["default"].weight.grad),
                             (ours.lora_A.grad, theirs.lora_A["default"].weight.grad),
                             (ours.lora_B.grad, theirs.lora_B["default"].weight.grad)):
        torch.testing.assert_close(grad, their_grad, atol=1e-5, rtol=1e-5)


def test_clean_input_switch_applies_dropout_to_the_low_rank_path_only():
    """``rescale_dropped_input: false``: y = m/‖W + s·BA‖ ⊙ (W x + s·B A dropout(x)) + b."""
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(16, 24).requires_grad_(False), r=4, alpha=8, dropout=0.5,
                       rescale_dropped_input=False).train()
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.3)
        layer.magnitude.mul_(1.2)
    x = torch.randn(7, 16)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)  # the same mask: the same RNG draw
    with torch.no_grad():
        weight, bias = layer.base.weight, layer.base.bias
        scale = layer.magnitude / torch.linalg.vector_norm(weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
        expected = scale * (x @ weight.T + layer.scaling * dropped @ layer.lora_A.T @ layer.lora_B.T) + bias
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_merged_layer_equals_the_adapted_layer(tiny):
    base, targets, _ = tiny
    ours = _dora(base, targets, r=4, alpha=8)
    _perturb(ours, targets)
    layer = ours.get_submodule(targets[3].name).eval()
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer.merged()(x), layer(x), atol=1e-5, rtol=1e-5)


def test_count_is_loras_plus_the_magnitudes_and_matches_injection(tiny):
    base, targets, _ = tiny
    params = DoRAParams(r=3, rank_pattern={targets[1].name: 5})
    counts = DoRA(params).peftbench_count_trainable(targets)
    lora = sum(params.rank_of(t.name) * (t.in_features + t.out_features) for t in targets)
    assert counts.final == counts.peak == counts.nonzero == lora + sum(t.out_features for t in targets)
    ours = _dora(base, targets, r=3, rank_pattern={targets[1].name: 5})
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == counts.final


def _config(model=None, budget_ranks="mixed", lora_rank=8):
    return parse_config({
        "tasks": ["toy"], "model": model or tiny_model_config(), "budget": {"lora_rank": lora_rank},
        "methods": [{"name": "dora", "params": {"budget_ranks": budget_ranks}}],
    })


@pytest.mark.parametrize("model, lora_rank", [
    (tiny_model_config(), 4),
    ({"name_or_path": "microsoft/deberta-v3-base"}, 8),  # shapes only: a meta model, offline
])
def test_budget_solver_meets_lora_budgets_within_tolerance(model, lora_rank):
    host = Host(plugins=["peftbench.testing"])
    config = _config(model, lora_rank=lora_rank)
    shapes = model_shapes(config)
    ((_, solved),) = solve_all(config, host, shapes).items()
    assert abs(solved.miss) <= config.budget.tolerance
    ranks = {solved.params.rank_of(t.name) for t in shapes.targets}
    assert ranks == {solved.params.r, solved.params.r + 1}  # mixed ranks: r or r + 1


def test_uniform_ranks_miss_a_deberta_budget_by_six_percent():
    """Why the solver mixes ranks: with one rank, the magnitudes push DoRA half a rank off LoRA r=8."""
    host = Host(plugins=["peftbench.testing"])
    config = _config({"name_or_path": "microsoft/deberta-v3-base"}, budget_ranks="uniform")
    config.budget.tolerance = 0.5
    ((_, solved),) = solve_all(config, host).items()
    assert solved.params.r == 8 and not solved.params.rank_pattern
    assert solved.miss == pytest.approx(0.0625)


def test_export_loads_into_hf_peft_with_identical_outputs(tiny, tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file

    base, targets, batch = tiny
    ours = _dora(base, targets, r=3, alpha=6, rank_pattern={targets[2].name: 4})
    _perturb(ours, targets)
    config, state_dict = DoRA(DoRAParams(r=3, alpha=6, rank_pattern={targets[2].name: 4})).peftbench_export_peft(
        ours)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(state_dict, str(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(_outputs(loaded, batch)[0], _outputs(ours.eval(), batch)[0], atol=1e-5, rtol=0)


def test_dora_is_registered_through_its_entry_point():
    host = Host()
    registered = host.methods["dora"]
    assert registered.obj is DoRA
    assert (registered.plugin.source, registered.plugin.package, registered.plugin.version) == \
        ("entry point", "peftbench-dora", peftbench_dora.__version__)


def test_the_example_config_runs_and_exports_through_the_cli(tmp_path, capsys, monkeypatch):
    """pip-installed plugin -> `peftbench plugins` -> `peftbench run` -> `peftbench export --check` (HF PEFT)."""
    monkeypatch.delenv("PEFTBENCH_PROGRESS", raising=False)
    db = tmp_path / "dora.sqlite"
    assert main(["plugins"]) == 0
    assert any(line.split()[:3] == ["method", "dora", "peftbench-dora"] for line in capsys.readouterr().out.splitlines())
    assert main(["run", str(EXAMPLE / "tiny.yaml"), "--db", str(db), "--no-progress",
                 "--set", "output.save_adapters=true", "--set", f"output.dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) finished" in out and "0 failed" in out
    store = Store(str(db))
    rows = {row["label"]: row for row in store.runs(status=None)}
    store.close()
    assert {label: row["status"] for label, row in rows.items()} == {"lora": "done", "dora": "done"}
    assert rows["dora"]["trainable"]["adapter"] == rows["lora"]["trainable"]["adapter"] == 3584  # matched budgets

    assert main(["export", rows["dora"]["run_id"], str(tmp_path / "export"), "--db", str(db), "--check",
                 "--plugin", "peftbench.testing"]) == 0
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    check = capsys.readouterr().out.splitlines()[-1]
    diff = float(check.split("max |Δlogit| ")[1].split(",")[0])
    assert diff < 1e-5 and "agree on 100.00%" in check, check
