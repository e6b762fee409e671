"""Value types with their checks, declared once for config sections and method params.

A field's annotation says which values it takes; :func:`peftbench.schema.from_dict` (pydantic) checks a
config's value against it, and the error names the file, line and key:
``c.yaml:12: methods[1].params.dropout: must be in [0, 1), got 1.5``. The bounds are ``annotated_types``
constraints, which pydantic enforces natively; a plugin's ``Params`` uses the same types, or its own
``Annotated[float, Gt(0)]`` (any ``annotated_types`` bound, or ``pydantic.Field(ge=...)``). Checks that
involve two fields stay in the dataclass's ``__post_init__``, starting the message with a field's name.

Like every dataclass check of a config, these apply to values read from YAML or ``--set``; Python code that
builds a dataclass directly is trusted.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Ge, Gt, Interval, MinLen
from pydantic import AfterValidator

PositiveInt = Annotated[int, Ge(1)]  #: 1, 2, ...
NonNegativeInt = Annotated[int, Ge(0)]  #: 0, 1, ...
PositiveFloat = Annotated[float, Gt(0)]  #: > 0
NonNegativeFloat = Annotated[float, Ge(0)]  #: >= 0
Fraction = Annotated[float, Interval(ge=0, lt=1)]  #: in [0, 1): a ratio, an EMA coefficient
OpenFraction = Annotated[float, Interval(gt=0, lt=1)]  #: in (0, 1)

#: a rank (of an adapter's factors, per module): 1, 2, ...
Rank = PositiveInt
#: the dropout probability on an adapter's input (or a classifier's), in [0, 1)
Dropout = Fraction


def unique(item: type, what: str = "value") -> type:
    """``list[item]`` whose values are all different; a repeated one is named: ``repeated seed(s) [3]``."""
    def check(values: list) -> list:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"repeated {what}(s) {repeated}")
        return values

    return Annotated[list[item], AfterValidator(check)]


#: a list of at least one seed, none repeated
Seeds = Annotated[unique(int, "seed"), MinLen(1)]


__all__ = ["PositiveInt", "NonNegativeInt", "PositiveFloat", "NonNegativeFloat", "Fraction", "OpenFraction", "Rank",
           "Dropout", "Seeds", "unique"]
