# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The demo data set on disk: BraTS-layout case folders and a ``manifest.json``, written all-or-nothing
(:func:`make_demo_data`). See ``docs/demo_data.md``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.utils import StrEnum, look_up_option

from berdiff.data.synthetic.subjects import synthesize_subject
from berdiff.data.synthetic.template import TEMPLATE_FILES, TemplateGrid, load_template, validate_shape
from berdiff.data.synthetic.tumour import LABELS
from berdiff.utils import MODALITIES, atomic_write, atomic_write_json

__all__ = ["SegDType", "make_demo_data"]

_MANIFEST = "manifest.json"
_GENERATOR = "berdiff.data.synthetic"
_FORMAT_VERSION = 1


class SegDType(StrEnum):
    """Data type of the written segmentation volumes."""

    UINT8 = "uint8"
    INT16 = "int16"


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Writes ``array`` to ``path`` atomically (:func:`berdiff.utils.atomic_write`), with the affine as qform and sform."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, tmp))


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
        seg_type = look_up_option(seg_dtype, SegDType)
    except ValueError:
        raise ValueError(f"seg_dtype must be one of {[m.value for m in SegDType]}, got {seg_dtype!r}") from None
    if not isinstance(case_prefix, str) or not case_prefix or not all(c.isalnum() or c == "-" for c in case_prefix):
        raise ValueError(f"case_prefix must be non-empty letters, digits or '-', got {case_prefix!r}")
    grid_shape = validate_shape(shape)

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
            "files": [f"nilearn/datasets/data/{name}" for name in TEMPLATE_FILES.values()],
        },
        "options": {
            "tumour_radius_mm": list(radius),
            "noise_std": noise_std,
            "seg_dtype": seg_type.value,
        },
        "subjects": subjects,
    }
    atomic_write_json(manifest, out_dir / _MANIFEST)
    return str(out_dir / _MANIFEST)
