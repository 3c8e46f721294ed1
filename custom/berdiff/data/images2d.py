# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Folders of 2D single-channel images (PNG/JPEG/TIFF or 2D NIfTI, including ``H x W x 1``): reading, intensity
scaling to [0, 1], square padding + resizing to a fixed size, and a simple brain-mask rule.

Brain-mask rule (:func:`brain_mask`), for skull-on T1 slices such as IXI and for skull-stripped images alike:

1. foreground = ``image > Otsu threshold`` (``skimage.filters.threshold_otsu``);
2. binary opening with a disk of radius ``opening`` (2 px) to cut the thin bridges between brain and scalp through
   the dark skull;
3. keep the largest 8-connected component;
4. fill holes (ventricles, dark sulci enclosed by the component);
5. erode with a disk of radius ``erosion`` (1 px).

The rule is deterministic and documented; it is used to place synthetic lesions and for optional masked metrics,
never for training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resize, SpatialPad
from monai.utils import StrEnum, look_up_option
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label as cc_label
from skimage.morphology import disk

from berdiff.utils import NIFTI_SUFFIXES, is_nifti

__all__ = [
    "IMAGE_SUFFIXES",
    "Intensity",
    "brain_mask",
    "list_images",
    "load_folder",
    "read_image",
    "resize_image",
    "resize_label",
    "scale_intensity",
    "stem",
]

#: file endings recognised as 2D images (lower case)
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *NIFTI_SUFFIXES)


class Intensity(StrEnum):
    """
    Intensity scaling to [0, 1].

    auto: values already in [0, 1] are kept, integer images are divided by 255 (8-bit) or their maximum (wider
        types), anything else is min-max scaled per image.
    minmax: per-image min-max scaling.
    none: no scaling (values must already be in [0, 1]).
    """

    AUTO = "auto"
    MINMAX = "minmax"
    NONE = "none"


def stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``a.nii.gz`` -> ``a``, ``b.png`` -> ``b``)."""
    name = Path(path).name
    low = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def list_images(folder: str | os.PathLike) -> list[Path]:
    """
    Image files directly inside ``folder`` (sorted by name; hidden files skipped).

    Raises:
        FileNotFoundError: when ``folder`` does not exist or holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a directory.")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}.")
    return files


