# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
One synthetic subject: the template deformed by a small random affine and elastic transform (MONAI), rendered into
four pseudo-modalities from its tissue maps, optionally given a tumour, and corrupted by a bias field, a contrast
change and noise (MONAI) (:func:`synthesize_subject`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from monai.transforms import Rand3DElasticd, RandAdjustContrast, RandBiasField, RandGaussianNoise
from monai.utils import convert_to_numpy

from berdiff.data.synthetic.template import TISSUES, TemplateGrid
from berdiff.data.synthetic.tumour import add_tumour, smooth_noise
from berdiff.utils import MODALITIES

__all__ = ["random_seed", "synthesize_subject"]

# Mean intensity of each tissue / tumour compartment per modality (arbitrary units, WM t1 ~ 0.85).
_HEALTHY_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"gm": 0.60, "wm": 0.85, "csf": 0.20},
    "t1ce": {"gm": 0.58, "wm": 0.80, "csf": 0.20},
    "t2": {"gm": 0.55, "wm": 0.40, "csf": 1.00},
    "flair": {"gm": 0.60, "wm": 0.45, "csf": 0.10},
}


_TUMOUR_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"necrosis": 0.15, "enhancing": 0.45, "oedema": 0.45},
    "t1ce": {"necrosis": 0.15, "enhancing": 1.30, "oedema": 0.45},
    "t2": {"necrosis": 1.05, "enhancing": 0.70, "oedema": 0.90},
    "flair": {"necrosis": 0.45, "enhancing": 0.75, "oedema": 0.95},
}


#: share of the T1-weighted images taken from the template's own T1 intensities (adds anatomical detail).
_T1_TEMPLATE_WEIGHT = 0.4
#: how much of the healthy tissue signal oedema keeps (the rest is replaced by the oedema intensity).
_OEDEMA_TISSUE_KEEP = 0.3


def random_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _deform_healthy(template: TemplateGrid, rng: np.random.Generator, spacing: float) -> dict[str, np.ndarray]:
    """Same random affine + elastic deformation of tissue maps, template T1 and brain mask (one MONAI transform)."""
    sigma_vox = (10.0 / spacing, 14.0 / spacing)
    # MONAI smooths uniform noise with sigma, which shrinks it ~ sigma^-1.5: scale so that displacements are 1-2 mm
    mean_sigma = sum(sigma_vox) / 2
    magnitude = tuple(mm / spacing * mean_sigma**1.5 / 0.072 for mm in (1.0, 2.0))
    elastic = Rand3DElasticd(
        keys=["tissues", "t1", "mask"],
        sigma_range=sigma_vox,
        magnitude_range=magnitude,  # type: ignore[arg-type]
        prob=1.0,
        rotate_range=(math.radians(5),) * 3,
        scale_range=(0.05,) * 3,
        translate_range=(3.0 / spacing,) * 3,
        mode="bilinear",
        padding_mode="zeros",
    )
    elastic.set_random_state(seed=random_seed(rng))
    data = {"tissues": template.tissues.copy(), "t1": template.t1[None].copy(), "mask": template.mask[None].copy()}
    out = elastic(data)
    mask = convert_to_numpy(out["mask"], dtype=np.float32)[0] > 0.5
    tissues = np.clip(convert_to_numpy(out["tissues"], dtype=np.float32), 0.0, None)
    total = tissues.sum(0)
    tissues[2][mask & (total <= 1e-6)] = 1.0
    tissues = tissues / np.maximum(tissues.sum(0), 1e-6) * mask
    t1 = np.clip(convert_to_numpy(out["t1"], dtype=np.float32)[0], 0.0, 1.0) * mask
    return {"tissues": tissues.astype(np.float32), "t1": t1.astype(np.float32), "mask": mask}


