"""Mixed precision and GPU-only paths, exercised on the CPU (bf16 autocast works there)."""

from __future__ import annotations

import accelerate
import pytest
import torch
from peftbench.plugins.prilora.layer import PRILoRALinear
from torch import nn

from peftbench.checkpoint import _set_rng_state
from peftbench.hookspecs import hookimpl
from peftbench.host import PluginInfo
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store
from peftbench.testing import tiny_config

FAST = {"epochs": 1, "batch_size": 16, "max_train_samples": 64, "max_eval_samples": 32, "log_every": 2,
        "num_threads": 1}


def test_prilora_statistics_stay_fp32_under_bf16_autocast():
    layer = PRILoRALinear(nn.Linear(16, 8), r=4, alpha=8).train()
    x = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        layer(x)  # the second forward folds into the average: this is what failed
    assert layer.norm_ema.dtype == torch.float32 and torch.isfinite(layer.norm_ema).all()
    # fp32 rounding only (a bf16 sum would be off by ~1e-2 relative)
    torch.testing.assert_close(layer.norm_ema, x.reshape(-1, 16).norm(dim=0), rtol=1e-6, atol=1e-6)


def _sweep(tmp_path, methods, plugin=None):
    config = tiny_config(tmp_path, methods=methods, train=FAST)
    host = make_host(config)
    if plugin is not None:
        host.add_plugin(plugin, PluginInfo("observer", "object"))
    store = Store(config.output.db)
    summary = run_sweep(config, host, store, progress=False, log=lambda *a: None)
    return summary, {r["label"]: r for r in store.runs(status=None)}


def test_a_sweep_that_changes_precision_between_runs_finishes(tmp_path):
    methods = [{"name": "lora", "label": "lora_fp32", "params": {"r": 4}, "train": {"precision": "fp32"}},
               {"name": "lora", "label": "lora_bf16", "params": {"r": 4}, "train": {"precision": "bf16"}},
               {"name": "prilora", "label": "prilora_bf16", "train": {"precision": "bf16"}},
               {"name": "lora", "label": "lora_fp32_again", "params": {"r": 4}, "train": {"precision": "fp32"}}]
    summary, runs = _sweep(tmp_path, methods)
    assert summary.ok and {r["status"] for r in runs.values()} == {"done"}, [r.get("error") for r in runs.values()]
    assert runs["lora_fp32"]["best"] == runs["lora_fp32_again"]["best"]  # no state carried over between runs


class StepCounter:
    steps = 0

    @hookimpl
    def peftbench_after_optimizer_step(self, state):
        StepCounter.steps += 1


def test_method_updates_skip_steps_the_grad_scaler_skipped(tmp_path, monkeypatch):
    StepCounter.steps = 0
    summary, _ = _sweep(tmp_path, None, StepCounter())
    taken = StepCounter.steps
    assert summary.ok and taken > 0
    # every step overflowed (as fp16 with inf gradients): no statistics update may see its gradients
    monkeypatch.setattr(accelerate.Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    StepCounter.steps = 0
    summary, _ = _sweep(tmp_path / "skipped", None, StepCounter())
    assert summary.ok and StepCounter.steps == 0


def test_resume_with_fewer_visible_gpus_restores_those_and_says_so(monkeypatch):
    restored, messages = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    import numpy as np

    kind, keys, pos, gauss, cached = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8)] * 2,
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, gauss, cached],
           "python": __import__("random").getstate()}
    _set_rng_state(rng, messages.append)
    assert restored == [0] and "2 GPU(s), 1 visible" in messages[0]


@pytest.mark.parametrize("precision", ["bf16"])
def test_every_builtin_method_trains_under_bf16_autocast(tmp_path, precision):
    methods = [{"name": name, "train": {"precision": precision}} for name in ("lora", "prilora", "adalora", "full")]
    methods.append({"name": "prunedlora", "params": {"init_ratio": 2, "prune_every": None},  # 2 events in 12 steps
                    "train": {"precision": precision, "epochs": 3}})
    summary, runs = _sweep(tmp_path, methods)
    failed = {label: r.get("error") for label, r in runs.items() if r["status"] != "done"}
    assert summary.ok and not failed, failed
