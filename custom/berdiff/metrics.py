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
* inputs may be numpy arrays or torch tensors; outputs are numpy arrays / python floats;
* a metric that is undefined for the given input (Dice with an empty prediction and an empty ground truth,
  AUROC/AUPRC when the ground truth holds a single class) is returned as ``NaN``; aggregated means use ``nanmean``
  and report how many values were defined.

Protocols (see ``docs/evaluation.md``):

* **A** (reference, per slice): :func:`reference_slice_postprocess`, :func:`per_slice_protocol`;
* **B** (per volume, Behrendt et al.): :func:`volume_postprocess`, :func:`per_volume_protocol`, :func:`best_dice`;
* **C** (threshold at a fixed false-positive rate on healthy data): :func:`threshold_at_fpr`;
* slice-level detection: :func:`slice_statistics`, :func:`slice_detection_auroc`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.utils import StrEnum
from scipy import ndimage
from skimage.measure import label as cc_label
from skimage.measure import regionprops
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "AreaRule",
    "ThresholdMap",
    "best_dice",
    "brain_mask_from_image",
    "dice",
    "per_slice_protocol",
    "per_volume_protocol",
    "pixel_auprc",
    "pixel_auroc",
    "psnr",
    "reference_slice_postprocess",
    "remove_small_components",
    "slice_detection_auroc",
    "slice_statistics",
    "threshold_at_fpr",
    "volume_postprocess",
]

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


class AreaRule(StrEnum):
    """
    How the size of a connected component is measured by :func:`remove_small_components`.

    area: number of pixels/voxels of the component.
    filled: number of pixels/voxels after filling the component's holes (skimage ``area_filled``); this is what the
        reference script (``prop['filled_area'] <= 15``) uses.
    """

    AREA = "area"
    FILLED = "filled"


class ThresholdMap(StrEnum):
    """
    Which map the fixed threshold of :func:`per_volume_protocol` is applied to.

    processed: the masked, median-filtered map (Behrendt et al.; use thresholds calibrated on processed maps).
    raw: the raw map inside the (eroded) brain mask, without median filter (use thresholds calibrated on raw maps,
        e.g. by ``python -m berdiff calibrate``, whose rule is ``anomaly_map > threshold`` on the raw map).
    """

    PROCESSED = "processed"
    RAW = "raw"


