# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The evaluation protocols of ``docs/evaluation.md`` on one volume or a set of slices: protocol A (reference, per 2D
slice), protocol B (per volume, Behrendt et al.) and slice-level detection, with :func:`mean_std`, the one
aggregation of per-item scores used by ``evaluate`` and the benchmark.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.utils import StrEnum

from berdiff.evaluation.arrays import ArrayLike, as_binary, check_finite, check_same_shape, to_numpy
from berdiff.evaluation.metrics import best_dice, dice, pixel_auprc, pixel_auroc
from berdiff.evaluation.postprocess import (
    AreaRule,
    reference_slice_postprocess,
    remove_small_components,
    volume_postprocess,
)

__all__ = [
    "ThresholdMap",
    "mean_std",
    "per_slice_protocol",
    "per_volume_protocol",
    "score_slices",
    "slice_detection_auroc",
    "slice_statistics",
    "summarise_slices",
]


class ThresholdMap(StrEnum):
    """
    Which map the fixed threshold of :func:`per_volume_protocol` is applied to.

    processed: the masked, median-filtered map (Behrendt et al.; use thresholds calibrated on processed maps).
    raw: the raw map inside the (eroded) brain mask, without median filter (use thresholds calibrated on raw maps,
        e.g. by ``python -m berdiff calibrate``, whose rule is ``anomaly_map > threshold`` on the raw map).
    """

    PROCESSED = "processed"
    RAW = "raw"


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """
    Mean and population standard deviation of the finite values, and how many there were: undefined (NaN) scores
    are left out, ``{"mean": nan, "std": nan, "n": 0}`` when none is finite.

    Args:
        values: per-item scores (slices or volumes).
    """
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def score_slices(
    maps: Iterable[ArrayLike],
    labels: Iterable[ArrayLike],
    min_component: int = 15,
    median_size: int = 5,
    threshold: float = 0.5,
    oracle: bool = False,
    grid: Sequence[float] = (),
) -> dict[str, list]:
    """
    Protocol A on 2D slices, one score per slice: :func:`reference_slice_postprocess`, then Dice of the binary map
    and AUROC/AUPRC of the soft map against the slice's ground truth.

    Args:
        maps: 2D anomaly maps (or ``(C, H, W)`` residuals), one per slice.
        labels: matching 2D ground truths (``> 0`` is anomalous).
        min_component, median_size, threshold: see :func:`reference_slice_postprocess`.
        oracle: also the per-slice oracle Dice of the soft map (:func:`best_dice`, an upper bound) as ``best_dice``.
        grid: further thresholds on the soft map; ``dice_grid`` then holds one row of Dice values per slice (the same
            component filter as at ``threshold``).

    Returns:
        ``{"dice", "auroc", "auprc"}`` lists (plus ``best_dice`` and ``dice_grid`` when asked for).
    """
    out: dict[str, list] = {"dice": [], "auroc": [], "auprc": []}
    if oracle:
        out["best_dice"] = []
    if len(grid):
        out["dice_grid"] = []
    for m, g in zip(maps, labels):
        prob, binary = reference_slice_postprocess(
            m, min_component=min_component, median_size=median_size, threshold=threshold
        )
        out["dice"].append(dice(binary, g))
        out["auroc"].append(pixel_auroc(prob, g))
        out["auprc"].append(pixel_auprc(prob, g))
        if oracle:
            out["best_dice"].append(best_dice(prob, g)[0])
        if len(grid):
            out["dice_grid"].append(
                [
                    dice(remove_small_components(prob > t, min_component, connectivity=2, area_rule=AreaRule.FILLED), g)
                    for t in grid
                ]
            )
    return out


def summarise_slices(per_slice: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """
    Protocol A's aggregation: :func:`mean_std` over slices of each score of :func:`score_slices` (slices of several
    volumes may be pooled first, as the reference does).

    Args:
        per_slice: ``{"dice", "auroc", "auprc"}`` lists of per-slice scores.

    Returns:
        ``{"dice", "auroc", "auprc"}`` (each ``{"mean", "std", "n"}``) and ``n_slices``.
    """
    return {
        "dice": mean_std(per_slice["dice"]),
        "auroc": mean_std(per_slice["auroc"]),
        "auprc": mean_std(per_slice["auprc"]),
        "n_slices": len(per_slice["dice"]),
    }


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
    s = to_numpy(score_volume, "score_volume")
    g = as_binary(gt_volume, "gt_volume")
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
    check_finite(s, "score_volume")
    ax = axis % 3
    g_last = np.moveaxis(g, ax, -1)
    s_last = np.moveaxis(s, ax + (1 if channel_axis is not None else 0), -1)
    diseased = np.flatnonzero(g_last.reshape(-1, g_last.shape[-1]).any(axis=0))
    per_slice = score_slices(
        (s_last[..., z] for z in diseased),
        (g_last[..., z] for z in diseased),
        min_component=min_component,
        median_size=median_size,
        threshold=threshold,
    )
    return {
        **summarise_slices(per_slice),
        "slice_index": diseased.tolist(),
        "dice_per_slice": per_slice["dice"],
        "auroc_per_slice": per_slice["auroc"],
        "auprc_per_slice": per_slice["auprc"],
    }


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
    g = as_binary(gt_volume, "gt_volume")
    s_raw = to_numpy(score_volume, "score_volume")
    check_same_shape(s_raw, g, "score_volume", "gt_volume")
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
    s = to_numpy(score_volume, "score_volume")
    g = as_binary(gt_volume, "gt_volume")
    if s.ndim != 3:
        raise ValueError(f"score_volume must be 3D, got shape {s.shape}.")
    check_same_shape(s, g, "score_volume", "gt_volume")
    check_finite(s, "score_volume")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    ax = axis % 3
    s_l, g_l = np.moveaxis(s, ax, -1), np.moveaxis(g, ax, -1)
    labels = g_l.reshape(-1, g_l.shape[-1]).any(axis=0)
    if mask is None:
        scores = np.percentile(s_l.reshape(-1, s_l.shape[-1]), percentile, axis=0)
        return scores.astype(np.float64), labels
    m = as_binary(mask, "mask")
    check_same_shape(s, m, "score_volume", "mask")
    m_l = np.moveaxis(m, ax, -1)
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
