# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Retinal OCT B-scans (one 2D single-channel image per file: PNG, JPEG, TIFF or 2D NIfTI) on the OCT bundle's grid,
and back.

Preprocessing (:func:`prepare_scan`), the same for training and inference:

1. read the file with :func:`berdiff.data.images2d.read_image` (colour images are converted to grey; a truncated or
   undecodable file is an error naming it) and refuse a constant ("empty") scan;
2. cut a band of ``round(band_ratio * width)`` rows that holds the retina (rows outside the scan read as the scan's
   minimum), aligned as :class:`BandAlignment` says:

   * ``rpe`` (the OCT bundle's default): the band follows a smooth curve fitted to the retinal pigment epithelium
     (:func:`rpe_curve`: per column the deepest bright row, then a robust cubic fit over the columns), with the
     curve at ``rpe_position`` of the band's height, so the scan is *flattened*: in every normal scan the RPE becomes
     the same straight line of the grid, and a drusen, which lifts the RPE locally, is a bump above that line. The
     fit is smooth on purpose (a cubic over the whole width): it follows the eye's curvature and tilt, not the
     drusen;
   * ``centre``: a straight band centred on the intensity-weighted centre row of the row profile (mean over columns,
     minus its median, negative values set to 0).

   B-scans of cropped data sets are wide and the retina is a horizontal band of roughly a fifth to a third of the
   width: the band keeps all of it and drops most of the vitreous and the deep choroid, so the network's rows are
   spent on the layers where drusen are (under the retinal pigment epithelium);
3. resize the band to ``spatial_size`` (``[H, W]``, bilinear with anti-aliasing, which also averages speckle), then
   optionally smooth it with a Gaussian of ``smooth_sigma`` grid pixels (0: off, the default);
4. scale intensities per scan to [0, 1] between the 1st and the 99.5th percentile of the band (clipped): OCT gain and
   brightness differ from scan to scan, and the robust range keeps the bright RPE at the top of the scale without
   letting a few saturated pixels compress the layers.

:func:`restore_to_input` inverts steps 2-3 for a map: the grid is resized back to the band and written into the
input's pixel grid, column by column where the band follows the RPE (zero outside the band). :func:`rpe_columns`
tells which grid columns hold the scan's RPE (not the optic nerve head or a scan's edge): the image score of the
OCT bundle's inference reads only those.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Resize
from monai.utils import StrEnum, look_up_option
from scipy import ndimage

from berdiff.data.images2d import IMAGE_SUFFIXES, read_image

__all__ = [
    "BandAlignment",
    "DEFAULT_ALIGNMENT",
    "DEFAULT_BAND_RATIO",
    "DEFAULT_GRID",
    "DEFAULT_RPE_POSITION",
    "NORMAL_CLASS",
    "RPE_COLUMN_MARGIN",
    "RPE_MEDIAN_WINDOW",
    "ScanGeometry",
    "class_items",
    "list_scans",
    "load_scan",
    "prepare_scan",
    "read_scan",
    "restore_to_input",
    "retina_band",
    "rpe_columns",
    "rpe_curve",
    "rpe_estimate",
    "scale_scan",
]

#: the bundle's grid ``[H, W]`` (a multiple of 16 for the ``small`` preset: 4x in the autoencoder, 4x in the denoiser)
DEFAULT_GRID: tuple[int, int] = (64, 256)
#: band height as a fraction of the scan's width
DEFAULT_BAND_RATIO = 0.15
#: the class folder of healthy scans
NORMAL_CLASS = "NORMAL"
#: where the RPE curve sits in an ``rpe``-aligned band, as a fraction of the band's height from its top
DEFAULT_RPE_POSITION = 0.75
#: how the band is cut (a :class:`BandAlignment`)
DEFAULT_ALIGNMENT = "rpe"
#: the degree of the polynomial fitted to the RPE over the columns
RPE_FIT_DEGREE = 3
#: columns of the median filter of the per-column RPE estimate (:func:`rpe_estimate`)
RPE_MEDIAN_WINDOW = 31
#: input columns left out on each side of a column whose band holds no RPE (:func:`rpe_columns`)
RPE_COLUMN_MARGIN = 15


class BandAlignment(StrEnum):
    """
    How the band of rows that holds the retina is cut from a scan (module docstring, step 2).

    rpe: follows a smooth fit of the retinal pigment epithelium, which becomes a straight line of the grid (flattened).
    centre: a straight band centred on the retina's intensity-weighted centre row.
    """

    RPE = "rpe"
    CENTRE = "centre"


