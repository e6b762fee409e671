"""Config: typed validation with file:line key paths, --set overrides, precedence of training overrides."""

import textwrap

import pytest

from peftbench.config import load_config, packaged_configs
from peftbench.errors import ConfigError

VALID = """\
name: t
model: {name_or_path: minilm}
tasks: [rte, MRPC]
methods:
  - lora
  - name: lora
    label: lora_r4
    params: {r: 4}
    train: {lr: 2.0e-3}
    per_task:
      rte: {train: {epochs: 9}, params: {alpha: 4}}
train:
  lr: 5e-4
  epochs: 2
per_task:
  rte: {lr: 1.0e-3, epochs: 5}
"""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_valid_config_and_precedence(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert config.tasks == ["rte", "mrpc"]
    assert [m.label for m in config.methods] == ["lora", "lora_r4"]
    assert config.train.lr == 5e-4  # YAML 1.1 reads 5e-4 as a string; it is coerced to a float
    plain, variant = config.methods
    assert config.train_for(plain, "rte").lr == 1e-3 and config.train_for(plain, "rte").epochs == 5
    assert config.train_for(plain, "mrpc").epochs == 2
    assert config.train_for(variant, "rte").lr == 2e-3 and config.train_for(variant, "rte").epochs == 9
    assert config.params_for(variant, "rte") == {"r": 4, "alpha": 4}
    assert config.params_for(variant, "mrpc") == {"r": 4}


@pytest.mark.parametrize("text,expected", [
    (VALID.replace("  epochs: 2", "  epohcs: 2"), r"c\.yaml:14: train\.epohcs: unknown key \(did you mean 'epochs'"),
    (VALID.replace("  lr: 5e-4", "  lr: fast"), r"c\.yaml:13: train\.lr: expected a number, got 'fast'"),
    (VALID.replace("    train: {lr: 2.0e-3}", "    train: {lr: [1]}"), r"c\.yaml:9: methods\[2\]|methods\[1\]\.train\.lr: expected a number"),
    (VALID.replace("rte: {lr: 1.0e-3, epochs: 5}", "rte: {lr: 1.0e-3, epoch: 5}"), r"c\.yaml:16: per_task\.rte\.epoch: unknown key \(did you mean 'epochs'"),
    (VALID.replace("tasks: [rte, MRPC]", "tasks: [rte, MRPC"), r"c\.yaml:\d+: YAML syntax error"),
    (VALID + "seeds: [a]\n", r"c\.yaml:17: seeds\[0\]: expected an integer"),
    (VALID + "name: again\n", r"c\.yaml:17: duplicate key 'name'"),
    (VALID.replace("  epochs: 2", "  epochs: 0"), r"c\.yaml:\d+: train\.epochs: must be >= 1, got 0"),
])
def test_errors_name_file_line_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_set_overrides(tmp_path):
    path = write(tmp_path, VALID)
    config = load_config(path, ["train.lr=3e-3", "methods.lora_r4.params.r=2", "seeds=[1, 2]", "model.random_init=true"])
    assert config.train.lr == 3e-3 and config.seeds == [1, 2] and config.model.random_init
    assert config.methods[1].params["r"] == 2
    with pytest.raises(ConfigError, match=r"--set train\.lrr: unknown key|train\.lrr: unknown key"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.lr"])


def test_packaged_configs_load():
    shipped = packaged_configs()
    assert {"quickstart", "glue_matched_budget"} <= set(shipped)
    for name in shipped:
        load_config(name)


def test_missing_config_suggests(tmp_path):
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("quickstrat")
