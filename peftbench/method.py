"""Base class of a PEFT method plugin.

A method is a class with a ``name``, a ``Params`` dataclass (its YAML-configurable hyperparameters) and
``@hookimpl`` methods implementing the run hooks of :mod:`peftbench.hookspecs`. The host makes one instance
per run, with that run's solved params, and registers it with the plugin manager only for that run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class NoParams:
    """Params of a method that has no hyperparameters."""


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
