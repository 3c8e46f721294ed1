# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""
Anomaly-detection metrics and the evaluation protocols of ``docs/evaluation.md`` as pure, deterministic functions.

Conventions used throughout:

* a voxel is predicted anomalous when its score is **strictly greater** than the threshold (``score > t``);
* ground truth is binarised as ``gt > 0`` (BraTS whole tumour);
* inputs may be numpy arrays or torch tensors; outputs are numpy arrays / python floats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["threshold_at_fpr"]

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: ArrayLike | Sequence, name: str = "array") -> np.ndarray:
    """Convert a numpy array, torch tensor or nested sequence to a numpy array (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be array-like, got {type(x).__name__}.") from e


def threshold_at_fpr(healthy_scores: ArrayLike | Sequence[ArrayLike], fpr: float) -> float:
    """
    Threshold whose false-positive rate on healthy values is (at most, and as close as possible to) ``fpr``.

    With the prediction rule ``score > t``, the returned ``t`` is the empirical ``(1 - fpr)`` quantile of the healthy
    scores taken with numpy's ``method="higher"`` (an order statistic, no interpolation). This guarantees
    ``mean(healthy_scores > t) <= fpr`` even with ties (e.g. a background of exact zeros), and equals the closed-form
    quantile ``F^-1(1 - fpr)`` up to sampling error for continuous distributions. ``np.quantile`` works by
    partial sorting (``np.partition``, linear time), so arrays of hundreds of millions of values are fine.

    Args:
        healthy_scores: anomaly scores on healthy data (any shape; numpy array, torch tensor, or a sequence of
            arrays of possibly different shapes, which are pooled). Typically the voxels inside the brain mask of
            healthy validation volumes.
        fpr: the requested false-positive rate, ``0 < fpr < 1`` (e.g. ``0.01`` for 1 %).

    Returns:
        the threshold as a python float.

    Raises:
        ValueError: ``fpr`` outside ``(0, 1)``, no scores, or non-finite scores.
    """
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in the open interval (0, 1), got {fpr}.")
    if isinstance(healthy_scores, (list, tuple)):
        parts = [_to_numpy(s, "healthy_scores").ravel() for s in healthy_scores]
        values = np.concatenate(parts) if parts else np.empty(0)
    else:
        values = _to_numpy(healthy_scores, "healthy_scores").ravel()
    if values.size == 0:
        raise ValueError("healthy_scores is empty: cannot calibrate a threshold without healthy values.")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"healthy_scores must be real numbers, got dtype {values.dtype}.")
    if not np.isfinite(values).all():
        raise ValueError("healthy_scores contains NaN or infinite values.")
    return float(np.quantile(values, 1.0 - fpr, method="higher"))
