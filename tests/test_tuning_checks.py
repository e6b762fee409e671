"""Issue #31's tuning-grid probes: every grid key reaches the run or is refused, a grid cannot bypass the
precision rule, duplicate values and an infeasible hold-out are refused before any training (exit 2, file:line)."""

from pathlib import Path

import pytest

from peftbench.cli import main

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
name: tuned
model: {{name_or_path: minilm, random_init: true, config_overrides: {{num_hidden_layers: 1, hidden_size: 32,
  intermediate_size: 64, num_attention_heads: 4}}{dtype}}}
tasks: [toy]
plugins: [peftbench.testing]
budget: {{lora_rank: 4}}
train: {{eval_every: 2}}
methods:
  - name: {method}
    params: {params}
tune:
  holdout: {holdout}
  seeds: [0]
  grid:
    {key}: {values}
"""


def _dry_run(tmp_path, capsys, method="lora", params="{r: 4}", key="train.lr", values="[1.0e-4, 3.0e-4]",
             holdout=0.2, dtype=""):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(method=method, params=params, key=key, values=values, holdout=holdout,
                                  dtype=dtype))
    code = main(["run", str(path), "--dry-run"])
    return code, capsys.readouterr()


@pytest.mark.parametrize("method, params, key, values, message", [
    # PrunedLoRA's init_ratio only feeds the solved init_r: both points trained init_r=16 (issue #31, item 3)
    ("prunedlora", "{init_ratio: 4, prune_every: null, prune_k: 1}", "params.init_ratio", "[2, 4]",
     "changes prunedlora's trainable count"),
    # LoRA's r is solved to the budget: a grid over it would train r=4 twice
    ("lora", "{r: 4}", "params.r", "[4, 2]", "lora's budget solver sets what this value would change"),
    ("adalora", "{}", "params.init_r", "[12, 16]", "changes adalora's trainable count"),
])
def test_a_grid_key_that_cannot_reach_the_run_is_refused(tmp_path, capsys, method, params, key, values, message):
    code, out = _dry_run(tmp_path, capsys, method=method, params=params, key=key, values=values)
    assert code == 2 and "c.yaml:15: tune.grid: " in out.err and message in out.err, out.err


@pytest.mark.parametrize("method, params, key, values", [
    ("lora", "{r: 4}", "params.alpha", "[8, 16]"),
    ("prunedlora", "{init_ratio: 4, prune_every: null, prune_k: 1}", "params.prune_k", "[1, 2]"),
    ("prilora", "{alpha: 16}", "params.alpha", "[8, 16]"),
    ("adalora", "{}", "params.gamma", "[0.1, 0.5]"),
])
def test_an_accepted_grid_key_changes_the_tuning_runs(tmp_path, capsys, method, params, key, values):
    """A key the grid accepts reaches the run: its points are two different runs (ids) with the value set."""
    code, out = _dry_run(tmp_path, capsys, method=method, params=params, key=key, values=values)
    assert code == 0, out.err
    lines = [line for line in out.out.splitlines() if " toy " in line and "seed=" in line and "after tuning" not in line]
    ids = {line.split()[0] for line in lines}
    assert len(lines) == 2 and len(ids) == 2, out.out
    name = key.split(".", 1)[1]
    assert all(f"{name}=" in line for line in lines)


def test_a_grid_cannot_bypass_the_precision_rule(tmp_path, capsys):
    """bf16 weights train under bf16 autocast: a grid value fp32 for train.precision is refused where it is
    written, before the run fails with a dtype error (issue #31, item 5)."""
    code, out = _dry_run(tmp_path, capsys, key="train.precision", values="[bf16, fp32]", dtype=", dtype: bf16")
    assert code == 2 and "c.yaml:15: tune.grid.train.precision: bf16 weights" in out.err
    assert "must be bf16 or auto, not fp32" in out.err


def test_duplicate_grid_values_are_refused(tmp_path, capsys):
    code, out = _dry_run(tmp_path, capsys, values="[1.0e-4, 1.0e-4]")
    assert code == 2 and "c.yaml:15: tune.grid.train.lr: 0.0001 listed more than once" in out.err, out.err


@pytest.mark.parametrize("holdout", [0.999, 0.001])
def test_an_infeasible_holdout_is_refused_before_training(tmp_path, capsys, holdout):
    code, out = _dry_run(tmp_path, capsys, holdout=holdout)
    assert code == 2 and "c.yaml:12: tune.holdout: " in out.err and "each part needs at least" in out.err, out.err


def test_a_tuning_runs_selection_split_that_cannot_fit_is_refused_before_training(tmp_path, capsys):
    """tune.holdout 0.99 of toy's 256 examples leaves 2 to train on, one per class: enough for the hold-out,
    but the tuning run's own selection split (train.validation_size) would leave one example, one class."""
    code, out = _dry_run(tmp_path, capsys, holdout=0.99)
    assert code == 2, out.err
    assert "c.yaml:7: train.validation_size: the tuning runs (tune.holdout 0.99 of 256) of toy train on 2 " in out.err
    assert "each part needs at least 2 (one per class" in out.err


def test_max_length_beyond_the_positions_fails_the_dry_run_naming_its_line(tmp_path, capsys):
    """Issue #31, item 9: it passed --dry-run, and the run's message had an empty line number."""
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(method="lora", params="{r: 4}", key="train.lr", values="[1.0e-4, 3.0e-4]",
                                  holdout=0.2, dtype="").replace(
        "train: {eval_every: 2}", "train: {eval_every: 2, max_length: 1024}"))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "c.yaml:7: train.max_length: 1024 (lora on toy) exceeds the 512-token position limit" in err, err


GSM8K = REPO / ".." / "shared" / "gsm8k"


@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="GSM8K data (../shared/gsm8k) not present")
def test_a_prompt_that_cannot_fit_fails_the_dry_run(capsys):
    """Issue #31, item 9: a GSM8K prompt longer than train.max_length passed --dry-run."""
    code = main(["run", str(REPO / "configs" / "tiny_gsm8k.yaml"), "--dry-run", "--set", "train.max_length=16",
                 "--set", f"data_dir={GSM8K}"])
    err = capsys.readouterr().err
    assert code == 2 and "train.max_length: 16 is too short for task gsm8k" in err and "example 0" in err, err
