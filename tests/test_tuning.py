"""Per-method tuning (``tune:``): held-out training data only, equal grids, resumable, marked in tables."""

from __future__ import annotations

import numpy as np
import pytest

from peftbench import data as data_module
from peftbench import sweep as sweep_module
from peftbench.cli import main
from peftbench.data import Encoded, holdout_split
from peftbench.runner import make_host, run_sweep, solve_budgets
from peftbench.runs import expand
from peftbench.store import Store
from peftbench.sweep import check_data
from peftbench.tables import build
from peftbench.toys import ToyTask, tiny_config
from peftbench.trainer import Diverged

TUNE = {"grid": {"train.lr": [1e-4, 1e-2]}, "holdout": 0.25, "seeds": [0]}
FAST = {"epochs": 1, "max_steps": 3}


def _tuned(tmp_path, **overrides):
    return tiny_config(tmp_path, train=FAST, tune=TUNE, **overrides)


def _sweep(config, log=None):
    store = Store(config.output.db)
    lines: list[str] = []
    try:
        summary = run_sweep(config, make_host(config), store, progress=False, log=log or lines.append)
    finally:
        rows = store.runs(status=None)
        store.close()
    return summary, rows, lines


def _chosen(lines):
    return [line for line in lines if line.startswith("peftbench: tuned ")]


def _record_runs(monkeypatch):
    """Record every run trained (its spec) and, per run, the splits its task loaded."""
    trained, reads, current = [], [], {}
    real_run_one, real_load = sweep_module.run_one, ToyTask.load

    def run_one(spec, host, **kwargs):
        trained.append(spec)
        current["spec"] = spec
        try:
            return real_run_one(spec, host, **kwargs)
        finally:
            current.pop("spec")

    def load(self, split, data_dir):
        if "spec" in current:
            reads.append((current["spec"].tuning is not None, split))
        return real_load(self, split, data_dir)

    monkeypatch.setattr(sweep_module, "run_one", run_one)
    monkeypatch.setattr(ToyTask, "load", load)
    return trained, reads


def test_tuning_runs_never_read_dev_and_the_choice_ignores_dev_labels(tmp_path, monkeypatch):
    trained, reads = _record_runs(monkeypatch)
    summary, rows, lines = _sweep(_tuned(tmp_path / "a"))
    assert summary.ok and len(trained) == 3  # 2 grid points × 1 tuning seed, then 1 final run
    assert {split for tuning, split in reads if tuning} == {"train"}  # dev is never read by a tuning run
    assert {split for tuning, split in reads if not tuning} == {"train", "dev"}
    tuning_ids = sorted(r["run_id"] for r in rows if r["spec"].get("tuning"))
    assert all("dev" not in r["spec"]["data"] for r in rows if r["spec"].get("tuning"))

    real_load = ToyTask.load  # the recording wrapper: dev labels flipped below it

    def garbage_dev(self, split, data_dir):
        data = real_load(self, split, data_dir)
        if split == "dev":
            data.labels = [1.0 - x for x in data.labels]
        return data

    monkeypatch.setattr(ToyTask, "load", garbage_dev)
    _, garbage_rows, garbage_lines = _sweep(_tuned(tmp_path / "b"))
    assert _chosen(garbage_lines) == _chosen(lines) and len(_chosen(lines)) == 1
    assert sorted(r["run_id"] for r in garbage_rows if r["spec"].get("tuning")) == tuning_ids


def test_holdout_split_is_stratified_seeded_and_disjoint():
    labels = np.array([0] * 80 + [1] * 20, dtype=np.float32)
    encoded = Encoded(np.arange(100, dtype=np.int32), None, np.arange(101, dtype=np.int64), labels)
    train, held = holdout_split(encoded, 0.25, seed=0, stratify=True)
    assert (len(train), len(held)) == (75, 25)
    assert (held.labels == 1).sum() == 5 and (train.labels == 1).sum() == 15  # each class keeps its share
    assert set(train.ids).isdisjoint(held.ids) and set(train.ids) | set(held.ids) == set(range(100))
    assert np.array_equal(holdout_split(encoded, 0.25, seed=0, stratify=True)[1].ids, held.ids)  # seeded
    assert not np.array_equal(holdout_split(encoded, 0.25, seed=1, stratify=True)[1].ids, held.ids)


