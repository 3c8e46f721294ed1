# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The training and validation items read when a training configuration is instantiated (:func:`training_datalist`)
and the grid the slices were prepared on (:func:`prepared_grid`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["training_datalist", "prepared_grid"]


def training_datalist(
    source: str | os.PathLike, key: str = "training", defer_missing: bool = True
) -> list[dict[str, Any]]:
    """
    The items of a training or validation list, read when the configuration is instantiated: from a datalist JSON
    (``prepare_brats``'s ``datalist.json``, section ``key``) or from a folder of 2D images
    (:func:`berdiff.data.images2d.list_images`, one ``{"image": file}`` item per file).

    Args:
        source: the datalist JSON file or the image folder.
        key: the datalist section (``training`` or ``validation``); unused for a folder.
        defer_missing: a missing file or folder gives an empty :class:`berdiff.io.MissingData` (the run reports it
            when it starts) instead of raising now.

    Raises:
        FileNotFoundError: the source is missing (and ``defer_missing`` is off).
        ValueError: the datalist cannot be read.
    """
    from monai.data import load_decathlon_datalist

    from berdiff.io.datalists import MissingData

    source = os.fspath(source)
    try:
        if os.path.isdir(source):
            from berdiff.data.images2d import list_images

            return [{"image": str(p)} for p in list_images(source)]
        if not os.path.isfile(source):
            raise FileNotFoundError(
                f"training data not found: {source} (set --dataset_dir to the output folder of "
                "`python -m berdiff prepare_brats`, or to a folder of images for the 2D bundle)."
            )
    except FileNotFoundError as e:
        if defer_missing:
            return MissingData(e)
        raise
    try:
        with open(source) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read datalist {source}: {e}") from e
    if not isinstance(content, dict) or not isinstance(content.get(key, []), list):
        raise ValueError(f"datalist {source}: expected a JSON object with a {key!r} list.")
    if key not in content:
        return []
    return load_decathlon_datalist(source, False, key)


def prepared_grid(
    source: str | os.PathLike, preset: str, spatial_size: int | Sequence[int] | str = "auto"
) -> dict[str, Any]:
    """
    The grid of the training slices, ``{"spatial_size": [H, W], "pixdim": float | None}``: what ``prepare_brats``
    recorded in ``datalist.json`` (the in-plane size and voxel size it resampled the volumes to), so that training
    pads/crops to the size the slices have and ``models/model.json`` tells inference to resample as in preparation.

    Args:
        source: the datalist JSON (or a folder of 2D images, which has no recorded grid).
        preset: the network preset (its size is used for ``"auto"`` when nothing is recorded).
        spatial_size: the training config's ``spatial_size``: ``"auto"`` (the recorded size) or an explicit one,
            which must equal the recorded size.

    Raises:
        ValueError: an explicit ``spatial_size`` other than the one the slices were prepared at.
    """
    from berdiff.networks.presets import preset_grid

    recorded: dict[str, Any] = {}
    source = os.fspath(source)
    if os.path.isfile(source):
        try:
            with open(source) as f:
                content = json.load(f)
            recorded = content if isinstance(content, dict) else {}
        except (OSError, ValueError):
            recorded = {}  # reported by training_datalist / the preflight
    size = recorded.get("spatial_size")
    grid = preset_grid(preset, spatial_size if size is None or spatial_size != "auto" else size, None)
    if size is not None and spatial_size != "auto" and [int(s) for s in size] != grid["spatial_size"]:
        raise ValueError(
            f"spatial_size = {spatial_size!r}, but the slices in {source} were prepared at {list(size)}: leave "
            "spatial_size at auto, or prepare the data again with that --spatial_size."
        )
    grid["pixdim"] = recorded.get("pixdim")
    return grid
