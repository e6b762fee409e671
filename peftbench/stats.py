"""Significance for comparison tables: a paired bootstrap over dev examples and seeds, Holm's correction.

A difference between two methods on one task is marked only when it survives both sources of noise a reader
cares about: *which examples* the dev set happens to hold (the sampling error of a 200-example accuracy is about
three points) and *which seeds* were drawn. :func:`paired_bootstrap` resamples both at once — the same examples
for both methods (paired), seeds with replacement — and recomputes the task's metric on every resample, so
non-decomposable metrics (Matthews, F1, Pearson/Spearman) are handled as they are reported; a generation
task's metrics are stored per example as numerators and denominators and pooled the same way (GSM8K's strict
match, its gold solutions' log-probability per token). A test split scored once at the reported checkpoint
(GSM8K's) is compared on its own examples. :func:`holm` corrects the p-values of a whole table's comparisons
(dev and test columns together) for their number.

Runs stored without per-example predictions fall back to :func:`seed_permutation_test`, an exact sign-flip
test over seeds: with three seeds its smallest p is 0.25, which is the honest answer — three numbers cannot
establish a difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: resamples of :func:`paired_bootstrap` (a p-value near 0.05 is resolved to about ±0.005)
RESAMPLES = 2000


@dataclass(frozen=True)
class Comparison:
    """One method against the baseline on one task (metric units: the task's own, not ×100)."""

    diff: float  #: mean over seeds of metric(method) − metric(baseline), on the full dev set
    low: float  #: confidence interval of ``diff`` (percentile bootstrap)
    high: float
    p: float  #: two-sided p-value of "no difference" (uncorrected)
    seeds: int
    examples: int  #: 0: the seed-level fallback test, no per-example predictions
    test: str  #: "bootstrap" or "seed-permutation"


# ---------------------------------------------------------------------------------------------------------
# metrics over many resamples at once: predictions (S, B, n) after indexing, gold (B, n) → (S, B)
# ---------------------------------------------------------------------------------------------------------


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    return (pred == gold).mean(-1)


def _binary_counts(pred, gold):
    tp = ((pred == 1) & (gold == 1)).sum(-1).astype(float)
    tn = ((pred == 0) & (gold == 0)).sum(-1).astype(float)
    fp = ((pred == 1) & (gold == 0)).sum(-1).astype(float)
    fn = ((pred == 0) & (gold == 1)).sum(-1).astype(float)
    return tp, tn, fp, fn


def _f1(pred, gold):
    tp, _, fp, fn = _binary_counts(pred, gold)
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def _matthews(pred, gold):
    """Multi-class Matthews correlation (Gorodkin's R_K, what scikit-learn computes) from the confusion counts."""
    classes = np.union1d(np.unique(pred), np.unique(gold))
    n = pred.shape[-1]
    correct = (pred == gold).sum(-1).astype(float)
    t = np.stack([(gold == k).sum(-1) for k in classes], -1).astype(float)  # true counts per class
    p = np.stack([(pred == k).sum(-1) for k in classes], -1).astype(float)  # predicted counts per class
    numerator = correct * n - (t * p).sum(-1)
    denominator = np.sqrt((n * n - (p * p).sum(-1)) * (n * n - (t * t).sum(-1)))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _pearson(pred, gold):
    pred = pred - pred.mean(-1, keepdims=True)
    gold = gold - gold.mean(-1, keepdims=True)
    denominator = np.sqrt((pred * pred).sum(-1) * (gold * gold).sum(-1))
    numerator = (pred * gold).sum(-1)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank, as scipy's spearmanr)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _spearman(pred, gold):
    return _pearson(_ranks(pred), _ranks(gold))


def _corr(pred, gold):
    return (_pearson(pred, gold) + _spearman(pred, gold)) / 2


def _pooled(pred, gold):
    """Numerators over denominators, pooled over the examples: a generation metric stored per example
    (:func:`peftbench.task.per_example_scores`: 0/1 scores over labels of 1, summed log-probabilities over
    token counts)."""
    return pred.sum(-1) / gold.sum(-1)


#: the metrics peftbench's tasks report, computed for many resamples at once (``pooled``: any metric stored
#: per example as numerators and denominators)
VECTORIZED: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "accuracy": _accuracy, "f1": _f1, "matthews": _matthews, "pearson": _pearson, "spearman": _spearman,
    "corr": _corr, "pooled": _pooled,
}


