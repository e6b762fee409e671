"""`train.compile`: a compiled run has the names, counts, reports and exports of an uncompiled one, and the LoRA
layers trace without graph breaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compile_without_codegen
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters

from peftbench.cli import main
from peftbench.lora import LoRALinear
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store
from peftbench.testing import tiny_config

FAST = {"epochs": 1, "batch_size": 16, "max_train_samples": 32, "max_eval_samples": 16, "num_threads": 1}


@pytest.fixture
def fast_compile(monkeypatch):
    return compile_without_codegen(monkeypatch)


def _runs(tmp_path, methods):
    config = tiny_config(tmp_path, methods=methods, train=FAST)
    store = Store(config.output.db)
    summary = run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
    runs = {r["label"]: r for r in store.runs(status=None)}
    assert summary.ok, [r.get("error") for r in runs.values()]
    return config, runs


def test_a_compiled_run_has_the_names_counts_and_export_of_an_uncompiled_one(tmp_path, fast_compile):
    lora = {"name": "lora", "params": {"r": 4, "alpha": 8}}
    config, runs = _runs(tmp_path, [{**lora, "label": "eager"}, {**lora, "label": "compiled", "train": {"compile": True}}])
    assert len(fast_compile) == 1  # the compiled run did compile
    eager, compiled = runs["eager"], runs["compiled"]
    assert compiled["trainable"] == eager["trainable"] and compiled["trainable"]["adapter"] == 3584
    names = [sorted(load_file(Path(r["artifacts"]) / "trainable.safetensors")) for r in (eager, compiled)]
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])
    out = tmp_path / "export"
    assert main(["export", compiled["run_id"], str(out), "--db", config.output.db, "--check",
                 "--plugin", "peftbench.testing"]) == 0
    assert (out / "adapter_config.json").exists()


def test_adalora_rank_report_of_a_compiled_run_has_the_module_names(tmp_path, fast_compile):
    adalora = {"name": "adalora", "params": {"init_ratio": 2.0}}
    _, runs = _runs(tmp_path, [{**adalora, "label": "eager"},
                               {**adalora, "label": "compiled", "train": {"compile": True}}])
    ranks = [runs[label]["method_report"]["ranks"] for label in ("eager", "compiled")]
    assert ranks[0] and set(ranks[0]) == set(ranks[1])


class TwoAdapters(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = LoRALinear(nn.Linear(16, 16), r=4, alpha=8)
        self.b = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).sum()


@pytest.mark.parametrize("train", [True, False])
def test_lora_layers_compile_without_graph_breaks(train):
    torch._dynamo.reset()
    counters.clear()
    model = TwoAdapters().train(train)
    with torch.no_grad():  # B non-zero: the adapters contribute
        model.a.lora_B.normal_()
        model.b.lora_B.normal_()
    x = torch.randn(2, 3, 16)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))
    if train:
        compiled(x).backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