def _read_raw(path: Path) -> np.ndarray:
    low = path.name.lower()
    if is_nifti(low):
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj)
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("L", "I", "I;16", "F", "1", "P", "RGB", "RGBA", "LA"):
            img = img.convert("F")
        if img.mode in ("RGB", "RGBA", "LA", "P"):
            img = img.convert("L")
        return np.asarray(img)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """
    Read one 2D single-channel image as a numpy array of shape (H, W), in its stored dtype. A NIfTI of shape
    ``(H, W, 1)`` (or ``(1, H, W)``) is squeezed; colour PNG/JPEG images are converted to grey.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file cannot be decoded, is not 2D, is empty or holds non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist.")
    try:
        arr = _read_raw(path)
    except Exception as e:  # decoding errors of PIL / nibabel have many types
        raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"image {str(path)!r} must be 2D (H x W, or H x W x 1), got shape {np.shape(arr)}.")
    if arr.size == 0 or min(arr.shape) < 2:
        raise ValueError(f"image {str(path)!r} is too small: shape {arr.shape}.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"image {str(path)!r} holds NaN or infinite values.")
    return arr


def scale_intensity(arr: np.ndarray, mode: str = Intensity.AUTO) -> np.ndarray:
    """
    Scale an image to float32 in [0, 1] following :class:`Intensity`.

    Args:
        arr: the image.
        mode: an :class:`Intensity` name.
    """
    try:
        look_up_option(mode, Intensity)
    except ValueError:
        raise ValueError(f"intensity must be one of {[m.value for m in Intensity]}, got {mode!r}.") from None
    a = np.asarray(arr)
    f = a.astype(np.float32)
    if not np.all(np.isfinite(f)):
        raise ValueError("image holds NaN or infinite values.")
    if mode == Intensity.NONE:
        if f.min() < 0 or f.max() > 1:
            raise ValueError(f"intensity='none' needs values in [0, 1], got [{f.min()}, {f.max()}].")
        return f
    if mode == Intensity.AUTO:
        if np.issubdtype(a.dtype, np.integer):
            top = 255.0 if a.dtype.itemsize == 1 or a.max() <= 255 else float(a.max())
            return np.clip(f / top, 0.0, 1.0) if top > 0 else np.zeros_like(f)
        if f.min() >= 0 and f.max() <= 1:
            return f
    lo, hi = float(f.min()), float(f.max())
    return (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)


def _square_resize(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    if int(size) < 2:
        raise ValueError(f"size must be >= 2, got {size}.")
    side = max(arr.shape)
    padded = SpatialPad(spatial_size=(side, side), mode="constant")(torch.as_tensor(arr, dtype=torch.float32)[None])
    kwargs = {"anti_aliasing": True} if mode == "bilinear" else {}
    out = Resize(spatial_size=(int(size), int(size)), mode=mode, **kwargs)(padded)
    return np.asarray(out[0], dtype=np.float32)


def resize_image(arr: np.ndarray, size: int = 128) -> np.ndarray:
    """
    Zero-pad an image symmetrically to a square (keeping the aspect ratio) and resize it to ``size x size``
    (MONAI ``SpatialPad`` + ``Resize``, bilinear with anti-aliasing); values are clipped to [0, 1].
    """
    return np.clip(_square_resize(np.asarray(arr, dtype=np.float32), size, "bilinear"), 0.0, 1.0)


def resize_label(arr: np.ndarray, size: int = 128) -> np.ndarray:
    """The same padding and resizing as :func:`resize_image` for a label (``> 0`` is anomalous), nearest-neighbour."""
    return _square_resize((np.asarray(arr) > 0).astype(np.float32), size, "nearest") > 0.5


def load_folder(
    folder: str | os.PathLike,
    size: int | None = 128,
    intensity: str = Intensity.AUTO,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """
    Read every image of a folder, scale it to [0, 1] and (when ``size`` is set) pad + resize it to ``size x size``.

    Args:
        folder: folder of 2D images.
        size: output side length, or None to keep the native size (then all images must have the same shape).
        intensity: an :class:`Intensity` name.
        names: optional stems to read (in this order); every one must exist.

    Returns:
        ``(images, stems)``: float32 array (N, H, W) in [0, 1] and the file stems.
    """
    files = list_images(folder)
    if names is not None:
        by_stem = {stem(p): p for p in files}
        missing = [n for n in names if n not in by_stem]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) missing in {str(folder)!r}, e.g. {missing[:3]}.")
        files = [by_stem[n] for n in names]
    out = []
    for p in files:
        img = scale_intensity(read_image(p), intensity)
        out.append(img if size is None else resize_image(img, size))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"images in {str(folder)!r} have different shapes {sorted(shapes)}; set `size`.")
    return np.stack(out).astype(np.float32), [stem(p) for p in files]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels = cc_label(mask, connectivity=2)
    if labels.max() == 0:
        return mask.copy()
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def brain_mask(image: np.ndarray, opening: int = 2, erosion: int = 1) -> np.ndarray:
    """
    Brain mask of a 2D image by the rule in the module docstring (Otsu, opening, largest component, fill holes,
    erosion).

    Args:
        image: (H, W) image.
        opening: radius in pixels of the disk used for the opening (0 disables it).
        erosion: radius in pixels of the final erosion (0 disables it).

    Returns:
        boolean (H, W) mask; all False for a constant image.
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"brain_mask expects a 2D image, got shape {a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError("brain_mask: image holds NaN or infinite values.")
    if opening < 0 or erosion < 0:
        raise ValueError(f"opening and erosion must be >= 0, got {opening}, {erosion}.")
    if a.max() <= a.min():
        return np.zeros(a.shape, dtype=bool)
    fg = a > threshold_otsu(a)
    if opening > 0:
        fg = ndimage.binary_opening(fg, structure=disk(opening))
    mask = ndimage.binary_fill_holes(_largest_component(fg))
    if erosion > 0:
        mask = ndimage.binary_erosion(mask, structure=disk(erosion))
    return mask.astype(bool)
