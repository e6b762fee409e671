"""The fair protocol, round two (#28): the checkpoint is chosen off the reported split and dev is scored once,
PRILoRA's saved checkpoint is the pruned adapter that scored, every method's head trains at one rate, tuning
runs take the final runs' steps and flag the edges of their grids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import train_one, train_sweep

import peftbench.task as task_module
import peftbench.trainer as trainer
from peftbench.config import TrainConfig
from peftbench.errors import ConfigError
from peftbench.runner import make_host, solve_budgets
from peftbench.schedule import batches, steps_per_epoch, total_steps, train_examples
from peftbench.sweep import check_sweep_data
from peftbench.tables import build
from peftbench.testing import ToyTask, tiny_config
from peftbench.tuning import (
    Choice,
    chosen_lines,
    edges,
    extended,
    matched_steps,
    ordered_points,
    point_text,
    tuning_runs,
)

# -- the checkpoint is chosen off the reported split --------------------------------------------------------


def _count_dev_scorings(monkeypatch) -> list[str]:
    """Every split that ``score_split`` scores, in order (a list the test reads)."""
    scored, real = [], trainer.score_split

    def score_split(run, split, loader):
        scored.append(split)
        return real(run, split, loader)

    monkeypatch.setattr(trainer, "score_split", score_split)
    return scored


METHODS = [{"name": "lora", "params": {"dropout": 0.1}}, {"name": "prilora", "params": {"prune_every": 3}},
           "adalora"]


def test_flipping_the_dev_labels_changes_no_selected_checkpoint_and_dev_is_scored_once(tmp_path, monkeypatch):
    scored = _count_dev_scorings(monkeypatch)
    config = tiny_config(tmp_path / "a", methods=METHODS, seeds=[0, 1], train={"epochs": 3, "eval_every": 3})
    _, runs = train_sweep(config)
    assert len(runs) == 6 and scored.count("dev") == 6  # once per run
    assert scored.count("validation") == sum(r["evaluations"] for r in runs) > 6 * 3
    for run in runs:
        evals = [h for h in run["history"] if "in_budget" in h]  # of the validation split
        assert len(evals) == run["evaluations"] and not any("dev" in str(k) for h in evals for k in h)
        counted = [h for h in evals if h["in_budget"]]
        assert run["best_step"] == max(counted, key=lambda h: h["accuracy"])["step"]  # the first of ties
        dev = run["dev_predictions"]["dev"]
        assert len(dev["predictions"]) == len(dev["labels"]) == 128
        assert np.mean(np.equal(dev["predictions"], dev["labels"])) == pytest.approx(run["best"]["accuracy"])

    real_load = ToyTask.load

    def flipped(self, split, data_dir):
        data = real_load(self, split, data_dir)
        if split == "dev":
            data.labels = [1 - y for y in data.labels]
        return data

    monkeypatch.setattr(ToyTask, "load", flipped)
    scored.clear()
    _, again = train_sweep(tiny_config(tmp_path / "b", methods=METHODS, seeds=[0, 1],
                                       train={"epochs": 3, "eval_every": 3}))
    assert scored.count("dev") == 6
    step = {(r["label"], r["seed"]): r["best_step"] for r in runs}
    assert {(r["label"], r["seed"]): r["best_step"] for r in again} == step
    assert len(set(step.values())) > 1  # the checkpoints differ between runs: the test can see a change
    for run in again:  # the same checkpoints, scored on flipped labels
        before = next(r for r in runs if (r["label"], r["seed"]) == (run["label"], run["seed"]))
        assert run["best"]["accuracy"] == pytest.approx(1 - before["best"]["accuracy"])


def test_select_final_scores_dev_once_on_the_final_model_without_evaluating_before(tmp_path, monkeypatch):
    scored = _count_dev_scorings(monkeypatch)
    _, run = train_one(tiny_config(tmp_path, train={"select": "final", "eval_every": 2}))
    assert scored == ["dev"] and run["best_step"] == run["steps"] and run["final"] == run["best"]
    assert (run["evaluations"], run["in_budget_evals"]) == (1, 1)
    assert not [h for h in run["history"] if "accuracy" in h]


def test_select_dev_is_the_labelled_best_of_dev_evaluations(tmp_path, monkeypatch):
    scored = _count_dev_scorings(monkeypatch)
    _, run = train_one(tiny_config(tmp_path, train={"select": "dev", "eval_every": 4}))
    assert scored.count("dev") == run["evaluations"] > 1 and "validation" not in scored
    assert run["best"]["accuracy"] == max(h["accuracy"] for h in run["history"] if "accuracy" in h)
    assert len(run["dev_predictions"]["dev"]["predictions"]) == 128  # of the best evaluation
    table = build([run], {"toy": "accuracy"})
    assert f"best of {run['in_budget_evals']} dev evaluations (reproduces papers; not a fair protocol)" in table
    assert "held out of the training data" in build([{**run, "spec": {
        **run["spec"], "train": {**run["spec"]["train"], "select": "validation"}}}], {"toy": "accuracy"})


def test_the_selection_rule_is_the_same_for_every_method(tmp_path):
    with pytest.raises(ConfigError, match=r"methods\[1\] \(full, toy\): train.select/validation_size dev/0.1, "
                                          r"but lora has validation/0.1"):
        tiny_config(tmp_path, methods=["lora", {"name": "full", "train": {"select": "dev"}}])
    with pytest.raises(ConfigError, match="validation_size"):
        tiny_config(tmp_path, train={"validation_size": 2.5})


def test_a_run_stored_before_the_rule_is_another_run():
    from peftbench.runs import RunSpec

    spec = RunSpec("s", "lora", "lora", None, "toy", 0, None, TrainConfig(), None)
    assert spec.identity()["scoring"] == "dev_once_at_selected"


# -- PRILoRA's snapshot is the pruned adapter that scored -----------------------------------------------------


def test_prilora_saves_the_pruned_adapter_of_its_best_evaluation_and_its_export_reproduces_the_score(
        tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from peftbench.data import load_task_data, make_loader
    from peftbench.export import export_run, load_with_peft
    from peftbench.modeling import load_tokenizer

    real = task_module.predict_and_score

    def declining(model, loader, task, accelerator):  # the validation score falls: the first evaluation is best
        metrics, examples = real(model, loader, task, accelerator)
        if len(loader.dataset) != 128:  # the validation split (the toy task's dev split has 128 examples)
            declining.calls += 1
            metrics = {**metrics, "accuracy": 1.0 - 0.01 * declining.calls}
        return metrics, examples
    declining.calls = 0
    monkeypatch.setattr(task_module, "predict_and_score", declining)
    config = tiny_config(tmp_path, methods=[{"name": "prilora", "params": {"prune_every": 1000}}],
                         train={"epochs": 2, "eval_every": 4})
    host, run = train_one(config)
    assert run["best_step"] == 4 < run["steps"]  # before any pruning event: the weights are not pruned there

    from safetensors.torch import load_file

    saved = load_file(f"{run['artifacts']}/trainable.safetensors")
    a = [w for name, w in saved.items() if name.endswith("lora_A.weight") or name.endswith("lora_A")]
    assert a and all(((w == 0).sum(1) == w.shape[1] // 2).all() for w in a)  # prune_ratio 0.5 of every row

    out = export_run(run, tmp_path / "export", host)
    model = load_with_peft(run, out, host)
    tokenizer = load_tokenizer(config.model)
    data = load_task_data(host.task("toy"), "dev", None, tokenizer, config.train.max_length, None)
    predictions, labels = [], []
    for batch in make_loader(data, 64, False, True, 0, tokenizer.pad_token_id, False):
        with torch.no_grad():
            predictions += model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    assert np.mean(np.equal(predictions, labels)) == pytest.approx(run["best"]["accuracy"])
    assert predictions == run["dev_predictions"]["dev"]["predictions"]


# -- the head trained alike -----------------------------------------------------------------------------------


def test_every_methods_head_trains_at_the_sweeps_rate_unless_the_config_says_otherwise(tmp_path):
    config = tiny_config(tmp_path, methods=["lora", {"name": "full", "train": {"lr": 1e-4}},
                                            {"name": "lora", "label": "own", "train": {"head_lr": 1e-3}}],
                         train={"lr": 2e-3}, tune={"grid": {"train.lr": [1e-3, 3e-3]}, "holdout": 0.25})
    by_label = {m.label: config.train_for(m, "toy") for m in config.methods}
    assert [(t.lr, t.head_lr) for t in by_label.values()] == [(2e-3, 2e-3), (1e-4, 2e-3), (2e-3, 1e-3)]
    host = make_host(config)
    solved = solve_budgets(config, host)
    specs = tuning_runs(config, solved, check_sweep_data(config, host, solved))
    assert {(s.label, s.train.lr, s.train.head_lr) for s in specs if s.label != "own"} == {
        (label, lr, 2e-3) for label in ("lora", "full") for lr in (1e-3, 3e-3)}  # the grid moves lr only
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    groups = trainer.param_groups(model, by_label["full"], {"1.weight", "1.bias"})
    assert sorted((g["lr"], len(g["params"])) for g in groups) == [(1e-4, 1), (1e-4, 1), (2e-3, 1), (2e-3, 1)]


# -- tuning runs that match -----------------------------------------------------------------------------------


def test_tuning_runs_take_the_final_runs_steps(tmp_path):
    train = TrainConfig(epochs=2, batch_size=16, warmup_ratio=0.1)
    final = total_steps(train, batches(train_examples(train, 256), 16))
    tuning = matched_steps(train, 256, 0.25)
    own = steps_per_epoch(batches(train_examples(train, 256, 0.25), 16), 1)
    assert (final, own) == (30, 11) and (tuning.max_steps, tuning.epochs) == (30, 3)
    assert total_steps(tuning, own) == final

    config = tiny_config(tmp_path, methods=["lora", "adalora"], train={"eval_every": 4},
                         tune={"grid": {"train.lr": [1e-3, 3e-3]}, "holdout": 0.25})
    assert config.tune.seeds == [0, 1]  # two tuning seeds by default
    host = make_host(config)
    solved = solve_budgets(config, host)
    sizes = {}
    specs = tuning_runs(config, solved, check_sweep_data(config, host, solved, sizes), sizes)
    assert sizes == {"toy": 256} and len(specs) == 2 * 2 * 2
    assert {s.train.max_steps for s in specs} == {30}


def test_tuning_runs_that_take_the_final_steps_actually_train_them(tmp_path):
    config = tiny_config(tmp_path, methods=["lora"], seeds=[0], tune={"grid": {"train.lr": [3e-3]},
                                                                      "holdout": 0.25, "seeds": [0]})
    _, runs = train_sweep(config)
    steps = {bool(r["spec"].get("tuning")): r["steps"] for r in runs}
    assert steps == {True: 30, False: 30}


def test_edges_of_a_grid_are_found_and_extended_geometrically():
    grid = {"train.lr": [1e-3, 3e-3, 9e-3], "params.alpha": [8, 16], "train.epochs": [2]}
    assert edges({"train.lr": 3e-3, "params.alpha": 8, "train.epochs": 2}, grid) == ["alpha=8 (smallest of 2)"]
    assert edges({"train.lr": 9e-3, "params.alpha": 16, "train.epochs": 2}, grid) == [
        "lr=0.009 (largest of 3)", "alpha=16 (largest of 2)"]
    wider = extended({"train.lr": 9e-3, "params.alpha": 8, "train.epochs": 2}, grid)
    assert wider["train.lr"] == pytest.approx([1e-3, 3e-3, 9e-3, 2.7e-2]) and wider["params.alpha"] == [4, 8, 16]
    assert wider["train.epochs"] == [2]
    # the new value rounded (4.5e-3 × 3 is 0.013499999999999996 in floating point): the run's id and every line
    # that names it read 0.0135
    assert extended({"train.lr": 4.5e-3}, {"train.lr": [5e-4, 1.5e-3, 4.5e-3]})["train.lr"][-1] == 0.0135
    assert point_text({"train.lr": 0.013499999999999996}) == "lr=0.0135"
    points = ordered_points(grid, wider)
    assert points[:6] == ordered_points(grid) and len(points) == 12  # the old points keep their indices
    line = dataclasses.replace(Choice("adalora", "stsb", {"train.lr": 9e-3}, 0.5, 2, 2),
                               edges=["lr=0.009 (largest of 3)"]).line()
    assert line.endswith("at the edge of its grid: lr=0.009 (largest of 3))")
    run = {"label": "adalora", "task": "stsb", "spec": {"tuned": {"values": {"train.lr": 9e-3}, "grid": grid}}}
    assert chosen_lines([run]) == ["adalora: lr=0.009 [edge of grid: lr=0.009 (largest of 3)] (stsb)"]


def test_a_choice_at_the_edge_is_warned_about_and_extends_the_grid(tmp_path, monkeypatch):
    real = task_module.predict_and_score

    def rising(model, loader, task, accelerator):  # the held-out score favours the largest learning rate
        metrics, examples = real(model, loader, task, accelerator)
        lr = rising.lr()
        return ({**metrics, "accuracy": lr} if len(loader.dataset) == 64 else metrics), examples
    monkeypatch.setattr(task_module, "predict_and_score", rising)
    real_setup = trainer.setup

    def setup(spec, host, memory=None):
        rising.lr = lambda: spec.train.lr
        return real_setup(spec, host, memory)
    monkeypatch.setattr(trainer, "setup", setup)
    config = tiny_config(tmp_path, methods=["lora"], train={"epochs": 1},
                         tune={"grid": {"train.lr": [1e-3, 2e-3]}, "holdout": 0.25, "seeds": [0],
                               "extend_edges": 1})
    lines = []
    from peftbench.store import Store

    host = make_host(config)
    with Store(config.output.db) as store:
        from peftbench.runner import run_sweep

        assert run_sweep(config, host, store, progress=False, log=lines.append).ok
        runs = store.runs()
    assert any("extending the grid past its edge" in line for line in lines)
    assert any("× 3 grid points ×" in line and "(grids extended past an edge: 1)" in line for line in lines), lines
    assert any(line.startswith("peftbench: warning: lora toy chose the edge of its grid (lr=0.004 (largest of 3))")
               for line in lines), lines
    tuned = next(r for r in runs if r["spec"].get("tuned"))
    assert tuned["spec"]["tuned"]["values"] == {"train.lr": 0.004}
    assert sum(bool(r["spec"].get("tuning")) for r in runs) == 3


# -- a tie on the main metric ----------------------------------------------------------------------------------


def _select_step(task, evaluations: list[dict[str, float]]) -> int:
    """The step :func:`peftbench.trainer.keep_best` keeps of ``evaluations`` (steps 1, 2, ...), all in budget."""
    import math
    from types import SimpleNamespace

    state = SimpleNamespace(evaluations=0, in_budget_evals=0, best_any_score=-math.inf, best_score=-math.inf,
                            best_key=(-math.inf,), best_any_key=(-math.inf,), step=0, best_step=0)
    spec = SimpleNamespace(train=SimpleNamespace(select="dev"), save_adapters=False)
    run = SimpleNamespace(state=state, task=task, spec=spec, final_loaders={})
    for step, metrics in enumerate(evaluations, 1):
        state.step = step
        trainer.keep_best(run, metrics, True, {})
    return state.best_step


def test_a_tie_on_the_main_metric_goes_to_the_tasks_tie_break_metrics():
    """GSM8K's strict match at 0 on every evaluation of a few validation questions: the earliest evaluation, the
    one trained least, used to win; the flexible match, then the share of formatted answers decide (a SmolLM2
    LoRA run's `formatted` rose 0.1 → 1.0 while strict_match stayed 0 and step 4 of 22 was reported)."""
    from peftbench.host import Host

    gsm8k = Host().task("gsm8k")
    assert gsm8k.tie_break == ("flexible_extract", "formatted", "gold_logprob")
    evaluations = [{"strict_match": 0.0, "flexible_extract": 0.0, "formatted": f} for f in (0.1, 0.6, 1.0, 0.9)]
    assert _select_step(gsm8k, evaluations) == 3
    evaluations[1]["flexible_extract"] = 0.1  # the flexible match outranks the format
    assert _select_step(gsm8k, evaluations) == 2
    evaluations[0]["strict_match"] = 0.1  # and the main metric outranks both
    assert _select_step(gsm8k, evaluations) == 1
    # all three tied: the gold solutions' log-probability per token decides, the last
    evaluations = [{"strict_match": 0.0, "flexible_extract": 0.0, "formatted": 0.5, "gold_logprob": g}
                   for g in (-2.0, -1.2, -1.5)]
    assert _select_step(gsm8k, evaluations) == 2
    evaluations[2]["formatted"] = 0.75  # the format outranks it
    assert _select_step(gsm8k, evaluations) == 3
    assert _select_step(gsm8k, [{"strict_match": 0.0, "flexible_extract": 0.0, "formatted": 0.5,
                                 "gold_logprob": -1.0}] * 2) == 1  # a full tie: the earliest
    # a task without tie-break metrics (GLUE's): the earliest of equal evaluations, as before
    toy = ToyTask("toy", ("sentence",), 2, "accuracy")
    assert _select_step(toy, [{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.7}]) == 2
