"""Checks of what a caller hands the op, the reference and the decode path: one home, so the
same bad call gets the same error code from each (torch only; no codegen)."""
from __future__ import annotations

import math
from typing import Optional

from .errors import SpecError


def check_scale(scale, qk_dim: int) -> float:
    """The softmax scale as a float: ``qk_dim ** -0.5`` when None, else a finite number > 0
    (the kernels find a row's max before scaling, which only a positive scale leaves in place)."""
    if scale is None:
        return qk_dim ** -0.5
    value: Optional[float]
    if isinstance(scale, bool):
        value = None
    else:
        try:
            value = float(scale)
        except (TypeError, ValueError):
            value = None
    if value is None or not (math.isfinite(value) and value > 0):
        raise SpecError("E618", f"scale must be a finite number > 0, got {scale!r}",
                        hint="leave scale=None for qk_dim ** -0.5, or pass a positive float")
    return value
