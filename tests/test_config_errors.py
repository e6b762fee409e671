"""Bad configs: every one is a ConfigError (exit status 2) naming the file and line or the key path.

The fuzzer mutates a valid config (drops and renames keys, swaps values for wrong types, breaks the YAML)
and checks that loading it either gives a valid Config or an error that says where; a config that loads is
also checked against the plugins and budgets, which may only fail with a PeftbenchError.
"""

from __future__ import annotations

import copy
import random
import re
import textwrap

import huggingface_hub.constants
import pytest
import yaml

from peftbench.cli import main
from peftbench.config import Config, load_config
from peftbench.errors import BudgetError, ConfigError, PeftbenchError, PluginError
from peftbench.runner import make_host, solve_budgets
from peftbench.testing import tiny_model_config

VALID = {
    "name": "fuzz", "model": tiny_model_config(), "tasks": ["toy", "toy_pair"],
    "methods": [{"name": "lora", "label": "lora", "params": {"r": 4, "alpha": 8}, "train": {"lr": 1e-3},
                 "per_task": {"toy": {"params": {"alpha": 4}, "train": {"epochs": 1}}}}, "full"],
    "seeds": [0, 1], "budget": {"lora_rank": 4, "tolerance": 0.01},
    "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "max_length": 32, "max_steps": 8, "num_threads": 1},
    "per_task": {"toy": {"lr": 1e-3}}, "plugins": ["peftbench.testing"],
    "output": {"db": "results/fuzz.sqlite", "dir": "results/fuzz", "checkpoint": True},
}
WRONG_VALUES = [None, True, 0, -1, 2.5, float("nan"), float("inf"), "", "fast", "1e-3", [], [1, "a"], {},
                {"a": 1}, 10**30, "lora"]
YAML_DAMAGE = [":", "[", "]", "{", "}", "- ", ",", "'", '"', "&a", "*a", "!", "|", ">", "%", "@", "`", "\t",
               " !!python/object/apply:os.system [ls]", " ? [a, b]"]
#: the start of every message: the file, then its line (``c.yaml:12: ``) or a key path (``c.yaml: train.lr: ``)
LOCATED = re.compile(r"^c\.yaml(:\d+: |: <root>: |: [A-Za-z_][\w-]*(\[\d+\])?(\.[^\s:]+|\[\d+\])*: |: the config is empty)")


def _key_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _key_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from _key_paths(value, prefix + (i,))


def mutate_data(rng: random.Random, data: dict) -> str:
    """Drop, rename (typo) or retype one to three keys anywhere in the config."""
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_key_paths(data)))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key, action = path[-1], rng.choice(["drop", "rename", "retype", "retype"])
        if action == "drop":
            del parent[key]
        elif action == "rename" and isinstance(key, str):
            typo = rng.randrange(len(key) + 1)
            parent[key[:typo] + rng.choice("xs_") + key[typo + 1:]] = parent.pop(key)
        else:
            parent[key] = rng.choice(WRONG_VALUES)
    return yaml.safe_dump(data, sort_keys=False)


def mutate_text(rng: random.Random, text: str) -> str:
    """Break the YAML itself: delete, duplicate, re-indent, truncate a line or insert a stray token."""
    lines = text.splitlines()
    i = rng.randrange(len(lines))
    action = rng.choice(["delete", "duplicate", "indent", "insert", "truncate"])
    if action == "delete":
        del lines[i]
    elif action == "duplicate":
        lines.insert(i, lines[i])
    elif action == "indent":
        lines[i] = rng.choice([" ", "   ", "\t"]) + lines[i]
    elif action == "insert":
        at = rng.randrange(len(lines[i]) + 1)
        lines[i] = lines[i][:at] + rng.choice(YAML_DAMAGE) + lines[i][at:]
    else:
        lines = lines[:i]
    return "\n".join(lines) + "\n"


def test_fuzzed_configs_load_or_fail_naming_file_and_line_or_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a mutated model name must fail at once, not retry the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rng = random.Random(20240611)
    base = yaml.safe_dump(VALID, sort_keys=False)
    outcomes = {"valid": 0, "config error": 0, "checked": 0, "later error": 0}
    for i in range(400):
        text = mutate_text(rng, base) if i % 3 == 0 else mutate_data(rng, VALID)
        (tmp_path / "c.yaml").write_text(text)
        try:
            config = load_config("c.yaml")
        except ConfigError as exc:
            outcomes["config error"] += 1
            assert LOCATED.match(str(exc)), f"no file:line or key path in {str(exc)!r} for:\n{text}"
            continue
        except Exception as exc:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"{type(exc).__name__}: {exc} for:\n{text}")
        assert isinstance(config, Config)
        outcomes["valid"] += 1
        if outcomes["checked"] >= 60:  # names and budgets cost a (meta) model each: check a sample
            continue
        outcomes["checked"] += 1
        try:
            solve_budgets(config, make_host(config))
        except PeftbenchError as exc:
            outcomes["later error"] += 1
            assert str(exc).startswith("c.yaml") or "(c.yaml" in str(exc), str(exc)
        except Exception as exc:  # pragma: no cover
            pytest.fail(f"{type(exc).__name__}: {exc} for:\n{text}")
    # the fuzzer reached every outcome, many times
    assert min(outcomes.values()) >= 5, outcomes


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


