# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""
Scoring of saved anomaly maps against ground truth: ``python -m berdiff evaluate --pred DIR --label DIR``.

Every map is scored with all protocols of ``docs/evaluation.md`` (see :mod:`berdiff.metrics`):

* protocol A (reference): per 2D slice along ``axis``, 5x5 median, p1/p99 clip, min-max, threshold 0.5,
  8-connected components of filled area <= 15 px removed; Dice/AUROC/AUPRC pooled over the diseased slices of all
  cases (mean and std over slices), no brain mask;
* protocol B (per volume): optional eroded brain mask, 3D median 5, Dice at a given or calibrated threshold after
  removing 3D components <= 7 voxels, oracle best Dice (an upper bound), AUROC/AUPRC; mean and std over volumes with
  a tumour;
* slice-level detection AUROC (healthy vs diseased slices, 99th percentile of the map inside the head per slice).

:func:`evaluate_arrays` does the work on in-memory volumes (any iterable of case dicts, so a generator can load cases
lazily); :func:`evaluate` finds and checks the files, then calls it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from berdiff.metrics import (
    ThresholdMap,
    _mean_std,
    brain_mask_from_image,
    per_slice_protocol,
    per_volume_protocol,
    pixel_auroc,
    psnr,
    slice_statistics,
)
from berdiff.transforms import MAX_VOXELS

__all__ = ["MAP_KEYS", "EvaluationResult", "evaluate", "evaluate_arrays", "find_cases", "load_threshold"]

#: case-dict keys of the maps that are scored, in order (``score`` is the anomaly map). Every map but the anomaly map
#: is optional and read from ``<case>_<name>.nii.gz``: the autoencoder-only map, the latent maps of
#: ``berdiff.inferers.LatentMap`` and ``latent_flip`` (the former name of ``latent_flip_probability``).
MAP_KEYS = {
    "anomaly": "score",
    "autoencoder": "autoencoder",
    "latent_code_change": "latent_code_change",
    "latent_mask_fraction": "latent_mask_fraction",
    "latent_changed_bits": "latent_changed_bits",
    "latent_flip_probability": "latent_flip_probability",
    "latent_flip": "latent_flip",
}
#: the optional maps (case key = map name = file postfix)
_EXTRA_MAPS = tuple(k for k in MAP_KEYS if k != "anomaly")

_NII = (".nii.gz", ".nii")
#: trailing name tokens ignored when matching case names (modalities, segmentation, generic image/label names)
_STRIP_TOKENS = ("t1", "t1ce", "t2", "flair", "seg", "image", "img", "label", "mask")
#: channel order of the bundle (``berdiff.transforms.BRATS_MODALITIES``), used to order modality files
_MODALITY_ORDER = ("t1", "t1ce", "t2", "flair")


# ----------------------------------------------------------------------------------------------------------- helpers
class EvaluationResult(dict):
    """
    The metrics dict returned by :func:`evaluate`. A plain ``dict`` whose ``str`` is one line naming the output
    folder, so that ``python -m berdiff evaluate`` (``fire`` prints return values) does not dump the whole dict after
    the summary.
    """

    def __str__(self) -> str:
        return f"outputs in {self.get('settings', {}).get('output_folder', '<not written>')}"


