# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Image-level validation of the OCT bundle on class folders (``<val_dir>/NORMAL/`` healthy, any other folder
abnormal): ``python -m berdiff oct_validation --scores OUT/scores.csv --val_dir OCT_DIR/val``.

- **Splits** (:func:`split_of`): within each class the scans are sorted by file name; even positions (0, 2, ...) form
  the *tuning* split, odd positions the *untouched* split. Settings are chosen on the tuning split only
  (:func:`berdiff.apps.oct_sweep.sweep`) and the untouched split is reported.
- **Figure** (:func:`overview_figure`, ``--figure``): normal and abnormal scans (the highest, median and lowest score
  of each class) beside their anomaly maps, written into the run's output (it shows the data: do not commit it).
- **Metrics**: AUROC and AUPRC (sklearn, abnormal = positive) of every score column of ``scores.csv`` and of the
  no-learning references (:func:`reference_scores`: the scan's mean and standard deviation of intensity, on the raw
  scan and on the bundle's retina band), each with a percentile bootstrap 95 % interval (scans resampled with
  replacement within each class, 2000 resamples, seed 0).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from berdiff.data.oct import (
    DEFAULT_ALIGNMENT,
    DEFAULT_BAND_RATIO,
    DEFAULT_GRID,
    DEFAULT_RPE_POSITION,
    NORMAL_CLASS,
    class_items,
    prepare_scan,
    read_scan,
)
from berdiff.utils import atomic_write_json

__all__ = [
    "SPLITS",
    "bootstrap_interval",
    "image_metrics",
    "oct_validation",
    "overview_figure",
    "read_scores",
    "reference_scores",
    "split_of",
    "validation_items",
]

#: the splits of the validation scans
SPLITS: tuple[str, ...] = ("tuning", "untouched", "all")


def validation_items(val_dir: str | os.PathLike, normal_class: str = NORMAL_CLASS) -> list[dict[str, Any]]:
    """
    The validation scans of ``val_dir/<CLASS>/`` with their label (0 normal, 1 abnormal), their ``name`` relative to
    ``val_dir`` and their ``split`` (:func:`split_of`).

    Raises:
        FileNotFoundError: no class folder with scans, or only one class.
    """
    items = class_items(val_dir, normal_class)
    if not items or len({i["label"] for i in items}) < 2:
        raise FileNotFoundError(
            f"{os.fspath(val_dir)!r} needs scans in {normal_class}/ and in at least one other class folder."
        )
    root = Path(val_dir)
    by_class: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        item["name"] = Path(item["image"]).relative_to(root).as_posix()
        by_class.setdefault(item["class"], []).append(item)
    for members in by_class.values():
        for k, item in enumerate(sorted(members, key=lambda i: Path(i["image"]).name)):
            item["split"] = split_of(k)
    return items


def split_of(position: int) -> str:
    """The split of the scan at ``position`` in its class's file-name order: even ``tuning``, odd ``untouched``."""
    return "tuning" if position % 2 == 0 else "untouched"


def bootstrap_interval(
    metric: Callable[[np.ndarray, np.ndarray], float],
    labels: Sequence[int],
    scores: Sequence[float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """
    Percentile bootstrap interval of ``metric(labels, scores)``, resampling the scans with replacement within each
    class (so that every resample holds both classes).

    Args:
        metric: e.g. ``sklearn.metrics.roc_auc_score``.
        labels: 0/1 per scan.
        scores: score per scan.
        n_resamples: bootstrap resamples.
        confidence: coverage in (0, 1).
        seed: seed of the resampling.
    """
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1D with the same length, got {y.shape} and {s.shape}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    groups = [np.flatnonzero(y == c) for c in (0, 1)]
    if any(g.size == 0 for g in groups):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(int(n_resamples))
    for r in range(int(n_resamples)):
        idx = np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])
        values[r] = metric(y[idx], s[idx])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def image_metrics(labels: Sequence[int], scores: Sequence[float], n_resamples: int = 2000) -> dict[str, Any]:
    """
    AUROC and AUPRC (abnormal = positive) with bootstrap 95 % intervals (:func:`bootstrap_interval`).

    Returns:
        ``{"n", "n_abnormal", "auroc", "auroc_ci", "auprc", "auprc_ci"}``.
    """
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores hold NaN or infinite values.")
    out: dict[str, Any] = {"n": int(y.size), "n_abnormal": int(y.sum())}
    for key, metric in (("auroc", roc_auc_score), ("auprc", average_precision_score)):
        out[key] = float(metric(y, s))
        out[f"{key}_ci"] = list(bootstrap_interval(metric, y, s, n_resamples))
    return out


