# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The model description that travels with ``models/model.pt``: ``models/model.json`` (same stem), written by the
training export and read by inference, so that the network sizes (preset), image channels, slice size, the number of
diffusion timesteps T and the trained timestep range come from the model rather than from config values that must be
kept in sync by hand. Layout (format ``berdiff-pipeline-v1``)::

    {
        "format": "berdiff-pipeline-v1",
        "preset": "small",
        "in_channels": 4,
        "spatial_size": [96, 96],
        "pixdim": null,
        "latent_channels": 32,
        "denoiser_overrides": {},
        "num_train_timesteps": 1000,
        "schedule": "linear_beta",
        "prediction_type": "flip",
        "train_max_timestep": 400,
        "trained_iterations": 1234
    }

``train_max_timestep`` is null when all T timesteps were trained; ``trained_iterations`` is optional. ``pixdim`` is
the in-plane voxel size (mm) the training volumes were resampled to, null (or absent, in descriptions written before
it existed) when they kept their own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from berdiff.networks.presets import Preset
from berdiff.schedulers import BernoulliPredictionType
from berdiff.utils import atomic_write_json

__all__ = [
    "MODEL_DESCRIPTION_FORMAT",
    "description_path",
    "make_model_description",
    "write_model_description",
    "read_model_description",
    "check_noise_level",
    "inference_settings",
]

logger = logging.getLogger(__name__)

#: value of the ``format`` key
MODEL_DESCRIPTION_FORMAT = "berdiff-pipeline-v1"

_REQUIRED_KEYS = (
    "format",
    "preset",
    "in_channels",
    "spatial_size",
    "latent_channels",
    "denoiser_overrides",
    "num_train_timesteps",
    "schedule",
    "prediction_type",
    "train_max_timestep",
)


def description_path(model_path: os.PathLike | str) -> str:
    """The description file beside ``model_path``: the same stem with ``.json`` (``models/model.pt`` ->
    ``models/model.json``)."""
    return os.path.splitext(os.fspath(model_path))[0] + ".json"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(description: Any, source: str) -> dict[str, Any]:
    """Checks keys and types of a description; returns a copy with ``spatial_size`` as a list."""

    def fail(problem: str) -> ValueError:
        return ValueError(f"invalid model description {source}: {problem}")

    if not isinstance(description, Mapping):
        raise fail(f"expected a JSON object, got {type(description).__name__}.")
    d = dict(description)
    missing = [k for k in _REQUIRED_KEYS if k not in d]
    if missing:
        raise fail(f"missing key(s) {missing}.")
    if d["format"] != MODEL_DESCRIPTION_FORMAT:
        raise fail(f"format must be {MODEL_DESCRIPTION_FORMAT!r}, got {d['format']!r}.")
    presets = [str(p) for p in Preset.__members__.values()]
    if d["preset"] not in presets:
        raise fail(f"preset must be one of {presets}, got {d['preset']!r}.")
    for key in ("in_channels", "latent_channels", "num_train_timesteps"):
        if not _is_int(d[key]) or d[key] < 1:
            raise fail(f"{key} must be a positive integer, got {d[key]!r}.")
    size = d["spatial_size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) not in (2, 3)
        or not all(_is_int(s) and s > 0 for s in size)
    ):
        raise fail(f"spatial_size must be a list of 2 (or 3) positive integers, got {size!r}.")
    d["spatial_size"] = [int(s) for s in size]
    if not isinstance(d["denoiser_overrides"], Mapping):
        raise fail(f"denoiser_overrides must be an object, got {d['denoiser_overrides']!r}.")
    d["denoiser_overrides"] = dict(d["denoiser_overrides"])
    if not isinstance(d["schedule"], str) or not d["schedule"]:
        raise fail(f"schedule must be a non-empty string, got {d['schedule']!r}.")
    kinds = [str(p) for p in BernoulliPredictionType.__members__.values()]
    if d["prediction_type"] not in kinds:
        raise fail(f"prediction_type must be one of {kinds}, got {d['prediction_type']!r}.")
    top = d["train_max_timestep"]
    if top is not None and (not _is_int(top) or not 1 <= top <= d["num_train_timesteps"]):
        raise fail(f"train_max_timestep must be null or an integer in [1, num_train_timesteps = "
                   f"{d['num_train_timesteps']}], got {top!r}.")
    pixdim = d.get("pixdim")
    if pixdim is not None and (not isinstance(pixdim, (int, float)) or isinstance(pixdim, bool) or not pixdim > 0):
        raise fail(f"pixdim must be null or a positive number (mm), got {pixdim!r}.")
    d["pixdim"] = None if pixdim is None else float(pixdim)
    iterations = d.get("trained_iterations")
    if iterations is not None and (not _is_int(iterations) or iterations < 0):
        raise fail(f"trained_iterations must be null or a non-negative integer, got {iterations!r}.")
    return d