def metric_of(name: str, predictions: np.ndarray, gold: np.ndarray) -> float:
    """``name`` of one prediction vector (what the bootstrap's point estimate uses)."""
    return float(VECTORIZED[name](np.asarray(predictions)[None], np.asarray(gold)[None])[0])


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------


def paired_bootstrap(method: Sequence[np.ndarray], baseline: Sequence[np.ndarray], gold: np.ndarray,
                     metric: str, resamples: int = RESAMPLES, confidence: float = 0.95, seed: int = 0,
                     chunk: int = 250) -> Comparison:
    """Difference ``metric(method) − metric(baseline)``, averaged over seeds, with its percentile CI and a
    two-sided p-value from resampling dev examples (the same ones for both methods) and seeds.

    ``method[s]`` and ``baseline[s]`` are the two methods' predictions of seed ``s`` for the examples of
    ``gold``, in the same order. The p-value is that of the centred bootstrap distribution,
    ``(1 + #{|d* − d| ≥ |d|}) / (1 + resamples)``: identical predictions give p = 1; a method right wherever
    the baseline is wrong, on every example and seed, gets the smallest p the resamples can show."""
    if metric not in VECTORIZED:
        raise ValueError(f"no bootstrap for metric {metric!r}; known: {', '.join(VECTORIZED)}")
    if len(method) != len(baseline) or not method:
        raise ValueError("paired_bootstrap needs the same seeds (at least one) for both methods")
    fn = VECTORIZED[metric]
    a, b, gold = np.stack(method), np.stack(baseline), np.asarray(gold)
    if a.shape != b.shape or a.shape[1] != gold.shape[0]:
        raise ValueError(f"prediction shapes differ: {a.shape}, {b.shape} for {gold.shape[0]} examples")
    seeds, n = a.shape
    observed = float((fn(a, gold[None]) - fn(b, gold[None])).mean())
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, chunk):  # bounded memory: seeds × chunk × examples at a time
        size = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        per_seed = fn(a[:, idx], gold[idx][None]) - fn(b[:, idx], gold[idx][None])  # (seeds, size)
        pick = rng.integers(0, seeds, size=(size, seeds))  # seeds resampled too (none to resample with one)
        draws.append(per_seed[pick, np.arange(size)[:, None]].mean(-1))
    d = np.concatenate(draws)
    tail = (1 - confidence) / 2
    low, high = (float(x) for x in np.quantile(d, [tail, 1 - tail]))
    if observed == 0:  # a tie is no evidence, whatever the spread
        p = 1.0
    else:
        p = float((1 + np.count_nonzero(np.abs(d - observed) >= abs(observed))) / (1 + resamples))
    return Comparison(observed, low, high, p, seeds, n, "bootstrap")


def seed_permutation_test(method: Sequence[float], baseline: Sequence[float]) -> Comparison:
    """Exact paired sign-flip test over seeds (scipy ``permutation_test``), for runs without per-example
    predictions. ``n`` seeds allow p ≥ 2 / 2ⁿ: 0.25 at 3 seeds, 0.0625 at 5. Constant non-zero differences
    get that smallest p, never 0; identical scores get 1. The interval is the range of the seed differences."""
    from scipy.stats import permutation_test

    diffs = np.asarray(method, float) - np.asarray(baseline, float)
    if diffs.size < 2:
        raise ValueError("a seed-level test needs at least two common seeds")
    observed = float(diffs.mean())
    if not diffs.any():
        p = 1.0
    else:
        result = permutation_test((diffs,), np.mean, permutation_type="samples", alternative="two-sided",
                                  n_resamples=math.inf)
        p = float(result.pvalue)
    return Comparison(observed, float(diffs.min()), float(diffs.max()), p, int(diffs.size), 0, "seed-permutation")


def holm(p_values: dict, alpha: float = 0.05) -> dict:
    """Holm's step-down adjusted p-values (each ``min(1, max over the smaller ones of (m − i) · p_(i))``);
    a comparison is significant at ``alpha`` when its adjusted p is below it. Keys are kept."""
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    m, running, adjusted = len(ordered), 0.0, {}
    for i, (key, p) in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[key] = running
    return adjusted


# ---------------------------------------------------------------------------------------------------------
# a table's comparisons
# ---------------------------------------------------------------------------------------------------------


