# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""
Input and output of the brain MRI bundle: inference data lists (BraTS folder, datalist JSON, single case), case
names, atomic NIfTI and JSON writers, and the model checkpoint check.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

from monai.data import NibabelWriter
from monai.utils import ImageMetaKey

from berdiff.data.brats import find_brats_cases
from berdiff.itk_io import image_stem
from berdiff.transforms import BRATS_MODALITIES

__all__ = [
    "AtomicNibabelWriter",
    "atomic_write_json",
    "case_name",
    "case_name_formatter",
    "load_datalist",
    "inference_datalist",
    "check_checkpoint",
]

_NIFTI_EXT = re.compile(r"\.nii(\.gz)?$", flags=re.IGNORECASE)


def _temp_name(filename: str) -> str:
    """A unique hidden name in the folder of ``filename`` that keeps its extension (nibabel picks gzip from it)."""
    folder, base = os.path.split(os.path.abspath(filename))
    ext = _NIFTI_EXT.search(base)
    suffix = ext.group(0) if ext else os.path.splitext(base)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file the usual permissions
    return tmp


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
        filename = os.fspath(filename)
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        tmp = _temp_name(filename)
        try:
            super().write(tmp, verbose=verbose, **obj_kwargs)
            os.replace(tmp, filename)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def atomic_write_json(obj: Any, path: os.PathLike | str, indent: int = 2) -> str:
    """
    Writes ``obj`` as JSON to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        obj: JSON-serialisable object.
        path: destination file.
        indent: JSON indentation.

    Returns:
        the path written.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def case_name(filename: Any, modalities: Sequence[str] = BRATS_MODALITIES) -> str:
    """
    The case name of an image file: the base name without the NIfTI extension and without a trailing
    ``_<modality>`` suffix (``BraTS2021_00000_t1.nii.gz`` -> ``BraTS2021_00000``; ``case7.nii.gz`` -> ``case7``).

    Args:
        filename: a file name, or a list of file names (the first one is used).
        modalities: modality suffixes to strip.
    """
    if isinstance(filename, (list, tuple)):
        if not filename:
            raise ValueError("case_name: empty file list.")
        filename = filename[0]
    base = image_stem(str(filename))
    for m in sorted(modalities, key=len, reverse=True):
        if base.lower().endswith(f"_{m.lower()}") and len(base) > len(m) + 1:
            return base[: -len(m) - 1]
    return base


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


def _resolve(path: Any, base_dir: str) -> Any:
    if isinstance(path, (list, tuple)):
        return [_resolve(p, base_dir) for p in path]
    if isinstance(path, str) and not os.path.isabs(path):
        return os.path.normpath(os.path.join(base_dir, path))
    return path


def load_datalist(path: os.PathLike | str, key: str | None = None) -> list[dict]:
    """
    Reads a datalist JSON: a list of items, or a dict holding the list under ``key`` (default: the first of
    ``testing``, ``test``, ``validation``, ``training`` present). Items are dicts with ``image`` (one file, or one
    file per modality) and optionally ``label``; a bare string or list item is taken as ``image``. Relative paths
    are relative to the JSON file's folder. For the ``datalist.json`` written by ``prepare_brats``, the source
    volumes (its ``volumes`` section) are read, so ``key="validation"`` gives the held-out volumes.

    Args:
        path: the JSON file.
        key: the list's key when the file holds a dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"datalist file not found: {path}")
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read datalist {path}: {e}") from e
    if isinstance(content, dict) and isinstance(content.get("volumes"), dict):
        content = content["volumes"]  # a prepare_brats datalist: its source volumes per split
    if isinstance(content, dict):
        keys = [key] if key else [k for k in ("testing", "test", "validation", "training") if k in content]
        if not keys or keys[0] not in content:
            raise ValueError(f"datalist {path} has no list under {key or 'testing/test/validation/training'!r}.")
        content = content[keys[0]]
    if not isinstance(content, list) or not content:
        raise ValueError(f"datalist {path} holds no items.")
    base_dir = os.path.dirname(os.path.abspath(path))
    items = []
    for i, item in enumerate(content):
        if isinstance(item, (str, list)):
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise ValueError(f"datalist {path}: item {i} has no 'image' entry: {item!r}")
        item = dict(item)
        for k in ("image", "label"):
            if k in item:
                item[k] = _resolve(item[k], base_dir)
        items.append(item)
    return items


def inference_datalist(
    image: str | Sequence[str] | None = None,
    datalist: os.PathLike | str | None = None,
    dataset_dir: os.PathLike | str | None = None,
    modalities: Sequence[str] = BRATS_MODALITIES,
    datalist_key: str | None = None,
) -> list[dict]:
    """
    The list of cases to run, from the first input that is set: a single case ``image`` (one 4-channel NIfTI or one
    file per modality), a datalist JSON (:func:`load_datalist`), or a BraTS-layout folder
    (:func:`berdiff.data.brats.find_brats_cases`).
    Every item gets a ``case`` name.

    Args:
        image: a single case.
        datalist: a datalist JSON file.
        dataset_dir: a BraTS-layout folder.
        modalities: modality suffixes in channel order (BraTS folder and case names).
        datalist_key: see :func:`load_datalist`.

    Raises:
        ValueError: no input is set, or the input holds no case.
    """
    if image:
        items = [{"image": [os.fspath(p) for p in image] if isinstance(image, (list, tuple)) else os.fspath(image)}]
    elif datalist:
        items = load_datalist(datalist, datalist_key)
    elif dataset_dir:
        if tuple(modalities) != tuple(BRATS_MODALITIES):
            raise ValueError(f"a BraTS-layout dataset_dir needs the modalities {BRATS_MODALITIES}, got {modalities}.")
        items = [
            {"image": c["image"], "case": c["subject"], **({"label": c["label"]} if "label" in c else {})}
            for c in find_brats_cases(os.fspath(dataset_dir), require_label=False)
        ]
    else:
        raise ValueError("no input given: set one of image, datalist or dataset_dir.")
    for item in items:
        item.setdefault("case", case_name(item["image"], modalities))
    return items


def check_checkpoint(path: os.PathLike | str, allow_random_weights: bool = False) -> bool:
    """
    Checks that the model weights exist, so inference never runs silently with random weights.

    Args:
        path: the checkpoint (``models/model.pt``).
        allow_random_weights: opt-in for tests and debugging: a missing file is then allowed.

    Returns:
        True when the file exists, False when it is missing and ``allow_random_weights`` is set.

    Raises:
        FileNotFoundError: the file is missing and random weights are not allowed.
    """
    if os.path.isfile(os.fspath(path)):
        return True
    if allow_random_weights:
        return False
    raise FileNotFoundError(
        f"model weights not found: {path}. Train the bundle or download models/model.pt, pass --ckpt_path <file>, "
        "or (tests/debugging only) --allow_random_weights True."
    )
