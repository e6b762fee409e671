"""`peftbench export`: HF PEFT's PeftModel.from_pretrained reproduces the run's dev predictions."""

import json
import re

import numpy as np
import pytest
import torch
from helpers import train_one

from peftbench.cli import main
from peftbench.data import load_task_data, make_loader
from peftbench.export import export_run, load_with_peft, rebuild
from peftbench.modeling import load_tokenizer
from peftbench.testing import tiny_config

pytest.importorskip("peft")


@pytest.mark.parametrize("params", [{"r": 4, "alpha": 8}, {"r": 4, "alpha": 8, "rank_pattern": {"value": 2}}])
def test_exported_lora_reproduces_dev_predictions(tmp_path, params):
    config = tiny_config(tmp_path, methods=[{"name": "lora", "params": params, "match_budget": False}],
                         train={"epochs": 2})
    host, run = train_one(config)
    out = export_run(run, tmp_path / "export", host)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and set(adapter_config["modules_to_save"]) == {"classifier", "bert.pooler"}
    if "rank_pattern" in params:
        assert set(adapter_config["rank_pattern"].values()) == {2}

    theirs = load_with_peft(run, out, host)
    ours = rebuild(run, host)[0]
    task = host.task("toy")
    tokenizer = load_tokenizer(config.model)
    data = load_task_data(task, "dev", None, tokenizer, config.train.max_length, None)
    predictions = []
    for batch in make_loader(data, 64, False, True, 0, tokenizer.pad_token_id, False):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            a, b = ours(**inputs).logits, theirs(**inputs).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        predictions.append((b.argmax(-1).numpy(), batch["labels"].numpy()))
    accuracy = np.mean(np.concatenate([p == y for p, y in predictions]))
    assert accuracy == pytest.approx(run["best"]["accuracy"])  # the best checkpoint's dev accuracy


def test_cli_export_errors(tmp_path, capsys):
    assert main(["export", "nope", str(tmp_path / "x"), "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_export_loads_the_runs_plugins_and_names_a_refused_export(tmp_path, capsys):
    """The toy task comes from the config's ``plugins:`` (no entry point): the stored spec keeps them, outside the
    run's identity, so ``peftbench export`` finds the task without ``--plugin``. LoRA with ``bias: lora_only``
    implements peftbench_export_peft but returns None: the error says so, not that the hook is missing."""
    import hashlib

    config = tiny_config(tmp_path, methods=[{"name": "lora", "params": {"r": 4, "bias": "lora_only"},
                                             "match_budget": False}], train={"epochs": 1})
    _, run = train_one(config)
    assert run["spec"]["plugins"] == ["peftbench.testing"]
    identity = {k: v for k, v in run["spec"].items() if k not in ("plugins", "data_dir")}  # stored beside it
    assert hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16] == run["run_id"]
    assert main(["export", run["run_id"], str(tmp_path / "x"), "--db", config.output.db]) == 2
    err = capsys.readouterr().err
    assert "unknown task" not in err and "does not implement" not in err
    assert re.search(r"method 'lora' cannot export this run in HF PEFT format: its peftbench_export_peft returned "
                     r"None for the run's params \{.*'bias': 'lora_only'", err), err