def _finite_or_none(x: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become ``None`` (strict JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _channel_first(x: np.ndarray | None, spatial: tuple[int, ...], what: str) -> np.ndarray | None:
    """3D volumes pass through; 4D volumes are returned channel-first (accepts channel-first or channel-last)."""
    if x is None:
        return None
    x = np.asarray(x)
    if x.shape == spatial:
        return x
    if x.ndim == 4 and x.shape[1:] == spatial:
        return x
    if x.ndim == 4 and x.shape[:3] == spatial:
        return np.moveaxis(x, -1, 0)
    raise ValueError(f"{what} has shape {x.shape}, which does not match the anomaly map's spatial shape {spatial}.")


def _squeeze_to_3d(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    while x.ndim > 3 and (x.shape[-1] == 1 or x.shape[0] == 1):
        x = x[..., 0] if x.shape[-1] == 1 else x[0]
    if x.ndim != 3:
        raise ValueError(f"{what} must be a 3D volume (singleton channel dimensions allowed), got shape {x.shape}.")
    return x


def _figure_slice(image: np.ndarray | None, channel: int, axis: int, z: int) -> np.ndarray | None:
    if image is None:
        return None
    vol = image[channel] if image.ndim == 4 else image
    return np.take(vol, z, axis=axis).astype(np.float32)


def load_threshold(threshold_file: str | os.PathLike) -> tuple[float, dict]:
    """
    Read a calibration JSON (as written by ``python -m berdiff calibrate``): an object with a finite number under
    ``"threshold"``; other fields are returned for the record.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON, or has no finite ``"threshold"``.
    """
    path = Path(threshold_file)
    if not path.is_file():
        raise FileNotFoundError(f"threshold file not found: {path}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"threshold file {path} is not valid JSON: {e}") from e
    if not isinstance(content, dict) or "threshold" not in content:
        raise ValueError(f'threshold file {path} must hold a JSON object with a "threshold" number.')
    try:
        value = float(content["threshold"])
    except (TypeError, ValueError) as e:
        raise ValueError(f'threshold file {path}: "threshold" is not a number: {content["threshold"]!r}') from e
    if not math.isfinite(value):
        raise ValueError(f'threshold file {path}: "threshold" must be finite, got {value}.')
    return value, content


# ------------------------------------------------------------------------------------------------ in-memory scoring
def _score_case(
    case: Mapping[str, Any],
    index: int,
    threshold: float | None,
    use_brain_mask: bool | None,
    axis: int,
    median_size_2d: int,
    min_component_2d: int,
    median_size_3d: int,
    min_component_3d: int,
    erode: bool | int,
    detection_percentile: float,
    figure_channel: int,
    compute_psnr: bool,
    threshold_on: str,
) -> dict:
    name = str(case.get("name", f"case_{index:03d}"))
    for key in ("score", "label"):
        if key not in case or case[key] is None:
            raise ValueError(f"case {name!r} has no {key!r} array.")
    score = _squeeze_to_3d(np.asarray(case["score"]), f"case {name!r}: score")
    label = _squeeze_to_3d(np.asarray(case["label"]), f"case {name!r}: label")
    if score.shape != label.shape:
        raise ValueError(f"case {name!r}: score has shape {score.shape} but label has shape {label.shape}.")
    if not np.isfinite(score).all():
        raise ValueError(f"case {name!r}: the anomaly map contains NaN or infinite values.")
    gt = label > 0
    image = _channel_first(case.get("image"), score.shape, f"case {name!r}: image")
    recon = _channel_first(case.get("recon"), score.shape, f"case {name!r}: recon")
    extra: dict[str, np.ndarray] = {}
    for key in _EXTRA_MAPS:
        if case.get(key) is None:
            continue
        extra[key] = _squeeze_to_3d(np.asarray(case[key]), f"case {name!r}: {key}")
        if extra[key].shape != score.shape:
            raise ValueError(f"case {name!r}: {key} has shape {extra[key].shape} but score has shape {score.shape}.")
        if not np.isfinite(extra[key]).all():
            raise ValueError(f"case {name!r}: {key} contains NaN or infinite values.")
    brain = case.get("brain_mask")
    if use_brain_mask is False:
        brain = None
    elif brain is None and image is not None:
        brain = brain_mask_from_image(image, channel_axis=0)
    if use_brain_mask and brain is None:
        raise ValueError(f"case {name!r}: a brain mask was requested but the case has no 'brain_mask' or 'image'.")
    if brain is not None:
        brain = np.asarray(brain) > 0
        if brain.shape != score.shape:
            raise ValueError(f"case {name!r}: brain_mask has shape {brain.shape} but score has shape {score.shape}.")

    ax = axis % 3
    row: dict[str, Any] = {"case": name, "tumour_voxels": int(gt.sum()), "brain_mask": brain is not None}
    maps: dict[str, dict] = {}
    for map_name, key in MAP_KEYS.items():
        vol = score if key == "score" else extra.get(key)
        if vol is None:
            continue
        a = per_slice_protocol(vol, gt, axis=ax, min_component=min_component_2d, median_size=median_size_2d)
        b = per_volume_protocol(
            vol,
            gt,
            brain_mask=brain,
            threshold=threshold if map_name == "anomaly" else None,
            median_size=median_size_3d,
            erode=erode,
            min_component=min_component_3d,
            threshold_on=threshold_on,
        )
        det_scores, det_labels = slice_statistics(vol, gt, mask=brain, axis=ax, percentile=detection_percentile)
        maps[map_name] = {"a": a, "b": b, "det": (det_scores, det_labels)}
        row.update(
            {
                f"{map_name}_a_dice": a["dice"]["mean"],
                f"{map_name}_a_auroc": a["auroc"]["mean"],
                f"{map_name}_a_auprc": a["auprc"]["mean"],
                f"{map_name}_a_n_slices": a["n_slices"],
                f"{map_name}_b_dice": b["dice"],
                f"{map_name}_b_best_dice": b["best_dice"],
                f"{map_name}_b_best_threshold": b["best_threshold"],
                f"{map_name}_b_auroc": b["auroc"],
                f"{map_name}_b_auprc": b["auprc"],
            }
        )
    row["psnr"] = psnr(recon, image) if compute_psnr and recon is not None and image is not None else float("nan")

    # figure material: the slice with the largest tumour area (the middle slice for a healthy case)
    areas = np.moveaxis(gt, ax, -1).reshape(-1, gt.shape[ax]).sum(axis=0)
    z = int(np.argmax(areas)) if areas.max() > 0 else gt.shape[ax] // 2
    fig = {
        "image": _figure_slice(image, figure_channel, ax, z),
        "recon": _figure_slice(recon, figure_channel, ax, z),
        "score": np.take(score, z, axis=ax).astype(np.float32),
        "autoencoder": np.take(extra["autoencoder"], z, axis=ax).astype(np.float32) if "autoencoder" in extra else None,
        "label": np.take(gt, z, axis=ax),
        "slice": z,
    }
    return {"row": row, "maps": maps, "figure": fig}


def _summarise(scored: list[dict], map_name: str) -> dict:
    items = [c["maps"][map_name] for c in scored if map_name in c["maps"]]
    if not items:
        return {}
    a_pool = {k: [v for it in items for v in it["a"][f"{k}_per_slice"]] for k in ("dice", "auroc", "auprc")}
    det_s = np.concatenate([it["det"][0] for it in items])
    det_l = np.concatenate([it["det"][1] for it in items])
    return {
        "protocol_a": {
            "dice": _mean_std(a_pool["dice"]),
            "auroc": _mean_std(a_pool["auroc"]),
            "auprc": _mean_std(a_pool["auprc"]),
            "n_slices": len(a_pool["dice"]),
        },
        "protocol_b": {
            "dice": _mean_std([it["b"]["dice"] for it in items]),
            "best_dice_upper_bound": _mean_std([it["b"]["best_dice"] for it in items]),
            "auroc": _mean_std([it["b"]["auroc"] for it in items]),
            "auprc": _mean_std([it["b"]["auprc"] for it in items]),
            "n_volumes": len(items),
        },
        "slice_detection": {
            "auroc": pixel_auroc(det_s, det_l) if det_s.size else float("nan"),
            "n_healthy_slices": int((~det_l).sum()),
            "n_diseased_slices": int(det_l.sum()),
        },
    }


def _settings(
    threshold: float | None,
    threshold_source: str,
    used_mask: list[bool],
    axis: int,
    median_size_2d: int,
    min_component_2d: int,
    median_size_3d: int,
    min_component_3d: int,
    erode: bool | int,
    detection_percentile: float,
    threshold_on: str,
) -> dict:
    if all(used_mask) and used_mask:
        mask_rule = "yes (given, or from the image: any channel != 0, holes filled, largest component)"
    elif any(used_mask):
        mask_rule = f"mixed: {sum(used_mask)} of {len(used_mask)} cases"
    else:
        mask_rule = "no"
    erosion = "shape[0] // 25 iterations" if erode is True else ("none" if not erode else f"{int(erode)} iterations")
    return {
        "protocol_a": {
            "unit": f"2D slices along axis {axis}, pooled over the diseased slices of all cases; mean, std over slices",
            "brain_mask": "no",
            "median_filter": f"2D {median_size_2d}x{median_size_2d} on the channel-summed map",
            "normalisation": "clip to the slice's [p1, p99], then min-max to [0, 1]",
            "threshold": "fixed 0.5",
            "components": f"2D 8-connected components with filled area <= {min_component_2d} px removed",
        },
        "protocol_b": {
            "unit": "volume; mean and std over volumes with a tumour",
            "brain_mask": mask_rule,
            "mask_erosion": erosion if any(used_mask) else "n/a",
            "median_filter": f"3D {median_size_3d}^3",
            "threshold": threshold,
            "threshold_source": threshold_source,
            "threshold_applies_to": (
                "anomaly map after masking and median filtering (not the latent flip map)"
                if threshold_on == ThresholdMap.PROCESSED
                else "raw anomaly map inside the (eroded) brain mask, no median filter (not the latent flip map)"
            ),
            "components": f"3D 26-connected components <= {min_component_3d} voxels removed before Dice",
            "best_dice": "per-volume oracle threshold, no component filter: an upper bound",
            "auroc_auprc_voxels": "inside the eroded brain mask when one is used, else all voxels",
        },
        "slice_detection": (
            f"per-slice score = {detection_percentile}th percentile of the raw map inside the head mask (all pixels "
            "without a mask; slices with an empty mask dropped); label = slice has a tumour voxel"
        ),
        "auprc_implementation": "sklearn average_precision_score (the reference used torcheval BinaryAUPRC)",
        "auroc_implementation": "sklearn roc_auc_score",
        "undefined_values": "Dice with empty prediction and ground truth, AUROC/AUPRC with one class: not averaged",
    }


def _write_atomic(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary file in its folder first, then move them all into place with ``os.replace``."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for tmp, path in temps:
            os.replace(tmp, path)
        temps = []
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def _csv_bytes(rows: list[dict]) -> bytes:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue().encode()


def _figure_png(scored: list[dict], rank_key: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    ranked = [c for c in scored if np.isfinite(c["row"].get(rank_key, float("nan")))]
    if ranked:
        ranked.sort(key=lambda c: c["row"][rank_key], reverse=True)
        picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[-1])]
    else:
        picks = [("case", c) for c in scored[:3]]
    rows: list[tuple[str, dict]] = []
    for tag, c in picks:  # with fewer than 3 ranked cases one row carries several tags ("median, worst")
        same = [i for i, (_, other) in enumerate(rows) if other is c]
        if same:
            rows[same[0]] = (f"{rows[same[0]][0]}, {tag}", c)
        else:
            rows.append((tag, c))
    columns = [("input", "image", "gray"), ("reconstruction", "recon", "gray"), ("anomaly map", "score", "inferno")]
    if any(c["figure"].get("autoencoder") is not None for _, c in rows):
        columns.append(("autoencoder-only map", "autoencoder", "inferno"))
    columns.append(("ground truth", "label", "gray"))
    fig = Figure(figsize=(3.0 * len(columns), 3.0 * len(rows)))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (tag, c) in enumerate(rows):
        for k, (title, key, cmap) in enumerate(columns):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            arr = c["figure"].get(key)
            if arr is None:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(np.rot90(np.asarray(arr, dtype=np.float32)), cmap=cmap)
            if r == 0:
                ax.set_title(title)
            if k == 0:
                value = c["row"].get(rank_key, float("nan"))
                label = f"{tag}: {c['row']['case']}\nDice_A {value:.3f}, slice {c['figure']['slice']}"
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _evaluate(
    cases: Iterable[Mapping[str, Any]],
    threshold: float | None = None,
    threshold_source: str | None = None,
    brain_mask: bool | None = None,
    axis: int = -1,
    median_size_2d: int = 5,
    min_component_2d: int = 15,
    median_size_3d: int = 5,
    min_component_3d: int = 7,
    erode: bool | int = True,
    detection_percentile: float = 99.0,
    figure_channel: int = -1,
    compute_psnr: bool = True,
    threshold_on: str = ThresholdMap.PROCESSED,
) -> tuple[dict, list[dict]]:
    """Score the cases; returns the metrics dict and the per-case results (see :func:`evaluate_arrays`)."""
    if threshold is not None:
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}.")
    if threshold_source is None:
        threshold_source = "given value" if threshold is not None else "none"
    threshold_on = ThresholdMap(threshold_on)
    kwargs = dict(
        threshold=threshold,
        use_brain_mask=brain_mask,
        axis=axis,
        median_size_2d=median_size_2d,
        min_component_2d=min_component_2d,
        median_size_3d=median_size_3d,
        min_component_3d=min_component_3d,
        erode=erode,
        detection_percentile=detection_percentile,
        figure_channel=figure_channel,
        compute_psnr=compute_psnr,
        threshold_on=threshold_on,
    )
    scored = [_score_case(case, i, **kwargs) for i, case in enumerate(cases)]
    if not scored:
        raise ValueError("no cases to evaluate.")
    names = [c["row"]["case"] for c in scored]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate case names: {dup}")
    rows = [c["row"] for c in scored]
    result = {
        "n_cases": len(scored),
        "n_diseased_cases": int(sum(r["tumour_voxels"] > 0 for r in rows)),
        "cases": names,
        "maps": {m: s for m in MAP_KEYS if (s := _summarise(scored, m))},
        "psnr": _mean_std([r["psnr"] for r in rows]),
        "settings": _settings(
            threshold,
            threshold_source,
            [bool(r["brain_mask"]) for r in rows],
            axis,
            median_size_2d,
            min_component_2d,
            median_size_3d,
            min_component_3d,
            erode,
            detection_percentile,
            threshold_on,
        ),
        "per_case": rows,
    }
    result["settings"]["figure"] = "rows: best, median and worst case by protocol A Dice; slice with most tumour"
    return result, scored


def evaluate_arrays(
    cases: Iterable[Mapping[str, Any]],
    threshold: float | None = None,
    threshold_source: str | None = None,
    brain_mask: bool | None = None,
    axis: int = -1,
    median_size_2d: int = 5,
    min_component_2d: int = 15,
    median_size_3d: int = 5,
    min_component_3d: int = 7,
    erode: bool | int = True,
    detection_percentile: float = 99.0,
    figure_channel: int = -1,
    compute_psnr: bool = True,
    threshold_on: str = ThresholdMap.PROCESSED,
    out: str | os.PathLike | None = None,
    figure: bool = True,
) -> dict:
    """
    Score in-memory cases with protocols A, B and slice-level detection.

    Args:
        cases: iterable (list or generator) of dicts with

            * ``score``: 3D anomaly map (a singleton channel dimension is squeezed);
            * ``label``: 3D ground truth, same shape (``> 0`` is anomalous);
            * optional ``name``; ``image`` and ``recon`` (3D, or 4D channel-first or channel-last), used for the
              figure, for PSNR and (``image``) for the brain mask; any of the other :data:`MAP_KEYS` (3D maps, scored like
              ``score``, e.g. ``autoencoder``: the autoencoder-only map, shown in the figure too);
              ``brain_mask`` (3D, overrides the mask derived from ``image``).
        threshold: threshold of protocol B for the anomaly map (``None``: only best Dice, AUROC, AUPRC).
        threshold_source: how the threshold was chosen, for the record.
        brain_mask: ``None`` uses a mask for every case that has ``brain_mask`` or ``image``; ``True`` requires one;
            ``False`` never masks.
        axis: slicing axis for protocol A and slice detection (default last: axial for RAS volumes).
        median_size_2d, min_component_2d: protocol A filter sizes (5 and 15 in the reference).
        median_size_3d, min_component_3d, erode: protocol B settings (5, 7 and ``shape[0] // 25`` erosions).
        detection_percentile: per-slice statistic for slice-level detection.
        figure_channel: channel of 4D ``image``/``recon`` shown in the figure (-1: FLAIR in the bundle's order).
        compute_psnr: compute PSNR of ``recon`` against ``image`` (only meaningful when both share intensity space).
        threshold_on: member of ``berdiff.metrics.ThresholdMap``: apply ``threshold`` to the processed (masked,
            median-filtered; default) or the raw map; it must match how the threshold was calibrated.
        out: optional folder: ``metrics.json``, ``per_case.csv`` and ``figure.png`` are written there atomically.
        figure: write ``figure.png`` when ``out`` is given.

    Returns:
        dict with ``n_cases``, ``n_diseased_cases``, ``cases``, ``maps`` (per map: ``protocol_a``, ``protocol_b``,
        ``slice_detection``), ``psnr``, ``settings`` and ``per_case`` (one row dict per case). NaN marks undefined
        values (written as ``null`` in ``metrics.json``).
    """
    result, scored = _evaluate(
        cases,
        threshold=threshold,
        threshold_source=threshold_source,
        brain_mask=brain_mask,
        axis=axis,
        median_size_2d=median_size_2d,
        min_component_2d=min_component_2d,
        median_size_3d=median_size_3d,
        min_component_3d=min_component_3d,
        erode=erode,
        detection_percentile=detection_percentile,
        figure_channel=figure_channel,
        compute_psnr=compute_psnr,
        threshold_on=threshold_on,
    )
    if out is not None:
        _write_outputs(result, scored, Path(out), figure)
    return result


# --------------------------------------------------------------------------------------------------- file discovery
def _strip_nii(name: str) -> str | None:
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _match_key(name: str) -> str:
    """Case key for matching: trailing modality / seg / image tokens removed (``BraTS_001_flair`` -> ``BraTS_001``)."""
    parts = name.split("_")
    while len(parts) > 1 and parts[-1].lower() in _STRIP_TOKENS:
        parts.pop()
    return "_".join(parts)


def _index_by_suffix(folder: Path, suffix: str, what: str) -> dict[str, Path]:
    """Recursively find ``*<suffix>.nii[.gz]`` files; returns {case name: path}; duplicate case names are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        stem = _strip_nii(path.name)
        if stem is None or not path.is_file() or not stem.endswith(suffix) or len(stem) == len(suffix):
            continue
        case = stem[: -len(suffix)] if suffix else stem
        if case in found:
            raise ValueError(f"two {what} files for case {case!r}: {found[case]} and {path}")
        found[case] = path
    return found


def _labels_from_datalist(path: Path, label_suffix: str) -> dict[str, Path]:
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"label datalist {path} is not valid JSON: {e}") from e
    items: list = []
    if isinstance(content, list):
        items = content
    elif isinstance(content, dict):
        for value in content.values():
            if isinstance(value, list):
                items += [v for v in value if isinstance(v, dict) and "label" in v]
    found: dict[str, Path] = {}
    for item in items:
        if not isinstance(item, dict) or "label" not in item:
            continue
        lab = Path(str(item["label"]))
        lab = lab if lab.is_absolute() else path.parent / lab
        stem = _strip_nii(lab.name) or lab.name
        case = stem[: -len(label_suffix)] if label_suffix and stem.endswith(label_suffix) else stem
        found[case] = lab
    if not found:
        raise ValueError(f'label datalist {path} has no entries with a "label" file.')
    return found


def _image_files(folder: Path) -> dict[str, list[Path]]:
    """{case key: modality files ordered t1, t1ce, t2, flair (others after, by name)}; segmentations are skipped."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        stem = _strip_nii(path.name)
        if stem is None or not path.is_file() or stem.lower().endswith("_seg"):
            continue
        groups.setdefault(_match_key(stem), []).append(path)

    def order(p: Path) -> tuple[int, str]:
        token = (_strip_nii(p.name) or "").split("_")[-1].lower()
        return (_MODALITY_ORDER.index(token) if token in _MODALITY_ORDER else len(_MODALITY_ORDER), p.name)

    return {k: sorted(v, key=order) for k, v in groups.items()}


def _header_shape(path: Path, what: str) -> tuple[int, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    if len(shape) > 0 and int(np.prod(np.asarray(shape, dtype=np.float64))) > MAX_VOXELS:  # before reading the data
        raise ValueError(
            f"{what} file {path}: the header claims {shape} voxels, more than {MAX_VOXELS:,}; refusing to read it."
        )
    return shape


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape[:3] if len(shape) >= 3 else shape


def find_cases(
    pred: str | os.PathLike,
    label: str | os.PathLike,
    image: str | os.PathLike | None = None,
    map_suffix: str = "_anomaly",
    recon_suffix: str = "_reconstruction",
    flip_suffix: str = "_latent_flip",
    label_suffix: str = "_seg",
    allow_missing_labels: bool = False,
) -> list[dict[str, Any]]:
    """
    Match prediction files with labels (and optional images) and check their shapes from the headers.

    Matching: a map ``<case><map_suffix>.nii[.gz]`` anywhere under ``pred`` is matched with the label
    ``<case><label_suffix>.nii[.gz]`` anywhere under ``label`` (a folder, or a JSON datalist whose entries hold a
    ``"label"`` path). When no exact name matches, names are compared with trailing modality tokens removed
    (``BraTS_001_flair`` matches ``BraTS_001``). Maps without a label are an error (a silently dropped case would bias
    the means) unless ``allow_missing_labels``, which warns and skips them; labels without a map only give a warning
    (the label folder may hold more cases than were predicted). Images: every NIfTI under ``image`` whose name
    (without its modality token) is the case key, e.g. BraTS ``<case>/<case>_flair.nii.gz``; several files are
    stacked as channels in the order t1, t1ce, t2, flair.

    Returns:
        list of dicts with ``name``, ``score`` (path), ``label`` (path), optional ``recon``, the other :data:`MAP_KEYS` and
        ``image`` (list of paths).

    Raises:
        FileNotFoundError: a folder is missing, no map is found, or a map has no label.
        ValueError: duplicate cases, unreadable files, or shapes that do not match (naming both files).
    """
    pred_dir, label_path = Path(pred), Path(label)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    if not label_path.exists():
        raise FileNotFoundError(f"label folder or datalist not found: {label_path}")
    maps = _index_by_suffix(pred_dir, map_suffix, "anomaly map")
    if not maps:
        raise FileNotFoundError(f"no anomaly maps '*{map_suffix}.nii.gz' found under {pred_dir}")
    recons = _index_by_suffix(pred_dir, recon_suffix, "reconstruction") if recon_suffix else {}
    extras = {k: _index_by_suffix(pred_dir, f"_{k}", f"{k} map") for k in _EXTRA_MAPS if k != "latent_flip"}
    extras["latent_flip"] = _index_by_suffix(pred_dir, flip_suffix, "latent flip map") if flip_suffix else {}
    if label_path.is_dir():
        labels = _index_by_suffix(label_path, label_suffix, "label")
    else:
        labels = _labels_from_datalist(label_path, label_suffix)
    label_by_key: dict[str, list[str]] = {}
    for case in labels:
        label_by_key.setdefault(_match_key(case), []).append(case)

    matched: dict[str, str] = {}
    missing: list[str] = []
    for case in maps:
        if case in labels:
            matched[case] = case
        elif len(label_by_key.get(_match_key(case), [])) == 1:
            matched[case] = label_by_key[_match_key(case)][0]
        else:
            missing.append(case)
    used = list(matched.values())
    if len(set(used)) != len(used):
        dup = sorted({u for u in used if used.count(u) > 1})
        raise ValueError(f"several anomaly maps match the same label: {dup}")
    if missing:
        msg = f"{len(missing)} anomaly map(s) have no label '*{label_suffix}.nii.gz' under {label_path}: {missing}"
        if not allow_missing_labels:
            raise FileNotFoundError(msg + " (pass allow_missing_labels=True to skip them)")
        warnings.warn(msg + "; they are skipped.", stacklevel=2)
    unused = sorted(set(labels) - set(used))
    if unused:
        warnings.warn(f"{len(unused)} label(s) have no anomaly map and are not evaluated: {unused[:20]}", stacklevel=2)
    if image is not None and not Path(image).is_dir():
        raise FileNotFoundError(f"image folder not found: {image}")
    images = _image_files(Path(image)) if image is not None else {}

    cases = []
    for case, lab in matched.items():
        shape = _spatial(_header_shape(maps[case], "anomaly map"))
        entry: dict[str, Any] = {"name": case, "score": maps[case], "label": labels[lab]}
        lab_shape = _spatial(_header_shape(labels[lab], "label"))
        if lab_shape != shape:
            raise ValueError(
                f"shape mismatch for case {case!r}: anomaly map {maps[case]} has shape {shape} but label "
                f"{labels[lab]} has shape {lab_shape}."
            )
        for key, index, what in (("recon", recons, "reconstruction"), *((k, extras[k], f"{k} map") for k in extras)):
            if case in index:
                other = _header_shape(index[case], what)
                if other[:3] != shape and other[1:4] != shape:
                    raise ValueError(
                        f"shape mismatch for case {case!r}: anomaly map {maps[case]} has shape {shape} but {what} "
                        f"{index[case]} has shape {other}."
                    )
                entry[key] = index[case]
        if image is not None:
            files = images.get(_match_key(case)) or images.get(_match_key(lab))
            if not files:
                raise FileNotFoundError(f"no image files for case {case!r} under {image}")
            for f in files:
                other = _spatial(_header_shape(f, "image"))
                if other != shape:
                    raise ValueError(
                        f"shape mismatch for case {case!r}: anomaly map {maps[case]} has shape {shape} but image "
                        f"{f} has shape {other}."
                    )
            entry["image"] = files
        cases.append(entry)
    return cases


def _load(path: Path, what: str) -> np.ndarray:
    try:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as e:  # corrupt or truncated files raise several types
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    if not np.isfinite(data).all():
        raise ValueError(f"{what} file {path} contains NaN or infinite values.")
    return data


def _check_label_values(label: np.ndarray, path: Any) -> None:
    """A segmentation holds non-negative integer labels (0 background; any positive value is anomalous)."""
    values = np.unique(label)
    bad = values[(values < 0) | (values != np.round(values))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(
            f"label file {path} holds values that are not segmentation labels: {shown} (expected non-negative "
            "integers: 0 for background, positive labels such as BraTS 1, 2, 4 for the anomaly); a probability "
            "map or an intensity image was given as the label?"
        )


def _load_case(entry: Mapping[str, Any]) -> dict[str, Any]:
    case: dict[str, Any] = {
        "name": entry["name"],
        "score": _squeeze_to_3d(_load(entry["score"], "anomaly map"), f"anomaly map {entry['score']}"),
        "label": _squeeze_to_3d(_load(entry["label"], "label"), f"label {entry['label']}"),
    }
    _check_label_values(case["label"], entry["label"])
    for key in _EXTRA_MAPS:
        if key in entry:
            case[key] = _load(entry[key], f"{key} map")
    if "recon" in entry:
        case["recon"] = _load(entry["recon"], "reconstruction")
    if "image" in entry:
        vols = [_load(p, "image") for p in entry["image"]]
        if len(vols) == 1:
            case["image"] = vols[0]
        else:
            case["image"] = np.stack([_squeeze_to_3d(v, f"image {p}") for v, p in zip(vols, entry["image"])])
    return case


def evaluate(
    pred: str,
    label: str,
    out: str | None = None,
    image: str | None = None,
    threshold: float | None = None,
    threshold_file: str | None = None,
    map_suffix: str = "_anomaly",
    recon_suffix: str = "_reconstruction",
    flip_suffix: str = "_latent_flip",
    label_suffix: str = "_seg",
    brain_mask: bool | None = None,
    axis: int = -1,
    median_size_2d: int = 5,
    min_component_2d: int = 15,
    median_size_3d: int = 5,
    min_component_3d: int = 7,
    erode: bool | int = True,
    threshold_on: str | None = None,
    allow_missing_labels: bool = False,
    figure: bool = True,
    quiet: bool = False,
) -> dict:
    """
    Score the anomaly maps written by the bundle against ground-truth segmentations and write ``metrics.json``
    (means plus the settings used), ``per_case.csv`` and ``figure.png`` (best / median / worst case by protocol A
    Dice: input, reconstruction, anomaly map and ground truth on the slice with the largest tumour area) into ``out``.
    All inputs are checked before anything is written; files are written atomically.

    Args:
        pred: folder of ``<case>_anomaly.nii.gz`` (optionally ``<case>_reconstruction.nii.gz`` and
            ``<case>_<name>.nii.gz`` for the other maps of :data:`MAP_KEYS`, e.g. ``_autoencoder``,
            ``_latent_code_change``), searched recursively.
        label: folder of ``<case>_seg.nii.gz`` (searched recursively), or a JSON datalist with ``"label"`` entries.
        out: output folder (default ``<pred>/evaluation``).
        image: optional folder of input images (BraTS ``<case>/<case>_flair.nii.gz`` ...): shown in the figure and
            used for the brain mask of protocol B. PSNR is not computed from files, because the raw images are not in
            the reconstruction's intensity space.
        threshold: protocol B threshold for the anomaly map.
        threshold_file: calibration JSON holding ``{"threshold": float, ...}`` (``python -m berdiff calibrate``);
            exclusive with ``threshold``. With neither, protocol B reports only best Dice, AUROC and AUPRC.
        map_suffix, recon_suffix, flip_suffix, label_suffix: file name suffixes before ``.nii.gz``.
        brain_mask: ``None``: use a mask when ``image`` is given; ``True``: require ``image``; ``False``: never.
        axis: slicing axis for protocol A and detection (default last: axial in RAS).
        threshold_on: ``"processed"`` or ``"raw"`` (``berdiff.metrics.ThresholdMap``): the map the threshold is
            applied to. ``None``: ``"raw"`` when the threshold file's ``"rule"`` says it was calibrated on the raw map
            (as ``python -m berdiff calibrate`` writes), else ``"processed"``.
        median_size_2d, min_component_2d, median_size_3d, min_component_3d, erode: see :func:`evaluate_arrays`.
        allow_missing_labels: skip (with a warning) maps that have no label instead of failing.
        figure: write ``figure.png``.
        quiet: don't print the summary.

    Returns:
        the metrics dict of :func:`evaluate_arrays`.
    """
    if threshold is not None and threshold_file is not None:
        raise ValueError("give either threshold or threshold_file, not both.")
    source = "none"
    extra: dict = {}
    if threshold_file is not None:
        threshold, extra = load_threshold(threshold_file)
        source = f"file {threshold_file}"
    elif threshold is not None:
        source = "given value"
    if threshold_on is None:
        raw_rule = "raw" in str(extra.get("rule", "")).lower()
        threshold_on = ThresholdMap.RAW if raw_rule else ThresholdMap.PROCESSED
    threshold_on = ThresholdMap(threshold_on)
    if brain_mask and image is None:
        raise ValueError("brain_mask=True needs the image folder (--image) to compute the mask from.")
    entries = find_cases(
        pred,
        label,
        image=image,
        map_suffix=map_suffix,
        recon_suffix=recon_suffix,
        flip_suffix=flip_suffix,
        label_suffix=label_suffix,
        allow_missing_labels=allow_missing_labels,
    )
    if not entries:
        raise FileNotFoundError(f"no anomaly map under {pred} could be matched with a label under {label}.")
    from tqdm.auto import tqdm

    progress = tqdm(entries, desc="evaluate", unit="case", disable=quiet, dynamic_ncols=True, mininterval=1.0)
    result, scored = _evaluate(
        (_load_case(e) for e in progress),
        threshold=threshold,
        threshold_source=source,
        brain_mask=brain_mask,
        axis=axis,
        median_size_2d=median_size_2d,
        min_component_2d=min_component_2d,
        median_size_3d=median_size_3d,
        min_component_3d=min_component_3d,
        erode=erode,
        compute_psnr=False,
        threshold_on=threshold_on,
    )
    if extra:
        result["settings"]["threshold_file_content"] = extra
    result["settings"]["inputs"] = {"pred": str(pred), "label": str(label), "image": image and str(image)}
    out_dir = Path(out) if out is not None else Path(pred) / "evaluation"
    result["settings"]["output_folder"] = str(out_dir)
    _write_outputs(result, scored, out_dir, figure)
    if not quiet:
        print(_summary(result, out_dir))
    return EvaluationResult(result)


def _write_outputs(result: dict, scored: list[dict], out_dir: Path, figure: bool) -> None:
    """Render all outputs in memory, then write ``metrics.json``, ``per_case.csv`` and ``figure.png`` atomically."""
    files = {
        out_dir / "metrics.json": json.dumps(
            _finite_or_none({k: v for k, v in result.items() if k != "per_case"}), indent=2
        ).encode(),
        out_dir / "per_case.csv": _csv_bytes(result["per_case"]),
    }
    if figure:
        files[out_dir / "figure.png"] = _figure_png(scored, "anomaly_a_dice")
    _write_atomic(files)


def _summary(result: dict, out_dir: Path) -> str:
    def fmt(d: dict) -> str:
        if not d or d.get("n", 0) == 0:
            return "n/a"
        return f"{d['mean']:.4f} ± {d['std']:.4f} (n={d['n']})"

    lines = [f"evaluated {result['n_cases']} cases ({result['n_diseased_cases']} with tumour) -> {out_dir}"]
    for name, m in result["maps"].items():
        a, b = m["protocol_a"], m["protocol_b"]
        lines.append(f"[{name}]")
        lines.append(f"  A per-slice  Dice {fmt(a['dice'])}  AUROC {fmt(a['auroc'])}  AUPRC {fmt(a['auprc'])}")
        lines.append(
            f"  B per-volume Dice {fmt(b['dice'])}  best Dice (upper bound) {fmt(b['best_dice_upper_bound'])}  "
            f"AUROC {fmt(b['auroc'])}  AUPRC {fmt(b['auprc'])}"
        )
        lines.append(f"  slice detection AUROC {m['slice_detection']['auroc']:.4f}")
    lines.append(f"  threshold: {result['settings']['protocol_b']['threshold_source']}")
    return "\n".join(lines)
