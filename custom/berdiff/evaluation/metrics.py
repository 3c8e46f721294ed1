# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The scores of anomaly detection as pure, deterministic functions (``docs/evaluation.md``): Dice, pixel AUROC and
AUPRC, the oracle best Dice, PSNR and the threshold at a false-positive rate on healthy data (protocol C).

Conventions: a voxel is predicted anomalous when its score is **strictly greater** than the threshold
(``score > t``); ground truth is binarised as ``gt > 0``; inputs are numpy arrays or torch tensors, outputs python
floats; a score that is undefined for the input (Dice of two empty masks, AUROC/AUPRC with one class) is ``NaN``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from sklearn.metrics import average_precision_score, roc_auc_score

from berdiff.evaluation.arrays import ArrayLike, as_binary, check_finite, check_same_shape, to_numpy

__all__ = ["best_dice", "dice", "pixel_auprc", "pixel_auroc", "psnr", "threshold_at_fpr"]


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
        parts = [to_numpy(s, "healthy_scores").ravel() for s in healthy_scores]
        values = np.concatenate(parts) if parts else np.empty(0)
    else:
        values = to_numpy(healthy_scores, "healthy_scores").ravel()
    if values.size == 0:
        raise ValueError("healthy_scores is empty: cannot calibrate a threshold without healthy values.")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"healthy_scores must be real numbers, got dtype {values.dtype}.")
    if not np.isfinite(values).all():
        raise ValueError("healthy_scores contains NaN or infinite values.")
    return float(np.quantile(values, 1.0 - fpr, method="higher"))


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
    p = as_binary(pred_bin, "pred_bin")
    g = as_binary(gt_bin, "gt_bin")
    check_same_shape(p, g, "pred_bin", "gt_bin")
    if not p.any() and not g.any():
        return float(empty_score)
    pt = torch.from_numpy(np.ascontiguousarray(p)).reshape(1, 1, -1).float()
    gtt = torch.from_numpy(np.ascontiguousarray(g)).reshape(1, 1, -1).float()
    return float(compute_dice(pt, gtt, include_background=True, ignore_empty=False).item())


def _score_and_labels(score: ArrayLike, gt: ArrayLike, mask: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    s = to_numpy(score, "score")
    g = as_binary(gt, "gt")
    check_same_shape(s, g, "score", "gt")
    check_finite(s, "score")
    if mask is not None:
        m = as_binary(mask, "mask")
        check_same_shape(s, m, "score", "mask")
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
    s = to_numpy(score, "score")
    g_all = as_binary(gt, "gt")
    check_same_shape(s, g_all, "score", "gt")
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
    r = to_numpy(recon, "recon").astype(np.float64)
    x = to_numpy(image, "image").astype(np.float64)
    check_same_shape(r, x, "recon", "image")
    check_finite(r, "recon")
    check_finite(x, "image")
    peak = float(x.max()) if max_val is None else float(max_val)
    if peak <= 0:
        raise ValueError(f"PSNR needs a positive peak value, got {peak}.")
    mse = float(np.mean((r - x) ** 2))
    if mse == 0:
        return float("inf")
    return float(20.0 * np.log10(peak / np.sqrt(mse)))
