"""The significance code on constructed cases: ties, constant differences, known bootstrap intervals, Holm."""

import numpy as np
import pytest
from scipy.stats import bootstrap, pearsonr, spearmanr, ttest_rel
from sklearn.metrics import f1_score, matthews_corrcoef

from peftbench import stats


def test_vectorized_metrics_equal_the_reference_implementations():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 300)
    pred = np.where(rng.random(300) < 0.7, gold, 1 - gold)
    assert stats.metric_of("accuracy", pred, gold) == pytest.approx((pred == gold).mean())
    assert stats.metric_of("f1", pred, gold) == pytest.approx(f1_score(gold, pred))
    assert stats.metric_of("matthews", pred, gold) == pytest.approx(matthews_corrcoef(gold, pred))
    three = rng.integers(0, 3, 300)
    three_pred = np.where(rng.random(300) < 0.6, three, rng.integers(0, 3, 300))
    assert stats.metric_of("matthews", three_pred, three) == pytest.approx(matthews_corrcoef(three, three_pred))
    score = np.round(rng.random(300) * 5, 1)  # ties, as STS-B's gold scores have
    guess = np.round(score + rng.normal(0, 1, 300), 1)
    expected = (pearsonr(guess, score)[0] + spearmanr(guess, score)[0]) / 2
    assert stats.metric_of("corr", guess, score) == pytest.approx(expected)


def test_identical_predictions_are_a_tie_with_p_one():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200)
    preds = [rng.integers(0, 2, 200) for _ in range(3)]
    result = stats.paired_bootstrap(preds, preds, gold, "accuracy", resamples=500)
    assert (result.diff, result.low, result.high, result.p) == (0.0, 0.0, 0.0, 1.0)


def test_right_wherever_the_baseline_is_wrong_gets_the_smallest_p():
    gold = np.arange(100) % 2
    right, wrong = [gold.copy()] * 2, [1 - gold] * 2
    result = stats.paired_bootstrap(right, wrong, gold, "accuracy", resamples=999)
    assert result.diff == 1.0 and result.low == 1.0 and result.high == 1.0
    assert result.p == pytest.approx(1 / 1000)


def test_one_seed_interval_matches_scipy_bootstrap_of_the_paired_differences():
    """Accuracy is a mean: with one seed, the paired example bootstrap is scipy's bootstrap of the per-example
    differences in correctness."""
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, 400)
    a = np.where(rng.random(400) < 0.80, gold, 1 - gold)
    b = np.where(rng.random(400) < 0.75, gold, 1 - gold)
    ours = stats.paired_bootstrap([a], [b], gold, "accuracy", resamples=4000, seed=1)
    diffs = (a == gold).astype(float) - (b == gold).astype(float)
    ref = bootstrap((diffs,), np.mean, n_resamples=4000, method="percentile", random_state=2).confidence_interval
    assert ours.diff == pytest.approx(diffs.mean())
    assert ours.low == pytest.approx(ref.low, abs=0.008)
    assert ours.high == pytest.approx(ref.high, abs=0.008)
    normal = diffs.std(ddof=1) / np.sqrt(400) * 1.96  # and the usual normal approximation
    assert ours.high - ours.low == pytest.approx(2 * normal, rel=0.1)


def test_seed_noise_widens_the_interval():
    """Two seeds that disagree strongly: resampling seeds makes the interval wider than the examples alone."""
    rng = np.random.default_rng(4)
    gold = rng.integers(0, 2, 300)
    base = [np.where(rng.random(300) < 0.7, gold, 1 - gold) for _ in range(2)]
    good = np.where(rng.random(300) < 0.9, gold, 1 - gold)
    bad = np.where(rng.random(300) < 0.5, gold, 1 - gold)
    examples_only = stats.paired_bootstrap([good], [base[0]], gold, "accuracy", resamples=1000)
    both = stats.paired_bootstrap([good, bad], base, gold, "accuracy", resamples=1000)
    assert both.high - both.low > 1.5 * (examples_only.high - examples_only.low)


