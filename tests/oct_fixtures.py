# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Tiny synthetic OCT-like B-scans for the OCT tests: dark vitreous, bright retinal layers, a bright RPE line and,
optionally, a drusen-like bump that lifts the RPE; written in every format the OCT bundle reads."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from PIL import Image

__all__ = ["synthetic_bscan", "write_bscan", "write_oct_folder"]


def synthetic_bscan(height: int = 48, width: int = 80, bump: bool = False, seed: int = 0) -> np.ndarray:
    """
    A uint8 ``(height, width)`` B-scan: speckle-like noise, a retina band (layers of different brightness) whose
    lower edge is the bright RPE, gently curved; ``bump`` lifts the RPE in a dome (a drusen) in the middle.

    Args:
        height, width: the scan's size.
        bump: add the drusen-like dome.
        seed: the noise and curvature seed.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(height)[:, None].astype(np.float64)
    cols = np.arange(width)[None, :].astype(np.float64)
    rpe = 0.6 * height + 0.05 * height * np.sin(2 * np.pi * cols / width + rng.uniform(0, 6.28))
    if bump:
        rpe = rpe - 0.12 * height * np.exp(-(((cols - width / 2) / (0.06 * width)) ** 2))
    top = rpe - 0.3 * height
    img = np.full((height, width), 20.0)
    inside = (rows > top) & (rows < rpe)
    img[inside] = 90.0 + 40.0 * np.cos((rows - top) / (rpe - top) * 3 * np.pi)[inside]
    img[np.abs(rows - rpe) < 2] = 230.0
    img[rows > rpe + 2] = 60.0
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_bscan(path: str, image: np.ndarray) -> str:
    """Writes ``image`` in the format of ``path``'s suffix (PNG, JPEG, TIFF, or NIfTI ``H x W x 1``)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if path.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(image[..., None].astype(np.float32), np.eye(4)), path)
    else:
        Image.fromarray(image).save(path)
    return path


def write_oct_folder(root: str, num_normal: int = 4, num_abnormal: int = 0, cls: str = "AMD", size=(48, 80)) -> None:
    """``root/NORMAL/normal_<i>.png`` and ``root/<cls>/<cls>_<i>.png`` (with the bump)."""
    for i in range(num_normal):
        write_bscan(os.path.join(root, "NORMAL", f"normal_{i}.png"), synthetic_bscan(*size, bump=False, seed=i))
    for i in range(num_abnormal):
        write_bscan(os.path.join(root, cls, f"{cls}_{i}.png"), synthetic_bscan(*size, bump=True, seed=100 + i))
