# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The anatomy of the synthetic subjects: the MNI ICBM152 2009a template (T1 and grey/white-matter probability maps)
shipped inside the nilearn wheel, resampled to the output grid (:func:`load_template`); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["TEMPLATE_FILES", "TISSUES", "TemplateGrid", "validate_shape", "load_template"]

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


TISSUES = ("gm", "wm", "csf")


class TemplateGrid:
    """
    The template resampled to the output grid.

    Attributes:
        affine: 4x4 RAS voxel-to-world affine (mm) of the output grid.
        tissues: float32 array ``(3, *shape)``: GM, WM, CSF fractions, summing to one inside the brain, zero outside.
        t1: float32 template T1 intensities in ``[0, 1]`` on the grid (zero outside the brain).
        mask: float32 brain mask (0/1).
    """

    def __init__(self, affine: np.ndarray, tissues: np.ndarray, t1: np.ndarray, mask: np.ndarray) -> None:
        self.affine = affine
        self.tissues = tissues
        self.t1 = t1
        self.mask = mask
        for arr in (affine, tissues, t1, mask):
            arr.setflags(write=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.mask.shape)  # type: ignore[return-value]


def _template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the demo data generator needs nilearn (for its bundled MNI152 template): pip install berdiff[demo]"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"nilearn at {folder.parent.parent} lacks the bundled MNI152 template file(s) {missing}; "
            "install the tested version: pip install berdiff[demo] (nilearn==0.14.1)"
        )
    return folder


def validate_shape(shape: Sequence[int] | int | None) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),) * 3
    if isinstance(shape, str):
        shape = [s for s in shape.replace("x", ",").split(",") if s.strip()]
    try:
        out = tuple(int(s) for s in shape)
        ok = len(out) == 3 and all(float(s) == int(s) for s in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(out) < 16:
        raise ValueError(f"shape must be three integers >= 16 (e.g. 88,104,96), got {shape!r}")
    return out  # type: ignore[return-value]


def _default_shape(bbox_mm: np.ndarray, spacing: float, margin_mm: float = 12.0) -> tuple[int, int, int]:
    """Smallest multiple of 8 voxels per axis covering the template brain plus ``margin_mm`` on each side."""
    n = np.ceil((bbox_mm + 2 * margin_mm) / spacing)
    return tuple(int(8 * math.ceil(v / 8)) for v in n)  # type: ignore[return-value]


@lru_cache(maxsize=4)
def load_template(spacing: float = 2.0, shape: tuple[int, int, int] | None = None) -> TemplateGrid:
    """
    Load nilearn's MNI152 2009a template and resample it to an RAS grid of ``spacing`` mm centred on the brain.

    Args:
        spacing: isotropic output voxel size in mm.
        shape: output grid size; default: the brain's bounding box plus 12 mm per side, rounded up to a multiple of
            8 voxels (88x104x96 at 2 mm). A smaller grid crops the brain.

    Returns:
        a :class:`TemplateGrid` (read-only arrays, cached per ``(spacing, shape)``).
    """
    folder = _template_dir()
    images = {key: nib.load(str(folder / name)) for key, name in TEMPLATE_FILES.items()}
    src_affine = images["t1"].affine
    data = {}
    for key, img in images.items():
        if img.shape != images["t1"].shape or not np.allclose(img.affine, src_affine):
            raise ValueError(f"template {TEMPLATE_FILES[key]} is not on the grid of the T1 template")
        arr = np.asanyarray(img.dataobj).astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"template {TEMPLATE_FILES[key]} holds NaN or infinite values")
        data[key] = arr / 255.0
    brain = data["t1"] > 0
    if not brain.any():
        raise ValueError(f"template {TEMPLATE_FILES['t1']} is empty")
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    src_zooms = np.abs(np.diag(src_affine)[:3])
    bbox_mm = (hi - lo + 1) * src_zooms
    centre_mm = (src_affine @ np.append((lo + hi) / 2.0, 1.0))[:3]
    out_shape = _default_shape(bbox_mm, spacing) if shape is None else shape
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre_mm - spacing * (np.asarray(out_shape) - 1) / 2.0
    # output voxel -> template voxel; anti-alias before down-sampling
    to_src = np.linalg.inv(src_affine) @ affine
    sigma = np.maximum(spacing / src_zooms - 1.0, 0.0) / 2.0
    resampled = {}
    for key, arr in {**data, "mask": brain.astype(np.float32)}.items():
        if sigma.any():
            arr = ndimage.gaussian_filter(arr, sigma)
        resampled[key] = ndimage.affine_transform(
            arr, to_src[:3, :3], to_src[:3, 3], output_shape=out_shape, order=1, mode="constant", cval=0.0
        )
    mask = (resampled["mask"] > 0.5).astype(np.float32)
    tissues = _tissue_fractions(resampled["gm"], resampled["wm"], resampled["t1"], mask)
    return TemplateGrid(affine, tissues, (resampled["t1"] * mask).astype(np.float32), mask)


def _tissue_fractions(gm: np.ndarray, wm: np.ndarray, t1: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """GM, WM, CSF fractions summing to one inside ``mask``: CSF is the brain minus GM/WM, and low-T1 voxels."""
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    csf_residual = np.clip(1.0 - gm - wm, 0.0, 1.0)
    # CSF has a template T1 of ~0.3, GM ~0.65: voxels darker than 0.45 are (partly) CSF
    csf_t1 = np.clip((0.45 - t1) / 0.2, 0.0, 1.0)
    tissues = np.stack([gm, wm, np.maximum(csf_residual, csf_t1)])
    total = tissues.sum(0)
    tissues[2][total <= 1e-6] = 1.0
    tissues = tissues / np.maximum(tissues.sum(0), 1e-6)
    return (tissues * mask).astype(np.float32)
