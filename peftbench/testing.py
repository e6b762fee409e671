"""Test helpers for peftbench and for plugin authors.

* From :mod:`peftbench.toys`: ``toy`` and ``toy_pair``, small synthetic tasks (no download, no data folder)
  that a tiny model learns in seconds (load this module as a plugin: ``plugins: [peftbench.testing]`` or
  ``--plugin peftbench.testing``); :func:`tiny_model_config`, a 2-layer random-init BERT; :func:`tiny_config`,
  a complete sweep config around both, for end-to-end tests in a few seconds.
* The conformance kit for method plugins (:mod:`peftbench.conformance`): :func:`check_method`,
  :class:`MethodConformance` (one pytest test per check), :class:`Conformance`, :class:`ConformanceError`.
"""

from __future__ import annotations

from .conformance import CHECKS, Conformance, ConformanceError, MethodConformance, check_method
from .toys import (
    PEFTBENCH_API_VERSION,
    TOY_TASKS,
    ToyTask,
    peftbench_add_tasks,
    tiny_config,
    tiny_model_config,
)

__all__ = ["PEFTBENCH_API_VERSION", "TOY_TASKS", "ToyTask", "peftbench_add_tasks", "tiny_model_config",
           "tiny_config", "CHECKS", "Conformance", "ConformanceError", "MethodConformance", "check_method"]
