"""The speed benchmark runs end to end, its pieces measure what they claim, and the fast LoRA path is exact.

No timing assertions: timings on a shared CPU are noise at this size.
"""

import sys
from pathlib import Path

import pytest
import torch

from peftbench import modeling
from peftbench.config import ModelConfig
from peftbench.testing import tiny_model_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ lives beside the package, like `python -m benchmarks.bench`

bench = pytest.importorskip("benchmarks.bench")
common = pytest.importorskip("benchmarks.common")


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.delenv("PEFTBENCH_PROGRESS", raising=False)


def test_bench_runs_end_to_end_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "benchmarks.md"
    rc = bench.main(["--quick", "--task", "toy_pair", "--threads", "1", "--seq-lengths", "16", "--ranks", "4",
                     "--methods", "lora,hf_peft_lora,floor,prunedlora,no_such_method", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "skipped no_such_method: not installed" in printed
    report = out.read_text()
    for section in ("## Machine", "## Setup", "## Checks", "## Step time, throughput and memory", "Memory by part",
                    "## Dynamic padding", "## How cost grows", "Sequence length", "Rank (the budget"):
        assert section in report, section
    def rows_of(section):
        text = report.split(section, 1)[1].split("\n## ", 1)[0]
        rows = {}
        for line in text.splitlines():  # the section's first table wins
            if line.startswith("| "):
                rows.setdefault(line.split("|")[1].strip(), line)
        return rows

    rows = rows_of("## Checks")
    for check in ("LoRA ≤ 0.95× HF PEFT LoRA", "LoRA ≤ 1.10× the floor",
                  "PrunedLoRA after compaction ≤ 1.10× LoRA at the final rank", "LoRA peak memory ≤ HF PEFT LoRA's"):
        assert "meets" in rows[check] or "MISSES" in rows[check], rows[check]  # measured, whatever the verdict
    assert "not measured (prilora: not run)" in rows["PRILoRA ≤ 1.05× LoRA"]
    assert "not measured" in rows["AdaLoRA ≤ 0.8× HF PEFT AdaLoRA"]
    padding_row = next(v for k, v in rows.items() if k.startswith("Epoch with dynamic padding"))
    assert "meets" in padding_row or "MISSES" in padding_row
    assert "`no_such_method`: not installed" in report
    # PrunedLoRA is timed only after its pruning event (step 1) and the step after it: 1 of 4 steps
    prunedlora_row = [c.strip() for c in rows_of("## Step time")["prunedlora"].split("|")]
    assert prunedlora_row[3] == "4.00" and prunedlora_row[6] == "1"  # mean final rank (r=4), steps timed


def test_skipped_and_discovered_methods():
    setup = bench.Setup(model=tiny_model_config(), model_name="tiny", task="toy_pair", batch_size=8, max_length=16,
                        device="cpu", precision="fp32", threads=1, compile=False, budget_rank=4)
    methods, skipped = bench.available_methods(setup, None)
    assert {"lora", "full", "floor", "hf_peft_lora", "hf_peft_adalora"} <= set(methods)
    assert methods.index("lora") < methods.index("floor")  # the methods first, in its order
    _, skipped = bench.available_methods(setup, ["lora", "nope"])
    assert skipped == {"nope": "not installed (no plugin registers it)"}


def test_checks_compare_medians_and_memory_against_targets():
    stats = {name: {"median_step_s": t, "median_cpu_step_s": t / 2, "peak_mem_bytes": m} for name, t, m in [
        ("lora", 0.9, 100), ("hf_peft_lora", 1.0, 120), ("floor", 0.8, 90), ("prilora", 1.0, 100)]}
    rows = {row[0]: row for row in bench.checks(stats, {"dynamic": 1.0, "fixed": 2.5}, {"adalora": "not installed"})}
    assert rows["LoRA ≤ 0.95× HF PEFT LoRA"][1:] == ["0.900×", "≤ 0.95×", "meets", "0.900×", "0.800×"]
    assert rows["LoRA ≤ 1.10× the floor"][1:] == ["1.125×", "≤ 1.10×", "MISSES", "1.125×", "1.000×"]
    assert rows["PRILoRA ≤ 1.05× LoRA"][3] == "MISSES"
    assert rows["PRILoRA ≤ 1.05× LoRA"][5] == "0.889×"  # the floor's step over LoRA's: the best any method could do
    assert rows["LoRA peak memory ≤ HF PEFT LoRA's"][1] == "0.833×"
    assert rows["AdaLoRA ≤ 0.8× HF PEFT AdaLoRA"][3] == ("not measured (adalora: not installed, "
                                                         "hf_peft_adalora: not run)")
    padding = next(row for name, row in rows.items() if name.startswith("Epoch"))
    assert padding[1:4] == ["2.50×", "≥ 2.00×", "meets"]


def _tiny_model():
    mc = ModelConfig(**tiny_model_config())
    model = modeling.load_model(mc, num_labels=2, seed=0)
    head = modeling.head_modules(mc, model)
    modeling.freeze(model)
    return model, head


def test_floor_runs_backward_through_every_layer_and_trains_no_base_weight():
    from benchmarks.peft_baselines import FrozenFloor

    model, head = _tiny_model()
    FrozenFloor().peftbench_inject(model)
    modeling.unfreeze_head(model, head)
    seen = {}
    first_block = model.bert.encoder.layer[0].attention.self.query
    first_block.register_full_backward_hook(lambda m, grad_in, grad_out: seen.update(grad=grad_in[0]))
    ids = torch.randint(1000, 2000, (2, 7))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
    assert seen["grad"] is not None  # backward reached the first block's input
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == modeling.head_parameter_names(model, head)


def test_memory_probe_accounts_weights_gradients_adam_and_activations():
    config = common.bench_config([{"name": "lora", "params": {"r": 4, "alpha": 8}}, {"name": "floor"}],
                                 task="toy_pair", steps=2, batch_size=8, max_length=16, model=tiny_model_config(),
                                 device="cpu", budget_rank=4, num_threads=1)
    stats = common.run_interleaved(config, rounds=1, warmup=0, probe_memory=True)
    lora, floor = stats["lora"]["memory"], stats["floor"]["memory"]
    assert lora["params"] - floor["params"] == stats["lora"]["adapter"] * 4  # fp32 adapter weights
    for m in (lora, floor):
        assert m["optimizer"] == 2 * m["grads"]  # AdamW: two fp32 moments per trainable weight
        assert m["activations"] > 0
        assert m["total"] == m["params"] + m["grads"] + m["optimizer"] + m["activations"]
    assert stats["lora"]["mem_kind"] == "cpu_train_state_estimate"
    assert stats["lora"]["peak_mem_bytes"] == lora["total"]


# --- the pair probe (benchmarks/pair_probe.py) -----------------------------------------------------------


def test_pair_probe_pools_tokens_without_padding_and_builds_every_feature():
    from transformers import AutoTokenizer, BertConfig, BertModel

    from benchmarks.pair_probe import encode, features
    from peftbench.task import Split

    tokenizer = AutoTokenizer.from_pretrained(modeling.resolve_name("minilm"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)).eval()
    short, long = "a cat", "a much longer sentence about a cat on a mat"
    cls_batch, mean_batch = encode(model, tokenizer, [short, long], None)  # `short` is padded in this batch
    cls_alone, mean_alone = encode(model, tokenizer, [short], None)
    assert torch.allclose(torch.from_numpy(mean_batch[:1]), torch.from_numpy(mean_alone), atol=1e-5)
    assert torch.allclose(torch.from_numpy(cls_batch[:1]), torch.from_numpy(cls_alone), atol=1e-5)
    split = Split([[short, long], [long, short]], [0.0, 1.0], "<test>")
    feats = features(model, tokenizer, split)
    assert feats["bi [u, v, |u-v|, u*v]"].shape == (2, 4 * 32)
    # the pairs are the same two sentences swapped: the cosine of u and v is the same for both
    assert abs(feats["bi cosine"][0, 0] - feats["bi cosine"][1, 0]) < 1e-5
    assert feats["cross [CLS]"].shape == feats["cross mean"].shape == (2, 32)


@pytest.mark.slow  # about a minute on 2 shared cores
def test_gpu_setup_runs_on_the_cpu(tmp_path, capsys):
    """``--gpu --device cpu --quick``: the GPU code path (DeBERTa shape, bf16 autocast) to the end, with the
    methods that broke under bf16 (PRILoRA's statistics, DoRA's fp32 magnitude in DeBERTa's attention)."""
    out = tmp_path / "gpu.md"
    rc = bench.main(["--gpu", "--device", "cpu", "--quick", "--threads", "1", "--task", "toy_pair",
                     "--methods", "lora,prilora,dora", "--seq-lengths", "16", "--ranks", "4", "--out", str(out)])
    assert rc == 0
    report = out.read_text()
    assert "DeBERTa-v3-base shape" in report and "bf16" in report
    assert "## How cost grows" in report
    assert "## TF32 vs the exact merged path" in report and bench.TF32_ON_CPU in report  # not measurable here


def test_side_by_side_runs_differ_only_in_the_compared_setting():
    eager, compiled = bench.variant_entries("compile", 8, 10)
    assert (eager["label"], eager["train"]["compile"], compiled["label"], compiled["train"]["compile"]) == \
        ("eager", False, "compiled", True)
    exact, tf32 = bench.variant_entries("tf32", 8, 10)
    assert exact["train"] == {"tf32": False, "precision": "fp32"} and tf32["train"] == {"tf32": True, "precision": "fp32"}
    assert {k: v for k, v in exact.items() if k not in ("label", "train")} == \
        {k: v for k, v in tf32.items() if k not in ("label", "train")}


def test_compare_compile_times_both_runs_and_reports_the_ratio(tmp_path, capsys, monkeypatch):
    from helpers import compile_without_codegen

    compiled = compile_without_codegen(monkeypatch)  # inductor takes minutes here: same tracing, no codegen
    out = tmp_path / "compile.md"
    rc = bench.main(["--quick", "--compare-compile", "--sections", "", "--task", "toy_pair", "--threads", "1",
                     "--out", str(out)])
    assert rc == 0 and len(compiled) == 1  # one of the two runs compiled
    report = out.read_text()
    section = report.split("## torch.compile, side by side", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"eager", "compiled"} and "1.000×" in rows["eager"]
    assert "tf32" not in capsys.readouterr().out  # the TF32 row belongs to --gpu