def test_tuning_runs_train_on_the_rest_and_evaluate_on_the_held_out_part(tmp_path, monkeypatch):
    sizes = []
    real_loaders = data_module.task_loaders

    def loaders(spec, task, tokenizer):
        train_loader, dev_loaders, select_loaders = real_loaders(spec, task, tokenizer)
        sizes.append((spec.tuning is not None, len(train_loader.dataset),
                      {split: len(loader.dataset) for split, loader in {**dev_loaders, **select_loaders}.items()}))
        return train_loader, dev_loaders, select_loaders

    monkeypatch.setattr(data_module, "task_loaders", loaders)
    summary, _, _ = _sweep(_tuned(tmp_path))
    assert summary.ok
    # the toy task: 256 training examples (128 positive), 128 dev examples; the validation split (10%) that
    # chooses the checkpoint comes out of what a run trains on: the tuning run's own training part
    assert sizes == [(True, 172, {"holdout": 64, "validation": 20}), (True, 172, {"holdout": 64, "validation": 20}),
                     (False, 230, {"dev": 128, "validation": 26})]


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


CONFIG = """\
name: tuned
model: {{name_or_path: minilm, random_init: true, config_overrides: {{num_hidden_layers: 1, hidden_size: 32,
  intermediate_size: 64, num_attention_heads: 4}}}}
tasks: [toy]
plugins: [peftbench.testing]
budget: {{lora_rank: 4}}
methods:
  - name: lora
    params: {{r: 4}}
  - name: full
    tune: {full_grid}
tune:
  grid:
    {key}: {values}
"""