def make_model_description(
    preset: str,
    in_channels: int,
    spatial_size: int | Sequence[int],
    latent_channels: int,
    num_train_timesteps: int = 1000,
    train_max_timestep: int | None = None,
    schedule: str = "linear_beta",
    prediction_type: str = BernoulliPredictionType.FLIP,
    denoiser_overrides: Mapping[str, Any] | None = None,
    trained_iterations: int | None = None,
    pixdim: float | None = None,
) -> dict[str, Any]:
    """
    A validated description dict (the JSON layout of the module docstring).

    Args:
        preset: the :class:`~berdiff.networks.Preset` of both networks.
        in_channels: image channels.
        spatial_size: in-plane size the slices were trained at (an int means a square).
        latent_channels: bits per latent position (``autoencoder.latent_channels``).
        num_train_timesteps: T of the scheduler.
        train_max_timestep: end of the trained timestep range (None: all T).
        schedule: the scheduler's noise schedule name.
        prediction_type: the scheduler's prediction type.
        denoiser_overrides: extra keyword arguments given to ``denoiser_from_preset``.
        trained_iterations: number of stage-2 training iterations (informational).
        pixdim: in-plane voxel size (mm) the training volumes were resampled to (None: their own).
    """
    size = [int(spatial_size)] * 2 if isinstance(spatial_size, int) else [int(s) for s in spatial_size]
    description = {
        "format": MODEL_DESCRIPTION_FORMAT,
        "preset": str(preset),
        "in_channels": int(in_channels),
        "spatial_size": size,
        "pixdim": None if pixdim is None else float(pixdim),
        "latent_channels": int(latent_channels),
        "denoiser_overrides": dict(denoiser_overrides or {}),
        "num_train_timesteps": int(num_train_timesteps),
        "schedule": str(schedule),
        "prediction_type": str(prediction_type),
        "train_max_timestep": None if train_max_timestep is None else int(train_max_timestep),
    }
    if trained_iterations is not None:
        description["trained_iterations"] = int(trained_iterations)
    return _validate(description, "(being written)")


def write_model_description(model_path: os.PathLike | str, description: Mapping[str, Any]) -> None:
    """
    Validates ``description`` and writes it atomically to :func:`description_path` of ``model_path`` (UTF-8 JSON,
    indent 4, final newline).

    Raises:
        ValueError: when the description is invalid (nothing is written).
    """
    d = _validate(description, "(being written)")
    atomic_write_json(d, description_path(model_path), indent=4)


def read_model_description(model_path: os.PathLike | str, required: bool = False) -> dict[str, Any] | None:
    """
    Reads and validates the description beside ``model_path``.

    Args:
        model_path: the weights file (``models/model.pt``); the description is ``models/model.json``.
        required: raise when the description is missing instead of returning None.

    Raises:
        FileNotFoundError: missing description and ``required``.
        ValueError: unreadable JSON, missing keys or wrong types (the message names the file and the key).
    """
    import json

    path = description_path(model_path)
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"model description not found: {path} (written by the stage-2 training export).")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"invalid model description {path}: cannot read it as JSON ({e}).") from None
    return _validate(content, path)


