"""Comparison tables: mean ± std over seeds, ×100, best per column marked, four formats."""

import numpy as np
import pytest

from peftbench.tables import build, human_count

MAIN = {"rte": "accuracy", "stsb": "corr"}


def run(label, task, seed, value, adapter=1000):
    metric = MAIN[task]
    return {"label": label, "task": task, "seed": seed, "best": {metric: value}, "final": {metric: value - 0.01},
            "trainable": {"adapter": adapter}}


RUNS = [run("lora", "rte", 0, 0.70), run("lora", "rte", 1, 0.72), run("lora", "stsb", 0, 0.90), run("lora", "stsb", 1, 0.92),
        run("adalora", "rte", 0, 0.75, 1_270_000), run("adalora", "rte", 1, 0.77, 1_270_000),
        run("adalora", "stsb", 0, 0.80, 1_270_000), run("adalora", "stsb", 1, 0.84, 1_270_000)]


def test_markdown_mean_std_and_best_marked():
    table = build(RUNS, MAIN, "markdown")
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["method", "params", "peak", "rte (accuracy)",
                                                              "stsb (corr)", "avg"]
    lora = next(line for line in lines if line.startswith("| lora"))
    ada = next(line for line in lines if line.startswith("| adalora"))
    assert "71.00±1.41" in lora and "**91.00±1.41**" in lora and "**81.00**" in lora  # avg (71+91)/2 = 81 > (76+82)/2 = 79
    assert "**76.00±1.41**" in ada and "82.00±2.83" in ada and "79.00" in ada
    assert "1.27M" in ada and "1.00K" in lora


def test_latex_csv_plain():
    latex = build(RUNS, MAIN, "latex")
    assert "\\textbf{76.00$\\pm$1.41}" in latex and "\\begin{tabular}" in latex
    csv_text = build(RUNS, MAIN, "csv")
    assert csv_text.splitlines()[1].startswith("lora,1.00K,1.00K,71.00±1.41,91.00±1.41*,81.00*")
    plain = build(RUNS, MAIN, "plain")
    assert "76.00±1.41*" in plain


def test_final_metrics_missing_tasks_and_single_seed():
    table = build(RUNS + [run("full", "rte", 0, 0.6, 10**8)], MAIN, "csv", metric="final", cost=False)
    full = next(line for line in table.splitlines() if line.startswith("full"))
    assert full == "full,100.00M,100.00M,59.00,—,—"  # one seed: no ±; missing task: no average
    assert build([], MAIN) == "(no finished runs match)"
    with pytest.raises(ValueError):
        build(RUNS, MAIN, "html")


def test_human_count():
    assert [human_count(n) for n in (999, 1_327_104, 184_000_000)] == ["999", "1.33M", "184.00M"]


def test_significance_needs_more_than_three_seed_scores():
    """Three seed scores alone (no per-example predictions stored) cannot mark a difference: the exact sign-flip
    test's smallest p is 0.25. The footer says which test ran, over how many comparisons, and the intervals."""
    runs = []
    for seed, (lora, better, same) in enumerate([(0.70, 0.80, 0.71), (0.72, 0.83, 0.70), (0.71, 0.81, 0.73)]):
        runs += [run("lora", "rte", seed, lora), run("better", "rte", seed, better), run("noise", "rte", seed, same)]
    csv_text = build(runs, MAIN, "csv")
    assert "†" not in csv_text
    plain = build(runs, MAIN, "plain")
    assert "exact sign-flip test over seeds" in plain and "Holm-corrected over the table's 2 comparisons" in plain
    assert "better − lora: rte +10.33 [+10.00, +11.00] p=0.5" in plain


def test_per_example_predictions_mark_a_real_difference():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 400)
    runs = []
    for seed in range(3):
        for label, right in (("lora", 0.7), ("better", 0.9), ("noise", 0.7)):
            pred = np.where(rng.random(400) < right, gold, 1 - gold)
            runs.append(dict(run(label, "rte", seed, float((pred == gold).mean())), dev_predictions={
                "validation": {"predictions": pred.tolist(), "labels": gold.tolist()}}))
    rows = {line.split(",")[0]: line for line in build(runs, MAIN, "csv").splitlines()}
    assert "†" in rows["better"] and "†" not in rows["noise"]
    assert "paired bootstrap over dev examples and seeds" in build(runs, MAIN, "plain")


