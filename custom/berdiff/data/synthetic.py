# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""
Synthetic BraTS-like demo data: skull-stripped four-modality brain volumes with (optional) tumours.

Anatomy comes from the MNI ICBM152 2009a template (T1 and grey/white-matter probability maps) shipped inside the
nilearn wheel, so nothing is downloaded. Each subject is the template resampled to the output grid, deformed by a
small random affine + elastic transform (MONAI), turned into four pseudo-modalities from its tissue maps, given a
tumour (necrotic core, enhancing rim, oedema) with mass effect in a share of the subjects, and corrupted by a bias
field, a contrast change and noise (MONAI). See ``docs/demo_data.md``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import Rand3DElasticd, RandAdjustContrast, RandBiasField, RandGaussianNoise
from monai.utils import StrEnum, convert_to_numpy
from scipy import ndimage

__all__ = [
    "MODALITIES",
    "LABELS",
    "SegDType",
    "TemplateGrid",
    "load_template",
    "make_demo_data",
    "synthesize_subject",
]

#: BraTS modality suffixes, in the order they are written.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: BraTS label values.
LABELS: dict[str, int] = {"background": 0, "necrotic_core": 1, "oedema": 2, "enhancing": 4}

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_TISSUES = ("gm", "wm", "csf")
_MANIFEST = "manifest.json"
_GENERATOR = "berdiff.data.synthetic"
_FORMAT_VERSION = 1

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
#: a tumour draw is rejected if one of its three labels has fewer voxels than this.
_MIN_COMPARTMENT_VOXELS = 5


class SegDType(StrEnum):
    """Data type of the written segmentation volumes."""

    UINT8 = "uint8"
    INT16 = "int16"


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
    missing = [name for name in _TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"nilearn at {folder.parent.parent} lacks the bundled MNI152 template file(s) {missing}; "
            "install the tested version: pip install berdiff[demo] (nilearn==0.14.1)"
        )
    return folder


def _validate_shape(shape: Sequence[int] | int | None) -> tuple[int, int, int] | None:
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
    images = {key: nib.load(str(folder / name)) for key, name in _TEMPLATE_FILES.items()}
    src_affine = images["t1"].affine
    data = {}
    for key, img in images.items():
        if img.shape != images["t1"].shape or not np.allclose(img.affine, src_affine):
            raise ValueError(f"template {_TEMPLATE_FILES[key]} is not on the grid of the T1 template")
        arr = np.asanyarray(img.dataobj).astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"template {_TEMPLATE_FILES[key]} holds NaN or infinite values")
        data[key] = arr / 255.0
    brain = data["t1"] > 0
    if not brain.any():
        raise ValueError(f"template {_TEMPLATE_FILES['t1']} is empty")
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