def check_noise_level(description: Mapping[str, Any], noise_level: int) -> None:
    """
    Checks that the noise level L lies in the trained range ``[1, train_max_timestep or T]``: inference from L visits
    the timesteps ``L - 1, ..., 0``, and the denoiser never saw timesteps at or above ``train_max_timestep``.

    Raises:
        ValueError: naming L and the trained range.
    """
    total = int(description["num_train_timesteps"])
    top = description.get("train_max_timestep")
    end = total if top is None else int(top)
    if not _is_int(noise_level):
        raise ValueError(f"noise_level L must be an integer, got {noise_level!r}.")
    if not 1 <= noise_level <= end:
        why = f"train_max_timestep = {top}" if top is not None else f"T = {total}"
        raise ValueError(
            f"noise_level L = {noise_level} is outside the trained range [1, {end}] ({why}): the denoiser was only "
            f"trained on timesteps t < {end}; choose L <= {end} or train with a larger train_max_timestep."
        )


def inference_settings(
    model_path: os.PathLike | str,
    preset: str,
    in_channels: int,
    spatial_size: int | Sequence[int] | str,
    num_train_timesteps: int = 1000,
    noise_level: int | None = None,
    num_inference_steps: int | None = None,
    pixdim: float | str | None = "auto",
) -> dict[str, Any]:
    """
    The model settings inference uses: those of the model description beside ``model_path`` when it exists, else
    the given config values (the fallback for weights without a description). Used by ``configs/inference.yaml``
    (its ``model_settings``) and therefore by ``python -m berdiff calibrate``.

    Args:
        model_path: the weights (``models/model.pt``); it need not exist (config parsing, random-weight tests).
        preset: the config's preset (fallback).
        in_channels: the number of image channels the config's preprocessing produces (``len(modalities)``); must
            equal the description's.
        spatial_size: the config's in-plane size (fallback; an int means a square; ``"auto"``: the preset's, see
            :data:`berdiff.networks.PRESET_GRIDS`).
        num_train_timesteps: the config's T (fallback).
        noise_level: L; when given and the description has a trained range, checked with :func:`check_noise_level`.
        num_inference_steps: K; capped at L (None: L).
        pixdim: the config's in-plane voxel size in mm (fallback; None: the input's; ``"auto"``: the preset's).

    Returns:
        a dict with ``preset``, ``in_channels``, ``spatial_size`` (list), ``pixdim``, ``num_train_timesteps``, ``schedule``,
        ``prediction_type``, ``latent_channels`` (None without a description: the preset's),
        ``denoiser_overrides``, ``train_max_timestep``, ``num_inference_steps`` (K after capping, None when L is not
        given and K is None) and ``description`` (the path of the description used, or None).

    Raises:
        ValueError: invalid description, channel mismatch, or L outside the trained range.
    """
    from berdiff.networks.presets import preset_grid

    description = read_model_description(model_path)
    grid = preset_grid(
        str(description["preset"] if description else preset), "auto" if spatial_size is None else spatial_size, pixdim
    )
    size = [int(s) for s in grid["spatial_size"]]
    if description is None:
        settings: dict[str, Any] = {
            "preset": str(preset),
            "in_channels": int(in_channels),
            "spatial_size": size,
            "pixdim": grid["pixdim"],
            "num_train_timesteps": int(num_train_timesteps),
            "schedule": "linear_beta",
            "prediction_type": str(BernoulliPredictionType.FLIP),
            "latent_channels": None,
            "denoiser_overrides": {},
            "train_max_timestep": None,
            "description": None,
        }
    else:
        if description["in_channels"] != int(in_channels):
            raise ValueError(
                f"{description_path(model_path)}: the model takes {description['in_channels']} image channel(s), "
                f"but the config's preprocessing gives {in_channels} (modalities): use a model trained on the same "
                "modalities."
            )
        settings = {k: description[k] for k in _REQUIRED_KEYS if k != "format"}
        settings["pixdim"] = description.get("pixdim")
        settings["description"] = description_path(model_path)
        for key, mine, theirs in (("preset", preset, settings["preset"]), ("spatial_size", size, settings["spatial_size"]),
                                  ("pixdim", grid["pixdim"], settings["pixdim"])):
            if mine != theirs:
                logger.info(f"{key}: {theirs!r} from {settings['description']} (the config's {mine!r} is not used).")
    steps = num_inference_steps
    if noise_level is not None:
        if description is not None:
            check_noise_level(description, noise_level)
        if steps is not None and _is_int(noise_level) and int(steps) > noise_level:
            steps = noise_level  # K <= L: the default K is capped for small L
    settings["num_inference_steps"] = None if steps is None else int(steps)
    return settings
