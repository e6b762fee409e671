"""The trainer calls the run hooks at the documented points, in order, with the documented arguments."""

import torch

from peftbench.budget import solve_all
from peftbench.hookspecs import TrainState, hookimpl
from peftbench.host import PluginInfo
from peftbench.runs import expand
from peftbench.sweep import run_one
from peftbench.testing import tiny_config


class Recorder:
    def __init__(self):
        self.calls = []

    def _log(self, name, state=None, **extra):
        self.calls.append((name, state.step if state is not None else None, extra))

    @hookimpl
    def peftbench_train_start(self, model, state):
        assert isinstance(state, TrainState) and isinstance(state.optimizer, torch.optim.Optimizer)
        self._log("train_start", state, total=state.total_steps)

    @hookimpl
    def peftbench_extra_loss(self, model, state):
        self._log("extra_loss", state)
        return None

    @hookimpl
    def peftbench_after_backward(self, model, state):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        self._log("after_backward", state, has_grad=all(g is not None for g in grads))

    @hookimpl
    def peftbench_after_optimizer_step(self, model, state):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        self._log("after_optimizer_step", state, has_grad=all(g is not None for g in grads))

    @hookimpl
    def peftbench_on_evaluate(self, model, state, metrics):
        self._log("on_evaluate", state, metrics=dict(metrics))

    @hookimpl
    def peftbench_train_end(self, model, state):
        self._log("train_end", state)

    @hookimpl
    def peftbench_report(self, model, state):
        self._log("report", state)
        return {"recorded_calls": len(self.calls)}


def _spec(host, tmp_path, **train):
    config = tiny_config(tmp_path, train={"epochs": 2, "batch_size": 32, "log_every": 1, **train})
    (spec,) = expand(config, solve_all(config, host))
    return spec


def _run(host, tmp_path, **train):
    return run_one(_spec(host, tmp_path, **train), host, progress=False)


def test_hooks_called_in_documented_order_with_arguments(host, tmp_path):
    recorder = Recorder()
    host.add_plugin(recorder, PluginInfo("recorder", "object"))
    result = _run(host, tmp_path)
    names = [c[0] for c in recorder.calls]
    steps_per_epoch = 256 // 32
    total = 2 * steps_per_epoch
    assert names[0] == "train_start" and recorder.calls[0][2]["total"] == total
    assert names[-3:] == ["train_end", "on_evaluate", "report"]  # the final evaluation follows train_end
    per_step = [n for n in names if n in ("extra_loss", "after_backward", "after_optimizer_step")]
    assert per_step == ["extra_loss", "after_backward", "after_optimizer_step"] * total
    # state.step is the index of the step being taken (after_backward) or just taken (after_optimizer_step)
    assert [c[1] for c in recorder.calls if c[0] == "after_backward"] == list(range(total))
    assert [c[1] for c in recorder.calls if c[0] == "after_optimizer_step"] == list(range(total))
    assert all(c[2]["has_grad"] for c in recorder.calls if c[0] in ("after_backward", "after_optimizer_step"))
    evals = [c for c in recorder.calls if c[0] == "on_evaluate"]
    assert [c[1] for c in evals] == [steps_per_epoch, total]  # each epoch end; the last after train_end
    assert "accuracy" in evals[0][2]["metrics"]
    assert result.method_report["recorded_calls"] == len(recorder.calls)


def test_gradient_accumulation_calls_extra_loss_per_micro_batch(host, tmp_path):
    recorder = Recorder()
    host.add_plugin(recorder, PluginInfo("recorder", "object"))
    _run(host, tmp_path, epochs=1, batch_size=16, grad_accum=2)
    names = [c[0] for c in recorder.calls]
    # 230 of the toy task's 256 examples train (26 are the validation split): 15 micro-batches, 8 steps
    assert names.count("extra_loss") == 15 and names.count("after_backward") == 8


def test_extra_loss_is_added_to_the_task_loss(host, tmp_path):
    class Penalty:
        @hookimpl
        def peftbench_extra_loss(self, model, state):
            return torch.tensor(float("nan"))

    host.add_plugin(Penalty(), PluginInfo("penalty", "object"))
    import pytest

    from peftbench.trainer import Diverged

    with pytest.raises(Diverged):
        _run(host, tmp_path, epochs=1)


def test_methods_without_step_hooks_trigger_no_hook_calls(host, tmp_path):
    spec = _spec(host, tmp_path, epochs=1)
    called = []
    undo = host.pm.add_hookcall_monitoring(lambda name, impls, kwargs: called.append(name), lambda *a: None)
    try:
        run_one(spec, host, progress=False)
    finally:
        undo()
    # LoRA needs no per-step hook: the loop makes no hook call at all; after it, its report (measured counts)
    # and the export that sizes the adapter
    assert called == ["peftbench_inject", "peftbench_report", "peftbench_export_peft"]
