"""Text formatting shared by the stages that write reports (score's report, summary's table)."""

from __future__ import annotations

import math


def fmt(value) -> str:
    """A metric with four decimals; "n/a" when it is undefined (None or NaN)."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