def read_scores(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """
    ``scores.csv`` as ``{column: {image: value}}`` for every column but ``image``.

    Raises:
        ValueError: no ``image`` or ``score`` column.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "image" not in rows[0] or "score" not in rows[0]:
        raise ValueError(f"{os.fspath(path)!r} is not a scores.csv (columns image, score, ...).")
    return {c: {r["image"]: float(r[c]) for r in rows} for c in rows[0] if c != "image"}


def reference_scores(
    path: str | os.PathLike,
    spatial_size: Sequence[int] = DEFAULT_GRID,
    band_ratio: float = DEFAULT_BAND_RATIO,
    band_alignment: str = DEFAULT_ALIGNMENT,
    rpe_position: float = DEFAULT_RPE_POSITION,
) -> dict[str, float]:
    """
    No-learning scores of one scan: mean and standard deviation of the raw scan (scaled to [0, 1] by its type's
    range: 8-bit / 255) and of the bundle's retina band on the grid (after the per-scan scaling). The raw values are
    returned; :func:`oct_validation` chooses each one's direction (higher or lower = abnormal) on the tuning split.

    Args:
        path: the scan.
        spatial_size: the grid.
        band_ratio, band_alignment, rpe_position: the retina band (:func:`berdiff.data.oct.prepare_scan`).
    """
    raw = read_scan(path)
    top = 255.0 if raw.max() <= 255 else float(raw.max())
    grid, _ = prepare_scan(raw, spatial_size, band_ratio, alignment=band_alignment, rpe_position=rpe_position)
    return {
        "ref_raw_mean": float(raw.mean() / top),
        "ref_raw_std": float(raw.std() / top),
        "ref_band_mean": float(grid.mean()),
        "ref_band_std": float(grid.std()),
    }


def _evaluate(
    items: Sequence[Mapping[str, Any]],
    columns: Mapping[str, Mapping[str, float]],
    signs: Mapping[str, int],
    n_resamples: int,
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        chosen = [i for i in items if split == "all" or i["split"] == split]
        labels = [i["label"] for i in chosen]
        out[split] = {
            col: {**image_metrics(labels, [signs.get(col, 1) * values[i["name"]] for i in chosen], n_resamples),
                  "sign": signs.get(col, 1)}
            for col, values in columns.items()
        }
    return out


def oct_validation(
    scores: str,
    val_dir: str,
    out: str | None = None,
    spatial_size: Sequence[int] = DEFAULT_GRID,
    band_ratio: float = DEFAULT_BAND_RATIO,
    band_alignment: str = DEFAULT_ALIGNMENT,
    rpe_position: float = DEFAULT_RPE_POSITION,
    references: bool = True,
    n_resamples: int = 2000,
    figure: str | None = None,
) -> dict[str, Any]:
    """
    Image-level AUROC / AUPRC with bootstrap 95 % intervals of every score column of an inference run's
    ``scores.csv`` and of the no-learning references, on the tuning split, the untouched split and all validation
    scans (module docstring). A reference's direction (higher or lower = abnormal) is chosen on the tuning split.

    Args:
        scores: the ``scores.csv`` of ``configs/inference.yaml`` run on ``val_dir``.
        val_dir: the validation folder (``<CLASS>/`` subfolders; ``NORMAL`` healthy).
        out: where to write the results as JSON (None: not written).
        spatial_size, band_ratio, band_alignment, rpe_position: the grid and band of the references (the bundle's).
        references: also score the no-learning references.
        n_resamples: bootstrap resamples of each interval.
        figure: where to write :func:`overview_figure` (None: not drawn); the maps are read beside ``scores``.

    Returns:
        ``{"splits": {split: {column: metrics}}, "n_scans": ...}``.
    """
    items = validation_items(val_dir)
    columns = read_scores(scores)
    names = [i["name"] for i in items]
    for col, values in columns.items():
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{scores}: column {col!r} has no score for {len(missing)} scan(s), e.g. {missing[:3]}.")
    if references:
        ref = {i["name"]: reference_scores(i["image"], spatial_size, band_ratio, band_alignment, rpe_position)
               for i in items}
        for key in next(iter(ref.values())):
            columns[key] = {n: r[key] for n, r in ref.items()}
    signs = {}
    tuning = [i for i in items if i["split"] == "tuning"]
    for col in columns:
        if col.startswith("ref_"):
            auc = roc_auc_score([i["label"] for i in tuning], [columns[col][i["name"]] for i in tuning])
            signs[col] = 1 if auc >= 0.5 else -1
    result = {"n_scans": len(items), "splits": _evaluate(items, columns, signs, n_resamples)}
    if out:
        atomic_write_json(result, out)
    if figure:
        overview_figure(items, columns["score"], os.path.dirname(os.path.abspath(scores)), figure)
    for split in ("tuning", "untouched"):
        print(f"{split}: AUROC [95% CI] / AUPRC [95% CI]")
        for col, m in result["splits"][split].items():
            print(
                f"  {col:36s} {m['auroc']:.3f} [{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}]  "
                f"{m['auprc']:.3f} [{m['auprc_ci'][0]:.3f}, {m['auprc_ci'][1]:.3f}]"
                + ("  (lower = abnormal)" if m["sign"] < 0 else "")
            )
    return result


def overview_figure(
    items: Sequence[Mapping[str, Any]],
    scores: Mapping[str, float],
    maps_dir: str | os.PathLike,
    out: str | os.PathLike,
    png_max: float | None = None,
) -> str:
    """
    A PNG of normal and abnormal scans (per class: the highest, the median and the lowest score) with their anomaly
    maps (``<maps_dir>/<name>_anomaly.npy``), each row titled with its class and score.

    Args:
        items: :func:`validation_items`.
        scores: image name -> score (the ``score`` column).
        maps_dir: the inference output folder.
        out: the PNG file.
        png_max: the map value shown white (None: the 99.9th percentile over the shown maps).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from berdiff.io.oct import output_stem
    from berdiff.utils import atomic_write

    rows = []
    for cls in sorted({i["class"] for i in items}, key=lambda c: (c != NORMAL_CLASS, c)):
        ranked = sorted((i for i in items if i["class"] == cls), key=lambda i: -scores[i["name"]])
        rows += [ranked[0], ranked[len(ranked) // 2], ranked[-1]]
    maps = [np.load(os.path.join(maps_dir, output_stem(i["name"]) + "_anomaly.npy")) for i in rows]
    vmax = float(np.percentile(np.concatenate([m.ravel() for m in maps]), 99.9)) if png_max is None else png_max
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 1.6 * len(rows)), squeeze=False)
    for (ax_img, ax_map), item, amap in zip(axes, rows, maps):
        ax_img.imshow(read_scan(item["image"]), cmap="gray")
        ax_img.set_title(f"{item['class']}: {Path(item['name']).name}", fontsize=7)
        ax_map.imshow(amap, cmap="inferno", vmin=0.0, vmax=vmax)
        ax_map.set_title(f"anomaly map, score {scores[item['name']]:.4g}", fontsize=7)
        for ax in (ax_img, ax_map):
            ax.axis("off")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return os.fspath(out)