GOOD = """\
name: t
model: {name_or_path: minilm, random_init: true, config_overrides: {num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64, num_attention_heads: 4}}
tasks: [toy]
methods:
  - name: lora
    params: {r: 4}
seeds: [0]
budget: {lora_rank: 4}
plugins: [peftbench.testing]
train:
  epochs: 1
"""


@pytest.mark.parametrize("change,expected", [
    (("  epochs: 1", "\tepochs: 1"), r"c\.yaml:11: YAML syntax error: found character '\\t'"),
    (("tasks: [toy]", "tasks: [toy"), r"c\.yaml:4: YAML syntax error"),
    (("  epochs: 1", "  epochs: 1\n  lr: .nan"), r"c\.yaml:12: train\.lr: expected a finite number, got nan"),
    (("  epochs: 1", "  epochs: 1\n  lr: fast"), r"c\.yaml:12: train\.lr: expected a number, got 'fast'"),
    (("  epochs: 1", "  epochs: 1\n  max_steps: -5"), r"c\.yaml:12: train\.max_steps: must be >= 1 \(or null\), got -5$"),
    (("  epochs: 1", "  epochs: 1\n  warmup_ratio: 1.5"), r"c\.yaml:12: train\.warmup_ratio: must be in \[0, 1\), got 1\.5$"),
    (("seeds: [0]", "seeds: 0"), r"c\.yaml:7: seeds: a number of seeds must be in 1\.\.10000, got 0"),
    (("seeds: [0]", "seeds: 1000000000"), r"c\.yaml:7: seeds: a number of seeds must be in 1\.\.10000"),
    (("seeds: [0]", "seeds: [3, 3]"), r"c\.yaml:7: seeds: repeated seed\(s\) \[3\]"),
    (("budget: {lora_rank: 4}", "budget: {lora_rank: 4, tolerance: -0.1}"), r"c\.yaml:8: budget\.tolerance: must be >= 0, got -0\.1$"),
    (("budget: {lora_rank: 4}", "bugdet: {lora_rank: 4}"), r"c\.yaml:8: bugdet: unknown key \(did you mean 'budget'\?\)"),
    (("    params: {r: 4}", "    parms: {r: 4}"), r"c\.yaml:6: methods\[0\]\.parms: unknown key \(did you mean 'params'"),
    (("seeds: [0]", "? [a, b]\n: 1"), r"c\.yaml:7: a key must be a plain value, got list"),
])
def test_bad_config_names_file_line_and_key(tmp_path, change, expected):
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, GOOD.replace(old, new)))


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(GOOD.encode().replace(b"name: t", b"name: t\xe9st"))
    with pytest.raises(ConfigError, match=r"c\.yaml:1: not UTF-8 text"):
        load_config(str(path))


@pytest.mark.parametrize("change,error,expected", [
    (("  - name: lora", "  - name: lroa"), PluginError,
     r"c\.yaml:5: methods\[0\]\.name: unknown method 'lroa' \(did you mean 'lora'"),
    (("tasks: [toy]", "tasks: [toy, toyy]"), PluginError, r"c\.yaml:3: tasks\[1\]: unknown task 'toyy' \(did you mean 'toy'"),
    (("plugins: [peftbench.testing]", "plugins: [peftbench.testing, no_such_plugin]"), PluginError,
     r"cannot load plugin 'no_such_plugin' \(\S*c\.yaml:9: plugins\)"),
])
def test_unknown_names_suggest_close_matches(tmp_path, change, error, expected):
    config_or_error = None
    with pytest.raises(error, match=expected):
        config_or_error = load_config(write(tmp_path, GOOD.replace(*change)))
        make_host(config_or_error)