def test_ablation_mode_names_the_varying_params():
    runs = [dict(run("prilora", "rte", 0, 0.7), method="prilora",
                 spec={"params": {"criterion": "input_norm", "ratio": 0.5}}),
            dict(run("prilora_random", "rte", 0, 0.6), method="prilora",
                 spec={"params": {"criterion": "random", "ratio": 0.5}}),
            dict(run("lora", "rte", 0, 0.7), method="lora", spec={"params": {"r": 8, "criterion": None}})]
    table = build(runs, MAIN, "csv", ablation=True, baseline=None)
    assert table.splitlines()[0].startswith("method,setting,params")
    assert "prilora_random,criterion=random," in table
    assert "prilora,criterion=input_norm," in table
    # params are compared within a method: LoRA's own keys are not a "setting" of the PRILoRA rows
    assert "lora,," in table and "r=" not in table


def test_task_columns_follow_the_order_of_main_metric():
    """The CLI passes tasks in the order their plugins register them: the task plugin orders the columns."""
    header = build(RUNS, {"stsb": "corr", "rte": "accuracy"}, "csv", cost=False).splitlines()[0]
    assert header == "method,params,peak,stsb (corr),rte (accuracy),avg"


def test_the_cli_lists_tasks_in_registration_order(host):
    from peftbench.cli import main_metrics

    rows = [{"task": task, "best": {}} for task in ("stsb", "rte", "mnli", "sst2", "toy")]
    assert list(main_metrics(rows, host)) == ["mnli", "sst2", "rte", "stsb", "toy"]


def _costly(label, seed, step_s, mem, adapter):
    return {**run(label, "rte", seed, 0.7), "median_step_s": step_s, "tokens_per_s": 1000 / step_s, "train_s": 60.0,
            "peak_mem_bytes": mem, "mem_kind": "cuda_max_allocated", "adapter_bytes": adapter}


COSTLY = [_costly("lora", 0, 0.010, 2 * 2 ** 30, 600_000), _costly("lora", 1, 0.012, 2 * 2 ** 30, 600_000),
          _costly("slow", 0, 0.150, 6 * 2 ** 30, 600_000)]


def test_cost_columns_mean_over_a_methods_runs():
    """Same count, same score: only the cost columns tell a 15× slower, 3× hungrier method apart."""
    header, lora, slow = build(COSTLY, MAIN, "csv").splitlines()
    assert header.endswith(",median_step_ms,tokens_per_s,peak_mem_mib,train_s,adapter_kib")
    assert lora.split(",")[-5:] == ["11", "91666.7", "2048", "60", "585.938"]
    assert slow.split(",")[-5:] == ["150", "6666.67", "6144", "60", "585.938"]
    markdown = build(COSTLY, MAIN, "markdown", cost=True)
    row = next(line for line in markdown.splitlines() if line.startswith("| slow"))
    assert "150.0" in row and "6.0 GiB" in row and "585.9 KiB" in row
    assert "peak memory (GPU: torch.cuda.max_memory_allocated over the run)" in markdown
    assert "mean over each method's runs" in markdown
    assert "step ms" not in build(COSTLY, MAIN, "markdown")  # narrow by default
    assert "step ms" not in build(COSTLY, MAIN, "csv", cost=False)


def test_cost_columns_of_runs_without_costs_are_empty():
    """Older stores have no adapter size: an empty CSV cell, a dash in markdown, never a made-up zero."""
    header, *rows = build(RUNS, MAIN, "csv").splitlines()
    assert rows[0].endswith(",,,,,")
    assert "| —" in build(RUNS, MAIN, "markdown", cost=True)


def test_comparison_is_a_structured_table_every_format_renders():
    """The cells carry value, std and flags; each format marks them its own way (no renderer parses marks)."""
    from peftbench.tables import Cell, comparison, render

    table = comparison(RUNS, MAIN, baseline=None)
    lora = next(row for row in table.rows if row[0].value == "lora")
    assert lora[3:] == [Cell("71.00", "1.41"), Cell("91.00", "1.41", best=True), Cell("81.00", best=True)]
    assert Cell("1", "2", best=True, significant=True, missed=True).text("latex") == "\\textbf{1$\\pm$2}†‼"
    assert render(table, "markdown") == build(RUNS, MAIN, "markdown", baseline=None)
    assert table.footer("plain")[0].endswith("best per column marked *")


def test_unmatched_references_are_named_under_the_table():
    runs = [dict(run("lora", "rte", 0, 0.7), budget={"matched": True}),
            dict(run("full", "rte", 0, 0.72, 10**8), budget={"matched": False}),
            dict(run("peft:ia3", "rte", 0, 0.6, 9216), budget={"matched": False})]
    text = build(runs, MAIN, "plain")
    assert "unmatched references (trainable count not matched to the budget; `params` is their own): full, " \
           "peft:ia3" in text
    assert "unmatched references" not in build(RUNS, MAIN, "plain")


