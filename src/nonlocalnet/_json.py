"""Strict JSON for every file and report the package writes: ``NaN`` and infinities (a metric
with nothing to measure, a per-class accuracy of a class without videos) become ``null``, so that
any JSON reader can load what we write; Python's ``json`` would write the invalid bare ``NaN``."""

from __future__ import annotations

import json
import math

__all__ = ["finite", "dumps"]


def finite(value):
    """``value`` with every non-finite float (nested in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, *, indent: int | None = None) -> str:
    """``json.dumps`` of :func:`finite` ``(value)`` with ``allow_nan=False``."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)