def stored_examples(run: dict, name: str, split: str = "dev") -> tuple[np.ndarray, np.ndarray, str] | None:
    """The run's stored per-example predictions of metric ``name`` on a reported split (``"dev"``: its first,
    the one its dev column reports; else the split of that name, e.g. ``"test"``) with their gold, and the
    :data:`VECTORIZED` metric that scores them: ``pooled`` where the split keeps ``name`` per example (a
    generation task's), else ``name`` itself of the class ids or values; ``None`` without them."""
    stored = run.get("dev_predictions") or {}
    entry = next(iter(stored.values()), None) if split == "dev" else stored.get(split)
    if not entry:
        return None
    per_metric = (entry.get("metrics") or {}).get(name)
    if per_metric:
        return np.asarray(per_metric["predictions"], float), np.asarray(per_metric["labels"], float), "pooled"
    if name in VECTORIZED and "predictions" in entry:
        return np.asarray(entry["predictions"]), np.asarray(entry["labels"]), name
    return None


def compare_to_baseline(runs: list[dict], main_metric: dict[str, str], baseline: str, metric: str = "best",
                        resamples: int = RESAMPLES, split: str = "dev") -> dict[tuple[str, str], Comparison]:
    """Each (label, task)'s :class:`Comparison` with ``baseline`` on ``split`` (``"dev"``: the reported dev
    split; ``"test"``: a test split scored at the same checkpoint, stored as ``test_<metric>``) over the seeds
    both ran: the paired bootstrap where both stored per-example predictions of the same examples
    (:func:`stored_examples`, and ``metric`` is the reported one), else the seed-level permutation test (two or
    more common seeds), else none."""
    by_seed: dict[tuple[str, str], dict[int, dict]] = {}
    for run in runs:
        by_seed.setdefault((run["label"], run["task"]), {})[run["seed"]] = run
    comparisons = {}
    for (label, task), mine in by_seed.items():
        theirs = by_seed.get((baseline, task))
        name = main_metric.get(task)
        if label == baseline or not theirs or not name:
            continue
        seeds = sorted(set(mine) & set(theirs))
        pairs = [(stored_examples(mine[s], name, split), stored_examples(theirs[s], name, split)) for s in seeds]
        usable = (metric == "best" and pairs and all(
            a is not None and b is not None and a[2] == b[2] and np.array_equal(a[1], b[1]) for a, b in pairs))
        if usable and all(np.array_equal(a[1], pairs[0][0][1]) for a, _ in pairs):
            comparisons[(label, task)] = paired_bootstrap([a[0] for a, _ in pairs], [b[0] for _, b in pairs],
                                                          pairs[0][0][1], pairs[0][0][2], resamples=resamples)
            continue
        key = name if split == "dev" else f"{split}_{name}"
        scores = [(float((mine[s].get(metric) or {}).get(key, math.nan)),
                   float((theirs[s].get(metric) or {}).get(key, math.nan))) for s in seeds]
        scores = [(a, b) for a, b in scores if math.isfinite(a) and math.isfinite(b)]
        if len(scores) >= 2:
            comparisons[(label, task)] = seed_permutation_test([a for a, _ in scores], [b for _, b in scores])
    return comparisons


def significant(comparisons: dict, alpha: float = 0.05) -> tuple[dict, dict]:
    """Holm-adjusted p-values of a table's comparisons, and which keys survive at ``alpha``."""
    adjusted = holm({key: c.p for key, c in comparisons.items()})
    return adjusted, {key: p < alpha for key, p in adjusted.items()}


def footer(comparisons: dict, baseline: str, alpha: float = 0.05, test_columns: bool = False) -> str:
    """The table's line on what its marks mean: which test, over what (``test_columns``: test columns were
    compared too, on their own examples), how many comparisons corrected."""
    if not comparisons:
        return f"no comparison with {baseline}: it needs two seeds, or stored per-example predictions"
    tests = sorted({c.test for c in comparisons.values()})
    examples = "dev examples (test examples in a test column)" if test_columns else "dev examples"
    what = {"bootstrap": f"paired bootstrap over {examples} and seeds ({RESAMPLES} resamples, 95% CI)",
            "seed-permutation": "exact sign-flip test over seeds (no per-example predictions stored)"}
    return (f"† differs from {baseline}: " + "; ".join(what[t] for t in tests)
            + f", Holm-corrected over the table's {len(comparisons)} comparisons, p < {alpha}")
