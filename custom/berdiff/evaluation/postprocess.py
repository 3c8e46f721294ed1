# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Post-processing of anomaly maps before they are scored (``docs/evaluation.md``): the component filter, protocol A's
per-slice steps, protocol B's masked 3D median filter and the brain-mask rule.
"""

from __future__ import annotations

import numpy as np
from monai.utils import StrEnum
from scipy import ndimage
from skimage.measure import label as cc_label
from skimage.measure import regionprops

from berdiff.evaluation.arrays import ArrayLike, as_binary, check_finite, check_same_shape, to_numpy

__all__ = [
    "AreaRule",
    "brain_mask_from_image",
    "reference_slice_postprocess",
    "remove_small_components",
    "volume_postprocess",
]


class AreaRule(StrEnum):
    """
    How the size of a connected component is measured by :func:`remove_small_components`.

    area: number of pixels/voxels of the component.
    filled: number of pixels/voxels after filling the component's holes (skimage ``area_filled``); this is what the
        reference script (``prop['filled_area'] <= 15``) uses.
    """

    AREA = "area"
    FILLED = "filled"


def remove_small_components(
    binary: ArrayLike, max_size: int, connectivity: int | None = None, area_rule: str = AreaRule.AREA
) -> np.ndarray:
    """
    Remove connected components whose size is **at most** ``max_size`` (``<=``, as in both reference protocols).

    Args:
        binary: 2D or 3D binary mask (non-zero is foreground).
        max_size: components with size ``<= max_size`` are removed; ``0`` keeps everything.
        connectivity: neighbourhood in skimage's convention, ``1 .. binary.ndim`` (1: faces only; ``ndim``: full,
            i.e. 8-connectivity in 2D and 26-connectivity in 3D). ``None`` means full connectivity.
        area_rule: member of :class:`AreaRule`: plain size or size after hole filling.

    Returns:
        a new boolean array of the same shape.
    """
    mask = as_binary(binary, "binary")
    if mask.ndim not in (2, 3):
        raise ValueError(f"binary must be 2D or 3D, got shape {mask.shape}.")
    if int(max_size) < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}.")
    connectivity = mask.ndim if connectivity is None else int(connectivity)
    if not 1 <= connectivity <= mask.ndim:
        raise ValueError(f"connectivity must be in 1..{mask.ndim} for a {mask.ndim}D mask, got {connectivity}.")
    area_rule = AreaRule(area_rule)
    if max_size == 0 or not mask.any():
        return mask.copy()
    labels = cc_label(mask, connectivity=connectivity)
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_size
    small[0] = False
    if area_rule == AreaRule.FILLED:
        # the filled area is >= the area, so only components that are small by area can be small when filled
        for prop in regionprops(labels):
            if small[prop.label] and prop.area_filled > max_size:
                small[prop.label] = False
    return mask & ~small[labels]


def reference_slice_postprocess(
    residual: ArrayLike,
    min_component: int = 15,
    median_size: int = 5,
    threshold: float = 0.5,
    clip_percentiles: tuple[float, float] = (1.0, 99.0),
) -> tuple[np.ndarray, np.ndarray]:
    """
    Protocol A, steps 2-7, on one 2D slice (the reference ``evaluation.py``, default branch).

    1. median filter of size ``median_size x median_size`` (``scipy.ndimage.median_filter``, ``mode="reflect"``) on
       each channel of a ``(C, H, W)`` residual; a ``(H, W)`` input is treated as an already channel-summed map and
       filtered once (median of the sum, which differs slightly from the sum of per-channel medians);
    2. sum over channels;
    3. clip to the slice's ``[p1, p99]`` (``np.percentile``, linear interpolation);
    4. min-max normalisation to ``[0, 1]``: this is the soft score ``prob``; a constant slice gives ``prob = 0``
       everywhere (the reference would divide by zero);
    5. ``binary = prob > threshold`` (0.5);
    6. removal of 8-connected components (connectivity 2) whose **filled** area is ``<= min_component`` pixels.

    Args:
        residual: ``(C, H, W)`` per-channel squared error or ``(H, W)`` channel-summed anomaly map.
        min_component: components with filled area ``<=`` this are removed (15 in the reference).
        median_size: median filter size (5 in the reference; 1 disables it).
        threshold: fixed threshold on ``prob`` (0.5 in the reference).
        clip_percentiles: lower and upper percentiles for clipping.

    Returns:
        ``(prob, binary)``: float64 ``(H, W)`` map in ``[0, 1]`` and boolean ``(H, W)`` prediction.
    """
    arr = to_numpy(residual, "residual").astype(np.float64, copy=False)
    if arr.ndim not in (2, 3):
        raise ValueError(f"residual must be (C, H, W) or (H, W), got shape {arr.shape}.")
    check_finite(arr, "residual")
    if int(median_size) < 1:
        raise ValueError(f"median_size must be >= 1, got {median_size}.")
    lo, hi = clip_percentiles
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {clip_percentiles}.")
    channels = arr[None] if arr.ndim == 2 else arr
    if median_size > 1:
        channels = np.stack([ndimage.median_filter(c, size=median_size, mode="reflect") for c in channels])
    summed = channels.sum(axis=0)
    p_lo, p_hi = np.percentile(summed, [lo, hi])
    clipped = np.clip(summed, p_lo, p_hi)
    span = clipped.max() - clipped.min()
    prob = (clipped - clipped.min()) / span if span > 0 else np.zeros_like(clipped)
    binary = remove_small_components(prob > threshold, min_component, connectivity=2, area_rule=AreaRule.FILLED)
    return prob, binary


def brain_mask_from_image(image: ArrayLike, channel_axis: int | None = 0, background: float = 0.0) -> np.ndarray:
    """
    Brain (head) mask of a skull-stripped volume: voxels whose value differs from ``background`` in **any** channel,
    then holes filled (``scipy.ndimage.binary_fill_holes``), then only the largest connected component kept
    (full connectivity).

    Args:
        image: 3D volume, or 4D with channels along ``channel_axis``.
        channel_axis: channel axis of a 4D image; ignored for 3D.
        background: background intensity (0 for BraTS).

    Returns:
        boolean 3D mask (all ``False`` for an all-background image).
    """
    x = to_numpy(image, "image")
    check_finite(x, "image")
    if x.ndim == 4:
        fg = (np.moveaxis(x, 0 if channel_axis is None else channel_axis, 0) != background).any(axis=0)
    elif x.ndim in (2, 3):
        fg = x != background
    else:
        raise ValueError(f"image must be 2D, 3D or 4D, got shape {x.shape}.")
    if not fg.any():
        return fg
    fg = ndimage.binary_fill_holes(fg)
    labels = cc_label(fg, connectivity=fg.ndim)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _erosion_iterations(erode: bool | int, shape: tuple[int, ...]) -> int:
    if isinstance(erode, (bool, np.bool_)):
        return shape[0] // 25 if erode else 0
    if int(erode) < 0:
        raise ValueError(f"erode must be a bool or a non-negative number of iterations, got {erode}.")
    return int(erode)


def volume_postprocess(
    score_volume: ArrayLike, brain_mask: ArrayLike | None = None, median_size: int = 5, erode: bool | int = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """
    Protocol B, steps 1-3: the raw map (no normalisation) is multiplied by the (optionally eroded) brain mask, then
    3D median filtered (``scipy.ndimage.median_filter``, cube of side ``median_size``, ``mode="reflect"``, computed
    on the mask's bounding box plus a margin, which gives the same values inside the mask as the whole volume does).
    Calibration on healthy data (:func:`threshold_at_fpr`) must use the same post-processing as the test maps.

    Args:
        score_volume: 3D raw anomaly map.
        brain_mask: optional 3D mask (non-zero is brain). ``None``: no masking.
        median_size: 3D median filter size; 1 disables the filter.
        erode: ``True`` erodes the mask with ``scipy.ndimage.binary_erosion`` for ``shape[0] // 25`` iterations
            (Behrendt et al.'s ``erodeBrainmask``), ``False``/``0`` does not erode, an int gives the iterations.

    Returns:
        ``(processed, mask)``: the float32 processed map (0 outside the mask) and the eroded boolean mask used (or
        ``None``).
    """
    s = to_numpy(score_volume, "score_volume").astype(np.float32)
    if s.ndim != 3:
        raise ValueError(f"score_volume must be 3D, got shape {s.shape}.")
    check_finite(s, "score_volume")
    if int(median_size) < 1:
        raise ValueError(f"median_size must be >= 1, got {median_size}.")
    mask = None
    if brain_mask is not None:
        mask = as_binary(brain_mask, "brain_mask")
        check_same_shape(s, mask, "score_volume", "brain_mask")
        iters = _erosion_iterations(erode, s.shape)
        if iters > 0 and mask.any():
            mask = ndimage.binary_erosion(mask, iterations=iters)
        s = np.where(mask, s, np.float32(0))
    if median_size > 1:
        if mask is not None and mask.any():
            margin = median_size
            idx = np.nonzero(mask)
            box = tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)
            out = np.zeros_like(s)
            out[box] = ndimage.median_filter(s[box], size=median_size, mode="reflect")
            s = np.where(mask, out, np.float32(0))
        elif mask is None:
            s = ndimage.median_filter(s, size=median_size, mode="reflect")
    return s, mask
