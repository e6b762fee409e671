"""API version 1 location of the LoRA layer, now :mod:`peftbench.lora`: its names resolve with a warning."""

from typing import Any

from . import _moved


def __getattr__(name: str) -> Any:
    if name in ("LoRALinear", "MergedLoRAFunction", "merge_is_exact", "merged_linear"):
        return _moved(__name__, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
