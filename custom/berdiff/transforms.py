# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Transforms shared by training and inference: input checks, head-masked intensity scaling, the volume pipeline."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    Spacingd,
)

from berdiff.io.itk import is_itk_image, read_itk_header

__all__ = [
    "MAX_VOXELS",
    "VOXEL_SIZE_RANGE",
    "check_image_header",
    "CheckImageFilesd",
    "ValidateImaged",
    "HeadPercentileScaled",
    "volume_preprocessing",
]

#: largest number of voxels (all channels together) an input file may claim in its header: 2**30 (4 GiB as float32,
#: ~30 times a BraTS case), so that a corrupt or hostile header is refused before any memory is allocated
MAX_VOXELS = 2**30
#: plausible voxel sizes in mm
VOXEL_SIZE_RANGE = (1e-3, 1e3)


def check_image_header(
    path: Any, shape: Sequence[int], affine: Any, zooms: Sequence[float] = (), max_voxels: int = MAX_VOXELS
) -> None:
    """
    Checks what an image header claims, before the data are read: a positive size per axis, at most ``max_voxels``
    voxels in all, a finite and invertible affine, and voxel sizes in :data:`VOXEL_SIZE_RANGE` (mm).

    Args:
        path: the file (named in the message).
        shape: the header's array shape.
        affine: the header's 4x4 voxel-to-world matrix.
        zooms: the header's voxel sizes (spatial ones first).
        max_voxels: largest number of voxels allowed.

    Raises:
        ValueError: naming the file and what is wrong.
    """
    dims = [int(d) for d in shape]
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"{path}: the header claims an empty image (shape {tuple(dims)}).")
    voxels = int(np.prod(np.asarray(dims, dtype=np.float64)))
    if voxels > max_voxels:
        raise ValueError(
            f"{path}: the header claims {tuple(dims)} = {voxels:,} voxels, more than the {max_voxels:,} allowed; "
            "refusing to read it (a corrupt header?)."
        )
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ValueError(f"{path}: the header's affine is not a finite 4x4 matrix:\n{matrix}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError(f"{path}: the header's affine is singular (zero voxel size or collapsed axes):\n{matrix}")
    spatial = [float(z) for z in list(zooms)[: min(3, len(dims))]]
    lo, hi = VOXEL_SIZE_RANGE
    if any(not np.isfinite(z) or not lo <= z <= hi for z in spatial):
        raise ValueError(f"{path}: implausible voxel size {tuple(spatial)} (expected {lo:g} to {hi:g} mm per axis).")


def _filename(meta_source: Any) -> str:
    meta = getattr(meta_source, "meta", None) or {}
    name = meta.get("filename_or_obj", "<in-memory image>")
    if isinstance(name, (list, tuple)):
        name = ", ".join(str(n) for n in name)
    return str(name)


class CheckImageFilesd(MapTransform):
    """
    Checks image files before loading, from their headers only: every file exists and is a readable NIfTI image, the
    number of channels (files, or the 4th dimension of a single file) is ``num_channels``, and the files of one case
    share shape and affine. Errors are ``ValueError``s naming the offending file.

    Args:
        keys: keys holding a file name or a list of file names (one per channel).
        num_channels: expected number of channels; None skips the count check.
        reference_key: optional key whose (first) file must have the same spatial shape and affine (e.g. the image
            key when checking a segmentation).
        atol: tolerance when comparing affines.
        max_voxels: largest number of voxels (all channels) a file may claim (:func:`check_image_header`).
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_channels: int | None = None,
        reference_key: str | None = None,
        atol: float = 1e-3,
        max_voxels: int = MAX_VOXELS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels = num_channels
        self.reference_key = reference_key
        self.atol = atol
        self.max_voxels = max_voxels

    def _header(self, path: str) -> nib.spatialimages.SpatialImage:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"expected an image file name, got {type(path).__name__}: {path!r}.")
        if is_itk_image(path) and os.path.exists(path):  # NRRD / MetaImage / DICOM folder: read through ITK
            return read_itk_header(path)
        if not os.path.isfile(path):
            raise ValueError(f"image file not found: {path}")
        try:
            img = nib.load(str(path))
            shape, affine = img.shape, img.affine
            zooms = img.header.get_zooms()
        except Exception as e:  # nibabel raises several types for corrupt files
            raise ValueError(f"cannot read image file {path}: {e}") from e
        check_image_header(path, shape, affine, zooms, self.max_voxels)
        return img

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            files = d[key]
            files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
            if not files:
                raise ValueError(f"no image file given under {key!r}.")
            headers = [self._header(f) for f in files]
            if len(files) == 1:
                shape = headers[0].shape
                channels = shape[3] if len(shape) == 4 else 1
                if len(shape) not in (3, 4):
                    raise ValueError(f"{files[0]}: expected a 3D volume or a 4D multi-channel volume, got {shape}.")
            else:
                channels = len(files)
                ref_shape, ref_affine = headers[0].shape, headers[0].affine
                for f, h in zip(files[1:], headers[1:]):
                    if h.shape != ref_shape:
                        raise ValueError(f"shape mismatch: {f} has shape {h.shape}, {files[0]} has {ref_shape}.")
                    if not np.allclose(h.affine, ref_affine, atol=self.atol):
                        raise ValueError(f"affine mismatch between {f} and {files[0]}.")
            if self.reference_key is not None and self.reference_key in d:
                ref = d[self.reference_key]
                ref = ref if isinstance(ref, (str, os.PathLike)) else list(ref)[0]
                ref_header = self._header(ref)
                if tuple(headers[0].shape[:3]) != tuple(ref_header.shape[:3]):
                    raise ValueError(f"shape mismatch: {files[0]} has shape {headers[0].shape}, {ref} has {ref_header.shape}.")
                if not np.allclose(headers[0].affine, ref_header.affine, atol=self.atol):
                    raise ValueError(f"affine mismatch between {files[0]} and {ref}.")
            if self.num_channels is not None and channels != self.num_channels:
                raise ValueError(
                    f"expected {self.num_channels} channels under {key!r}, got {channels} from {', '.join(map(str, files))}."
                )
        return d


class ValidateImaged(MapTransform):
    """
    Checks loaded (channel-first) images: channel count, no NaN or infinite voxel, and no constant channel (a blank
    modality) next to non-constant ones: the anomaly map of such a case would flag the whole head. Images that are
    constant in every channel (e.g. all zero) are allowed: they give all-zero anomaly maps, because constant slices
    are skipped by the pipeline.

    Args:
        keys: keys of channel-first images.
        num_channels: expected number of channels; None skips the check.
        allow_blank_channels: allow constant channels next to non-constant ones.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_channels: int | None = None,
        allow_blank_channels: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels = num_channels
        self.allow_blank_channels = allow_blank_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if self.num_channels is not None and img.shape[0] != self.num_channels:
                raise ValueError(
                    f"{_filename(img)}: expected {self.num_channels} channels, got {img.shape[0]} (shape {tuple(img.shape)})."
                )
            if not bool(torch.isfinite(torch.as_tensor(img)).all()):
                raise ValueError(f"{_filename(img)}: image contains NaN or infinite voxels.")
            if not self.allow_blank_channels and img.shape[0] > 1:
                flat = torch.as_tensor(img).reshape(img.shape[0], -1)
                blank = [c for c in range(flat.shape[0]) if bool((flat[c] == flat[c, 0]).all())]
                if blank and len(blank) < flat.shape[0]:
                    raise ValueError(
                        f"{_filename(img)}: channel(s) {blank} (0-based, of {flat.shape[0]}) are constant (e.g. all "
                        "zero) while the others are not: a missing or blank modality; every modality is needed."
                    )
        return d


class HeadPercentileScaled(MapTransform):
    """
    Per-volume, per-channel intensity scaling to [0, 1] inside the head: each channel is divided by its
    ``upper``-th percentile over voxels above ``background`` and clipped to [0, 1]; the background stays 0. A channel
    with no voxel above the background is left at 0.

    Args:
        keys: keys of channel-first images.
        upper: percentile (0-100] of head voxels mapped to 1.
        background: voxels with values <= background are not part of the head.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self, keys: KeysCollection, upper: float = 99.5, background: float = 0.0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 < upper <= 100.0:
            raise ValueError(f"upper percentile must be in (0, 100], got {upper}.")
        self.upper = upper
        self.background = background

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            out = torch.zeros_like(torch.as_tensor(img), dtype=torch.float32)
            for c in range(img.shape[0]):
                chan = torch.as_tensor(img[c]).float()
                head = chan > self.background
                if not bool(head.any()):
                    continue
                values = chan[head]
                if values.numel() > 2_000_000:  # quantile has an input-size limit; a strided subsample is exact enough
                    values = values[:: values.numel() // 1_000_000 + 1]
                hi = torch.quantile(values, self.upper / 100.0)
                if hi <= self.background:
                    continue
                out[c] = torch.where(head, ((chan - self.background) / (hi - self.background)).clamp(0.0, 1.0), 0.0)
            if isinstance(img, MetaTensor):
                out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
            d[key] = out
        return d


def volume_preprocessing(
    keys: Sequence[str] | str = "image",
    label_key: str | None = None,
    num_channels: int | None = 4,
    spatial_size: Sequence[int] = (256, 256),
    upper_percentile: float = 99.5,
    axcodes: str = "RAS",
    pixdim: float | None = None,
) -> Compose:
    """
    The one preprocessing of 3D brain MRI used by training and inference: check files, load the modalities (a list
    of files, or one multi-channel file) as channels, check channels and finite values, orient to ``axcodes``, scale
    each modality to [0, 1] inside the head (:class:`HeadPercentileScaled`), optionally resample in-plane to
    ``pixdim`` mm (``Spacingd``; the axial spacing is kept) and pad or crop in-plane (the first two spatial axes,
    i.e. the axial plane in RAS) to ``spatial_size``. Every spatial step is invertible, so ``Invertd`` maps
    predictions back onto the input's grid.

    Args:
        keys: image key(s).
        label_key: optional segmentation key, loaded and resampled alongside (nearest neighbour, no scaling).
        num_channels: expected channels of the image (4 for BraTS: t1, t1ce, t2, flair); None skips the check.
        spatial_size: in-plane size after padding/cropping.
        upper_percentile: see :class:`HeadPercentileScaled`.
        axcodes: orientation codes.
        pixdim: in-plane voxel size (mm) to resample to, bilinear for images and nearest neighbour for the label;
            None keeps the input's voxel size.
    """
    image_keys = [keys] if isinstance(keys, str) else list(keys)
    all_keys = image_keys + ([label_key] if label_key else [])
    size = (*[int(s) for s in spatial_size], -1)
    return Compose(
        [
            CheckImageFilesd(image_keys, num_channels=num_channels),
            *([CheckImageFilesd(label_key, num_channels=1, reference_key=image_keys[0])] if label_key else []),
            LoadImaged(all_keys, image_only=True),
            EnsureChannelFirstd(all_keys),
            ValidateImaged(image_keys, num_channels=num_channels),
            Orientationd(all_keys, axcodes=axcodes, labels=None),
            HeadPercentileScaled(image_keys, upper=upper_percentile),
            *(
                [Spacingd(all_keys, pixdim=(float(pixdim), float(pixdim), -1.0),
                          mode=["bilinear"] * len(image_keys) + (["nearest"] if label_key else []))]
                if pixdim is not None else []
            ),
            ResizeWithPadOrCropd(all_keys, spatial_size=size),
            EnsureTyped(image_keys, dtype=torch.float32),
        ]
    )