def test_show_puts_another_stored_metric_in_the_task_columns():
    """``peftbench table --show formatted`` (e.g. GSM8K's share of formatted answers, where the main metric is 0
    for every run): that metric, dev and test, instead of the main one, compared with the baseline on its own
    values: stored only per run here (not per example), so by the seed-level test, which three seeds cannot
    pass."""
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 400)
    runs = []
    for seed in range(3):
        for label, right, formatted in (("lora", 0.7, 0.5), ("better", 0.9, 0.75)):
            pred = np.where(rng.random(400) < right, gold, 1 - gold)
            runs.append({**run(label, "rte", seed, float((pred == gold).mean())),
                         "dev_predictions": {"validation": {"predictions": pred.tolist(), "labels": gold.tolist()}}})
            runs[-1]["best"].update(formatted=formatted, test_accuracy=0.0, test_formatted=formatted / 2)
    assert "†" in build(runs, MAIN, "csv")  # on the main metric, the difference is marked
    shown = build(runs, MAIN, "csv", show="formatted")
    rows = {line.split(",")[0]: line.strip().split(",") for line in shown.splitlines()}
    assert rows["method"][3:6] == ["rte (formatted)", "avg", "rte test (formatted)"]
    assert rows["lora"][3] == "50.00±0.00" and rows["better"][5] == "37.50±0.00*"
    assert "†" not in shown
    assert "better − lora: rte +25.00 [+25.00, +25.00] p=0.5; rte test +12.50 [+12.50, +12.50] p=0.5" in build(
        runs, MAIN, "plain", show="formatted")


def generation_run(label, seed, dev, test):
    """A GSM8K-like run: per split, each example's strict match (0/1) and its gold solution's summed
    log-probability over its token count, stored as :func:`peftbench.task.per_example_scores` stores them."""
    def split(right, sums, tokens):
        return {"predictions": right, "labels": [1.0] * len(right), "metrics": {
            "strict_match": {"predictions": right, "labels": [1.0] * len(right)},
            "gold_logprob": {"predictions": sums, "labels": tokens}}}

    def pooled(right, sums, tokens):
        return {"strict_match": float(np.mean(right)), "gold_logprob": float(np.sum(sums) / np.sum(tokens))}

    best = {**pooled(*dev), **{f"test_{k}": v for k, v in pooled(*test).items()}}
    return {"label": label, "task": "gsm8k", "seed": seed, "best": best, "final": best,
            "trainable": {"adapter": 1000}, "dev_predictions": {"dev": split(*dev), "test": split(*test)}}


def test_a_generation_tasks_test_column_is_compared_per_example_on_any_stored_metric():
    """GSM8K's test column gets its own paired bootstrap over its examples and seeds (corrected with the dev
    column's), for the main metric and for a ``--show`` metric stored per example: a strict match of 0 for
    both methods is no difference; a gold log-probability higher on every test question is one, which the
    4 dev questions (identical for both) do not show."""
    rng = np.random.default_rng(0)
    main = {"gsm8k": "strict_match"}
    tokens = rng.integers(50, 150, 64).astype(float).tolist()
    dev_tokens = [80.0, 90.0, 100.0, 110.0]
    runs = []
    for seed in range(3):
        dev = ([0.0] * 4, [-0.9 * t for t in dev_tokens], dev_tokens)
        for label, per_token in (("lora", -1.0), ("better", -0.8)):
            sums = [(per_token + 0.05 * rng.standard_normal()) * t for t in tokens]
            runs.append(generation_run(label, seed, dev, ([0.0] * 64, sums, tokens)))
    assert "†" not in build(runs, main, "csv")  # strict match 0 everywhere
    table = build(runs, main, "plain")
    assert "better − lora: gsm8k +0.00 [+0.00, +0.00] p=1; gsm8k test +0.00 [+0.00, +0.00] p=1" in table
    shown = build(runs, main, "csv", show="gold_logprob")
    rows = {line.split(",")[0]: line.strip().split(",") for line in shown.splitlines()}
    assert rows["method"][3:6] == ["gsm8k (gold_logprob)", "avg", "gsm8k test (gold_logprob)"]
    assert not rows["better"][3].endswith("†") and rows["better"][5].endswith("*†")
    assert ("paired bootstrap over dev examples (test examples in a test column) and seeds (2000 resamples, 95% CI), "
            "Holm-corrected over the table's 2 comparisons") in build(runs, main, "plain", show="gold_logprob")
