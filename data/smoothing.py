"""Alpha (temperature) smoothing of language shares, as in XLM and BLOOM's tokenizer sample.

q_i = p_i^alpha / sum_j p_j^alpha with p_i the raw share of language i. alpha=1 keeps the raw
proportions, alpha->0 tends to uniform; BLOOM used 0.3-0.5. One function, used both for the
tokenizer's training sample and for blend weights derived from token counts.
"""
from typing import Mapping

from data.errors import DataError


def smoothed_shares(sizes: Mapping[str, float], alpha: float) -> dict[str, float]:
    """Map each name to its alpha-smoothed share; sizes are any positive measure (bytes, tokens)."""
    if not 0.0 < alpha <= 1.0:
        raise DataError(f"alpha must be in (0, 1], got {alpha}")
    total = float(sum(sizes.values()))
    if total <= 0:
        raise DataError("cannot smooth shares: every dataset is empty")
    powered = {name: (size / total) ** alpha for name, size in sizes.items() if size > 0}
    norm = sum(powered.values())
    return {name: value / norm for name, value in powered.items()}
