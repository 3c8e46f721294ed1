# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The cases of an inference run: a single case, a datalist JSON or a BraTS-layout folder (:func:`inference_datalist`),
the empty list that stands for missing input (:class:`MissingData`) and the check for clashing output names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from berdiff.data.brats_cases import find_brats_cases
from berdiff.utils import MODALITIES, case_name

__all__ = ["load_datalist", "MissingData", "inference_datalist", "check_unique_outputs"]


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
    modalities: Sequence[str] = MODALITIES,
    datalist_key: str | None = None,
    defer_errors: bool = False,
) -> list[dict]:
    """
    The list of cases to run, from the first input that is set: a single case ``image`` (one 4-channel NIfTI or one
    file per modality), a datalist JSON (:func:`load_datalist`), or a BraTS-layout folder
    (:func:`berdiff.data.brats_cases.find_brats_cases`).
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
        if tuple(modalities) != tuple(MODALITIES):
            raise ValueError(f"a BraTS-layout dataset_dir needs the modalities {MODALITIES}, got {modalities}.")
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
