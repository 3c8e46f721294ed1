# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The one JSON sanitiser: turns results (numpy, torch, paths, NaN) into values that strict JSON can hold."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["to_json_safe"]


def to_json_safe(value: Any) -> Any:
    """
    A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts: mappings get string keys, tuples, lists,
    sets and arrays become lists, numpy and one-element torch values become Python numbers, NaN and infinities become
    ``None`` (strict JSON has no NaN), enums their value, paths and devices strings; anything else becomes its
    string form.

    Args:
        value: a result, settings object or summary.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return to_json_safe(value.value)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None:
        if isinstance(value, torch.Tensor):
            return to_json_safe(value.item() if value.numel() == 1 else value.detach().cpu().tolist())
        if isinstance(value, torch.device):
            return str(value)
    return str(value)
