"""When a run steps and evaluates, computed before training from the training-set size alone.

The trainer and the pre-training checks (``peftbench budget``, the sweep's check that enough evaluations are
in budget) use these same functions, so what is announced is what happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig


def steps_per_epoch(batches: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of ``batches`` micro-batches (a last partial accumulation is a step too)."""
    return math.ceil(batches / grad_accum)


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    steps = steps_per_epoch(batches_per_epoch, cfg.grad_accum) * cfg.epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def batches(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)


def held_out(examples: int, size: float) -> int:
    """Examples a held-out part of ``size`` (a fraction < 1, or a number) takes of ``examples`` (sklearn's
    ``train_test_split`` rounding: a fraction rounds up)."""
    return math.ceil(size * examples) if size < 1 else int(size)


def train_examples(cfg: TrainConfig, examples: int, holdout: float | None = None) -> int:
    """The examples a run trains on, of a training set of ``examples``: capped (``max_train_samples``), less a
    tuning run's held-out part (``holdout``), less the selection split (``select: validation``)."""
    examples = min(examples, cfg.max_train_samples or examples)
    if holdout:
        examples -= held_out(examples, holdout)
    if cfg.select == "validation":
        examples -= held_out(examples, cfg.validation_size)
    return examples


def evaluates_every(cfg: TrainConfig, step: int) -> bool:
    """Whether ``train.eval_every`` evaluates after ``step`` completed steps."""
    return bool(cfg.eval_every) and step % cfg.eval_every == 0


def evaluation_steps(cfg: TrainConfig, batches_per_epoch: int) -> list[int]:
    """The completed-step counts of every dev evaluation, in order: every ``eval_every`` steps and every epoch
    end but the last (once, where they coincide), and the final one at the last step."""
    per_epoch, total = steps_per_epoch(batches_per_epoch, cfg.grad_accum), total_steps(cfg, batches_per_epoch)
    return [*(step for step in range(1, total) if evaluates_every(cfg, step) or step % per_epoch == 0), total]


@dataclass(frozen=True)
class InBudgetPlan:
    """Which evaluations of a run count toward its reported metric."""

    total_steps: int
    from_step: int  #: evaluations at or after this completed-step count are in budget (and the final one)
    evaluations: list[int]

    @property
    def counted(self) -> int:
        return sum(step >= self.from_step for step in self.evaluations[:-1]) + 1  # the final one always counts


def in_budget_plan(cfg: TrainConfig, examples: int, in_budget_from) -> InBudgetPlan:
    """The plan of a run that trains on ``examples`` examples (:func:`train_examples`); ``in_budget_from(total_steps)``
    is the method's :func:`~peftbench.hookspecs.peftbench_in_budget_from` (``None``: always in budget)."""
    per_epoch = batches(examples, cfg.batch_size)
    total = total_steps(cfg, per_epoch)
    return InBudgetPlan(total, in_budget_from(total) or 0, evaluation_steps(cfg, per_epoch))
