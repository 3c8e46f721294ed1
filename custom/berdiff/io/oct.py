# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Inputs and outputs of the OCT bundle's inference: the scan list (:func:`scan_items`, :func:`scan_item`), the checks
before the run (:func:`oct_preflight`), the image-level score of a map (:class:`ImageScore`, :func:`image_score`),
the per-scan map files (:func:`write_scan_maps`: ``<name>_<map>.png`` for viewing and ``<name>_<map>.npy`` for
analysis, both on the input's pixel grid) and ``scores.csv`` (:func:`write_scores_csv`), written by the ignite
handler :class:`OCTOutputWriter`.

Output names: a scan ``<dataset_dir>/<sub>/<stem>.<ext>`` gives ``<output_dir>/<sub>/<stem>_<map>.{png,npy}``, so that
scans of different class folders with the same file name do not collide; ``scores.csv`` has one row per scan, sorted
as the scans are, with columns ``image`` (the path relative to ``dataset_dir``) and ``score`` (higher = more
abnormal), then ``score_<map>`` for every other written map.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import StrEnum, look_up_option
from scipy import ndimage

from berdiff.data.images2d import stem
from berdiff.data.oct import (
    DEFAULT_ALIGNMENT,
    DEFAULT_BAND_RATIO,
    DEFAULT_GRID,
    DEFAULT_RPE_POSITION,
    ScanGeometry,
    list_scans,
    prepare_scan,
    read_scan,
    restore_to_input,
    rpe_columns,
)
from berdiff.io.datalists import MissingData
from berdiff.utils import atomic_write, atomic_write_bytes
from berdiff.validation.errors import exit_on_error

__all__ = [
    "RELATIVE_SCORE_FLOOR",
    "ImageScore",
    "OCTOutputWriter",
    "image_score",
    "oct_preflight",
    "output_stem",
    "relative_image_score",
    "scan_item",
    "scan_items",
    "write_scan_maps",
    "write_scores_csv",
]


class ImageScore(StrEnum):
    """
    The image-level score of an anomaly map on the grid, after a Gaussian smoothing (``sigma`` grid pixels) that
    averages the speckle-level residual.

    mean: the mean of the map (diffuse change).
    p99: the 99th percentile (1 % of the scored pixels abnormal, e.g. a single druse).
    p95: the 95th percentile (5 % of the scored pixels abnormal, e.g. a row of drusen): a focal change smaller than
        that, such as a normal scan's foveal reflex or a vessel shadow, does not raise it.
    max: the maximum (a single focal change).
    top1: the mean of the highest 1 % of the values (between ``p99`` and ``max``, less noisy than ``max``).
    """

    MEAN = "mean"
    P99 = "p99"
    P95 = "p95"
    MAX = "max"
    TOP1 = "top1"


def _fractions(what: str, value: Sequence[float] | None) -> list[float] | None:
    """``value`` as ``[start, stop]`` fractions with ``0 <= start < stop <= 1`` (None passes through)."""
    if value is None:
        return None
    try:
        fractions = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"score {what} must be [start, stop] fractions, got {value!r}.") from None
    if len(fractions) != 2 or not 0.0 <= fractions[0] < fractions[1] <= 1.0:
        raise ValueError(f"score {what} must be [start, stop] with 0 <= start < stop <= 1, got {value!r}.")
    return fractions


