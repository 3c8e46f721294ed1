# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Input checks shared by the metrics, the post-processing and the protocols: array conversion, binarisation, shapes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ArrayLike", "to_numpy", "as_binary", "check_finite", "check_same_shape"]

#: what the evaluation functions accept: numpy arrays or torch tensors
ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: ArrayLike | Sequence, name: str = "array") -> np.ndarray:
    """
    A numpy view of a numpy array, torch tensor or nested sequence (no copy when possible).

    Args:
        x: the input.
        name: its name, for the error message.

    Raises:
        TypeError: ``x`` is not array-like.
    """
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be array-like, got {type(x).__name__}.") from e


def check_finite(arr: np.ndarray, name: str) -> None:
    """
    Raise when a floating-point array holds NaN or infinite values.

    Args:
        arr: the array.
        name: its name, for the error message.
    """
    if arr.size and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values.")


def as_binary(x: ArrayLike, name: str) -> np.ndarray:
    """
    A boolean mask: booleans pass through, numbers become ``x > 0`` (after a finiteness check).

    Args:
        x: a mask or label array.
        name: its name, for the error message.
    """
    arr = to_numpy(x, name)
    if arr.dtype != bool:
        check_finite(arr, name)
        arr = arr > 0
    return arr


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """
    Raise when two arrays differ in shape, naming both.

    Args:
        a, b: the arrays.
        name_a, name_b: their names, for the error message.
    """
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match.")
