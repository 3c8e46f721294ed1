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

import torch
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
    "MissingData",
    "inference_datalist",
    "check_unique_outputs",
    "load_state_dict",
    "check_state_dict",
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


class MissingData(list):
    """
    The empty datalist that stands for input data that are not there: the configuration still builds (tools that
    load a bundle without running it: ``check_properties``, MONAI Label), and the run reports ``error`` when it
    starts (:func:`berdiff.handlers.preflight`, :func:`berdiff.handlers.training_preflight`).

    Args:
        error: the error the run reports.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error


def inference_datalist(
    image: str | Sequence[str] | None = None,
    datalist: os.PathLike | str | None = None,
    dataset_dir: os.PathLike | str | None = None,
    modalities: Sequence[str] = BRATS_MODALITIES,
    datalist_key: str | None = None,
    defer_errors: bool = False,
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
        defer_errors: return an empty :class:`MissingData` holding the error instead of raising it (the config's
            data list, built when the config is parsed; the run's preflight reports the error).

    Raises:
        ValueError: no input is set, or the input holds no case.
    """
    if defer_errors:
        try:
            return inference_datalist(image, datalist, dataset_dir, modalities, datalist_key)
        except (ValueError, OSError) as e:
            return MissingData(e)
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


def check_unique_outputs(items: Sequence[dict], output_dir: os.PathLike | str | None = None) -> None:
    """
    Checks that no two cases of a datalist map to the same output names (``<case>_anomaly.nii.gz``, ...): two
    inputs named alike in different folders would otherwise overwrite each other's maps.

    Args:
        items: datalist items with a ``case`` entry (:func:`inference_datalist`) or an ``image`` entry.
        output_dir: the output folder, named in the message.

    Raises:
        ValueError: naming the output and both inputs.
    """
    seen: dict[str, Any] = {}
    for item in items:
        name = item.get("case") or case_name(item["image"])
        key = name if os.path.normcase("A") == "A" else name.lower()  # case-insensitive file systems
        if key in seen:
            where = f" in {output_dir}" if output_dir else ""
            raise ValueError(
                f"two inputs map to the same output {name}_anomaly.nii.gz{where}: {seen[key]!s} and {item['image']!s}; "
                "rename one of them or run them separately."
            )
        seen[key] = item["image"]


def load_state_dict(path: os.PathLike | str, key: str | None = None, mmap: bool = False) -> dict[str, torch.Tensor]:
    """
    Reads a flat state dict with ``torch.load(weights_only=True)`` (no arbitrary code is run).

    Args:
        path: the checkpoint file.
        key: optional entry of a nested checkpoint (``{"model": state_dict, ...}``).
        mmap: map the file instead of reading it (cheap checks of large files).

    Raises:
        ValueError: the file is not a readable PyTorch file, or it does not hold a mapping of names to tensors.
    """
    path = os.fspath(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot be mapped
    except Exception as e:  # pickle, zip and unpickler errors of many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read checkpoint {path} as PyTorch weights: {reason}") from e
    if key is not None:
        if not isinstance(state, dict) or key not in state:
            raise ValueError(f"checkpoint {path} has no entry {key!r}.")
        state = state[key]
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"checkpoint {path} is not a state dict (a mapping of parameter names to tensors), "
            f"got {type(state).__name__}"
            + (f" with keys {sorted(map(str, state))[:5]}" if isinstance(state, dict) else "")
            + "."
        )
    return state


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _pipeline_shapes(preset: str, in_channels: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the bundle's ``AnomalyPipeline`` for ``preset``, built on the meta device (no memory)."""
    from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset

    with torch.device("meta"):
        autoencoder = autoencoder_from_preset(preset, in_channels=in_channels)
        unet = denoiser_from_preset(preset, latent_channels=autoencoder.latent_channels)
        return _shapes(AnomalyPipeline(autoencoder, unet))


def _describe_mismatch(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    """None when ``state`` has exactly the keys and shapes of ``expected``; otherwise the first difference."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for k, shape in expected.items():
        if k in state and tuple(state[k].shape) != shape:
            return f"{k} has shape {tuple(state[k].shape)} in the checkpoint, {shape} in the network"
    if missing or unexpected:
        return (
            f"{len(missing)} parameter(s) missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    return None


def check_state_dict(
    state: dict[str, torch.Tensor], module: torch.nn.Module, path: os.PathLike | str, what: str = "network"
) -> None:
    """
    Checks that ``state`` has exactly the parameter names and shapes of ``module`` before loading it.

    Args:
        state: the state dict read from ``path``.
        module: the network it is loaded into.
        path: the file (named in the message).
        what: the network's description in the message.

    Raises:
        ValueError: naming the first differing parameter with both shapes.
    """
    problem = _describe_mismatch(state, _shapes(module))
    if problem:
        raise ValueError(f"checkpoint {os.fspath(path)} does not fit the {what}: {problem}.")


def check_checkpoint(
    path: os.PathLike | str,
    allow_random_weights: bool = False,
    preset: str | None = None,
    in_channels: int | None = None,
) -> bool:
    """
    Checks that the model weights exist, so inference never runs silently with random weights; with ``preset`` and
    ``in_channels`` also that the file is an ``AnomalyPipeline`` state dict of that size (read with
    ``weights_only=True``), naming both sizes when it is another preset's.

    Args:
        path: the checkpoint (``models/model.pt``).
        allow_random_weights: opt-in for tests and debugging: a missing file is then allowed.
        preset: the network preset the configuration builds; None skips the content check.
        in_channels: image channels of the configuration (4 for BraTS).

    Returns:
        True when the file exists, False when it is missing and ``allow_random_weights`` is set.

    Raises:
        FileNotFoundError: the file is missing and random weights are not allowed.
        ValueError: the file is not a state dict, or not one of the configured network.
    """
    if not os.path.isfile(os.fspath(path)):
        if allow_random_weights:
            return False
        raise FileNotFoundError(
            f"model weights not found: {path}. Train the bundle or download models/model.pt, pass --ckpt_path "
            "<file>, or (tests/debugging only) --allow_random_weights True."
        )
    if preset is None:
        return True
    from berdiff.networks.presets import Preset

    state = load_state_dict(path, mmap=True)
    in_channels = int(in_channels or 4)
    problem = _describe_mismatch(state, _pipeline_shapes(preset, in_channels))
    if problem is None:
        return True
    for other in Preset:
        for channels in dict.fromkeys((in_channels, 1, 4)):
            if (other, channels) == (preset, in_channels):
                continue
            if _describe_mismatch(state, _pipeline_shapes(other, channels)) is None:
                raise ValueError(
                    f"checkpoint {path} holds a {other.value!r} network with {channels} image channel(s), but the "
                    f"configuration builds a {preset!r} network with {in_channels} image channel(s): set "
                    f"--preset {other.value}" + (" and the matching channels" if channels != in_channels else "")
                    + " or use weights trained with this configuration."
                )
    raise ValueError(
        f"checkpoint {path} does not fit the {preset!r} network with {in_channels} image channel(s): {problem}."
    )
