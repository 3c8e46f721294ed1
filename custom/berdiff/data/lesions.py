# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Synthetic lesions on real 2D anatomy (``python -m berdiff make_lesions --src DIR --out DIR --seed S``).

Every lesion is an ellipse with a random centre inside the brain mask (:func:`berdiff.data.images2d.brain_mask`),
random radii, axis ratio and rotation, and a soft border ``w = sigmoid((1 - rho) / softness)`` where ``rho`` is the
normalised elliptic radius (``rho = 1`` on the border). The label is ``w >= 0.5`` (the ellipse itself) intersected
with the brain mask. Families (:class:`LesionFamily`):

* ``hyper`` / ``hypo``: additive blob ``x + sign * contrast * w`` (clipped to [0, 1]);
* ``fpi``: foreign patch interpolation (Tan et al., FPI): ``(1 - a w) x + a w x_other``, where ``x_other`` is another
  subject's image shifted by a random offset and ``a`` the interpolation factor;
* ``deform``: a local radial push (or pull) deformation ``amplitude * exp(-d^2 / (2 sigma^2))`` with
  ``|amplitude| >= 1.5`` px, resampled with ``scipy.ndimage.map_coordinates``; the label is where the displacement is
  at least ``max(1, |amplitude| / 2)`` pixels;
* ``texture``: the region is replaced by a blurred copy with added Gaussian noise (a local texture change).

The first lesion of the i-th image has family ``families[i % len(families)]`` so that every family is produced;
further lesions (``max_lesions > 1``) draw their family at random. Everything is drawn from
``numpy.random.default_rng([seed, i])``: the output depends only on the source images, their order and the settings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.utils import StrEnum, look_up_option
from scipy import ndimage

from berdiff.data.images2d import Intensity, brain_mask, list_images, read_image, resize_image, scale_intensity, stem
from berdiff.utils import atomic_write, atomic_write_json

__all__ = ["LesionFamily", "add_lesion", "make_lesions", "write_nifti_2d"]


class LesionFamily(StrEnum):
    """Synthetic lesion families (see the module docstring)."""

    HYPER = "hyper"
    HYPO = "hypo"
    FPI = "fpi"
    DEFORM = "deform"
    TEXTURE = "texture"


def _lesion_family(family: str) -> LesionFamily:
    """``family`` checked with ``monai.utils.look_up_option``; one clear error for an unknown name."""
    try:
        return look_up_option(family, LesionFamily)
    except ValueError:
        allowed = [m.value for m in LesionFamily]
        raise ValueError(f"unknown lesion family {family!r}; choose from {allowed}.") from None


