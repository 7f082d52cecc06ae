"""Numbers as people read them in terminal lines, summaries and descriptions: 0.9994, not 0.9993650793650793."""

from __future__ import annotations

import math
from typing import Any


def decimals4(value: Any) -> str:
    """A metric with 4 decimals (`0.9994`, `1.0000`); "n/a" when it is missing or not finite (one class only)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{number:.4f}" if math.isfinite(number) and not isinstance(value, bool) else "n/a"