def _as_binary(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.dtype != bool:
        _check_finite(arr, name)
        arr = arr > 0
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.size and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values.")


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match.")


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
    mask = _as_binary(binary, "binary")
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
    arr = _to_numpy(residual, "residual").astype(np.float64, copy=False)
    if arr.ndim not in (2, 3):
        raise ValueError(f"residual must be (C, H, W) or (H, W), got shape {arr.shape}.")
    _check_finite(arr, "residual")
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


def dice(pred_bin: ArrayLike, gt_bin: ArrayLike, empty_score: float = float("nan")) -> float:
    """
    Dice coefficient ``2|P & G| / (|P| + |G|)`` of two binary masks (non-zero is foreground), via MONAI's
    :func:`monai.metrics.compute_dice`.

    Empty convention: if both masks are empty the ratio is ``0/0`` and ``empty_score`` is returned (``NaN`` by
    default, i.e. undefined and left out of ``nanmean`` averages); an empty ground truth with a non-empty prediction
    gives 0, an empty prediction with a non-empty ground truth gives 0.

    Args:
        pred_bin: predicted mask, any shape.
        gt_bin: ground-truth mask, same shape.
        empty_score: value returned when both masks are empty.
    """
    p = _as_binary(pred_bin, "pred_bin")
    g = _as_binary(gt_bin, "gt_bin")
    _check_same_shape(p, g, "pred_bin", "gt_bin")
    if not p.any() and not g.any():
        return float(empty_score)
    pt = torch.from_numpy(np.ascontiguousarray(p)).reshape(1, 1, -1).float()
    gtt = torch.from_numpy(np.ascontiguousarray(g)).reshape(1, 1, -1).float()
    return float(compute_dice(pt, gtt, include_background=True, ignore_empty=False).item())


def _score_and_labels(score: ArrayLike, gt: ArrayLike, mask: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(score, "score")
    g = _as_binary(gt, "gt")
    _check_same_shape(s, g, "score", "gt")
    _check_finite(s, "score")
    if mask is not None:
        m = _as_binary(mask, "mask")
        _check_same_shape(s, m, "score", "mask")
        return s[m], g[m]
    return s.ravel(), g.ravel()


def _two_class_score(metric: Callable[..., float], score: ArrayLike, gt: ArrayLike, mask: ArrayLike | None) -> float:
    """``metric(labels, scores)`` on the (masked) pixels, or NaN when the labels hold a single class."""
    s, g = _score_and_labels(score, gt, mask)
    n_pos = int(g.sum())
    if n_pos == 0 or n_pos == g.size:
        return float("nan")
    return float(metric(g, s))


def pixel_auroc(score: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> float:
    """
    Pixel-level area under the ROC curve (sklearn ``roc_auc_score``; identical to the reference's
    ``roc_curve`` + ``auc``).

    Returns ``NaN`` when the ground truth (inside ``mask``) holds a single class (all healthy or all anomalous), where
    the ROC curve is undefined.

    Args:
        score: continuous anomaly score, any shape.
        gt: ground truth, same shape (``> 0`` is anomalous).
        mask: optional boolean mask, same shape: only these pixels are scored.
    """
    return _two_class_score(roc_auc_score, score, gt, mask)


def pixel_auprc(score: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> float:
    """
    Pixel-level area under the precision-recall curve, as sklearn ``average_precision_score`` (the non-interpolated
    step-wise sum ``sum_n (R_n - R_{n-1}) P_n``, Behrendt et al.'s implementation). The reference script used
    torcheval ``BinaryAUPRC``, which computes the same step-wise area; values can differ only in how tied scores are
    grouped (both group equal scores into one operating point), so we expect agreement to floating-point precision but
    have not verified it here (torcheval is not a dependency).

    Returns ``NaN`` when the ground truth (inside ``mask``) holds a single class (with no positives precision-recall is
    undefined; with no negatives it is trivially 1).

    Args:
        score: continuous anomaly score, any shape.
        gt: ground truth, same shape (``> 0`` is anomalous).
        mask: optional boolean mask, same shape: only these pixels are scored.
    """
    return _two_class_score(average_precision_score, score, gt, mask)


def best_dice(score: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> tuple[float, float]:
    """
    Oracle ("best-possible") Dice over all thresholds of one volume: an **upper bound**, since the threshold is chosen
    with the ground truth. The search is exact (every distinct score value is tried, via one sort and cumulative sums)
    and is done on the thresholded map without component filtering.

    Args:
        score: continuous anomaly score, any shape.
        gt: ground truth, same shape.
        mask: optional boolean mask: pixels outside it are never predicted anomalous; ground-truth pixels outside it
            still count as misses.

    Returns:
        ``(best_dice, threshold)`` with the prediction rule ``score > threshold``; ``(NaN, NaN)`` when the ground truth
        is empty.
    """
    s = _to_numpy(score, "score")
    g_all = _as_binary(gt, "gt")
    _check_same_shape(s, g_all, "score", "gt")
    n_gt = int(g_all.sum())
    if n_gt == 0:
        return float("nan"), float("nan")
    s, g = _score_and_labels(s, g_all, mask)
    if s.size == 0:
        return 0.0, float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order].astype(np.float64)
    tp = np.cumsum(g[order])
    # cut only between distinct values: predicting the first k sorted voxels is "score > next value"
    last_of_run = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    k = np.flatnonzero(last_of_run)
    dices = 2.0 * tp[k] / (k + 1 + n_gt)
    i = int(np.argmax(dices))
    cut = k[i]
    thr = float(s_sorted[cut + 1]) if cut + 1 < s_sorted.size else float(np.nextafter(s_sorted[-1], -np.inf))
    return float(dices[i]), thr


def psnr(recon: ArrayLike, image: ArrayLike, max_val: float | None = None) -> float:
    """
    Peak signal-to-noise ratio ``20 log10(max_val / sqrt(MSE(recon, image)))`` over the whole array (equivalent to
    MONAI's ``PSNRMetric(max_val)``). With ``max_val=None`` the image maximum is used, as in the reference script.

    Returns ``inf`` for a perfect reconstruction.
    """
    r = _to_numpy(recon, "recon").astype(np.float64)
    x = _to_numpy(image, "image").astype(np.float64)
    _check_same_shape(r, x, "recon", "image")
    _check_finite(r, "recon")
    _check_finite(x, "image")
    peak = float(x.max()) if max_val is None else float(max_val)
    if peak <= 0:
        raise ValueError(f"PSNR needs a positive peak value, got {peak}.")
    mse = float(np.mean((r - x) ** 2))
    if mse == 0:
        return float("inf")
    return float(20.0 * np.log10(peak / np.sqrt(mse)))


def _mean_std(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def _move_axis_last(arr: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(arr, axis, -1)


def per_slice_protocol(
    score_volume: ArrayLike,
    gt_volume: ArrayLike,
    axis: int = -1,
    channel_axis: int | None = None,
    min_component: int = 15,
    median_size: int = 5,
    threshold: float = 0.5,
) -> dict:
    """
    Protocol A (reference): every **diseased** 2D slice (one with at least one ground-truth voxel) along ``axis`` is
    post-processed with :func:`reference_slice_postprocess` and scored with Dice (on the binary map), AUROC and AUPRC
    (on the soft ``prob`` map); values are then averaged over slices (mean and population std). Healthy slices are
    skipped. No brain mask is used.

    Args:
        score_volume: 3D channel-summed anomaly map, or a 4D per-channel residual with ``channel_axis`` set.
        gt_volume: 3D ground truth (``> 0`` is anomalous) matching the spatial shape of ``score_volume``.
        axis: slicing axis of the 3D spatial volume (default: last, i.e. axial for RAS-oriented volumes).
        channel_axis: channel axis of a 4D ``score_volume`` (``None`` for a 3D map).
        min_component, median_size, threshold: see :func:`reference_slice_postprocess`.

    Returns:
        dict with ``dice``, ``auroc``, ``auprc`` (each ``{"mean", "std", "n"}``), ``n_slices`` (diseased slices),
        ``slice_index`` and the per-slice lists ``dice_per_slice``, ``auroc_per_slice``, ``auprc_per_slice`` (so
        that slices from several volumes can be pooled, as the reference does).
    """
    s = _to_numpy(score_volume, "score_volume")
    g = _as_binary(gt_volume, "gt_volume")
    if channel_axis is not None:
        if s.ndim != 4:
            raise ValueError(f"channel_axis is set, so score_volume must be 4D, got shape {s.shape}.")
        s = np.moveaxis(s, channel_axis, 0)
        spatial = s.shape[1:]
    else:
        if s.ndim != 3:
            raise ValueError(f"score_volume must be 3D (or 4D with channel_axis), got shape {s.shape}.")
        spatial = s.shape
    if g.shape != spatial:
        raise ValueError(f"score_volume has spatial shape {spatial} but gt_volume has shape {g.shape}.")
    _check_finite(s, "score_volume")
    ax = axis % 3
    g_last = _move_axis_last(g, ax)
    s_last = np.moveaxis(s, ax + (1 if channel_axis is not None else 0), -1)
    diseased = np.flatnonzero(g_last.reshape(-1, g_last.shape[-1]).any(axis=0))
    d_list, a_list, p_list = [], [], []
    for z in diseased:
        prob, binary = reference_slice_postprocess(
            s_last[..., z], min_component=min_component, median_size=median_size, threshold=threshold
        )
        gz = g_last[..., z]
        d_list.append(dice(binary, gz))
        a_list.append(pixel_auroc(prob, gz))
        p_list.append(pixel_auprc(prob, gz))
    return {
        "dice": _mean_std(d_list),
        "auroc": _mean_std(a_list),
        "auprc": _mean_std(p_list),
        "n_slices": int(diseased.size),
        "slice_index": diseased.tolist(),
        "dice_per_slice": d_list,
        "auroc_per_slice": a_list,
        "auprc_per_slice": p_list,
    }


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
    x = _to_numpy(image, "image")
    _check_finite(x, "image")
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
    s = _to_numpy(score_volume, "score_volume").astype(np.float32)
    if s.ndim != 3:
        raise ValueError(f"score_volume must be 3D, got shape {s.shape}.")
    _check_finite(s, "score_volume")
    if int(median_size) < 1:
        raise ValueError(f"median_size must be >= 1, got {median_size}.")
    mask = None
    if brain_mask is not None:
        mask = _as_binary(brain_mask, "brain_mask")
        _check_same_shape(s, mask, "score_volume", "brain_mask")
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


def per_volume_protocol(
    score_volume: ArrayLike,
    gt_volume: ArrayLike,
    brain_mask: ArrayLike | None = None,
    threshold: float | None = None,
    median_size: int = 5,
    erode: bool | int = True,
    min_component: int = 7,
    connectivity: int = 3,
    threshold_on: str = ThresholdMap.PROCESSED,
) -> dict:
    """
    Protocol B (per volume, Behrendt et al.): :func:`volume_postprocess`, then

    * ``dice``: Dice at the given ``threshold`` (``score > threshold`` on the map chosen by ``threshold_on``, inside
      the eroded mask when one is given) after removing 3D components of
      ``<= min_component`` voxels (``connectivity`` 3 = 26-neighbourhood); ``NaN`` when no threshold is given or when
      both prediction and ground truth are empty;
    * ``best_dice``: oracle Dice over all thresholds (:func:`best_dice`, no component filter): an **upper bound**;
    * ``auroc`` / ``auprc``: on the processed map, over the voxels inside the eroded brain mask when a mask is given,
      otherwise over all voxels (sklearn ``roc_auc_score`` / ``average_precision_score``).

    Ground-truth voxels outside the eroded mask are kept as ground truth for Dice (they count as misses) but are not
    scored by AUROC/AUPRC.

    Args:
        score_volume: 3D raw anomaly map.
        gt_volume: 3D ground truth (``> 0`` is anomalous).
        brain_mask: optional 3D brain mask (see :func:`brain_mask_from_image` to derive one from the input image).
        threshold: fixed threshold for ``dice`` (e.g. from validation or :func:`threshold_at_fpr`), or ``None``.
        median_size: 3D median filter size (5; 1 disables).
        erode: see :func:`volume_postprocess`.
        min_component: 3D components of at most this many voxels are removed before Dice (7).
        connectivity: connectivity for the component filter (1..3).
        threshold_on: member of :class:`ThresholdMap`: threshold the processed (default) or the raw map. It must
            match how the threshold was calibrated.

    Returns:
        dict with ``dice``, ``best_dice``, ``best_threshold``, ``auroc``, ``auprc``, ``tumour_voxels``,
        ``predicted_voxels`` (``NaN``/0 where undefined).
    """
    threshold_on = ThresholdMap(threshold_on)
    g = _as_binary(gt_volume, "gt_volume")
    s_raw = _to_numpy(score_volume, "score_volume")
    _check_same_shape(s_raw, g, "score_volume", "gt_volume")
    s, mask = volume_postprocess(s_raw, brain_mask, median_size=median_size, erode=erode)
    result: dict = {"tumour_voxels": int(g.sum())}
    if threshold is not None:
        if not np.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold}.")
        pred = (s if threshold_on == ThresholdMap.PROCESSED else s_raw) > float(threshold)
        if mask is not None:
            pred &= mask
        pred = remove_small_components(pred, min_component, connectivity=connectivity)
        result["dice"] = dice(pred, g)
        result["predicted_voxels"] = int(pred.sum())
    else:
        result["dice"] = float("nan")
        result["predicted_voxels"] = 0
    result["best_dice"], result["best_threshold"] = best_dice(s, g, mask)
    result["auroc"] = pixel_auroc(s, g, mask)
    result["auprc"] = pixel_auprc(s, g, mask)
    return result


def slice_statistics(
    score_volume: ArrayLike,
    gt_volume: ArrayLike,
    mask: ArrayLike | None = None,
    axis: int = -1,
    percentile: float = 99.0,
) -> tuple[np.ndarray, np.ndarray]:
    """
    One detection score and one label per 2D slice along ``axis``: the score is the ``percentile``-th percentile of
    the map inside ``mask`` on that slice (a robust maximum), the label is 1 when the slice has any ground-truth
    voxel. With a mask, slices whose mask is empty (outside the head) are dropped; without one, all pixels of every
    slice are used.

    Returns:
        ``(scores, labels)``: float64 and bool arrays of equal length.
    """
    s = _to_numpy(score_volume, "score_volume")
    g = _as_binary(gt_volume, "gt_volume")
    if s.ndim != 3:
        raise ValueError(f"score_volume must be 3D, got shape {s.shape}.")
    _check_same_shape(s, g, "score_volume", "gt_volume")
    _check_finite(s, "score_volume")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    ax = axis % 3
    s_l, g_l = _move_axis_last(s, ax), _move_axis_last(g, ax)
    labels = g_l.reshape(-1, g_l.shape[-1]).any(axis=0)
    if mask is None:
        scores = np.percentile(s_l.reshape(-1, s_l.shape[-1]), percentile, axis=0)
        return scores.astype(np.float64), labels
    m = _as_binary(mask, "mask")
    _check_same_shape(s, m, "score_volume", "mask")
    m_l = _move_axis_last(m, ax)
    keep = m_l.reshape(-1, m_l.shape[-1]).any(axis=0)
    scores = [np.percentile(s_l[..., z][m_l[..., z]], percentile) for z in np.flatnonzero(keep)]
    return np.asarray(scores, dtype=np.float64), labels[keep]


def slice_detection_auroc(
    score_volumes: Sequence[ArrayLike],
    gt_volumes: Sequence[ArrayLike],
    masks: Sequence[ArrayLike | None] | None = None,
    axis: int = -1,
    percentile: float = 99.0,
) -> float:
    """
    Slice-level detection AUROC (healthy vs diseased slices) pooled over volumes, with the per-slice score of
    :func:`slice_statistics`. ``NaN`` when all pooled slices are of one class.

    Args:
        score_volumes: 3D anomaly maps.
        gt_volumes: matching 3D ground truths.
        masks: optional matching head masks (or ``None`` entries).
        axis: slicing axis.
        percentile: per-slice statistic.
    """
    if len(score_volumes) != len(gt_volumes):
        raise ValueError(f"got {len(score_volumes)} score volumes but {len(gt_volumes)} ground-truth volumes.")
    if masks is not None and len(masks) != len(score_volumes):
        raise ValueError(f"got {len(masks)} masks for {len(score_volumes)} volumes.")
    scores, labels = [], []
    for i, (s, g) in enumerate(zip(score_volumes, gt_volumes)):
        sc, lb = slice_statistics(s, g, None if masks is None else masks[i], axis=axis, percentile=percentile)
        scores.append(sc)
        labels.append(lb)
    return pixel_auroc(np.concatenate(scores), np.concatenate(labels))
