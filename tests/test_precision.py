"""Mixed precision and GPU-only paths, exercised on the CPU (bf16 autocast works there)."""

from __future__ import annotations

import math

import accelerate
import pytest
import torch
from helpers import CrashAtStep, compile_without_codegen
from peftbench.plugins.prilora.layer import PRILoRALinear
from peftbench.plugins.prunedlora.layer import PrunedLoRALinear
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftbench import assembly
from peftbench.checkpoint import _set_rng_state
from peftbench.errors import ConfigError
from peftbench.hookspecs import hookimpl
from peftbench.host import PluginInfo
from peftbench.lora import LoRALinear
from peftbench.runner import make_host, run_sweep
from peftbench.store import Store
from peftbench.testing import tiny_config
from peftbench.trainer import tf32_matmuls

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


def _sweep(tmp_path, methods, plugin=None, log=None, **kwargs):
    config = tiny_config(tmp_path, methods=methods, train=FAST, **kwargs)
    host = make_host(config)
    if plugin is not None:
        host.add_plugin(plugin, PluginInfo("observer", "object"))
    store = Store(config.output.db)
    summary = run_sweep(config, host, store, progress=False, log=log or (lambda *a: None))
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


def test_every_builtin_method_under_bf16_with_accumulation_evaluations_resume_and_compile(tmp_path, monkeypatch):
    """The CPU matrix: bf16 autocast, 2 micro-batches per step, evaluations inside epochs, a run interrupted in
    its second epoch and resumed from its epoch-end checkpoint by the next sweep; LoRA compiled as well."""
    compiled = compile_without_codegen(monkeypatch)
    train = {"precision": "bf16", "grad_accum": 2, "eval_every": 1, "epochs": 2}  # 2 steps per epoch
    methods = [{"name": name, "train": train} for name in ("lora", "prilora", "adalora", "full")]
    methods.append({"name": "prunedlora", "params": {"init_ratio": 2, "prune_k": 4, "prune_every": None},
                    "train": train})  # one pruning event, at step 0
    methods.append({"name": "lora", "label": "lora_compiled", "train": {**train, "compile": True}})
    kwargs = {"methods": methods, "output": {"checkpoint": True}}
    summary, runs = _sweep(tmp_path, plugin=CrashAtStep(3), **kwargs)  # in epoch 2, after its checkpoint
    assert {r["error"] for r in runs.values()} == {"RuntimeError: crash at step 3"}
    lines: list[str] = []
    summary, runs = _sweep(tmp_path, log=lines.append, **kwargs)
    failed = {label: r.get("error") for label, r in runs.items() if r["status"] != "done"}
    assert summary.ok and not failed, failed
    assert sum("resumed from" in line and "at epoch 1, step 2" in line for line in lines) == len(methods)
    assert len(compiled) == 2  # the compiled run, crashed and resumed
    for label, run in runs.items():
        assert run["steps"] == 4 and [h["step"] for h in run["history"] if "accuracy" in h] == [1, 2, 3, 4]
        assert all(math.isfinite(h["loss"]) for h in run["history"] if "loss" in h), label
    assert runs["lora_compiled"]["trainable"] == runs["lora"]["trainable"]


def test_tf32_is_a_validated_setting_recorded_in_the_run(tmp_path):
    with pytest.raises(ConfigError, match="tf32"):
        tiny_config(tmp_path, train={"tf32": "sometimes"})
    summary, runs = _sweep(tmp_path, [{"name": "lora", "params": {"r": 4}, "train": {"tf32": True}},
                                      {"name": "lora", "label": "lora_fp32", "params": {"r": 4}}])
    assert summary.ok and runs["lora"]["spec"]["train"]["tf32"] is True
    assert runs["lora_fp32"]["spec"]["train"]["tf32"] is False
    assert runs["lora"]["run_id"] != runs["lora_fp32"]["run_id"]  # never merged into one result
    assert torch.get_float32_matmul_precision() == "highest"  # no TF32 on the CPU, nothing left changed