@pytest.mark.parametrize("full_grid, key, values, line, message", [
    ("{train.lr: [1.0e-5]}", "train.lr", "[1.0e-4, 3.0e-4]", 11, "a grid of 1 point(s) for full, but 2 for lora"),
    ("null", "train.lrr", "[1.0e-4]", 14, "unknown training key 'lrr' (did you mean 'lr'"),
    ("null", "train.lr", "[fast]", 14, "'fast'"),
    ("{train.lr: [1.0e-5]}", "params.alpah", "[8]", 14, "lora has no param 'alpah' (did you mean 'alpha'"),
    ("{train.lr: [1.0e-5, 2.0e-5]}", "params.r", "[4, 2]", 14, "lora's budget solver sets what this value"),
])
def test_bad_grids_exit_2_naming_the_line(tmp_path, capsys, full_grid, key, values, line, message):
    path = _write(tmp_path, CONFIG.format(full_grid=full_grid, key=key, values=values))
    assert main(["run", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"c.yaml:{line}: " in err and message in err, err


def test_alpha_in_the_grid_is_fine_and_dry_run_lists_both_phases(tmp_path, capsys):
    path = _write(tmp_path, CONFIG.format(full_grid="{train.lr: [1.0e-5, 2.0e-5]}", key="params.alpha",
                                          values="[8, 16]"))
    assert main(["run", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "phase 1, tuning on 10% of the training set held out" in out and "alpha=16" in out and "lr=2e-05" in out
    assert "phase 2, at each method's chosen point" in out and "(after tuning)" in out


def test_killed_tuning_resumes_without_training_anything_twice(tmp_path, monkeypatch):
    _, reference, reference_lines = _sweep(_tuned(tmp_path / "whole"))
    trained, _ = _record_runs(monkeypatch)
    real_run_one = sweep_module.run_one

    def killed_at_second_point(spec, host, **kwargs):
        if spec.tuning and spec.tuning["index"] == 1 and not killed_at_second_point.done:
            killed_at_second_point.done = True
            raise KeyboardInterrupt  # what the sweep sees of Ctrl-C; a kill -9 leaves a "running" row instead
        return real_run_one(spec, host, **kwargs)

    killed_at_second_point.done = False
    monkeypatch.setattr(sweep_module, "run_one", killed_at_second_point)
    config = _tuned(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        _sweep(config)
    summary, rows, lines = _sweep(config)
    assert summary.ok and summary.skipped == 1 and any("finished earlier, skipped" in line for line in lines)
    ids = [spec.run_id for spec in trained]
    assert len(ids) == len(set(ids)) == 3  # the interrupted run never trained; each run trained once
    assert _chosen(lines) == _chosen(reference_lines)
    assert sorted(r["run_id"] for r in rows if r["status"] == "done") == sorted(r["run_id"] for r in reference)


def test_failed_tuning_runs_are_said_and_no_finished_one_means_no_final_runs(tmp_path, monkeypatch):
    real_run_one = sweep_module.run_one

    def fail(spec, host, **kwargs):
        if spec.tuning and (spec.tuning["index"] == 0 or spec.task == "toy_pair"):
            raise RuntimeError("worker lost")
        return real_run_one(spec, host, **kwargs)

    monkeypatch.setattr(sweep_module, "run_one", fail)
    summary, rows, lines = _sweep(_tuned(tmp_path, tasks=["toy", "toy_pair"]))
    text = "\n".join(lines)
    assert "tuned lora toy: 1 of its 2 tuning runs failed; its final runs are not started" in text
    assert "lora toy_pair: none of its 2 tuning run(s) finished" in text
    assert not [r for r in rows if r["status"] == "done" and not r["spec"].get("tuning")]


def test_a_choice_is_made_on_the_whole_grid_only_and_the_table_shows_one_row(tmp_path, monkeypatch):
    """Issue #31, item 2: with one grid point failing once, the first run picked the other point from 1 of 2
    runs and trained the seeds there; the rerun picked the repaired point and trained them again, and the table
    showed both. Now nothing is reported until the grid is whole, and a diverged point counts as finished."""
    real_run_one = sweep_module.run_one
    failing = {"on": True}

    def fail_once(spec, host, **kwargs):
        if spec.tuning and spec.tuning["index"] == 1 and failing["on"]:
            raise RuntimeError("worker lost")
        return real_run_one(spec, host, **kwargs)

    monkeypatch.setattr(sweep_module, "run_one", fail_once)
    config = _tuned(tmp_path)
    _, rows, lines = _sweep(config)
    assert not [r for r in rows if r["status"] == "done" and r["spec"].get("tuned")]
    failing["on"] = False
    _, rows, lines = _sweep(config)
    finals = [r for r in rows if r["status"] == "done" and r["spec"].get("tuned")]
    assert len(finals) == 1 and len(_chosen(lines)) == 1
    assert "failed" not in _chosen(lines)[0]


def test_a_diverged_grid_point_is_a_finished_worst_point(tmp_path, monkeypatch):
    real_run_one = sweep_module.run_one

    def diverge(spec, host, **kwargs):
        if spec.tuning and spec.tuning["index"] == 1:
            raise Diverged("training loss became nan at step 2")
        return real_run_one(spec, host, **kwargs)

    monkeypatch.setattr(sweep_module, "run_one", diverge)
    _, rows, lines = _sweep(_tuned(tmp_path))
    assert "tuned lora toy: lr=0.0001 (held-out" in _chosen(lines)[0]
    assert len([r for r in rows if r["status"] == "done" and r["spec"].get("tuned")]) == 1


def test_tables_hide_a_superseded_choice():
    """A store from an older peftbench with final runs at two points of one grid: the table keeps those at the
    point the stored tuning runs choose."""
    from peftbench.tuning import current_choices

    def tuning(index, lr, score):
        return {"label": "lora", "task": "rte", "seed": 0, "status": "done", "best": {"accuracy": score},
                "spec": {"tuning": {"index": index, "point": {"train.lr": lr}}}}

    def final(lr, seed):
        return {"label": "lora", "task": "rte", "seed": seed, "status": "done", "best": {"accuracy": 0.7},
                "spec": {"tuned": {"values": {"train.lr": lr}}}}

    runs = [tuning(0, 1e-4, 0.6), tuning(1, 1e-3, 0.8), final(1e-4, 0), final(1e-3, 0), final(1e-3, 1)]
    kept = current_choices(runs, {"rte": "accuracy"})
    assert [r["spec"]["tuned"]["values"]["train.lr"] for r in kept if "tuned" in r["spec"]] == [1e-3, 1e-3]



def test_tables_hide_the_same_choice_made_before_the_grid_was_extended():
    """``tune.extend_edges`` extended a grid and the choice stayed (measured: SmolLM2 full fine-tuning, 1.8e-4 of
    4 points, then of 5): the final runs of both choices have other identities and the same scores; the table
    keeps those chosen from the whole grid, so that no seed is counted twice."""
    from peftbench.tuning import current_choices

    def tuning(index, lr, score):
        return {"label": "full", "task": "gsm8k", "seed": 0, "status": "done", "best": {"gold_logprob": score},
                "spec": {"tuning": {"index": index, "point": {"train.lr": lr}}}}

    def final(grid, seed):
        return {"label": "full", "task": "gsm8k", "seed": seed, "status": "done", "best": {"gold_logprob": -0.9},
                "spec": {"tuned": {"values": {"train.lr": 1.8e-4}, "grid": {"train.lr": grid}}}}

    small, extended = [6e-5, 1.8e-4], [6e-5, 1.8e-4, 5.4e-4]
    runs = [tuning(0, 6e-5, -0.90), tuning(1, 1.8e-4, -0.86), tuning(2, 5.4e-4, -0.96),
            final(small, 0), final(small, 1), final(extended, 0), final(extended, 1)]
    kept = current_choices(runs, {"gsm8k": "strict_match"}, {"gsm8k": ("gold_logprob",)})
    assert [r["spec"]["tuned"]["grid"]["train.lr"] for r in kept if "tuned" in r["spec"]] == [extended, extended]
    # before the extension's tuning run finished, the runs of the smaller grid were the current ones
    kept = current_choices(runs[:2] + runs[3:5], {"gsm8k": "strict_match"}, {"gsm8k": ("gold_logprob",)})
    assert len([r for r in kept if "tuned" in r["spec"]]) == 2

def test_a_tie_on_the_held_out_main_metric_goes_to_the_tie_break_metrics_as_in_checkpoint_selection():
    """GSM8K's strict match at 0 on every point of a learning-rate grid: the tie-break metrics decide in order
    (their means over the tuning seeds), the earlier point only on a full tie."""
    from peftbench.tuning import choose, held_out_key

    names = ("strict_match", "flexible_extract", "formatted", "gold_logprob")
    ties = {"gsm8k": names[1:]}

    def runs(*points):
        return [("lora", "gsm8k", i, {"train.lr": lr}, held_out_key(dict(zip(names, metrics)), names))
                for i, (lr, seeds) in enumerate(points) for metrics in seeds]

    logprob = runs((1e-4, [(0, 0, 0.5, -2.0), (0, 0, 0.5, -1.8)]), (1e-3, [(0, 0, 0.5, -1.0), (0, 0, 0.5, -1.4)]),
                   (1e-2, [(0, 0, 0.5, -1.3), (0, 0, 0.5, -1.3)]))
    choice = choose(logprob, ties)[("lora", "gsm8k")]
    assert choice.point == {"train.lr": 1e-3} and choice.score == 0 and choice.tie_break == ("gold_logprob", pytest.approx(-1.2))
    assert "lr=0.001 (held-out 0.0000, a tie broken by gold_logprob -1.2000)" in choice.line()
    # without the task's tie-break metrics: the earlier point, as before
    assert choose([(*run[:4], run[4][:1]) for run in logprob])[("lora", "gsm8k")].point == {"train.lr": 1e-4}
    # the metrics in order: the format outranks the log-probability, the main metric outranks both
    formatted = runs((1e-4, [(0, 0, 0.5, -1.0)]), (1e-3, [(0, 0, 0.75, -3.0)]))
    assert choose(formatted, ties)[("lora", "gsm8k")].tie_break == ("formatted", 0.75)
    main = runs((1e-4, [(0, 0, 0.5, -1.0)]), (1e-3, [(0.1, 0, 0, -3.0)]))
    assert choose(main, ties)[("lora", "gsm8k")].point == {"train.lr": 1e-3}
    assert choose(main, ties)[("lora", "gsm8k")].tie_break is None
    # a full tie: the earlier point, no tie-break named
    full = runs((1e-4, [(0, 0, 0.5, -1.0)]), (1e-3, [(0, 0, 0.5, -1.0)]))
    assert choose(full, ties)[("lora", "gsm8k")].point == {"train.lr": 1e-4}
    assert choose(full, ties)[("lora", "gsm8k")].tie_break is None
    # a diverged point stays the worst, whatever its tie-break metrics
    diverged = [*runs((1e-4, [(0, 0, 0.5, -1.0)])), ("lora", "gsm8k", 1, {"train.lr": 1e-3}, -float("inf"))]
    assert choose(diverged, ties)[("lora", "gsm8k")].point == {"train.lr": 1e-4}


def test_runs_that_chose_on_gold_logprob_alone_are_ranked_by_it_and_never_taken_as_diverged():
    """``select_on: gold_logprob``: a tuning run's held-out metrics have no answers (no main metric): its key is
    -inf up to gold_logprob, which decides; such a point is finished, unlike a diverged one."""
    from peftbench.tables import tuning_table
    from peftbench.tuning import choose, held_out_key

    names = ("strict_match", "flexible_extract", "formatted", "gold_logprob")
    ties = {"gsm8k": names[1:]}
    assert held_out_key({"gold_logprob": -1.5}, names) == (-float("inf"),) * 3 + (-1.5,)
    assert held_out_key({}, names) is None
    scored = [("lora", "gsm8k", 0, {"train.lr": 1e-4}, held_out_key({"gold_logprob": -1.5}, names)),
              ("lora", "gsm8k", 1, {"train.lr": 1e-3}, held_out_key({"gold_logprob": -1.1}, names)),
              ("lora", "gsm8k", 2, {"train.lr": 1e-2}, -float("inf"))]  # diverged
    choice = choose(scored, ties)[("lora", "gsm8k")]
    assert choice.point == {"train.lr": 1e-3} and choice.complete
    assert "lr=0.001 (held-out gold_logprob -1.1000)" in choice.line()
    alone = choose(scored[:1], ties)[("lora", "gsm8k")]  # one finished point: still a choice
    assert alone.point == {"train.lr": 1e-4}
    rows = [{"label": "lora", "task": "gsm8k", "seed": 0, "status": "done", "best": {"gold_logprob": g},
             "spec": {"tuning": {"index": i, "point": {"train.lr": lr}}}}
            for i, (lr, g) in enumerate([(1e-4, -1.5), (1e-3, -1.1)])]
    table = tuning_table(rows, {"gsm8k": "strict_match"}, "plain", tie_break=ties)
    assert "gsm8k (held-out gold_logprob)" in table and "-1.10" in table and "-1.50" in table
    assert "(a column headed by another metric: the one the runs chose on, as it is)" in table


def test_tables_keep_the_final_runs_of_a_choice_made_by_a_tie_break():
    """The sweep chose 1e-3 by the tie-break: tables (current_choices) keep its final runs, not the earlier
    point's."""
    from peftbench.tuning import current_choices

    def tuning(index, lr, gold):
        return {"label": "lora", "task": "gsm8k", "seed": 0, "status": "done",
                "best": {"strict_match": 0.0, "gold_logprob": gold},
                "spec": {"tuning": {"index": index, "point": {"train.lr": lr}}}}

    def final(lr):
        return {"label": "lora", "task": "gsm8k", "seed": 0, "status": "done", "best": {"strict_match": 0.0},
                "spec": {"tuned": {"values": {"train.lr": lr}}}}

    runs = [tuning(0, 1e-4, -2.0), tuning(1, 1e-3, -1.0), final(1e-4), final(1e-3)]
    kept = current_choices(runs, {"gsm8k": "strict_match"}, {"gsm8k": ("gold_logprob",)})
    assert [r["spec"]["tuned"]["values"]["train.lr"] for r in kept if "tuned" in r["spec"]] == [1e-3]
    kept = current_choices(runs, {"gsm8k": "strict_match"})
    assert [r["spec"]["tuned"]["values"]["train.lr"] for r in kept if "tuned" in r["spec"]] == [1e-4]


def test_tables_leave_tuning_runs_out_and_show_the_choice(tmp_path, capsys):
    config = _tuned(tmp_path)
    summary, rows, lines = _sweep(config)
    done = [r for r in rows if r["status"] == "done"]
    final = [r for r in done if not r["spec"].get("tuning")]
    (chosen,) = [r["spec"]["tuned"]["values"]["train.lr"] for r in final]
    assert final[0]["spec"]["train"]["lr"] == chosen
    assert final[0]["spec"]["tuned"]["grid"] == TUNE["grid"]
    table = build(done, {"toy": "accuracy"}, "plain")
    assert table == build(final, {"toy": "accuracy"}, "plain")  # tuning runs left out
    assert "hyperparameters tuned per method on a held-out 25% of the training set (grid of 2 points, seeds 0)" \
        in table and f"chosen: lora: lr={chosen} [edge of grid: lr={chosen} (" in table  # of 2 values, always an edge
    assert main(["table", config.output.db, "--tuning", "--format", "plain"]) == 0
    grid = capsys.readouterr().out
    rows_of = {line.split()[1]: line for line in grid.splitlines() if line.startswith("lora ")}
    assert set(rows_of) == {"lr=0.0001", "lr=0.01"} and rows_of[f"lr={chosen}"].endswith("*")
    assert not rows_of[f"lr={1e-4 if chosen == 1e-2 else 1e-2}"].endswith("*")


def test_one_row_per_label_when_the_chosen_values_differ_per_task():
    def run(task, lr, seed):
        tuned = {"values": {"train.lr": lr}, "grid": {"train.lr": [1e-5, 1e-4, 1e-3, 1e-2]}, "holdout": 0.1, "split_seed": 0,
                 "seeds": [0]}
        return {"label": "lora", "task": task, "seed": seed, "best": {"accuracy": 0.5 + seed / 10},
                "spec": {"train": {"lr": lr}, "task": task, "seed": seed, "tuned": tuned}}

    runs = [run("rte", 1e-4, 0), run("rte", 1e-4, 1), run("mrpc", 1e-3, 0), run("mrpc", 1e-3, 1)]
    table = build(runs, {"rte": "accuracy", "mrpc": "accuracy"}, "plain")
    assert "lora@" not in table and "chosen: lora: lr=0.0001 (rte); lr=0.001 (mrpc)" in table
    assert "grid of 4 points, seeds 0" in table
    untuned = [{**r, "spec": {k: v for k, v in r["spec"].items() if k != "tuned"}} for r in runs[:2]]
    assert "hyperparameters not tuned per method" in build(untuned, {"rte": "accuracy"}, "plain")


def test_untuned_configs_keep_their_run_ids(tmp_path):
    """Ids of untuned runs (computed with the in-budget selection rule, RNG-isolated evaluations,
    ``model.dtype`` and the dev split scored once at a checkpoint chosen off it, with the head at the sweep's rate,
    which renamed every run on purpose): tuning must not rename any stored run."""
    config = tiny_config(tmp_path, methods=[{"name": "lora", "params": {"r": 4, "alpha": 8}}, {"name": "full"}],
                         seeds=[0, 1])
    host = make_host(config)
    runs = expand(config, solve_budgets(config, host), check_data(config, host, config.tasks))
    assert [spec.run_id for spec in runs] == ['7555df560d0db876', '01ef78205b9606f6', '70e3082fd6dafe9a',
                                              '0039f429555066ae']
    assert all(spec.tuning is None and spec.tuned is None for spec in runs)
