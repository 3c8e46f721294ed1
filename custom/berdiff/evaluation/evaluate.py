# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Scoring of anomaly maps against ground truth: ``python -m berdiff evaluate --pred DIR --label DIR``.

Every map is scored with all protocols of ``docs/evaluation.md``:

* protocol A (reference): per 2D slice along ``axis``, 5x5 median, p1/p99 clip, min-max, threshold 0.5,
  8-connected components of filled area <= 15 px removed; Dice/AUROC/AUPRC pooled over the diseased slices of all
  cases (mean and std over slices), no brain mask;
* protocol B (per volume): optional eroded brain mask, 3D median 5, Dice at a given or calibrated threshold after
  removing 3D components <= 7 voxels, oracle best Dice (an upper bound), AUROC/AUPRC; mean and std over volumes with
  a tumour;
* slice-level detection AUROC (healthy vs diseased slices, 99th percentile of the map inside the head per slice).

:func:`evaluate_arrays` does the work on in-memory volumes (any iterable of case dicts, so a generator can load cases
lazily); :func:`evaluate` finds and checks the files (:mod:`berdiff.evaluation.cases`), then calls it.
:func:`load_threshold` reads the calibration file of ``python -m berdiff calibrate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from berdiff.evaluation.cases import find_cases, load_case
from berdiff.evaluation.comparisons import compare_maps, comparison_text
from berdiff.evaluation.protocols import ThresholdMap, mean_std
from berdiff.evaluation.reports import summary_text, write_outputs
from berdiff.evaluation.scoring import ProtocolSettings, describe_settings, map_names, score_case, summarise_map

__all__ = ["EvaluationResult", "crop_case", "evaluate", "evaluate_arrays", "load_threshold", "read_calibration"]

logger = logging.getLogger(__name__)


class EvaluationResult(dict):
    """
    The metrics dict returned by :func:`evaluate`. A plain ``dict`` whose ``str`` is one line naming the output
    folder, so that ``python -m berdiff evaluate`` (``fire`` prints return values) does not dump the whole dict after
    the summary.
    """

    def __str__(self) -> str:
        return f"outputs in {self.get('settings', {}).get('output_folder', '<not written>')}"


