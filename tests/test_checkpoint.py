"""The checkpoint owns a run's tensor I/O: the whole loop state, shape validation before anything changes,
and the resizable-module protocol (a layer that takes a saved shape itself in ``_load_from_state_dict``)."""

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from peftbench.checkpoint import Checkpoint, run_tensors
from peftbench.host import Host
from peftbench.trainer import LoopState


class Resizable(nn.Module):
    """Follows the protocol: declares peftbench_resizable and resizes its parameter in place on load."""

    peftbench_resizable = True

    def __init__(self, r: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(r, 4))
        self.register_buffer("seen", torch.zeros(r))  # persistent, resized with the rank
        self.register_buffer("calls", torch.zeros(()), persistent=False)  # training state, not in state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "a")
        if saved is not None and saved.shape != self.a.shape:
            self.a.data = torch.empty_like(saved)  # the same Parameter object: the optimizer keeps it
            self.seen = torch.empty_like(state_dict[prefix + "seen"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Fixed(nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, 4))
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)


def _run(model: nn.Module, **loop) -> LoopState:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return LoopState(step=0, total_steps=10, epoch=0, optimizer=optimizer, lr_scheduler=scheduler,
                     accelerator=Accelerator(cpu=True), seed=0, running_loss=torch.zeros(()),
                     new_tokens=torch.zeros((), dtype=torch.long), **loop)


def _train(model: nn.Module, state: LoopState, steps: int) -> None:
    for _ in range(steps):
        loss = sum((p ** 2).sum() for p in model.parameters() if p.requires_grad)
        loss.backward()
        state.optimizer.step()
        state.lr_scheduler.step()
        state.optimizer.zero_grad()
        state.running_loss += loss.detach()
        state.micro_batches += 1
        state.new_tokens += 5
        state.step += 1


def _trained(tmp_path, shrink: str | None = "resizable"):
    torch.manual_seed(0)
    model = nn.Sequential(Resizable(4), Fixed())
    if shrink == "resizable":  # pruned to rank 2 before training (and the optimizer's state with it)
        model[0].a.data = model[0].a.data[:2].clone()
        model[0].seen = torch.arange(2.0)
    elif shrink == "fixed":
        model[1].w.data = model[1].w.data[:2].clone()
    state = _run(model)
    _train(model, state, 3)
    model[0].calls.fill_(3)
    state.epoch = 1
    state.history.append({"step": 3, "epoch": 1, "loss": 1.0})
    state.logs["budget"] = 7.0
    state.best_score, state.best_metrics, state.best_step = 0.5, {"accuracy": 0.5}, 3
    checkpoint = Checkpoint(tmp_path / "checkpoint.pt", "run0", log=lambda line: None)
    checkpoint.save(model, state, Host(entry_points=False))
    return model, state


def test_a_resizable_module_takes_the_saved_shape_in_place_and_the_loop_state_returns_whole(tmp_path):
    trained, saved_state = _trained(tmp_path)
    torch.manual_seed(1)
    fresh = nn.Sequential(Resizable(4), Fixed())
    a = fresh[0].a
    state = _run(fresh)
    lines = []
    assert Checkpoint(tmp_path / "checkpoint.pt", "run0", log=lines.append).restore(fresh, state, Host(entry_points=False))
    assert fresh[0].a is a and a.shape == (2, 4)  # resized in place by the layer itself
    for name, tensor in run_tensors(trained).items():
        assert torch.equal(run_tensors(fresh)[name], tensor), name
    assert fresh[0].calls.item() == 3  # a non-persistent buffer is part of the run's state too
    assert (state.step, state.epoch, state.logs, state.history) == (3, 1, {"budget": 7.0}, saved_state.history)
    assert (state.best_score, state.best_metrics, state.best_step) == (0.5, {"accuracy": 0.5}, 3)
    assert state.tokens == 15 and state.micro_batches == 3
    assert state.running_loss.item() == saved_state.running_loss.item()
    assert state.lr_scheduler.last_epoch == 3
    _train(fresh, state, 2)  # the optimizer state fits the restored shapes
    _train(trained, saved_state, 2)
    assert torch.equal(fresh[0].a, trained[0].a) and torch.equal(fresh[1].w, trained[1].w)
    assert lines == [f"resumed from {tmp_path / 'checkpoint.pt'} at epoch 1, step 3"]


def test_a_shape_change_in_a_module_that_is_not_resizable_is_refused_before_anything_changes(tmp_path):
    _trained(tmp_path, shrink="fixed")
    fresh = nn.Sequential(Resizable(4), Fixed())
    before = {n: t.clone() for n, t in run_tensors(fresh).items()}
    state = _run(fresh)
    lines = []
    assert not Checkpoint(tmp_path / "checkpoint.pt", "run0", log=lines.append).restore(
        fresh, state, Host(entry_points=False))
    assert "1.w: (2, 4) vs (3, 4)" in lines[0] and "Fixed does not declare peftbench_resizable" in lines[0]
    assert all(torch.equal(before[n], t) for n, t in run_tensors(fresh).items())
    assert state.step == 0 and state.history == [] and state.best_score == -math.inf


@pytest.mark.parametrize("model", ["missing", "extra"])
def test_tensors_must_have_the_model_names(tmp_path, model):
    _trained(tmp_path, shrink=None)
    fresh = nn.Sequential(Resizable(4)) if model == "missing" else nn.Sequential(Resizable(4), Fixed(), Fixed())
    lines = []
    assert not Checkpoint(tmp_path / "checkpoint.pt", "run0", log=lines.append).restore(
        fresh, _run(fresh), Host(entry_points=False))
    assert "its tensors differ from the model's" in lines[0]
