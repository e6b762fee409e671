"""Base class of a PEFT method plugin.

A method is a class with a ``name``, a ``Params`` dataclass (its YAML-configurable hyperparameters) and
``@hookimpl`` methods implementing the run hooks of :mod:`peftbench.hookspecs`. The host makes one instance
per run, with that run's solved params, and registers it with the plugin manager only for that run.

Optional: :meth:`Method.describe` says what ``peftbench budget`` shows in its ``scale`` and ``deviations``
columns (the effective LoRA scale and every switch where the run departs from the paper or its notes); the
default shows nothing. :func:`scale_range` and :func:`departures` format both the same way for every method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class NoParams:
    """Params of a method that has no hyperparameters."""


@dataclass
class Description:
    """What ``peftbench budget`` shows of a method's configuration beyond its counts."""

    #: the effective scale of the adapter's update (LoRA's ``alpha / r``), e.g. ``"2.00"`` or ``"4.00→1.33"``
    #: (first → last layer) when it differs between modules; ``""``: not applicable (shown as ``—``)
    scale: str = ""
    #: ``key=value`` for every switch where the run departs from the paper's defaults or the method notes'
    #: choices, a choice the paper does not state marked ``[open]``
    deviations: list[str] = field(default_factory=list)


def scale_range(scales: Sequence[float]) -> str:
    """One scale (``"2.00"``), ``first→last`` over modules in layer order when monotone, else ``min–max``."""
    if not scales:
        return ""
    if max(scales) - min(scales) < 5e-3:
        return f"{scales[0]:.2f}"
    pairs = list(zip(scales, scales[1:]))
    if all(a >= b for a, b in pairs) or all(a <= b for a, b in pairs):
        return f"{scales[0]:.2f}→{scales[-1]:.2f}"
    return f"{min(scales):.2f}–{max(scales):.2f}"


def departures(params: Any, reference: dict[str, Any], open_choices: Sequence[str] = ()) -> list[str]:
    """``key=value`` for every field of ``params`` that differs from ``reference`` (the paper's or the notes'
    value), then every key of ``open_choices`` (choices the paper does not state) marked ``[open]``."""
    def show(key: str) -> str:
        return f"{key}={getattr(params, key)}"

    out = [show(key) for key, value in reference.items() if getattr(params, key) != value]
    return out + [f"{show(key)}[open]" for key in open_choices]


class Method:
    #: unique name used in configs (``methods: [{name: lora}]``)
    name: ClassVar[str]
    #: dataclass of the method's hyperparameters; YAML ``params:`` are validated into it
    Params: ClassVar[type] = NoParams
    #: one line shown by ``peftbench plugins``
    description: ClassVar[str] = ""
    #: ``False`` for reference methods (full fine-tuning) that are reported but not budget-matched
    matches_budget: ClassVar[bool] = True

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    def with_params(self, **changes: Any) -> Any:
        """A copy of this method's params with ``changes`` applied (handy in ``peftbench_solve_budget``)."""
        return dataclasses.replace(self.params, **changes)

    def describe(self, targets: list) -> Description:
        """Effective scale and deviation switches of this method with ``self.params`` on ``targets`` (the
        :class:`~peftbench.hookspecs.TargetModule` list of the budget's meta model), for ``peftbench budget``.
        Optional: the default shows nothing. Format with :func:`scale_range` and :func:`departures`."""
        return Description()

    @classmethod
    def implemented_hooks(cls) -> list[str]:
        """Names of the run hooks this method implements."""
        return sorted(
            name
            for name in dir(cls)
            if name.startswith("peftbench_") and hasattr(getattr(cls, name), "peftbench_impl")
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"