def _render(
    subject: dict[str, np.ndarray],
    weights: dict[str, np.ndarray] | None,
    rng: np.random.Generator,
    noise_std: float,
) -> dict[str, np.ndarray]:
    """Four modalities from tissue fractions (+ tumour weights), then bias field, contrast and noise (MONAI)."""
    mask = subject["mask"]
    tissues = subject["tissues"]
    images = {}
    for modality in MODALITIES:
        contrast = {k: v * float(rng.uniform(0.95, 1.05)) for k, v in _HEALTHY_CONTRAST[modality].items()}
        img = sum(tissues[i] * contrast[t] for i, t in enumerate(TISSUES))
        if modality in ("t1", "t1ce"):
            img = (1 - _T1_TEMPLATE_WEIGHT) * img + _T1_TEMPLATE_WEIGHT * subject["t1"]
        if weights is not None:
            texture = 1.0 + 0.08 * smooth_noise(rng, mask.shape, 1.0)
            tumour = _TUMOUR_CONTRAST[modality]
            w_oed = weights["oedema"] * (1 - _OEDEMA_TISSUE_KEEP)
            w_core = weights["necrosis"] + weights["enhancing"]
            img = (1 - w_core - w_oed) * img + texture * (
                weights["necrosis"] * tumour["necrosis"]
                + weights["enhancing"] * tumour["enhancing"]
                + w_oed * tumour["oedema"]
            )
        img = img[None].astype(np.float32)
        for transform in (
            RandBiasField(degree=3, coeff_range=(0.0, 0.1), prob=1.0),
            RandAdjustContrast(prob=1.0, gamma=(0.85, 1.15)),
            RandGaussianNoise(prob=1.0, mean=0.0, std=noise_std),
        ):
            transform.set_random_state(seed=random_seed(rng))
            img = transform(img)
        img = convert_to_numpy(img, dtype=np.float32)[0]
        # strictly positive inside the brain, exactly zero outside (the same voxels in every modality)
        images[modality] = np.where(mask, np.maximum(img, 1e-3), 0.0).astype(np.float32)
    return images


def synthesize_subject(
    template: TemplateGrid,
    seed: int | np.random.SeedSequence,
    tumour: bool,
    spacing: float = 2.0,
    tumour_radius_mm: tuple[float, float] = (10.0, 18.0),
    noise_std: float = 0.02,
    max_attempts: int = 20,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any] | None]:
    """
    One synthetic subject in memory.

    Args:
        template: grid from :func:`load_template`.
        seed: integer or ``SeedSequence`` for ``numpy.random.default_rng``; everything random derives from it.
        tumour: whether to add a tumour.
        spacing: voxel size of ``template`` in mm (scales deformations and tumour radii).
        tumour_radius_mm: range of the whole tumour's (oedema's) mean radius.
        noise_std: upper bound of the Gaussian noise standard deviation (WM t1 intensity is ~0.85).
        max_attempts: tumour placements tried before giving up (a placement fails if a label has < 5 voxels).

    Returns:
        ``(images, labels, tumour_parameters)``: float32 modalities keyed by :data:`MODALITIES`, uint8 BraTS labels,
        and the tumour's parameters (``None`` for a healthy subject).

    Raises:
        RuntimeError: no valid tumour could be drawn (grid or radii too small).
    """
    rng = np.random.default_rng(seed)
    subject = _deform_healthy(template, rng, spacing)
    labels = np.zeros(template.shape, dtype=np.uint8)
    weights, params = None, None
    if tumour:
        for _ in range(max_attempts):
            trial = {k: v.copy() for k, v in subject.items()}
            result = add_tumour(trial, rng, spacing, tumour_radius_mm)
            if result is not None:
                weights, labels, params = result
                subject = trial
                break
        else:
            raise RuntimeError(
                f"could not place a tumour with all three labels in {max_attempts} attempts "
                f"(grid {template.shape} at {spacing} mm, tumour_radius_mm={tumour_radius_mm}); "
                "use larger radii or a finer grid"
            )
    images = _render(subject, weights, rng, noise_std)
    return images, labels, params
