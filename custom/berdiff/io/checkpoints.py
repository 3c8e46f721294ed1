# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Model weights read safely (``weights_only=True``) and checked against the network they are loaded into, naming the
first differing parameter, or the preset and channels the file was trained with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from berdiff.networks.presets import Preset

__all__ = [
    "load_state_dict",
    "check_state_dict",
    "check_checkpoint",
    "identify_preset",
    "load_pipeline_weights",
    "PipelineCheckpointLoader",
]


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


def _pipeline_shapes(preset: str, in_channels: int, latent_channels: int | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the bundle's ``AnomalyPipeline`` for ``preset``, built on the meta device (no memory)."""
    from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset

    overrides = {} if latent_channels is None else {"latent_channels": latent_channels}
    with torch.device("meta"):
        autoencoder = autoencoder_from_preset(preset, in_channels=in_channels, **overrides)
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


_FIRST_CONV = "autoencoder.encoder.blocks.0.conv.weight"
_LATENT_CONV = "autoencoder.to_logits.conv.weight"


def identify_preset(state: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """
    The ``(preset, in_channels)`` of an AnomalyPipeline state dict (flat ``models/model.pt``) whose keys and shapes
    match one of the presets exactly, or None.
    """
    if _FIRST_CONV not in state or _LATENT_CONV not in state:
        return None
    in_channels = int(state[_FIRST_CONV].shape[1])
    latent_channels = int(state[_LATENT_CONV].shape[0])
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for preset in Preset.__members__.values():
        try:
            if _pipeline_shapes(str(preset), in_channels, latent_channels) == shapes:
                return str(preset), in_channels
        except (ValueError, TypeError, RuntimeError):
            continue
    return None


def _describe(preset: str | None, in_channels: int | None) -> str:
    text = f"preset {preset!r}" if preset is not None else "an unknown network size"
    return text + (f" with {in_channels} image channel(s)" if in_channels is not None else "")


def _mismatch_error(
    model_path: os.PathLike | str, state: Mapping[str, torch.Tensor], preset: str | None, in_channels: int | None,
    detail: str,
) -> ValueError:
    found = identify_preset(state)
    trained = _describe(*found) if found is not None else "networks of no known preset"
    hint = ""
    if found is not None:
        hint = f" Set --preset {found[0]} (or keep the model.json written by training beside it)."
        if in_channels is not None and found[1] != in_channels:
            hint = f" Use it with {found[1]}-channel images and --preset {found[0]}."
    lines = [line.strip() for line in detail.splitlines()[1:] if line.strip()]
    lines.sort(key=lambda line: not line.startswith("size mismatch"))  # the most telling difference first
    first = f" First difference: {lines[0][:200]}{'...' if len(lines[0]) > 200 else ''}" if lines else ""
    return ValueError(
        f"{model_path} does not fit the network the config builds: model.pt was trained with {trained}, the config "
        f"builds {_describe(preset, in_channels)}.{hint}{first}"
    )


def _is_state_mismatch(error: RuntimeError) -> bool:
    return "Error(s) in loading state_dict" in str(error)


def load_pipeline_weights(
    network: nn.Module,
    model_path: os.PathLike | str,
    map_location: torch.device | str | None = "cpu",
    preset: str | None = None,
    in_channels: int | None = None,
) -> nn.Module:
    """
    Loads a flat ``models/model.pt`` into ``network`` (strict); when the weights do not fit, raises one ValueError
    naming the preset the weights were trained with (found from their shapes) and the one the config builds.

    Args:
        network: the :class:`~berdiff.networks.AnomalyPipeline`.
        model_path: the weights file.
        map_location: device of the loaded tensors.
        preset: the preset the config builds (for the message).
        in_channels: the image channels the config builds (for the message).
    """
    state = torch.load(os.fspath(model_path), map_location=map_location, weights_only=True)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        if not _is_state_mismatch(e):
            raise
        raise _mismatch_error(model_path, state, preset, in_channels, str(e)) from None
    return network


class PipelineCheckpointLoader(CheckpointLoader):
    """
    MONAI ``CheckpointLoader`` for the flat ``models/model.pt`` whose error, when the weights do not fit the network
    (another preset or channel count), names the preset the weights were trained with and the one the config builds.

    Args:
        load_path: the weights file.
        load_dict: ``{"model": network}``.
        preset: the preset the config builds (for the message).
        in_channels: the image channels the config builds (for the message).
        kwargs: other ``CheckpointLoader`` arguments (``map_location``, ``strict``, ...).
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        preset: str | None = None,
        in_channels: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(load_path, load_dict, **kwargs)
        self.preset = preset
        self.in_channels = in_channels

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except RuntimeError as e:
            if not _is_state_mismatch(e):
                raise
            state = torch.load(self.load_path, map_location="cpu", weights_only=True)
            raise _mismatch_error(self.load_path, state, self.preset, self.in_channels, str(e)) from None
