# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Retinal OCT B-scans (one 2D single-channel image per file: PNG, JPEG, TIFF or 2D NIfTI) on the OCT bundle's grid,
and back.

Preprocessing (:func:`prepare_scan`), the same for training and inference:

1. read the file with :func:`berdiff.data.images2d.read_image` (colour images are converted to grey; a truncated or
   undecodable file is an error naming it) and refuse a constant ("empty") scan;
2. find the retina: the intensity-weighted centre row of the row profile (mean over columns of the scan, minus its
   median, negative values set to 0), and cut a band of ``round(band_ratio * width)`` rows centred on it (rows
   outside the scan read as 0). B-scans of flattened, cropped data sets are wide and the retina is a horizontal band
   of roughly a third of the width: the band keeps all of it and drops most of the vitreous and the deep choroid, so
   the network's rows are spent on the layers where drusen are (under the retinal pigment epithelium);
3. resize the band to ``spatial_size`` (``[H, W]``, bilinear with anti-aliasing, which also averages speckle), then
   optionally smooth it with a Gaussian of ``smooth_sigma`` grid pixels (0: off, the default);
4. scale intensities per scan to [0, 1] between the 1st and the 99.5th percentile of the band (clipped): OCT gain and
   brightness differ from scan to scan, and the robust range keeps the bright RPE at the top of the scale without
   letting a few saturated pixels compress the layers.

:func:`restore_to_input` inverts steps 2-3 for a map: the grid is resized back to the band and written into the
input's pixel grid (zero outside the band).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Resize
from scipy import ndimage

from berdiff.data.images2d import IMAGE_SUFFIXES, read_image

__all__ = [
    "DEFAULT_BAND_RATIO",
    "DEFAULT_GRID",
    "NORMAL_CLASS",
    "ScanGeometry",
    "class_items",
    "list_scans",
    "load_scan",
    "prepare_scan",
    "read_scan",
    "restore_to_input",
    "retina_band",
    "scale_scan",
]

#: the bundle's grid ``[H, W]`` (a multiple of 16 for the ``small`` preset: 4x in the autoencoder, 4x in the denoiser)
DEFAULT_GRID: tuple[int, int] = (96, 192)
#: band height as a fraction of the scan's width
DEFAULT_BAND_RATIO = 0.35
#: the class folder of healthy scans
NORMAL_CLASS = "NORMAL"


@dataclass(frozen=True)
class ScanGeometry:
    """
    Where the grid came from in the input scan: the input's ``height`` x ``width`` and the band of rows
    ``[top, top + band)`` (``top`` may be negative and the band may end below the scan: those rows were zeros).
    """

    height: int
    width: int
    top: int
    band: int

    def as_dict(self) -> dict[str, int]:
        """The fields as a plain dict (collatable by a DataLoader, JSON-safe)."""
        return {k: int(v) for k, v in asdict(self).items()}


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
) -> tuple[np.ndarray, ScanGeometry]:
    """
    A scan on the bundle's grid (module docstring, steps 2-4) and where it came from.

    Args:
        image: ``(H, W)`` scan in any value range.
        spatial_size: the grid ``[H, W]`` (an int: a square).
        band_ratio: see :func:`retina_band`.
        smooth_sigma: Gaussian smoothing on the grid, in grid pixels (>= 0; 0: none).

    Returns:
        ``(grid, geometry)``: float32 ``spatial_size`` array in [0, 1] and a :class:`ScanGeometry`.
    """
    grid_size = _check_grid(spatial_size)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"a scan must be 2D (H, W), got shape {image.shape}.")
    height, width = image.shape
    top, band = retina_band(image, band_ratio)
    pad_before, pad_after = max(0, -top), max(0, top + band - height)
    padded = np.pad(image, ((pad_before, pad_after), (0, 0)), mode="constant", constant_values=float(image.min()))
    crop = padded[top + pad_before : top + pad_before + band]
    if not smooth_sigma >= 0:
        raise ValueError(f"smooth_sigma must be >= 0, got {smooth_sigma!r}.")
    grid = _resize(crop, grid_size, anti_aliasing=True)
    if smooth_sigma > 0:
        grid = ndimage.gaussian_filter(grid, sigma=float(smooth_sigma), mode="nearest")
    grid = scale_scan(grid)
    return grid, ScanGeometry(height=height, width=width, top=top, band=band)


def restore_to_input(grid_map: np.ndarray | torch.Tensor, geometry: ScanGeometry | dict[str, Any]) -> np.ndarray:
    """
    A map on the grid written back onto the input scan's pixel grid: resized (bilinear) to the band, rows outside
    the scan dropped, zero outside the band.

    Args:
        grid_map: ``(H, W)`` (or ``(1, H, W)``) map on the grid.
        geometry: the :class:`ScanGeometry` (or its dict) of :func:`prepare_scan`.

    Returns:
        float32 ``(height, width)`` array.
    """
    g = geometry if isinstance(geometry, ScanGeometry) else ScanGeometry(**{k: int(v) for k, v in geometry.items()})
    arr = torch.as_tensor(grid_map).detach().cpu().float().numpy()
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"a grid map must be 2D (H, W), got shape {arr.shape}.")
    band = _resize(arr, (g.band, g.width), anti_aliasing=False)
    out = np.zeros((g.height, g.width), dtype=np.float32)
    lo, hi = max(0, g.top), min(g.height, g.top + g.band)
    out[lo:hi] = band[lo - g.top : hi - g.top]
    return out


def load_scan(
    path: str | os.PathLike,
    spatial_size: Sequence[int] | int = DEFAULT_GRID,
    band_ratio: float = DEFAULT_BAND_RATIO,
    smooth_sigma: float = 0.0,
) -> torch.Tensor:
    """
    One scan file as a ``(1, H, W)`` float32 tensor in [0, 1] on the grid (the training loader of the OCT bundle).

    Args:
        path: the image file.
        spatial_size: the grid ``[H, W]``.
        band_ratio: see :func:`retina_band`.
        smooth_sigma: see :func:`prepare_scan`.
    """
    grid, _ = prepare_scan(read_scan(path), spatial_size, band_ratio, smooth_sigma)
    return torch.as_tensor(grid)[None]