def _ellipse(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float], angle: float) -> np.ndarray:
    """Normalised elliptic radius ``rho`` (1 on the ellipse border)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dy + s * dx) / radii[0]
    v = (-s * dy + c * dx) / radii[1]
    return np.sqrt(u * u + v * v)


def add_lesion(
    image: np.ndarray,
    mask: np.ndarray,
    family: str,
    rng: np.random.Generator,
    other: np.ndarray | None = None,
    radius_range: tuple[float, float] = (0.04, 0.1),
    contrast_range: tuple[float, float] = (0.25, 0.5),
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """
    Insert one lesion of ``family`` into ``image``.

    Args:
        image: (H, W) float image in [0, 1].
        mask: (H, W) boolean brain mask; the centre is drawn inside it and the label is cut to it.
        family: a :class:`LesionFamily` name.
        rng: the random generator.
        other: (H, W) image of another subject, required for ``fpi``.
        radius_range: lesion radius as a fraction of the smaller image side.
        contrast_range: absolute intensity change of ``hyper``/``hypo`` blobs.

    Returns:
        ``(new_image, label, params)``: the image with the lesion, the boolean label and the drawn parameters.
    """
    family = _lesion_family(family)
    img = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if img.ndim != 2 or img.shape != mask.shape:
        raise ValueError(f"image {img.shape} and mask {mask.shape} must be 2D and of equal shape.")
    if not mask.any():
        raise ValueError("the brain mask is empty: cannot place a lesion.")
    side = min(img.shape)
    r = float(rng.uniform(*radius_range)) * side
    ratio = float(rng.uniform(0.6, 1.0))
    radii = (r, r * ratio)
    angle = float(rng.uniform(0, np.pi))
    # centre: inside the brain mask, preferably at least half a radius away from its border
    inner = ndimage.binary_erosion(mask, iterations=max(1, int(r * 0.5)))
    candidates = np.argwhere(inner if inner.any() else mask)
    cy, cx = (float(v) for v in candidates[rng.integers(len(candidates))])
    softness = float(rng.uniform(0.05, 0.2))
    rho = _ellipse(img.shape, (cy, cx), radii, angle)
    w = 1.0 / (1.0 + np.exp(-np.clip((1.0 - rho) / softness, -50, 50)))
    label = (rho <= 1.0) & mask
    params: dict[str, Any] = {
        "family": str(family),
        "center": [cy, cx],
        "radii": [radii[0], radii[1]],
        "angle": angle,
        "softness": softness,
    }
    if family in (LesionFamily.HYPER, LesionFamily.HYPO):
        sign = 1.0 if family == LesionFamily.HYPER else -1.0
        contrast = float(rng.uniform(*contrast_range))
        new = img + sign * contrast * w
        params["contrast"] = sign * contrast
    elif family == LesionFamily.FPI:
        if other is None:
            raise ValueError("the 'fpi' family needs another subject's image (`other`).")
        oth = np.asarray(other, dtype=np.float64)
        if oth.shape != img.shape:
            raise ValueError(f"the other subject's image has shape {oth.shape}, expected {img.shape}.")
        shift = [float(v) for v in rng.uniform(-2 * r, 2 * r, size=2)]
        moved = ndimage.shift(oth, shift, order=1, mode="nearest")
        alpha = float(rng.uniform(0.6, 1.0))
        new = (1 - alpha * w) * img + alpha * w * moved
        params.update({"alpha": alpha, "shift": shift})
    elif family == LesionFamily.DEFORM:
        amplitude = max(1.5, float(rng.uniform(0.3, 0.6)) * r) * (1.0 if rng.random() < 0.5 else -1.0)
        sigma = r * 0.6
        yy, xx = np.mgrid[: img.shape[0], : img.shape[1]].astype(np.float64)
        dy, dx = yy - cy, xx - cx
        dist = np.sqrt(dy * dy + dx * dx) + 1e-6
        disp = amplitude * np.exp(-(dist**2) / (2 * sigma**2))
        # pushing the content outwards samples from closer to the centre
        new = ndimage.map_coordinates(img, [yy - disp * dy / dist, xx - disp * dx / dist], order=1, mode="nearest")
        label = (np.abs(disp) >= max(1.0, 0.5 * abs(amplitude))) & mask
        params.update({"amplitude": amplitude, "sigma": sigma})
    else:  # texture
        blur = float(rng.uniform(1.5, 3.0))
        noise_std = float(rng.uniform(0.05, 0.12))
        textured = ndimage.gaussian_filter(img, blur) + rng.normal(0.0, noise_std, size=img.shape)
        new = (1 - w) * img + w * textured
        params.update({"blur_sigma": blur, "noise_std": noise_std})
    params["area_px"] = int(label.sum())
    return np.clip(new, 0.0, 1.0), label, params


def write_nifti_2d(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a 2D array as a NIfTI file (identity affine) atomically (:func:`berdiff.utils.atomic_write`)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), np.eye(4))
    atomic_write(path, lambda tmp: nib.save(image, tmp))


def make_lesions(
    src: str,
    out: str,
    seed: int = 0,
    size: int | None = None,
    families: Sequence[str] | None = None,
    max_lesions: int = 1,
    radius_range: Sequence[float] = (0.04, 0.1),
    contrast_range: Sequence[float] = (0.25, 0.5),
    intensity: str = Intensity.AUTO,
    limit: int | None = None,
) -> dict[str, Any]:
    """
    Write a synthetic-lesion set made from the healthy 2D images of ``src``.

    Output layout: ``out/images/<name>.nii.gz`` (float32 image in [0, 1] with lesions), ``out/labels/<name>.nii.gz``
    (uint8, ``> 0`` anomalous), ``out/healthy/<name>.nii.gz`` (the same image without lesions, for slice-level
    detection and false-positive checks) and ``out/lesions.json`` (settings and every lesion's parameters).

    Args:
        src: folder of healthy 2D images (PNG or NIfTI).
        out: output folder (created; existing files of the same names are replaced).
        seed: random seed.
        size: resize (pad to square, then resize) the images to ``size x size`` first; native size when None.
        families: lesion families to cycle through (default: all of :class:`LesionFamily`).
        max_lesions: each image gets between 1 and ``max_lesions`` lesions.
        radius_range: lesion radius range as a fraction of the smaller image side.
        contrast_range: intensity change range of hyper/hypo blobs.
        intensity: intensity scaling (:class:`berdiff.data.images2d.Intensity`).
        limit: use only the first ``limit`` images (sorted by name).

    Returns:
        the content of ``lesions.json``.
    """
    families = [str(f) for f in (families or list(LesionFamily.__members__.values()))]
    for f in families:
        _lesion_family(f)
    if int(max_lesions) < 1:
        raise ValueError(f"max_lesions must be >= 1, got {max_lesions}.")
    lo, hi = (float(v) for v in radius_range)
    if not 0 < lo <= hi < 0.5:
        raise ValueError(f"radius_range must satisfy 0 < low <= high < 0.5, got {tuple(radius_range)}.")
    clo, chi = (float(v) for v in contrast_range)
    if not 0 < clo <= chi <= 1:
        raise ValueError(f"contrast_range must satisfy 0 < low <= high <= 1, got {tuple(contrast_range)}.")
    files = list_images(src)
    if limit is not None:
        files = files[: int(limit)]
    if len(files) < 2 and LesionFamily.FPI in families:
        raise ValueError("the 'fpi' family needs at least two source images (a foreign subject).")
    names = [stem(p) for p in files]
    if len(set(names)) != len(names):
        raise ValueError(f"source folder {src!r} holds several files with the same name stem.")
    images = []
    for p in files:
        img = scale_intensity(read_image(p), intensity)
        images.append(img if size is None else resize_image(img, int(size)))
    shapes = {a.shape for a in images}
    # all inputs are read and checked before anything is written
    results = []
    for i, (name, img) in enumerate(zip(names, images)):
        rng = np.random.default_rng([int(seed), i])
        mask = brain_mask(img)
        if not mask.any():
            raise ValueError(f"image {str(files[i])!r} gives an empty brain mask (constant image?).")
        n = int(rng.integers(1, int(max_lesions) + 1))
        new, label, lesions = img.astype(np.float64), np.zeros(img.shape, dtype=bool), []
        for k in range(n):
            fam = families[i % len(families)] if k == 0 else families[int(rng.integers(len(families)))]
            other = None
            if fam == LesionFamily.FPI:
                j = int(rng.integers(len(images) - 1))
                j = j + 1 if j >= i else j
                other = images[j]
                if other.shape != img.shape:
                    raise ValueError(f"fpi needs equal image shapes; got {sorted(shapes)}: set `size`.")
            new, lab, params = add_lesion(new, mask, fam, rng, other, (lo, hi), (clo, chi))
            if fam == LesionFamily.FPI:
                params["other"] = names[j]
            label |= lab
            lesions.append(params)
        results.append((name, img, new.astype(np.float32), label, lesions))

    out_dir = Path(out)
    for sub in ("images", "labels", "healthy"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "src": str(src),
        "seed": int(seed),
        "size": size,
        "families": families,
        "max_lesions": int(max_lesions),
        "radius_range": [lo, hi],
        "contrast_range": [clo, chi],
        "intensity": str(intensity),
        "images": {},
    }
    for name, img, new, label, lesions in results:
        write_nifti_2d(new, out_dir / "images" / f"{name}.nii.gz")
        write_nifti_2d(label.astype(np.uint8), out_dir / "labels" / f"{name}.nii.gz")
        write_nifti_2d(img.astype(np.float32), out_dir / "healthy" / f"{name}.nii.gz")
        record["images"][name] = {"lesions": lesions, "label_px": int(label.sum())}
    atomic_write_json(record, out_dir / "lesions.json", indent=1)
    return record
