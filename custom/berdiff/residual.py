# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The image-space residual of the anomaly map: which sign of ``input - reconstruction`` counts
(:class:`ResidualSign`), how the channels are weighted, and an optional intensity prior (:func:`residual_map`).

The paper's map is ``sum_c (x_hat_c - x_c)^2`` (sign ``both``, every channel weight 1, no prior). On brain MRI the
lesions that matter (tumour, oedema, white-matter lesions) are *hyperintense* on FLAIR: where the input is darker than
its pseudo-healthy reconstruction there is usually an imperfect reconstruction of healthy anatomy (edges, sulci,
ventricles), not a lesion. ``positive`` keeps only the brighter-than-healthy part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import StrEnum

__all__ = ["ResidualSign", "channel_index", "channel_weights_for", "check_channel_weights", "residual_map"]


class ResidualSign(StrEnum):
    """
    Which part of the difference ``d = input - reconstruction`` enters the residual ``sum_c w_c r(d_c)^2``.

    both: ``r(d) = d`` (the paper's squared residual).
    positive: ``r(d) = max(d, 0)``: only where the input is brighter than its pseudo-healthy reconstruction
        (hyperintense anomalies, e.g. tumour and oedema on FLAIR and T2).
    negative: ``r(d) = max(-d, 0)``: only where the input is darker (hypointense anomalies).
    """

    BOTH = "both"
    POSITIVE = "positive"
    NEGATIVE = "negative"


def check_channel_weights(weights: Sequence[float] | None) -> tuple[float, ...] | None:
    """
    ``weights`` as a tuple of finite non-negative floats with a positive sum (None passes through).

    Raises:
        ValueError: an empty list, a negative or non-finite weight, or all weights 0.
    """
    if weights is None:
        return None
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"channel weights must be a list of numbers, got {weights!r}.")
    try:
        values = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"channel weights must be numbers, got {list(weights)!r}.") from None
    if not values or any(not (w >= 0.0 and w < float("inf")) for w in values) or sum(values) <= 0.0:
        raise ValueError(f"channel weights must be finite, >= 0 and not all 0, got {list(values)}.")
    return values


def channel_weights_for(channels: Sequence[str], used: Sequence[str] | str | None) -> list[float] | None:
    """
    Channel weights (1 for a used channel, 0 otherwise) from channel names, e.g. ``channels = [t1, t1ce, t2, flair]``
    and ``used = [flair]`` give ``[0, 0, 0, 1]``. None or ``"all"`` (every channel) gives None.

    Args:
        channels: the names of the image's channels, in order.
        used: the names of the channels that enter the residual.

    Raises:
        ValueError: an unknown or repeated name, or an empty list.
    """
    if used is None or used == "all" or (not isinstance(used, str) and list(used) == ["all"]):
        return None
    names = [used] if isinstance(used, str) else [str(u) for u in used]
    unknown = [n for n in names if n not in channels]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"residual channels must be distinct names from {list(channels)} (or 'all'), got {names}."
        )
    return [1.0 if c in names else 0.0 for c in channels]


def channel_index(channels: Sequence[str], name: str | None) -> int | None:
    """
    The index of channel ``name`` in ``channels`` (None or ``"none"`` gives None), e.g. for the intensity prior.

    Raises:
        ValueError: an unknown name.
    """
    if name is None or name == "none":
        return None
    if name not in channels:
        raise ValueError(f"unknown channel {name!r}; choose from {list(channels)} (or none).")
    return list(channels).index(name)


def residual_map(
    reconstruction: torch.Tensor,
    reference: torch.Tensor,
    sign: str = ResidualSign.BOTH,
    channel_weights: Sequence[float] | None = None,
    intensity: torch.Tensor | None = None,
    intensity_power: float = 1.0,
    intensity_floor: float = 0.0,
) -> torch.Tensor:
    """
    ``R = sum_c w_c r(reference_c - reconstruction_c)^2`` (see :class:`ResidualSign`); with an intensity prior
    ``(intensity_floor + sqrt(R)) * intensity ** intensity_power`` (for one channel, ``sqrt(R)`` is the absolute
    difference of the counted sign): the residual raises the intensity's rank where the reconstruction disagrees, and
    with ``intensity_floor > 0`` the voxels the reconstruction reproduced are still ranked by their intensity.

    Args:
        reconstruction: the pseudo-healthy reconstruction (B, C, ...).
        reference: what it is compared with, same shape (the input, or the autoencoder's reconstruction).
        sign: a :class:`ResidualSign`.
        channel_weights: C weights (None: all 1).
        intensity: optional (B, 1, ...) intensity prior the residual is multiplied with (e.g. the input's FLAIR).
        intensity_power: the power of the prior (> 0): how much the intensity counts against the residual.
        intensity_floor: the residual's floor under the prior (>= 0).

    Returns:
        the map, (B, 1, ...).
    """
    sign = ResidualSign(sign)
    d = reference.float() - reconstruction.float()
    if sign == ResidualSign.POSITIVE:
        d = d.clamp_min(0.0)
    elif sign == ResidualSign.NEGATIVE:
        d = (-d).clamp_min(0.0)
    sq = d.pow(2)
    if channel_weights is not None:
        if len(channel_weights) != sq.shape[1]:
            raise ValueError(f"{len(channel_weights)} channel weights for an image with {sq.shape[1]} channel(s).")
        w = torch.as_tensor(channel_weights, dtype=sq.dtype, device=sq.device).view(1, -1, *([1] * (sq.ndim - 2)))
        sq = sq * w
    out = sq.sum(dim=1, keepdim=True)
    if intensity is not None:
        if not intensity_power > 0:
            raise ValueError(f"intensity_power must be > 0, got {intensity_power}.")
        if not intensity_floor >= 0:
            raise ValueError(f"intensity_floor must be >= 0, got {intensity_floor}.")
        out = (float(intensity_floor) + out.sqrt()) * intensity.float().clamp_min(0.0).pow(float(intensity_power))
    return out