@dataclass(frozen=True)
class ScanGeometry:
    """
    Where the grid came from in the input scan: the input's ``height`` x ``width`` and, in every column, the band of
    rows ``[top_c, top_c + band)`` (``top_c`` may be negative and the band may end below the scan: those rows read as
    the scan's minimum). A straight band has ``top_c = top``; a band that follows the RPE has
    ``top_c = round(polyval(curve, x_c))`` with ``x_c`` the column on ``[-1, 1]`` (``curve``: the polynomial's
    coefficients, highest degree first, as :func:`numpy.polyval` takes them), and ``top`` is the mean of ``top_c``.
    """

    height: int
    width: int
    top: int
    band: int
    curve: tuple[float, ...] = ()

    def column_tops(self) -> np.ndarray:
        """The first row of the band in every column, int64 ``(width,)``."""
        if not self.curve:
            return np.full(self.width, self.top, dtype=np.int64)
        x = np.linspace(-1.0, 1.0, self.width)
        return np.round(np.polyval(np.asarray(self.curve, dtype=np.float64), x)).astype(np.int64)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (collatable by a DataLoader, JSON-safe): ints, and ``curve`` as a list."""
        out: dict[str, Any] = {k: int(v) for k, v in asdict(self).items() if k != "curve"}
        if self.curve:
            out["curve"] = [float(c) for c in self.curve]
        return out

    @classmethod
    def from_dict(cls, geometry: Mapping[str, Any]) -> ScanGeometry:
        """The geometry of :meth:`as_dict` (ints or 0-d tensors, ``curve`` a list of numbers or a 1-d tensor)."""
        curve = geometry.get("curve", ())
        curve = tuple(float(c) for c in (curve.reshape(-1).tolist() if hasattr(curve, "reshape") else curve))
        return cls(**{k: int(geometry[k]) for k in ("height", "width", "top", "band")}, curve=curve)

    @staticmethod
    def from_batch(geometry: Mapping[str, Any], index: int) -> ScanGeometry:
        """The geometry of item ``index`` of a DataLoader-collated batch of :meth:`as_dict` dicts."""
        item: dict[str, Any] = {}
        for k, v in geometry.items():
            if k == "curve":
                item[k] = [float(c[index]) for c in v] if isinstance(v, (list, tuple)) else v[index]
            else:
                item[k] = v[index]
        return ScanGeometry.from_dict(item)


def list_scans(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """
    Image files under ``folder`` (searched recursively by default; hidden files and folders skipped), sorted by their
    path relative to ``folder``.

    Args:
        folder: a folder of scans.
        recursive: also search subfolders.

    Raises:
        FileNotFoundError: ``folder`` is not a folder or holds no image file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"scan folder {str(root)!r} does not exist or is not a directory.")
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = sorted(
        (
            p
            for p in candidates
            if p.is_file()
            and p.name.lower().endswith(IMAGE_SUFFIXES)
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}.")
    return files


def class_items(folder: str | os.PathLike, normal_class: str = NORMAL_CLASS) -> list[dict[str, Any]]:
    """
    The scans of ``folder/<CLASS>/`` as ``{"image": path, "class": CLASS, "label": 0 or 1}`` items (label 0 for
    ``normal_class``, 1 for any other class), sorted by class then file name. A missing folder gives an empty list.

    Args:
        folder: a folder of class folders, e.g. ``<dataset_dir>/val``.
        normal_class: the folder name of healthy scans.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            files = list_scans(class_dir, recursive=True)
        except FileNotFoundError:
            continue
        label = 0 if class_dir.name == normal_class else 1
        items += [{"image": str(p), "class": class_dir.name, "label": label} for p in files]
    return items


def read_scan(path: str | os.PathLike) -> np.ndarray:
    """
    One B-scan as float32 ``(H, W)`` in its stored value range (RGB converted to grey).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded (e.g. truncated), is not 2D, or is empty (too small or constant).
    """
    arr = read_image(path).astype(np.float32)
    if float(arr.max()) <= float(arr.min()):
        raise ValueError(f"image {os.fspath(path)!r} is empty: every pixel has the value {float(arr.min())}.")
    return arr


def retina_band(image: np.ndarray, band_ratio: float = DEFAULT_BAND_RATIO) -> tuple[int, int]:
    """
    The band of rows ``(top, band)`` that holds the retina (module docstring, step 2).

    Args:
        image: ``(H, W)`` scan.
        band_ratio: band height as a fraction of the width, > 0.

    Raises:
        ValueError: ``band_ratio`` is not positive.
    """
    if not band_ratio > 0:
        raise ValueError(f"band_ratio must be > 0, got {band_ratio!r}.")
    height, width = image.shape
    band = max(2, int(round(band_ratio * width)))
    profile = np.asarray(image, dtype=np.float64).mean(axis=1)
    weight = np.clip(profile - np.median(profile), 0.0, None)
    centre = float((weight * np.arange(height)).sum() / weight.sum()) if weight.sum() > 0 else (height - 1) / 2
    top = int(round(centre - band / 2))
    if band <= height:
        top = min(max(top, 0), height - band)
    return top, band


def rpe_estimate(image: np.ndarray, bright_fraction: float = 0.6) -> np.ndarray:
    """
    The row of the retinal pigment epithelium (RPE) in every column of a B-scan, before any fit over the columns.

    The RPE is the deepest bright layer of the retina. After a Gaussian smoothing (2 rows x 4 columns) that averages
    the speckle, each column's estimate is the brightest row within 6 rows above the deepest row that reaches
    ``bright_fraction`` of the column's maximum; a median over :data:`RPE_MEDIAN_WINDOW` columns removes isolated
    misses (vessel shadows). Where a column has no RPE (the optic nerve head, the scan's edge), the estimate is
    whatever is brightest deepest there, usually far below the retina.

    Args:
        image: ``(H, W)`` scan in any value range.
        bright_fraction: the share of a column's maximum that counts as bright, in ``(0, 1)``.

    Returns:
        float64 ``(W,)`` rows.

    Raises:
        ValueError: a bad argument or an image that is not 2D.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"a scan must be 2D (H, W), got shape {image.shape}.")
    if not 0.0 < bright_fraction < 1.0:
        raise ValueError(f"bright_fraction must be in (0, 1), got {bright_fraction!r}.")
    height, width = image.shape
    smooth = ndimage.gaussian_filter(image, (2.0, 4.0), mode="nearest")
    smooth = smooth - smooth.min(axis=0, keepdims=True)
    bright = smooth >= bright_fraction * smooth.max(axis=0, keepdims=True)
    deepest = np.where(bright, np.arange(height)[:, None], 0).max(axis=0)
    window = np.arange(-6, 1)[:, None]
    rows = np.clip(deepest[None, :] + window, 0, height - 1)
    estimate = rows[np.argmax(np.take_along_axis(smooth, rows, axis=0), axis=0), np.arange(width)].astype(np.float64)
    return ndimage.median_filter(estimate, size=min(RPE_MEDIAN_WINDOW, width), mode="nearest")


def rpe_curve(
    image: np.ndarray, degree: int = RPE_FIT_DEGREE, bright_fraction: float = 0.6, iterations: int = 6
) -> np.ndarray:
    """
    A smooth curve along the retinal pigment epithelium (RPE) of a B-scan: the coefficients (highest degree first)
    of a polynomial in the column ``x`` on ``[-1, 1]`` that gives the RPE's row.

    An iteratively reweighted least-squares fit (weights ``min(1, 2 MAD / |residual|)``) of degree ``degree`` to the
    per-column estimate of :func:`rpe_estimate` keeps what is left of its misses from pulling the curve. A smooth fit
    follows the eye's curvature, not the drusen.

    Args:
        image: ``(H, W)`` scan in any value range.
        degree: the polynomial degree (>= 0).
        bright_fraction: the share of a column's maximum that counts as bright, in ``(0, 1)``.
        iterations: reweighting rounds of the fit.

    Raises:
        ValueError: a bad argument or an image that is not 2D.
    """
    if int(degree) < 0 or int(iterations) < 1:
        raise ValueError(f"degree must be >= 0 and iterations >= 1, got {degree!r}, {iterations!r}.")
    estimate = rpe_estimate(image, bright_fraction)
    width = estimate.shape[0]
    x = np.linspace(-1.0, 1.0, width)
    deg = min(int(degree), max(width - 1, 0))
    weights = np.ones(width)
    coeffs = np.polyfit(x, estimate, deg)
    for _ in range(int(iterations)):
        coeffs = np.polyfit(x, estimate, deg, w=np.sqrt(weights))
        residual = np.abs(estimate - np.polyval(coeffs, x))
        mad = float(np.median(residual)) + 1e-3
        weights = np.minimum(1.0, 2.0 * mad / np.maximum(residual, 1e-12))
    return coeffs


def rpe_columns(
    image: np.ndarray,
    geometry: ScanGeometry | Mapping[str, Any],
    grid_width: int,
    margin: int = RPE_COLUMN_MARGIN,
) -> np.ndarray:
    """
    The grid columns whose band holds the scan's RPE: False where the per-column RPE estimate
    (:func:`rpe_estimate`) lies outside the band cut by :func:`prepare_scan`, and within ``margin`` input columns of
    such a column.

    On a band that follows a smooth fit of the RPE this leaves out the columns where the retina has no RPE or bends
    away from the fit: the optic nerve head, where the retina dips and the deepest bright tissue is far below it, and
    a scan's edge. The band there holds no RPE, so the network's map in those columns says nothing about drusen (and
    the pseudo-normal band, which always has one, differs from it). A drusen lifts the RPE by a few rows, well
    inside the band, so its columns are kept.

    Args:
        image: the ``(H, W)`` scan the geometry was computed from.
        geometry: its :class:`ScanGeometry` (or the geometry's dict).
        grid_width: the grid's width: the band's ``W`` input columns are resized to it.
        margin: input columns on each side of a column without the RPE that are left out too (>= 0).

    Returns:
        bool ``(grid_width,)``: True where the column is kept. A grid column is left out when any input column it is
        resized from is.

    Raises:
        ValueError: a bad argument, or an image of another size than the geometry's.
    """
    g = geometry if isinstance(geometry, ScanGeometry) else ScanGeometry.from_dict(geometry)
    image = np.asarray(image)
    if image.shape != (g.height, g.width):
        raise ValueError(f"the image has shape {image.shape}, its geometry says {(g.height, g.width)}.")
    if int(grid_width) < 1 or int(margin) < 0:
        raise ValueError(f"grid_width must be >= 1 and margin >= 0, got {grid_width!r}, {margin!r}.")
    tops = g.column_tops()
    estimate = rpe_estimate(image)
    outside = (estimate < tops) | (estimate >= tops + g.band)
    if margin > 0 and outside.any():
        outside = ndimage.binary_dilation(outside, structure=np.ones(2 * int(margin) + 1, dtype=bool))
    edges = np.linspace(0, g.width, int(grid_width) + 1)
    starts = np.floor(edges[:-1]).astype(np.int64)
    stops = np.maximum(np.ceil(edges[1:]).astype(np.int64), starts + 1)
    cumulative = np.concatenate([[0], np.cumsum(outside)])
    return (cumulative[np.minimum(stops, g.width)] - cumulative[starts]) == 0


def scale_scan(image: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """
    Per-scan intensity scaling to [0, 1] between two percentiles, clipped (module docstring, step 4).

    Args:
        image: the scan (or its band on the grid).
        low, high: the percentiles mapped to 0 and 1 (``0 <= low < high <= 100``).
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}.")
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _resize(arr: np.ndarray, size: Sequence[int], anti_aliasing: bool) -> np.ndarray:
    out = Resize(spatial_size=tuple(int(s) for s in size), mode="bilinear", anti_aliasing=anti_aliasing)(
        torch.as_tensor(arr, dtype=torch.float32)[None]
    )
    return np.asarray(out[0], dtype=np.float32)


def _check_grid(spatial_size: Sequence[int] | int) -> tuple[int, int]:
    size = (spatial_size, spatial_size) if isinstance(spatial_size, int) else tuple(spatial_size)
    if len(size) != 2 or not all(int(s) >= 2 for s in size):
        raise ValueError(f"spatial_size must be [H, W] with H, W >= 2, got {spatial_size!r}.")
    return int(size[0]), int(size[1])


def prepare_scan(
    image: np.ndarray,
    spatial_size: Sequence[int] | int = DEFAULT_GRID,
    band_ratio: float = DEFAULT_BAND_RATIO,
    smooth_sigma: float = 0.0,
    alignment: str = DEFAULT_ALIGNMENT,
    rpe_position: float = DEFAULT_RPE_POSITION,
) -> tuple[np.ndarray, ScanGeometry]:
    """
    A scan on the bundle's grid (module docstring, steps 2-4) and where it came from.

    Args:
        image: ``(H, W)`` scan in any value range.
        spatial_size: the grid ``[H, W]`` (an int: a square).
        band_ratio: the band's height as a fraction of the scan's width (> 0), see :func:`retina_band`.
        smooth_sigma: Gaussian smoothing on the grid, in grid pixels (>= 0; 0: none).
        alignment: the :class:`BandAlignment` of the band (``centre``: the straight band of earlier versions).
        rpe_position: for ``rpe``: where the RPE curve sits in the band, as a fraction of its height from the top,
            in ``(0, 1)``.

    Returns:
        ``(grid, geometry)``: float32 ``spatial_size`` array in [0, 1] and a :class:`ScanGeometry`.
    """
    grid_size = _check_grid(spatial_size)
    alignment = look_up_option(alignment, BandAlignment)
    if not smooth_sigma >= 0:
        raise ValueError(f"smooth_sigma must be >= 0, got {smooth_sigma!r}.")
    if not 0.0 < rpe_position < 1.0:
        raise ValueError(f"rpe_position must be in (0, 1), got {rpe_position!r}.")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"a scan must be 2D (H, W), got shape {image.shape}.")
    height, width = image.shape
    top, band = retina_band(image, band_ratio)
    if alignment == BandAlignment.RPE:
        curve = rpe_curve(image)
        curve[-1] -= rpe_position * band
        geometry = ScanGeometry(height, width, 0, band, tuple(float(c) for c in curve))
        geometry = ScanGeometry(height, width, int(round(geometry.column_tops().mean())), band, geometry.curve)
    else:
        geometry = ScanGeometry(height=height, width=width, top=top, band=band)
    rows = geometry.column_tops()[None, :] + np.arange(band)[:, None]
    inside = (rows >= 0) & (rows < height)
    crop = np.where(inside, image[np.clip(rows, 0, height - 1), np.arange(width)[None, :]], float(image.min()))
    grid = _resize(crop.astype(np.float32), grid_size, anti_aliasing=True)
    if smooth_sigma > 0:
        grid = ndimage.gaussian_filter(grid, sigma=float(smooth_sigma), mode="nearest")
    grid = scale_scan(grid)
    return grid, geometry


def restore_to_input(grid_map: np.ndarray | torch.Tensor, geometry: ScanGeometry | Mapping[str, Any]) -> np.ndarray:
    """
    A map on the grid written back onto the input scan's pixel grid: resized (bilinear) to the band, placed column
    by column at the band's rows, rows outside the scan dropped, zero outside the band.

    Args:
        grid_map: ``(H, W)`` (or ``(1, H, W)``) map on the grid.
        geometry: the :class:`ScanGeometry` (or its dict) of :func:`prepare_scan`.

    Returns:
        float32 ``(height, width)`` array.
    """
    g = geometry if isinstance(geometry, ScanGeometry) else ScanGeometry.from_dict(geometry)
    arr = torch.as_tensor(grid_map).detach().cpu().float().numpy()
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"a grid map must be 2D (H, W), got shape {arr.shape}.")
    band = _resize(arr, (g.band, g.width), anti_aliasing=False)
    out = np.zeros((g.height, g.width), dtype=np.float32)
    rows = g.column_tops()[None, :] + np.arange(g.band)[:, None]
    cols = np.broadcast_to(np.arange(g.width)[None, :], rows.shape)
    inside = (rows >= 0) & (rows < g.height)
    out[rows[inside], cols[inside]] = band[inside]
    return out


def load_scan(
    path: str | os.PathLike,
    spatial_size: Sequence[int] | int = DEFAULT_GRID,
    band_ratio: float = DEFAULT_BAND_RATIO,
    smooth_sigma: float = 0.0,
    alignment: str = DEFAULT_ALIGNMENT,
    rpe_position: float = DEFAULT_RPE_POSITION,
) -> torch.Tensor:
    """
    One scan file as a ``(1, H, W)`` float32 tensor in [0, 1] on the grid (the training loader of the OCT bundle).

    Args:
        path: the image file.
        spatial_size: the grid ``[H, W]``.
        band_ratio, smooth_sigma, alignment, rpe_position: see :func:`prepare_scan`.
    """
    grid, _ = prepare_scan(read_scan(path), spatial_size, band_ratio, smooth_sigma, alignment, rpe_position)
    return torch.as_tensor(grid)[None]
