"""peftbench: fair, budget-matched comparisons of parameter-efficient fine-tuning methods.

Plugin authors need only :mod:`peftbench.hookspecs` (the hook contract, ``hookimpl``) and
:class:`peftbench.method.Method`.
"""

from .hookspecs import API_VERSION, ParamCounts, TargetModule, TrainState, hookimpl

__version__ = "0.1.0"
__all__ = ["API_VERSION", "ParamCounts", "TargetModule", "TrainState", "hookimpl", "__version__"]
