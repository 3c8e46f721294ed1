# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Paired bootstrap confidence intervals for differences between two methods scored on the same items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["paired_bootstrap_ci"]


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """
    Mean difference ``mean(a - b)`` over items scored by both methods (pairs with a non-finite value are dropped)
    and its percentile bootstrap confidence interval: items are resampled with replacement, the same items for
    both methods, ``n_resamples`` times.

    Args:
        a, b: per-item scores of the two methods, in the same item order.
        n_resamples: bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling.

    Returns:
        ``{"diff", "low", "high", "n", "p_not_better"}``; ``p_not_better`` is the fraction of resamples whose mean
        difference is <= 0 (a one-sided bootstrap estimate for "a is not better than b"). NaNs when no pair is left.

    Raises:
        ValueError: different lengths, or a confidence outside (0, 1).
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise ValueError(f"a and b must be 1D with the same length, got {a_arr.shape} and {b_arr.shape}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    keep = np.isfinite(a_arr) & np.isfinite(b_arr)
    d = a_arr[keep] - b_arr[keep]
    nan = float("nan")
    if d.size == 0:
        return {"diff": nan, "low": nan, "high": nan, "n": 0, "p_not_better": nan}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_resamples), d.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "n": int(d.size),
            "p_not_better": float((means <= 0).mean())}