def _seed(rng: np.random.Generator) -> int:
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
    elastic.set_random_state(seed=_seed(rng))
    data = {"tissues": template.tissues.copy(), "t1": template.t1[None].copy(), "mask": template.mask[None].copy()}
    out = elastic(data)
    mask = convert_to_numpy(out["mask"], dtype=np.float32)[0] > 0.5
    tissues = np.clip(convert_to_numpy(out["tissues"], dtype=np.float32), 0.0, None)
    total = tissues.sum(0)
    tissues[2][mask & (total <= 1e-6)] = 1.0
    tissues = tissues / np.maximum(tissues.sum(0), 1e-6) * mask
    t1 = np.clip(convert_to_numpy(out["t1"], dtype=np.float32)[0], 0.0, 1.0) * mask
    return {"tissues": tissues.astype(np.float32), "t1": t1.astype(np.float32), "mask": mask}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _add_tumour(
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
    rotation = _random_rotation(rng)
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
    d_whole = ell + 0.22 * _smooth_noise(rng, box_shape, noise_sigma) - 0.15 * wm  # oedema spreads along WM
    d_core = ell + 0.12 * _smooth_noise(rng, box_shape, noise_sigma)
    d_necro = ell + 0.12 * _smooth_noise(rng, box_shape, noise_sigma)
    softness = 0.6 / r_vox  # ~0.6 voxel partial-volume edge
    w_whole = _sigmoid((1.0 - d_whole) / softness) * box_mask
    w_core = np.minimum(_sigmoid((core_fraction - d_core) / softness), w_whole)
    w_necro = np.minimum(_sigmoid((core_fraction * necrosis_fraction - d_necro) / softness), w_core)
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
        img = sum(tissues[i] * contrast[t] for i, t in enumerate(_TISSUES))
        if modality in ("t1", "t1ce"):
            img = (1 - _T1_TEMPLATE_WEIGHT) * img + _T1_TEMPLATE_WEIGHT * subject["t1"]
        if weights is not None:
            texture = 1.0 + 0.08 * _smooth_noise(rng, mask.shape, 1.0)
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
            transform.set_random_state(seed=_seed(rng))
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
            result = _add_tumour(trial, rng, spacing, tumour_radius_mm)
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


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_json(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out) or out < low or (high is not None and out > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return out


def _write_subjects(
    folder: Path,
    template: TemplateGrid,
    num_subjects: int,
    tumour_fraction: float,
    seed: int,
    spacing: float,
    radius: tuple[float, float],
    noise_std: float,
    seg_type: SegDType,
    case_prefix: str,
) -> list[dict[str, Any]]:
    """Synthesize and write all cases into ``folder``; returns the manifest's subject entries."""
    num_tumours = int(round(tumour_fraction * num_subjects))
    # which subjects get a tumour, and each subject's own seed (independent of num_subjects for subject i)
    tumour_ids = set(
        np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,))).permutation(num_subjects)[:num_tumours]
    )
    subject_seeds = np.random.SeedSequence(seed, spawn_key=(1,)).spawn(num_subjects)
    seg_np_dtype = np.uint8 if seg_type == SegDType.UINT8 else np.int16
    subjects = []
    for i in range(num_subjects):
        case = f"{case_prefix}_{i:03d}"
        has_tumour = i in tumour_ids
        images, labels, params = synthesize_subject(
            template, subject_seeds[i], has_tumour, spacing, radius, noise_std
        )
        (folder / case).mkdir()
        files = {}
        for modality in MODALITIES:
            files[modality] = f"{case}/{case}_{modality}.nii.gz"
            _save_nifti(images[modality], template.affine, folder / files[modality])
        files["seg"] = f"{case}/{case}_seg.nii.gz"
        _save_nifti(labels.astype(seg_np_dtype), template.affine, folder / files["seg"])
        if params is not None:
            world = template.affine @ np.append(params["centre_voxel"], 1.0)
            params = {**params, "centre_mm": [round(float(v), 3) for v in world[:3]]}
        subjects.append({"case": case, "has_tumour": has_tumour, "files": files, "tumours": [params] if params else []})
    return subjects


