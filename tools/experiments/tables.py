"""The experiments' one mean +- std: over seeds, ignoring missing values (None, NaN, non-numbers)."""

import math
import statistics
from typing import Iterable, Optional, Tuple

__all__ = ["format_mean_std", "mean_std"]


def mean_std(values: Iterable) -> Tuple[Optional[float], Optional[float]]:
    """``(mean, sample standard deviation)`` of the numbers among ``values`` (std 0 for one number); ``(None,
    None)`` when there is none."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else 0.0)


def format_mean_std(values: Iterable, digits: int = 2, missing: str = "n/a") -> str:
    """``"mean +- std"`` of ``values`` with ``digits`` decimals, or ``missing``."""
    mean, std = mean_std(values)
    return missing if mean is None else f"{mean:.{digits}f} +- {std:.{digits}f}"