@pytest.mark.parametrize("change,error,expected", [
    (("    params: {r: 4}", "    params: {r: four}"), ConfigError, r"c\.yaml:6: methods\[0\]\.params\.r: expected an integer, got 'four'"),
    (("    params: {r: 4}", "    params: {rank: 4}"), ConfigError, r"c\.yaml:6: methods\[0\]\.params\.rank: unknown key"),
    (("budget: {lora_rank: 4}", "budget: {params: 7}"), BudgetError,
     r"c\.yaml: budget: target 7 adapter parameters \(tolerance 1\.0%\) missed by:\n  lora \(toy\)"),
    (("hidden_size: 32", "hidden_size: 30"), ConfigError, r"c\.yaml:2: model: cannot build 'minilm'.*not a multiple"),
    (("hidden_size: 32", "hidden_size: wide"), ConfigError,
     r"c\.yaml:2: model\.config_overrides\.hidden_size: 'wide' refused by BertConfig"),
])
def test_params_and_budgets_fail_before_training(tmp_path, change, error, expected):
    config = load_config(write(tmp_path, GOOD.replace(*change)))
    with pytest.raises(error, match=expected):
        solve_budgets(config, make_host(config))


def test_cli_exits_2_on_every_kind_of_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's default output paths are relative
    cases = {
        "syntax": (GOOD.replace("tasks: [toy]", "tasks: [toy"), r"c\.yaml:4: YAML syntax error"),
        "type": (GOOD.replace("  epochs: 1", "  epochs: one"), r"c\.yaml:11: train\.epochs: expected an integer"),
        "method": (GOOD.replace("name: lora", "name: lroa"), r"unknown method 'lroa' \(did you mean 'lora'"),
        "budget": (GOOD.replace("{lora_rank: 4}", "{params: 7}"), r"budget: target 7 adapter parameters"),
    }
    for name, (text, expected) in cases.items():
        path = write(tmp_path, text)
        for command in (["run", path, "--no-progress"], ["run", path, "--dry-run"], ["budget", path]):
            assert main(command) == 2, (name, command)
            err = capsys.readouterr().err
            assert re.search(r"^peftbench: error: .*" + expected, err, re.S), (name, command, err)
    assert not (tmp_path / "results").exists()  # nothing was stored or trained


def test_unknown_hub_model_offline_fails_at_once_naming_the_overrides(monkeypatch):
    """An offline machine (the hub's host does not resolve) must not spend a minute retrying the network."""
    import socket

    from peftbench import modeling
    from peftbench.config import ModelConfig

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    modeling._hub_unreachable.cache_clear()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    try:
        assert modeling._hub_kwargs("some-org/some-model") == {"local_files_only": True}
        assert modeling._hub_kwargs(modeling.resolve_name("minilm")) == {}  # a local folder loads as usual
        with pytest.raises(ConfigError, match=r"--set model.name_or_path=.*PEFTBENCH_GLUE_DIR"):
            modeling.load_config(ModelConfig(name_or_path="some-org/some-model"), num_labels=2)
    finally:
        modeling._hub_unreachable.cache_clear()


TWO_METHODS = GOOD.replace("""    params: {r: 4}
""", """    params: {r: 4}
  - name: lora
    label: b
    params:
      r: 4
      alpha: 8
    per_task:
      toy:
        train: {epochs: 1}
""")


@pytest.mark.parametrize("change,sets,expected", [
    (("      r: 4\n", "      r: four\n"), [], r"c\.yaml:10: methods\[1\]\.params\.r: expected an integer, got 'four'$"),
    (("      alpha: 8", "      alhpa: 8"), [], r"c\.yaml:11: methods\[1\]\.params\.alhpa: unknown key \(did you mean 'alpha'\?\)$"),
    (("      alpha: 8", "      alpha: 8\n      dropout: 1.5"), [],  # LoRAParams.dropout: peftbench.fields.Dropout
     r"c\.yaml:12: methods\[1\]\.params\.dropout: must be in \[0, 1\), got 1\.5$"),
    (("train: {epochs: 1}", "train: {epochs: 0}"), [], r"c\.yaml:14: methods\[1\]\.per_task\.toy\.train\.epochs: must be >= 1, got 0$"),
    (("train: {epochs: 1}", "train: {epoch: 1}"), [], r"c\.yaml:14: methods\[1\]\.per_task\.toy\.train\.epoch: unknown key"),
    (("train: {epochs: 1}", "train: {lr: fast}"), [], r"c\.yaml:14: methods\[1\]\.per_task\.toy\.train\.lr: expected a number"),
    (("seeds: [0]", "seeds: [0]\nper_task:\n  TOY: {warmup_ratio: 2}"), [], r"c\.yaml:17: per_task\.toy\.warmup_ratio: must be in \[0, 1\), got 2$"),
    (("", ""), ["methods.b.params.r=x"], r"^--set methods\.b\.params\.r: methods\[1\]\.params\.r: expected an integer, got 'x'$"),
    (("", ""), ["methods.b.per_task.toy.params={r: 0}"], r"^--set methods\.b\.per_task\.toy\.params:1: "
                                                         r"methods\[1\]\.per_task\.toy\.params\.r: must be >= 1, got 0$"),
    (("", ""), ["train.epochs=0"], r"^--set train\.epochs: train\.epochs: must be >= 1, got 0$"),
])
def test_method_params_and_overrides_name_file_line_and_key(tmp_path, change, sets, expected):
    """Method params are checked against the plugin's Params dataclass when the host is made, with the line."""
    assert change[0] in TWO_METHODS
    with pytest.raises(ConfigError, match=expected):
        make_host(load_config(write(tmp_path, TWO_METHODS.replace(*change)), sets))