def read_calibration(path: str | os.PathLike) -> dict[str, Any]:
    """
    The content of a calibration JSON (as written by ``python -m berdiff calibrate``): an object with a finite number
    under ``"threshold"`` (returned as a float); the other fields are kept for the record.

    Args:
        path: the JSON file.

    Raises:
        ValueError: the file is missing or not valid JSON, or has no finite ``"threshold"``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"threshold file not found: {path}")
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
    return {**content, "threshold": value}


def load_threshold(path: str | os.PathLike, expected: Mapping[str, Any] | None = None) -> float:
    """
    The threshold of a calibration JSON (see :func:`read_calibration`), as the bundle's ``inference.yaml`` and
    :func:`evaluate` use it.

    Args:
        path: the JSON file.
        expected: settings the calibration should have been made with (e.g. ``{"noise_level": 200}``); a mismatch
            with the file's ``"settings"`` is logged as a warning (the threshold depends on L, P, K and the model).

    Raises:
        ValueError: missing or unreadable file, or no finite ``threshold`` in it.
    """
    content = read_calibration(path)
    settings = content.get("settings", {})
    for key, value in (expected or {}).items():
        if isinstance(settings, dict) and key in settings and settings[key] != value:
            logger.warning(f"{path} was calibrated with {key}={settings[key]!r}, inference uses {value!r}.")
    return content["threshold"]


def crop_case(case: Mapping[str, Any], axis: int, start: int | None, stop: int | None) -> dict[str, Any]:
    """
    The case with every volume (maps, label, image, reconstruction, brain mask) restricted to the slices
    ``start:stop`` along the spatial ``axis`` (Python slice semantics), e.g. the paper's axial range of BraTS.

    Args:
        case: a case dict (see :func:`evaluate_arrays`).
        axis: the spatial slicing axis of the 3D volumes.
        start, stop: the slice range (None: from the first / to the last slice).

    Raises:
        ValueError: the range is empty for the case.
    """
    out = dict(case)
    if start is None and stop is None:
        return out
    score = np.asarray(case["score"])
    spatial = score.shape[-3:] if score.ndim > 3 and score.shape[0] == 1 else score.shape[:3]
    ax = axis % 3
    rng = range(*slice(start, stop).indices(spatial[ax]))
    if len(rng) == 0:
        raise ValueError(f"case {case.get('name')!r}: slice range [{start}, {stop}) is empty for {spatial[ax]} slices.")
    for key, value in case.items():
        if not isinstance(value, np.ndarray) or value.ndim < 3:
            continue
        if value.shape[:3] == spatial:
            out[key] = np.take(value, rng, axis=ax)
        elif value.ndim == 4 and value.shape[1:] == spatial:
            out[key] = np.take(value, rng, axis=ax + 1)
        elif value.ndim == 4 and value.shape[0] == 1 and value.shape[1:4] == spatial:
            out[key] = np.take(value, rng, axis=ax + 1)
    return out


def _score_all(
    cases: Iterable[Mapping[str, Any]], settings: ProtocolSettings, threshold_source: str | None
) -> tuple[dict, list[dict]]:
    """Score the cases; returns the metrics dict and the per-case results (see :func:`evaluate_arrays`)."""
    if threshold_source is None:
        threshold_source = "given value" if settings.threshold is not None else "none"
    scored = [score_case(case, i, settings) for i, case in enumerate(cases)]
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
        "maps": {m: s for m in map_names(scored) if (s := summarise_map(scored, m))},
        "comparisons": compare_maps(scored),
        "psnr": mean_std([r["psnr"] for r in rows]),
        "settings": describe_settings(settings, threshold_source, [bool(r["brain_mask"]) for r in rows]),
        "per_case": rows,
    }
    result["settings"]["figure"] = "rows: best, median and worst case by protocol A Dice; slice with most tumour"
    return result, scored


def evaluate_arrays(
    cases: Iterable[Mapping[str, Any]],
    settings: ProtocolSettings | None = None,
    threshold_source: str | None = None,
    out: str | os.PathLike | None = None,
    figure: bool = True,
    **protocol: Any,
) -> dict:
    """
    Score in-memory cases with protocols A, B and slice-level detection.

    Args:
        cases: iterable (list or generator) of dicts with

            * ``score``: 3D anomaly map (a singleton channel dimension is squeezed);
            * ``label``: 3D ground truth, same shape (``> 0`` is anomalous);
            * optional ``name``; ``image`` and ``recon`` (3D, or 4D channel-first or channel-last), used for the
              figure, for PSNR and (``image``) for the brain mask; any of the other
              :data:`~berdiff.evaluation.scoring.MAP_KEYS` (3D maps, scored like ``score``, e.g. ``autoencoder``: the
              autoencoder-only map, shown in the figure too); ``brain_mask`` (3D, overrides the mask derived from
              ``image``).
        settings: the protocol settings (default: :class:`~berdiff.evaluation.scoring.ProtocolSettings`'s defaults).
        threshold_source: how the threshold was chosen, for the record.
        out: optional folder: ``metrics.json``, ``per_case.csv`` and ``figure.png`` are written there atomically.
        figure: write ``figure.png`` when ``out`` is given.
        protocol: fields of :class:`~berdiff.evaluation.scoring.ProtocolSettings` that replace those of ``settings``
            (e.g. ``threshold=0.5, brain_mask=False``).

    Returns:
        dict with ``n_cases``, ``n_diseased_cases``, ``cases``, ``maps`` (per map: ``protocol_a``, ``protocol_b``,
        ``slice_detection``), ``psnr``, ``settings`` and ``per_case`` (one row dict per case). NaN marks undefined
        values (written as ``null`` in ``metrics.json``).
    """
    settings = dataclasses.replace(settings or ProtocolSettings(), **protocol)
    result, scored = _score_all(cases, settings, threshold_source)
    if out is not None:
        write_outputs(result, scored, Path(out), figure)
    return result


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
    references: bool = True,
    slice_start: int | None = None,
    slice_stop: int | None = None,
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
            ``<case>_<name>.nii.gz`` for the other maps of :data:`~berdiff.evaluation.scoring.MAP_KEYS`, e.g.
            ``_autoencoder``, ``_latent_code_change``), searched recursively.
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
        median_size_2d, min_component_2d, median_size_3d, min_component_3d, erode: see
            :class:`~berdiff.evaluation.scoring.ProtocolSettings`.
        threshold_on: ``"processed"`` or ``"raw"`` (:class:`~berdiff.evaluation.protocols.ThresholdMap`): the map the
            threshold is applied to. ``None``: ``"raw"`` when the threshold file's ``"rule"`` says it was calibrated
            on the raw map (as ``python -m berdiff calibrate`` writes), else ``"processed"``.
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
        extra = read_calibration(threshold_file)
        threshold, source = extra["threshold"], f"file {threshold_file}"
    elif threshold is not None:
        source = "given value"
    if threshold_on is None:
        raw_rule = "raw" in str(extra.get("rule", "")).lower()
        threshold_on = ThresholdMap.RAW if raw_rule else ThresholdMap.PROCESSED
    settings = ProtocolSettings(
        threshold=threshold,
        brain_mask=brain_mask,
        axis=axis,
        median_size_2d=median_size_2d,
        min_component_2d=min_component_2d,
        median_size_3d=median_size_3d,
        min_component_3d=min_component_3d,
        erode=erode,
        compute_psnr=False,
        threshold_on=threshold_on,
        input_references=bool(references),
    )
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
    cases = (crop_case(load_case(e), axis, slice_start, slice_stop) for e in progress)
    result, scored = _score_all(cases, settings, source)
    result["settings"]["slice_range"] = [slice_start, slice_stop]
    if extra:
        result["settings"]["threshold_file_content"] = extra
    result["settings"]["inputs"] = {"pred": str(pred), "label": str(label), "image": image and str(image)}
    out_dir = Path(out) if out is not None else Path(pred) / "evaluation"
    result["settings"]["output_folder"] = str(out_dir)
    write_outputs(result, scored, out_dir, figure)
    if not quiet:
        print(summary_text(result, out_dir))
        if result["comparisons"]:
            print(comparison_text(result["comparisons"]))
    return EvaluationResult(result)
