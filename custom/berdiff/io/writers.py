# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The NIfTI writer of the bundles' ``SaveImaged``: files appear atomically (:class:`AtomicNibabelWriter`, built on
:func:`berdiff.utils.atomic_write`) under names by case (:func:`case_name_formatter`).
"""

from __future__ import annotations

import os
from typing import Any

from monai.data import NibabelWriter
from monai.utils import ImageMetaKey

from berdiff.utils import atomic_write, case_name

__all__ = ["AtomicNibabelWriter", "case_name_formatter"]


class AtomicNibabelWriter(NibabelWriter):
    """
    A ``monai.data.NibabelWriter`` whose files appear atomically: the image is written to a hidden temporary file in
    the output folder and moved onto the final name with ``os.replace``, so a crash never leaves a half-written
    NIfTI file under the final name (the temporary file is removed on error). Use it as ``SaveImaged(writer=...)``.

    Without a target affine (``SaveImaged(resample=False)``, the geometry being restored by ``Invertd``) the data
    are written as they are: MONAI's writer would run a no-op resampling that fails for permuted-axis affines.
    """

    @classmethod
    def resample_if_needed(  # type: ignore[override]
        cls, data_array: Any, affine: Any = None, target_affine: Any = None, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        """No resampling without ``target_affine``; otherwise ``NibabelWriter.resample_if_needed``."""
        if target_affine is None:
            return data_array, affine
        return super().resample_if_needed(data_array, affine, target_affine, *args, **kwargs)

    def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs: Any) -> None:
        """
        Args:
            filename: final file name (``.nii`` or ``.nii.gz``).
            verbose: log the progress.
            obj_kwargs: passed to ``NibabelWriter.write``.
        """
        atomic_write(filename, lambda tmp: NibabelWriter.write(self, tmp, verbose=verbose, **obj_kwargs))


def case_name_formatter(metadict: dict | None, saver: Any = None) -> dict:
    """
    ``output_name_formatter`` for ``SaveImaged``: names outputs by case (``<case>_<postfix>.nii.gz``) instead of by
    the first modality file (``<case>_t1_<postfix>.nii.gz``).

    Args:
        metadict: the image meta data (``filename_or_obj`` is used).
        saver: the ``SaveImage`` transform (its data index names in-memory images).
    """
    metadict = metadict or {}
    source = metadict.get(ImageMetaKey.FILENAME_OR_OBJ)
    subject = case_name(source) if source else f"case_{getattr(saver, '_data_index', 0)}"
    return {"subject": subject, "idx": metadict.get(ImageMetaKey.PATCH_INDEX, None)}