def test_params_are_checked_once_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    from peftbench import modeling, schema

    checked = []
    validator = schema._validator
    monkeypatch.setattr(schema, "_validator", lambda tp: checked.append(tp.__name__) or validator(tp))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the params were checked")

    monkeypatch.setattr(modeling, "load_model", no_model)
    monkeypatch.setattr(modeling, "preflight", no_model)
    path = write(tmp_path, TWO_METHODS.replace("      r: 4\n", "      r: -2\n"))
    for command in (["run", path, "--no-progress"], ["budget", path]):
        assert main(command) == 2
        assert re.search(r"c\.yaml:10: methods\[1\]\.params\.r: must be >= 1, got -2$", capsys.readouterr().err)
    monkeypatch.undo()
    config = load_config(write(tmp_path, TWO_METHODS))
    checked.clear()
    monkeypatch.setattr(schema, "_validator", lambda tp: checked.append(tp.__name__) or validator(tp))
    host = make_host(config)
    solve_budgets(config, host)  # uses the checked params
    assert checked == ["LoRAParams", "LoRAParams"]  # each method's params, once


def test_yaml_spellings_are_accepted_and_wrong_types_refused(tmp_path):
    config = load_config(write(tmp_path, GOOD.replace("  epochs: 1", "  epochs: 2.0\n  lr: 1e-3\n  head_lr: 1")
                               .replace("name: t", "name: 2024")))
    assert config.train.epochs == 2 and type(config.train.epochs) is int
    assert config.train.lr == 1e-3 and type(config.train.head_lr) is float and config.name == "2024"
    for bad, message in [("epochs: true", "train.epochs: expected an integer, got True"),
                         ("epochs: '3'", "train.epochs: expected an integer, got '3'"),
                         ("epochs: 2.5", "train.epochs: expected an integer, got 2.5"),
                         ("lr: on", "train.lr: expected a number, got True"),
                         ("lr: .inf", "train.lr: expected a finite number, got inf"),
                         ("compile: 1", "train.compile: expected true or false, got 1"),
                         ("compile: 'yes'", "train.compile: expected true or false, got 'yes'")]:
        with pytest.raises(ConfigError) as exc:
            load_config(write(tmp_path, GOOD.replace("  epochs: 1", f"  epochs: 1\n  {bad}".replace(
                "  epochs: 1\n  epochs", "  epochs"))))
        assert str(exc.value).endswith(f"c.yaml:{11 if bad.startswith('epochs') else 12}: {message}"), str(exc.value)


def test_every_error_is_reported_in_line_order(tmp_path):
    text = GOOD.replace("  epochs: 1", "  epochs: 1\n  precision: bf61\n  lr: fast").replace("seeds: [0]", "seeds: [x]")
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    lines = [line.split("c.yaml", 1)[1] for line in str(exc.value).splitlines()]
    assert lines == [":7: seeds[0]: expected an integer, got 'x'",
                     ":12: train.precision: expected one of 'auto' | 'fp32' | 'bf16' | 'fp16', got 'bf61' "
                     "(did you mean 'bf16'?)",
                     ":13: train.lr: expected a number, got 'fast'"]


def test_duplicate_label_names_the_line_of_its_second_use(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: dup\ntasks: [sst2]\nmethods:\n  - name: lora\n  - name: prilora\n"
                    "  - name: lora\n    params: {r: 4}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:6: methods\[2\]: label 'lora' is already methods\[0\]'s"):
        load_config(str(path))


def test_shared_method_params_are_declared_once():
    """Every built-in method's ``dropout`` (and rank, where it has an integer one) is peftbench.fields' type: one
    declaration, one check, one message for all of them."""
    import typing

    from peftbench.fields import Dropout, Rank
    from peftbench.host import Host
    from peftbench.schema import from_dict

    host = Host()
    for name in ("lora", "adalora", "prilora", "prunedlora"):
        hints = typing.get_type_hints(host.method(name).Params, include_extras=True)
        assert hints["dropout"] == Dropout, name
    assert typing.get_type_hints(host.method("lora").Params, include_extras=True)["r"] == Rank
    with pytest.raises(ConfigError, match=r"^methods\[0\]\.params\.dropout: must be in \[0, 1\), got 1$"):
        from_dict(host.method("prunedlora").Params, {"dropout": 1}, "methods[0].params")