def test_bootstrap_refuses_unknown_metrics_and_mismatched_shapes():
    gold = np.zeros(5, int)
    with pytest.raises(ValueError, match="no bootstrap for metric"):
        stats.paired_bootstrap([gold], [gold], gold, "bleu")
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_bootstrap([gold, gold], [gold], gold, "accuracy")
    with pytest.raises(ValueError, match="shapes differ"):
        stats.paired_bootstrap([gold[:4]], [gold[:4]], gold, "accuracy")


def test_constant_seed_differences_are_not_p_zero():
    """scipy's paired t-test returns p = 0 (t = −inf) for constant differences; the permutation test gives the
    smallest p its seeds allow."""
    method, baseline = [77.5, 77.0, 78.5], [79.0, 78.5, 80.0]
    assert ttest_rel(method, baseline).pvalue == 0.0
    three = stats.seed_permutation_test(method, baseline)
    assert three.p == pytest.approx(0.25) and three.diff == pytest.approx(-1.5)
    five = stats.seed_permutation_test([1, 2, 3, 4, 5], [2, 3, 4, 5, 6])
    assert five.p == pytest.approx(2 / 32)
    assert stats.seed_permutation_test([1, 2], [1, 2]).p == 1.0
    with pytest.raises(ValueError, match="two common seeds"):
        stats.seed_permutation_test([1], [2])


def test_the_old_prilora_sst2_mark_does_not_survive():
    """docs/protocol.md's earlier table marked PRILoRA's SST-2 (77.67 vs LoRA 79.00, paired t-test p = 0.015).
    Three seeds cannot establish that: the seed-level test gives 0.25 before any correction."""
    prilora, lora = [77.5, 77.0, 78.5], [79.0, 78.0, 80.0]
    assert ttest_rel(prilora, lora).pvalue < 0.05
    assert stats.seed_permutation_test(prilora, lora).p >= 0.25


def test_holm_adjusts_step_down_and_keeps_monotone_order():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert stats.holm({"only": 0.2}) == {"only": 0.2}
    assert stats.holm({}) == {}
    assert stats.holm({"x": 0.5, "y": 0.9}) == {"x": 1.0, "y": 1.0}  # capped at 1, never below an earlier one


def _run(label, task, seed, preds, gold, score):
    return {"label": label, "task": task, "seed": seed, "best": {"accuracy": score},
            "dev_predictions": {"validation": {"predictions": list(map(int, preds)), "labels": list(map(int, gold))}}
            if preds is not None else None}


def test_table_comparisons_bootstrap_with_predictions_and_fall_back_without():
    rng = np.random.default_rng(5)
    gold = rng.integers(0, 2, 300)
    runs = []
    for seed in range(3):
        good = np.where(rng.random(300) < 0.95, gold, 1 - gold)
        base = np.where(rng.random(300) < 0.70, gold, 1 - gold)
        runs += [_run("lora", "sst2", seed, base, gold, (base == gold).mean()),
                 _run("big", "sst2", seed, good, gold, (good == gold).mean()),
                 _run("old", "sst2", seed, None, gold, (good == gold).mean())]
    comparisons = stats.compare_to_baseline(runs, {"sst2": "accuracy"}, "lora", resamples=500)
    assert comparisons[("big", "sst2")].test == "bootstrap" and comparisons[("big", "sst2")].examples == 300
    assert comparisons[("old", "sst2")].test == "seed-permutation"
    adjusted, marks = stats.significant(comparisons)
    assert marks[("big", "sst2")] and not marks[("old", "sst2")]  # 3 seeds alone can't show it
    assert adjusted[("big", "sst2")] == pytest.approx(2 * comparisons[("big", "sst2")].p)
    line = stats.footer(comparisons, "lora")
    assert "Holm-corrected over the table's 2 comparisons" in line and "sign-flip" in line