def make_demo_data(
    out: str | os.PathLike,
    num_subjects: int = 12,
    tumour_fraction: float = 0.5,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: float = 2.0,
    tumour_radius_mm: Sequence[float] = (10.0, 18.0),
    noise_std: float = 0.02,
    seg_dtype: str = SegDType.UINT8,
    case_prefix: str = "Demo",
    overwrite: bool = False,
) -> str:
    """
    Write a small synthetic data set in the BraTS 2020/2021 layout.

    ``out/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (cases ``Demo_000``, ``Demo_001``, ...) plus
    ``out/manifest.json`` with the subjects, which have tumours and every tumour's parameters. Images are float32,
    non-negative, exactly zero outside the brain; labels are 0, 1 (necrotic core), 2 (oedema), 4 (enhancing).
    Deterministic: subject ``i`` depends only on ``seed``, ``i``, whether it has a tumour and the geometry options.

    Args:
        out: output folder; created if missing. Must be empty unless ``overwrite``.
        num_subjects: number of subjects (>= 1).
        tumour_fraction: share of subjects with a tumour; ``round(tumour_fraction * num_subjects)`` subjects, chosen
            at random, get one.
        seed: random seed (>= 0).
        shape: output grid ``(x, y, z)``; default covers the brain with a 12 mm margin, rounded up to multiples
            of 8 voxels (88x104x96 at 2 mm, so axial slices pad to 128x128).
        spacing: isotropic voxel size in mm (BraTS: 1 mm; the demo default 2 mm keeps it CPU-friendly).
        tumour_radius_mm: ``(low, high)`` range of the whole tumour's mean radius in mm.
        noise_std: upper bound of the Gaussian noise std (healthy WM t1 is ~0.85).
        seg_dtype: member of :class:`SegDType`: data type of the segmentation files.
        case_prefix: case names are ``f"{case_prefix}_{i:03d}"`` (letters, digits, ``-``; no ``_``).
        overwrite: allow a non-empty ``out``; files of the same names are replaced, and cases listed in a previous
            manifest of this generator that are not part of the new set are removed.

    Returns:
        the path of the written ``manifest.json`` (the CLI prints it).

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is false, or ``out`` is a file.
        ValueError: an invalid option.
        ImportError: nilearn is not installed.
    """
    if isinstance(num_subjects, bool) or not isinstance(num_subjects, (int, np.integer)) or num_subjects < 1:
        raise ValueError(f"num_subjects must be an integer >= 1, got {num_subjects!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    tumour_fraction = _check_number("tumour_fraction", tumour_fraction, 0.0, 1.0)
    spacing = _check_number("spacing", spacing, 0.5, 8.0)
    noise_std = _check_number("noise_std", noise_std, 0.0, 0.5)
    try:
        radius = tuple(float(r) for r in tumour_radius_mm)
    except (TypeError, ValueError):
        radius = ()
    if len(radius) != 2 or not all(math.isfinite(r) for r in radius) or not 0 < radius[0] <= radius[1]:
        raise ValueError(f"tumour_radius_mm must be (low, high) with 0 < low <= high, got {tumour_radius_mm!r}")
    try:
        seg_type = SegDType(seg_dtype)
    except ValueError:
        raise ValueError(f"seg_dtype must be one of {[m.value for m in SegDType]}, got {seg_dtype!r}") from None
    if not isinstance(case_prefix, str) or not case_prefix or not all(c.isalnum() or c == "-" for c in case_prefix):
        raise ValueError(f"case_prefix must be non-empty letters, digits or '-', got {case_prefix!r}")
    grid_shape = _validate_shape(shape)

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} is not empty; choose another folder or pass overwrite=True")
    previous_cases: list[str] = []
    old_manifest = out_dir / _MANIFEST
    if overwrite and old_manifest.is_file():
        try:
            old = json.loads(old_manifest.read_text())
            if old.get("generator") == _GENERATOR:
                previous_cases = [s["case"] for s in old.get("subjects", []) if isinstance(s.get("case"), str)]
        except (json.JSONDecodeError, AttributeError, TypeError):
            previous_cases = []

    template = load_template(spacing, grid_shape)  # fails early (no partial output) if nilearn is missing
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # every case is written into a hidden staging folder first and moved into place only once all succeeded
    staging = Path(tempfile.mkdtemp(prefix=".make_demo_data-", dir=out_dir))
    try:
        subjects = _write_subjects(
            staging, template, num_subjects, tumour_fraction, seed, spacing, radius, noise_std, seg_type, case_prefix
        )
        for subject in subjects:
            target = out_dir / subject["case"]
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(staging / subject["case"], target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)

    new_cases = {s["case"] for s in subjects}
    for case in previous_cases:
        stale = out_dir / case
        if case not in new_cases and stale.is_dir() and not stale.is_symlink() and stale.parent == out_dir:
            shutil.rmtree(stale)

    manifest = {
        "generator": _GENERATOR,
        "format_version": _FORMAT_VERSION,
        "seed": int(seed),
        "num_subjects": int(num_subjects),
        "tumour_fraction": tumour_fraction,
        "shape": list(template.shape),
        "spacing_mm": spacing,
        "affine": template.affine.tolist(),
        "orientation": "RAS",
        "modalities": list(MODALITIES),
        "labels": dict(LABELS),
        "template": {
            "name": "MNI ICBM152 2009a nonlinear symmetric (nilearn-bundled, skull-stripped, 1 mm)",
            "files": [f"nilearn/datasets/data/{name}" for name in _TEMPLATE_FILES.values()],
        },
        "options": {
            "tumour_radius_mm": list(radius),
            "noise_std": noise_std,
            "seg_dtype": seg_type.value,
        },
        "subjects": subjects,
    }
    _save_json(manifest, out_dir / _MANIFEST)
    return str(out_dir / _MANIFEST)