def test_under_tf32_the_lora_layer_takes_the_unmerged_path():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    x = torch.randn(3, 16)
    assert layer.can_merge(x)
    with tf32_matmuls(True):
        assert torch.get_float32_matmul_precision() == "high" and not layer.can_merge(x)
    assert torch.get_float32_matmul_precision() == "highest" and layer.can_merge(x)
    with tf32_matmuls(False):
        assert layer.can_merge(x)


@pytest.mark.parametrize("method", [{"name": "lora", "params": {"r": 4}},
                                    {"name": "prilora", "params": {"prune_every": 2}}])
def test_gradient_checkpointing_gives_the_same_results(tmp_path, monkeypatch, method):
    enabled, enable = [], assembly.enable_checkpointing

    def spy(model):
        enable(model)
        new_name = hasattr(type(model), "is_activation_checkpointing")  # transformers 5 renamed it
        enabled.append(model.is_activation_checkpointing if new_name else model.is_gradient_checkpointing)

    monkeypatch.setattr(assembly, "enable_checkpointing", spy)
    methods = [method, {**method, "label": "checkpointed", "train": {"gradient_checkpointing": True}}]
    summary, runs = _sweep(tmp_path, methods)
    assert summary.ok and enabled == [True]
    plain, checkpointed = runs[method["name"]], runs["checkpointed"]
    assert plain["run_id"] != checkpointed["run_id"]
    losses = [[h["loss"] for h in run["history"] if "loss" in h] for run in (plain, checkpointed)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(checkpointed["final"], plain["final"], rtol=1e-5, atol=1e-6)
    assert checkpointed["trainable"] == plain["trainable"]


@pytest.mark.parametrize("make", [lambda: PRILoRALinear(nn.Linear(16, 8), r=4, alpha=8),
                                  lambda: PRILoRALinear(nn.Linear(16, 8), r=4, alpha=8, statistic="rank"),
                                  lambda: PrunedLoRALinear(nn.Linear(16, 8), r=4, alpha=8)],
                         ids=["prilora_input", "prilora_rank", "prunedlora"])
def test_forward_statistics_count_a_batch_once_under_gradient_checkpointing(make):
    """Checkpointing runs each forward again in backward: the statistics collected in it must not see it."""
    def statistic(layer):
        return layer.norm_ema if isinstance(layer, PRILoRALinear) else layer.input_energy

    torch.manual_seed(0)
    plain = make().train()
    checkpointed = make().train()
    checkpointed.load_state_dict(plain.state_dict())
    for layer in (plain, checkpointed):
        if isinstance(layer, PrunedLoRALinear):
            layer.input_energy = torch.zeros(layer.r)  # the activation criterion collects it
    for _ in range(2):
        x = torch.randn(3, 5, 16)
        plain(x).sum().backward()
        checkpoint(checkpointed, x, use_reentrant=False).sum().backward()
        torch.testing.assert_close(statistic(checkpointed), statistic(plain), rtol=0, atol=0)


class InfGradient:
    """Puts an inf into one AdaLoRA gradient at every step (what an fp16 overflow does)."""

    @hookimpl
    def peftbench_after_backward(self, model):
        grad = next(p.grad for n, p in model.named_parameters() if n.endswith(".E") and p.grad is not None)
        grad.view(-1)[0] = float("inf")


def test_adalora_fails_on_inf_gradients_and_stays_finite_when_the_scaler_skips_them(tmp_path, monkeypatch):
    methods = [{"name": "adalora"}]
    summary, runs = _sweep(tmp_path, methods, InfGradient())
    assert not summary.ok and "non-finite" in runs["adalora"]["error"]  # a failure, not a switched-off adapter
    step = accelerate.optimizer.AcceleratedOptimizer.step

    def scaler_like_step(self, closure=None):  # fp16's GradScaler: skip the step on inf/nan gradients
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._is_overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
        if not self._is_overflow:
            step(self, closure)

    monkeypatch.setattr(accelerate.optimizer.AcceleratedOptimizer, "step", scaler_like_step)
    summary, runs = _sweep(tmp_path / "skipped", methods, InfGradient())
    assert summary.ok and runs["adalora"]["status"] == "done", runs["adalora"].get("error")
