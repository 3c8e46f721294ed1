# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The one shared utility layer: atomic file writing, JSON-safe values, case names and NIfTI file names."""

from berdiff.utils.files import (
    atomic_save_torch,
    atomic_write,
    atomic_write_bytes,
    atomic_write_files,
    atomic_write_json,
    temp_path,
)
from berdiff.utils.json_safe import to_json_safe
from berdiff.utils.names import IMAGE_SUFFIXES, MODALITIES, NIFTI_SUFFIXES, case_name, image_stem, is_nifti, strip_nifti

__all__ = [
    "IMAGE_SUFFIXES",
    "MODALITIES",
    "NIFTI_SUFFIXES",
    "atomic_save_torch",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_json",
    "case_name",
    "image_stem",
    "is_nifti",
    "strip_nifti",
    "temp_path",
    "to_json_safe",
]
