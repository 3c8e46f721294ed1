# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The one rule for NIfTI file names and case names, and the BraTS modality order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["MODALITIES", "NIFTI_SUFFIXES", "IMAGE_SUFFIXES", "is_nifti", "strip_nifti", "image_stem", "case_name"]

#: BraTS modalities in the channel order of the brain MRI bundle.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: NIfTI file suffixes, longest first; matched case-insensitively.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

#: every image file suffix berdiff reads (NIfTI, and through ITK NRRD, MetaImage, DICOM); matched case-insensitively.
IMAGE_SUFFIXES: tuple[str, ...] = NIFTI_SUFFIXES + (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def strip_nifti(name: str | os.PathLike) -> str | None:
    """
    The base name without its NIfTI suffix (``a.nii.gz`` and ``a.NII`` -> ``a``), or ``None`` when the name is not a
    NIfTI file name.

    Args:
        name: a file name or path.
    """
    base = os.path.basename(os.fspath(name))
    lower = base.lower()
    for ext in NIFTI_SUFFIXES:
        if lower.endswith(ext) and len(base) > len(ext):
            return base[: -len(ext)]
    return None


def is_nifti(name: str | os.PathLike) -> bool:
    """Whether ``name`` ends with ``.nii`` or ``.nii.gz`` (any case)."""
    return strip_nifti(name) is not None


def image_stem(path: str | os.PathLike) -> str:
    """
    The base name without its image suffix (``a.nii.gz`` -> ``a``, ``b.NRRD`` -> ``b``, a DICOM folder ``c/`` -> ``c``).

    Args:
        path: an image file or folder.
    """
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    lower = base.lower()
    for ext in IMAGE_SUFFIXES:
        if lower.endswith(ext) and len(base) > len(ext):
            return base[: -len(ext)]
    return base


def case_name(filename: Any, modalities: Sequence[str] = MODALITIES) -> str:
    """
    The case name of an image file: the base name without its image extension and without a trailing
    ``_<modality>`` suffix, compared case-insensitively (``BraTS2021_00000_t1.nii.gz`` -> ``BraTS2021_00000``,
    ``case7.nii.gz`` -> ``case7``, ``scan.nrrd`` -> ``scan``).

    Args:
        filename: a file name, or a list of file names (the first one is used).
        modalities: modality suffixes to strip.

    Raises:
        ValueError: an empty list.
    """
    if isinstance(filename, (list, tuple)):
        if not filename:
            raise ValueError("case_name: empty file list.")
        filename = filename[0]
    base = image_stem(filename)
    for m in sorted(modalities, key=len, reverse=True):
        if base.lower().endswith(f"_{m.lower()}") and len(base) > len(m) + 1:
            return base[: -len(m) - 1]
    return base
