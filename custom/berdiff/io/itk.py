# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Image formats beyond NIfTI (NRRD, MetaImage, DICOM series), read by MONAI's ``ITKReader`` through ``LoadImaged``.
This module gives the header-only checks of :class:`berdiff.transforms.CheckImageFilesd` the same shape and RAS
affine that ``ITKReader`` gives the loaded image, so that the checks agree with what is loaded.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

__all__ = ["ITK_SUFFIXES", "ImageHeader", "is_itk_image", "read_itk_header"]

#: single-file formats read through ITK (a DICOM series is a folder)
ITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")


class ImageHeader(NamedTuple):
    """Shape (spatial axes in ITK index order, then the components if more than one) and RAS affine."""

    shape: tuple[int, ...]
    affine: np.ndarray


def is_itk_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an NRRD/MetaImage file or a folder (a DICOM series)."""
    path = os.fspath(path)
    return os.path.isdir(path) or path.lower().endswith(ITK_SUFFIXES)


def _ras_affine(direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    affine = np.eye(len(origin) + 1)
    affine[:-1, :-1] = direction @ np.diag(spacing)
    affine[:-1, -1] = origin
    flip = np.diag([-1.0, -1.0] + [1.0] * (len(origin) - 1))  # ITK's LPS -> RAS, as ITKReader(affine_lps_to_ras)
    return flip @ affine


def read_itk_header(path: str | os.PathLike) -> ImageHeader:
    """
    Shape and RAS affine of an image read through ITK: the header of an NRRD/MetaImage file, or the whole DICOM
    series of a folder.

    Args:
        path: an image file or a DICOM folder.

    Raises:
        ValueError: the file or folder cannot be read as an image.
    """
    import itk

    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            img = itk.imread(path)
            size = [int(s) for s in itk.size(img)]
            comps = int(img.GetNumberOfComponentsPerPixel())
            spacing = np.asarray(itk.spacing(img), float)
            origin = np.asarray(itk.origin(img), float)
            direction = np.asarray(itk.array_from_matrix(img.GetDirection()), float)
        else:
            io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
            if io is None:
                raise ValueError("no ITK reader for this file")
            io.SetFileName(path)
            io.ReadImageInformation()
            n = io.GetNumberOfDimensions()
            size = [int(io.GetDimensions(i)) for i in range(n)]
            comps = int(io.GetNumberOfComponents())
            spacing = np.asarray([io.GetSpacing(i) for i in range(n)], float)
            origin = np.asarray([io.GetOrigin(i) for i in range(n)], float)
            direction = np.stack([np.asarray(io.GetDirection(i), float) for i in range(n)], axis=1)
    except Exception as e:  # ITK raises RuntimeError / its own types for unreadable input
        raise ValueError(f"cannot read image {path}: {e}") from e
    shape = tuple(size) + ((comps,) if comps > 1 else ())
    return ImageHeader(shape, _ras_affine(direction, spacing, origin))