def image_score(
    grid_map: np.ndarray | torch.Tensor,
    statistic: str = ImageScore.P99,
    sigma: float = 2.0,
    rows: Sequence[float] | None = None,
    cols: Sequence[float] | None = None,
    column_mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """
    One number per scan (higher = more abnormal): :class:`ImageScore` ``statistic`` of the map smoothed with a
    Gaussian of ``sigma`` pixels, over the grid rows ``rows`` and the grid columns ``cols`` and ``column_mask``
    select.

    Args:
        grid_map: ``(H, W)`` (or ``(1, H, W)``) map.
        statistic: an :class:`ImageScore` name.
        sigma: Gaussian smoothing in pixels, >= 0 (0: none).
        rows: ``[start, stop]``, fractions of the grid's height in ``[0, 1]``: only rows
            ``int(start * H) <= r < int(stop * H)`` are scored (after the smoothing); None: all rows. On a band
            flattened along the RPE (:class:`berdiff.data.oct.BandAlignment`) these are the same tissue layers in
            every scan, e.g. the RPE and the outer retina above it, where drusen are.
        cols: ``[start, stop]``, fractions of the grid's width in ``[0, 1]``, read like ``rows`` (None: all
            columns), e.g. ``[0.05, 0.95]`` leaves out the scan's lateral borders, where the band's fit is
            extrapolated and the optic nerve head or the scan's edge may lie.
        column_mask: bool ``(W,)``, the grid columns that may be scored (e.g. :func:`berdiff.data.oct.rpe_columns`:
            the columns whose band holds the RPE); None: all. Applied with ``cols``; when the two leave no column,
            the columns of ``cols`` alone are scored.

    Raises:
        ValueError: an unknown statistic, a negative sigma, bad rows or columns, or a column mask of another width
            than the map's.
    """
    try:
        look_up_option(statistic, ImageScore)
    except ValueError:
        raise ValueError(f"image score must be one of {[m.value for m in ImageScore]}, got {statistic!r}.") from None
    if not sigma >= 0:
        raise ValueError(f"score sigma must be >= 0, got {sigma!r}.")
    rows, cols = _fractions("rows", rows), _fractions("columns", cols)
    arr = np.squeeze(torch.as_tensor(grid_map).detach().cpu().double().numpy())
    if sigma > 0:
        arr = ndimage.gaussian_filter(arr, sigma=float(sigma), mode="nearest")
    if column_mask is not None:
        column_mask = np.asarray(torch.as_tensor(column_mask).detach().cpu().numpy(), dtype=bool).reshape(-1)
        if arr.ndim != 2 or column_mask.shape[0] != arr.shape[1]:
            raise ValueError(
                f"column_mask must have one entry per column of the map, got {column_mask.shape[0]} for a map of "
                f"shape {arr.shape}."
            )
    if arr.ndim == 2:
        selected = []
        for axis, fractions in ((0, rows), (1, cols)):
            size = arr.shape[axis]
            start, stop = 0, size
            if fractions is not None:
                start = int(fractions[0] * size)
                stop = max(int(fractions[1] * size), start + 1)
            selected.append(np.arange(size)[start:stop])
        row_index, col_index = selected
        if column_mask is not None and column_mask[col_index].any():
            col_index = col_index[column_mask[col_index]]
        arr = arr[row_index][:, col_index]
    flat = arr.ravel()
    if statistic == ImageScore.MEAN:
        return float(flat.mean())
    if statistic == ImageScore.P99:
        return float(np.percentile(flat, 99))
    if statistic == ImageScore.P95:
        return float(np.percentile(flat, 95))
    if statistic == ImageScore.MAX:
        return float(flat.max())
    k = max(1, int(round(0.01 * flat.size)))
    return float(np.sort(flat)[-k:].mean())


#: added to the reference of :func:`relative_image_score` (a squared residual in [0, 1] per pixel), so that a
#: reference map that is zero (a scan the autoencoder reproduces exactly) gives a large, finite score
RELATIVE_SCORE_FLOOR = 1e-6


def relative_image_score(
    grid_map: np.ndarray | torch.Tensor,
    reference_map: np.ndarray | torch.Tensor,
    statistic: str = ImageScore.P99,
    sigma: float = 0.0,
    rows: Sequence[float] | None = None,
    cols: Sequence[float] | None = None,
    column_mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """
    :func:`image_score` of ``grid_map`` divided by the mean of ``reference_map`` over the same pixels (plus
    :data:`RELATIVE_SCORE_FLOOR`).

    With the autoencoder's residual against the input as the reference (the speckle and fine texture the autoencoder
    does not reproduce: a measure of how noisy the scan is), the score says how large the change made by the masked
    denoising is *for this scan's noise level*: a noisy normal scan gets a larger residual everywhere, and without
    the division it would rank with the scans that have drusen.

    Args:
        grid_map: ``(H, W)`` (or ``(1, H, W)``) map scored with ``statistic``.
        reference_map: a map of the same shape; its mean is the divisor.
        statistic, sigma, rows, cols, column_mask: see :func:`image_score` (both maps are read over the same
            pixels).

    Raises:
        ValueError: maps of different shapes, or a bad option (see :func:`image_score`).
    """
    shape = tuple(torch.as_tensor(grid_map).squeeze().shape)
    ref_shape = tuple(torch.as_tensor(reference_map).squeeze().shape)
    if shape != ref_shape:
        raise ValueError(f"the map and its reference must have the same shape, got {shape} and {ref_shape}.")
    score = image_score(grid_map, statistic, sigma, rows, cols, column_mask)
    reference = image_score(reference_map, ImageScore.MEAN, sigma, rows, cols, column_mask)
    return float(score / (max(reference, 0.0) + RELATIVE_SCORE_FLOOR))


def scan_items(
    dataset_dir: str | os.PathLike | None = None,
    image: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    datalist_key: str | None = None,
) -> list[dict]:
    """
    The scans to run on, from the first input that is set: the single ``image``, a ``datalist`` JSON, or every image
    file under ``dataset_dir`` (recursively, sorted by relative path); as ``{"image": path, "name": relative path}``
    items. Read when the configuration is instantiated: missing or bad input gives an empty
    :class:`berdiff.io.MissingData` that :func:`oct_preflight` reports.

    Args:
        dataset_dir: a folder of scans.
        image: one scan file (instead of ``dataset_dir``).
        datalist: a JSON file (instead of ``dataset_dir``; :func:`berdiff.io.datalists.load_datalist`): a list of
            scan files or ``{"image": file}`` items, or a dict with such a list under ``datalist_key`` (default: the
            first of ``testing``, ``test``, ``validation``, ``training``). Relative paths are relative to the JSON
            file's folder; a scan's ``name`` (its output files, the ``image`` column of ``scores.csv``) is its path
            relative to that folder, or its file name when it lies outside it. Two scans with the same name are an
            error.
        datalist_key: the list's key when ``datalist`` holds a dict.
    """
    try:
        if image:
            if not os.path.isfile(image):
                raise FileNotFoundError(f"image file {os.fspath(image)!r} does not exist.")
            return [{"image": os.fspath(image), "name": Path(image).name}]
        if datalist:
            from berdiff.io.datalists import load_datalist

            base = Path(os.fspath(datalist)).resolve().parent
            items = []
            for entry in load_datalist(datalist, datalist_key):
                path = entry["image"]
                if not isinstance(path, str):
                    raise ValueError(f"datalist {os.fspath(datalist)}: one scan file per item, got {path!r}.")
                resolved = Path(path).resolve()
                name = resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else resolved.name
                items.append({"image": path, "name": name})
            seen: dict[str, str] = {}
            for item in items:
                if item["name"] in seen:
                    raise ValueError(
                        f"datalist {os.fspath(datalist)}: {seen[item['name']]} and {item['image']} would write the "
                        f"same output files ({item['name']!r}); keep the scans under the datalist's folder, or give "
                        "them different file names."
                    )
                seen[item["name"]] = item["image"]
            return items
        if not dataset_dir:
            raise FileNotFoundError(
                "no input: set --dataset_dir (a folder of scans), --datalist (a JSON list) or --image (one scan)."
            )
        root = Path(dataset_dir)
        return [{"image": str(p), "name": p.relative_to(root).as_posix()} for p in list_scans(root)]
    except (FileNotFoundError, ValueError) as e:
        return MissingData(e)


def scan_item(
    item: Mapping[str, Any],
    spatial_size: Sequence[int] = DEFAULT_GRID,
    band_ratio: float = DEFAULT_BAND_RATIO,
    smooth_sigma: float = 0.0,
    alignment: str = DEFAULT_ALIGNMENT,
    rpe_position: float = DEFAULT_RPE_POSITION,
    score_rpe_columns: bool = True,
) -> dict[str, Any]:
    """
    The dataset transform of inference: ``item`` with ``image`` read and put on the grid (``(1, H, W)`` float32),
    ``geometry`` (:class:`berdiff.data.oct.ScanGeometry` as a dict) to map the outputs back, and ``score_columns``
    (bool ``(W,)``): the grid columns the image score may read.

    Args:
        item: a :func:`scan_items` item.
        spatial_size: the grid ``[H, W]`` of the weights.
        band_ratio: the retina band of training (:func:`berdiff.data.oct.retina_band`).
        smooth_sigma, alignment, rpe_position: the smoothing and band alignment of training
            (:func:`berdiff.data.oct.prepare_scan`).
        score_rpe_columns: True: ``score_columns`` holds only the columns whose band holds the scan's RPE
            (:func:`berdiff.data.oct.rpe_columns`: not the optic nerve head or a scan's edge); False: every column.

    Raises:
        TypeError: ``score_rpe_columns`` that is not a bool (e.g. the string ``"false"``, which would read as true).
    """
    if not isinstance(score_rpe_columns, (bool, np.bool_)):
        raise TypeError(f"score_rpe_columns must be true or false, got {score_rpe_columns!r}.")
    image = read_scan(item["image"])
    grid, geometry = prepare_scan(image, spatial_size, band_ratio, smooth_sigma, alignment, rpe_position)
    width = grid.shape[-1]
    columns = rpe_columns(image, geometry, width) if score_rpe_columns else np.ones(width, dtype=bool)
    return {
        **item,
        "image": torch.as_tensor(grid)[None],
        "geometry": geometry.as_dict(),
        "score_columns": torch.as_tensor(columns),
    }


def output_stem(name: str) -> str:
    """``<sub>/<stem>`` of a scan's relative path (its image suffix removed), the prefix of its output files."""
    parent = Path(name).parent
    return (parent / stem(name)).as_posix() if str(parent) != "." else stem(name)


def oct_preflight(
    items: Sequence[Mapping[str, Any]],
    ckpt_path: str | None = None,
    on_error: str = "exit",
    noise_level: int | None = None,
) -> int:
    """
    Checks before the run, so that bad input stops it before any output file is written: the scan list is not
    missing or empty, every scan can be read and is not empty (one error names every bad file), the weights exist
    and L is in their trained range.

    Args:
        items: :func:`scan_items`.
        ckpt_path: the model weights (None: not checked).
        on_error: ``exit`` (one ``error:`` line, status 1) or ``raise``.
        noise_level: L, checked against ``models/model.json`` (None: not checked).

    Returns:
        the number of scans.
    """
    try:
        if isinstance(items, MissingData):
            raise items.error
        if len(items) == 0:
            raise ValueError("no scans to run on.")
        bad = []
        for item in items:
            try:
                read_scan(item["image"])
            except (OSError, ValueError) as e:
                bad.append(str(e))
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(f"{len(bad)} bad scan(s), nothing written: " + "; ".join(bad[:3]) + more)
        if ckpt_path is not None and not os.path.isfile(ckpt_path):
            raise FileNotFoundError(
                f"model weights {ckpt_path} not found: train the bundle first (docs/README.md, Training)."
            )
        if ckpt_path is not None and noise_level is not None:
            from berdiff.model_description import check_noise_level, read_model_description

            description = read_model_description(ckpt_path)
            if description is not None:
                check_noise_level(description, int(noise_level))
    except Exception as e:
        if on_error == "raise":
            raise
        exit_on_error(e)
    return len(items)


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def _png_bytes(arr: np.ndarray, vmax: float) -> bytes:
    from PIL import Image

    img = np.clip(arr / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(arr)
    buf = io.BytesIO()
    Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_scan_maps(
    output_dir: str | os.PathLike, name: str, maps: Mapping[str, np.ndarray], png_max: float | None = None
) -> list[str]:
    """
    Writes each map (already on the input's pixel grid) as ``<name>_<map>.npy`` (float32) and, for viewing,
    ``<name>_<map>.png`` (8-bit grey, ``map / png_max`` clipped to [0, 1]; ``png_max`` None: the map's maximum).
    Each file is written atomically.

    Args:
        output_dir: the output folder.
        name: the scan's relative path (:func:`output_stem` is applied).
        maps: map name -> ``(H, W)`` array.
        png_max: the map value shown white.

    Returns:
        the written paths.
    """
    prefix = Path(output_dir) / output_stem(name)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for key, arr in maps.items():
        arr = np.asarray(arr, dtype=np.float32)
        npy = f"{prefix}_{key}.npy"
        atomic_write(npy, lambda tmp, a=arr: _save_npy(tmp, a))
        png = f"{prefix}_{key}.png"
        atomic_write_bytes(png, _png_bytes(arr, float(arr.max()) if png_max is None else float(png_max)))
        written += [npy, png]
    return written


def write_scores_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """
    Writes the score table atomically: columns ``image`` and ``score`` first, then any other keys of the rows in
    the order of the first row.

    Args:
        path: the CSV file.
        rows: one mapping per scan with at least ``image`` and ``score``.

    Raises:
        ValueError: no rows, or a row without ``image`` or ``score``.
    """
    if not rows:
        raise ValueError("no scores to write.")
    for r in rows:
        if "image" not in r or "score" not in r:
            raise ValueError(f"a score row needs 'image' and 'score', got keys {sorted(r)}.")
    columns = ["image", "score"] + [k for k in rows[0] if k not in ("image", "score")]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{r[k]:.8g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in columns})

    return atomic_write(path, write)


class OCTOutputWriter:
    """
    Ignite handler of the OCT inference evaluator (``decollate: false``): after every iteration it maps each output
    channel back to the scan's pixel grid and writes it (:func:`write_scan_maps`), scores it on the grid
    (:func:`image_score`, over the batch's ``score_columns`` when it has them), and when the run completes writes
    ``<output_dir>/scores.csv`` (:func:`write_scores_csv`).

    Args:
        output_dir: the output folder.
        channel_names: the name of each channel of the network's output, in order; the first one is the anomaly map
            (column ``score``), the others get ``score_<name>`` columns.
        statistic: the :class:`ImageScore` of every map.
        sigma: the smoothing of :func:`image_score`, in grid pixels.
        rows: the grid rows scored by :func:`image_score` (None: all).
        cols: the grid columns scored by :func:`image_score` (None: all).
        png_max: the map value shown white in the PNG files (None: each map's maximum).
        write_maps: the channel names whose maps are written as files (None: all).
        score_normalization: the name of another channel (e.g. ``autoencoder``, the autoencoder's residual against
            the input): the column ``score`` is then :func:`relative_image_score` of the first channel against it,
            and the first channel's own score is written as ``score_<its name>``. None: ``score`` is the first
            channel's score.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        channel_names: Sequence[str],
        statistic: str = ImageScore.P99,
        sigma: float = 2.0,
        png_max: float | None = None,
        write_maps: Sequence[str] | None = None,
        rows: Sequence[float] | None = None,
        cols: Sequence[float] | None = None,
        score_normalization: str | None = None,
    ) -> None:
        image_score(np.zeros((2, 2)), statistic, sigma, rows, cols)  # validates statistic, sigma, rows and columns
        if not channel_names:
            raise ValueError("channel_names must name at least the anomaly map.")
        if score_normalization is not None and score_normalization not in list(channel_names)[1:]:
            raise ValueError(
                f"score_normalization must be null or the name of one of the other output maps "
                f"{list(channel_names)[1:]}, got {score_normalization!r}."
            )
        self.score_normalization = score_normalization
        self.output_dir = os.fspath(output_dir)
        self.channel_names = list(channel_names)
        self.statistic = statistic
        self.sigma = float(sigma)
        self.score_rows, self.score_cols = _fractions("rows", rows), _fractions("columns", cols)
        self.png_max = png_max
        self.write_maps = None if write_maps is None else set(write_maps)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        """Registers the handler on ``engine`` (rows are reset when a run starts)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Any = None) -> None:
        """Forgets the rows of an earlier run."""
        self.rows = []

    def iteration_completed(self, engine: Any) -> None:
        """Writes the maps of the batch and records their scores."""
        batch, output = engine.state.batch, engine.state.output
        pred = output["pred"] if isinstance(output, Mapping) else output
        geometry = batch["geometry"]
        columns = batch.get("score_columns")
        for i, name in enumerate(batch["name"]):
            geo = ScanGeometry.from_batch(geometry, i)
            mask = None if columns is None else columns[i]
            row: dict[str, Any] = {"image": name}
            if self.score_normalization is not None:
                reference = pred[i, self.channel_names.index(self.score_normalization)]
                row["score"] = relative_image_score(
                    pred[i, 0], reference, self.statistic, self.sigma, self.score_rows, self.score_cols, mask
                )
            maps = {}
            for c, key in enumerate(self.channel_names):
                grid_map = pred[i, c]
                score = image_score(grid_map, self.statistic, self.sigma, self.score_rows, self.score_cols, mask)
                row["score" if c == 0 and self.score_normalization is None else f"score_{key}"] = score
                if self.write_maps is None or key in self.write_maps:
                    maps[key] = restore_to_input(grid_map, geo)
            write_scan_maps(self.output_dir, name, maps, self.png_max)
            self.rows.append(row)

    def completed(self, engine: Any = None) -> None:
        """Writes ``scores.csv``."""
        os.makedirs(self.output_dir, exist_ok=True)
        write_scores_csv(os.path.join(self.output_dir, "scores.csv"), self.rows)
