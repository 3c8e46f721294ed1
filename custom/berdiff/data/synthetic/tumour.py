# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Synthetic tumours: a necrotic core, an enhancing rim and oedema spreading along the white matter, with mass effect
(:func:`add_tumour`), labelled with the BraTS label values (:data:`LABELS`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["LABELS", "smooth_noise", "random_rotation", "sigmoid", "add_tumour"]

#: BraTS label values.
LABELS: dict[str, int] = {"background": 0, "necrotic_core": 1, "oedema": 2, "enhancing": 4}
#: a tumour draw is rejected if one of its three labels has fewer voxels than this.
_MIN_COMPARTMENT_VOXELS = 5


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def add_tumour(
    subject: dict[str, np.ndarray],
    rng: np.random.Generator,
    spacing: float,
    radius_mm: tuple[float, float],
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]] | None:
    """
    Push the tissue away from a random centre (mass effect) and draw an irregular tumour there.

    Returns the soft compartment weights (``necrosis``, ``enhancing``, ``oedema``; full volume), the label map and
    the tumour's parameters, or ``None`` if no valid position was found / a compartment came out empty.
    """
    mask = subject["mask"]
    shape = mask.shape
    radius = float(rng.uniform(*radius_mm))
    r_vox = radius / spacing
    core_fraction = float(rng.uniform(0.4, 0.6))
    necrosis_fraction = float(rng.uniform(0.45, 0.65))
    # centre deep enough that the core stays inside the brain
    depth = ndimage.distance_transform_edt(mask)
    candidates = np.argwhere(depth > max(core_fraction * r_vox + 1.5, 3.0))
    if len(candidates) == 0:
        return None
    centre = candidates[rng.integers(len(candidates))].astype(np.float64)
    axes = r_vox * rng.uniform(0.8, 1.25, size=3)
    rotation = random_rotation(rng)
    mass_effect = float(rng.uniform(0.4, 0.6))
    push_sigma = 1.2 * r_vox

    # local box around the tumour and its mass effect (the displacement is < 0.01 * push_sigma at the box border)
    half = int(math.ceil(3.5 * push_sigma)) + 2
    lo = np.maximum(centre.astype(int) - half, 0)
    hi = np.minimum(centre.astype(int) + half + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"))
    offset = grid - centre.astype(np.float32)[:, None, None, None]
    dist = np.sqrt((offset**2).sum(0))

    # mass effect: sample tissue from closer to the centre, r_src = r (1 - a exp(-r^2 / 2 s^2)) (monotone for a < 1)
    shrink = 1.0 - mass_effect * np.exp(-(dist**2) / (2 * push_sigma**2))
    src = centre.astype(np.float32)[:, None, None, None] + offset * shrink
    box_mask = mask[box]
    for key in ("tissues", "t1"):
        arr = subject[key]
        channels = arr if arr.ndim == 4 else arr[None]
        for c in range(channels.shape[0]):
            warped = ndimage.map_coordinates(channels[c], src, order=1, mode="nearest")
            channels[c][box] = np.where(box_mask, warped, channels[c][box])
    tissues_box = subject["tissues"][(slice(None), *box)]
    tissues_box[:] = tissues_box / np.maximum(tissues_box.sum(0), 1e-6) * box_mask

    # irregular nested compartments: ellipsoidal distance perturbed by smooth noise
    local = np.einsum("ij,j...->i...", rotation.T, offset)
    ell = np.sqrt(((local / axes[:, None, None, None]) ** 2).sum(0))
    noise_sigma = max(0.4 * r_vox, 1.0)
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    wm = tissues_box[1]
    d_whole = ell + 0.22 * smooth_noise(rng, box_shape, noise_sigma) - 0.15 * wm  # oedema spreads along WM
    d_core = ell + 0.12 * smooth_noise(rng, box_shape, noise_sigma)
    d_necro = ell + 0.12 * smooth_noise(rng, box_shape, noise_sigma)
    softness = 0.6 / r_vox  # ~0.6 voxel partial-volume edge
    w_whole = sigmoid((1.0 - d_whole) / softness) * box_mask
    w_core = np.minimum(sigmoid((core_fraction - d_core) / softness), w_whole)
    w_necro = np.minimum(sigmoid((core_fraction * necrosis_fraction - d_necro) / softness), w_core)
    whole, core, necro = w_whole > 0.5, w_core > 0.5, w_necro > 0.5
    # keep the oedema connected to the core
    components, _ = ndimage.label(whole)
    keep = np.unique(components[core])
    islands = (components > 0) & ~np.isin(components, keep[keep > 0])
    whole &= ~islands
    core &= whole
    necro &= core
    w_whole = np.where(islands, 0.0, w_whole)
    w_core = np.minimum(w_core, w_whole)
    w_necro = np.minimum(w_necro, w_core)
    labels_box = np.zeros(box_shape, dtype=np.uint8)
    labels_box[whole] = LABELS["oedema"]
    labels_box[core] = LABELS["enhancing"]
    labels_box[necro] = LABELS["necrotic_core"]
    counts = {name: int((labels_box == LABELS[name]).sum()) for name in ("necrotic_core", "oedema", "enhancing")}
    if min(counts.values()) < _MIN_COMPARTMENT_VOXELS:
        return None

    weights = {name: np.zeros(shape, dtype=np.float32) for name in ("necrosis", "enhancing", "oedema")}
    weights["necrosis"][box] = w_necro
    weights["enhancing"][box] = w_core - w_necro
    weights["oedema"][box] = np.clip(w_whole - w_core, 0.0, 1.0)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[box] = labels_box
    labels *= mask.astype(np.uint8)
    params = {
        "centre_voxel": [int(c) for c in centre],
        "radius_mm": round(radius, 3),
        "axes_mm": [round(float(a) * spacing, 3) for a in axes],
        "rotation": [[round(float(v), 6) for v in row] for row in rotation],
        "core_fraction": round(core_fraction, 4),
        "necrosis_fraction": round(necrosis_fraction, 4),
        "mass_effect": round(mass_effect, 4),
        "mass_effect_sigma_mm": round(push_sigma * spacing, 3),
        "voxels": counts,
    }
    return weights, labels, params
