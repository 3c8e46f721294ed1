# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Weights in and out of training: loading a stage's weights, resuming, and exporting ``models/model.pt``."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from ignite.engine import Engine, Events

from berdiff.model_description import description_path, make_model_description, write_model_description
from berdiff.networks.anomaly_pipeline import AnomalyPipeline
from berdiff.utils import atomic_save_torch

__all__ = ["load_weights", "latest_checkpoint", "export_pipeline", "ExportPipeline"]


def load_weights(
    module: nn.Module, path: str | Sequence[str], key: str | None = None, missing_ok: bool = False
) -> nn.Module:
    """
    Loads a flat state dict (``torch.load(weights_only=True)``) into ``module`` (strict) and returns the module.

    Args:
        module: the network.
        path: checkpoint file, or candidate files of which the first existing one is used.
        key: optional entry of a nested checkpoint.
        missing_ok: a missing file leaves ``module`` as it is (the configuration still builds; the training
            configs' :func:`berdiff.handlers.training_preflight` stops the run before any step).

    Raises:
        FileNotFoundError: no candidate file exists (and ``missing_ok`` is off).
        ValueError: the file is not a state dict of ``module`` (see :func:`berdiff.io.check_state_dict`).
    """
    from berdiff.io.checkpoints import check_state_dict, load_state_dict

    candidates = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        if missing_ok:
            return module
        names = ", ".join(map(str, candidates))
        raise FileNotFoundError(f"checkpoint not found: {names} (train the earlier stage first).")
    state = load_state_dict(found, key=key)
    check_state_dict(state, module, found)
    module.load_state_dict(state)
    return module


def latest_checkpoint(ckpt_dir: str, prefix: str = "checkpoint") -> str:
    """
    The most recently written ``<prefix>*.pt`` in ``ckpt_dir`` (the file ``--resume True`` continues from).

    Raises:
        FileNotFoundError: when there is none.
    """
    files = glob.glob(os.path.join(glob.escape(os.fspath(ckpt_dir)), f"{prefix}*.pt"))
    if not files:
        raise FileNotFoundError(f"no '{prefix}*.pt' checkpoint to resume from in {ckpt_dir}.")
    return max(files, key=lambda f: (os.path.getmtime(f), f))


def export_pipeline(
    autoencoder: nn.Module,
    unet: nn.Module,
    path: str,
    preset: str | None = None,
    in_channels: int | None = None,
    spatial_size: int | Sequence[int] | None = None,
    num_train_timesteps: int = 1000,
    train_max_timestep: int | None = None,
    schedule: str = "linear_beta",
    prediction_type: str = "flip",
    denoiser_overrides: Mapping[str, Any] | None = None,
    trained_iterations: int | None = None,
    pixdim: float | None = None,
) -> None:
    """
    Writes the flat :class:`AnomalyPipeline` state dict (keys ``autoencoder.*``, ``unet.*``; tensors only) and, when
    ``preset`` is given, the model description beside it (``model.json``, :mod:`berdiff.model_description`), both
    atomically. Without ``preset`` a stale description beside ``path`` is removed (it would describe other weights).

    Args:
        autoencoder: the frozen stage-1 autoencoder.
        unet: the denoiser.
        path: the weights file (``models/model.pt``).
        preset: the preset of both networks (None: no description).
        in_channels: image channels (the autoencoder's ``in_channels`` when None).
        spatial_size: in-plane training size (int or [H, W]); required with ``preset``.
        num_train_timesteps: T.
        train_max_timestep: end of the trained timestep range (None: all T).
        schedule: the scheduler's noise schedule.
        prediction_type: the scheduler's prediction type.
        denoiser_overrides: extra ``denoiser_from_preset`` arguments used in training.
        trained_iterations: stage-2 iterations (informational).
        pixdim: in-plane voxel size (mm) the training volumes were resampled to (None: their own).
    """
    description = None
    if preset is not None:
        if spatial_size is None:
            raise ValueError("export_pipeline needs spatial_size to describe the model (preset is set).")
        description = make_model_description(
            preset=preset,
            in_channels=int(getattr(autoencoder, "in_channels", 0)) if in_channels is None else in_channels,
            spatial_size=spatial_size,
            latent_channels=int(getattr(autoencoder, "latent_channels", getattr(unet, "in_channels", 0))),
            num_train_timesteps=num_train_timesteps,
            train_max_timestep=train_max_timestep,
            schedule=schedule,
            prediction_type=prediction_type,
            denoiser_overrides=denoiser_overrides,
            trained_iterations=trained_iterations,
            pixdim=pixdim,
        )
    pipeline = AnomalyPipeline(autoencoder, unet)
    state = {k: v.detach().cpu() for k, v in pipeline.state_dict().items()}
    atomic_save_torch(state, path)
    if description is not None:
        write_model_description(path, description)
    elif os.path.isfile(description_path(path)):
        os.remove(description_path(path))


class ExportPipeline:
    """
    Handler writing the combined ``models/model.pt`` and its description ``models/model.json``
    (:func:`export_pipeline`) when the trainer completes.

    Args:
        autoencoder: the frozen stage-1 autoencoder.
        unet: the denoiser to export (the EMA copy).
        filepath: output file.
        enabled: False to skip (e.g. on ranks other than 0).
        preset: the preset of both networks (None: no ``model.json``).
        in_channels: image channels (the autoencoder's when None).
        spatial_size: in-plane training size (int or [H, W]).
        num_train_timesteps: T.
        train_max_timestep: end of the trained timestep range (None: all T).
        schedule: the scheduler's noise schedule.
        prediction_type: the scheduler's prediction type.
        denoiser_overrides: extra ``denoiser_from_preset`` arguments used in training.
        pixdim: in-plane voxel size (mm) the training volumes were resampled to (None: their own).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        unet: nn.Module,
        filepath: str,
        enabled: bool = True,
        preset: str | None = None,
        in_channels: int | None = None,
        spatial_size: int | Sequence[int] | None = None,
        num_train_timesteps: int = 1000,
        train_max_timestep: int | None = None,
        schedule: str = "linear_beta",
        prediction_type: str = "flip",
        denoiser_overrides: Mapping[str, Any] | None = None,
        pixdim: float | None = None,
    ) -> None:
        self.autoencoder = autoencoder
        self.unet = unet
        self.filepath = filepath
        self.enabled = enabled
        self.description_args = {
            "preset": preset,
            "in_channels": in_channels,
            "spatial_size": spatial_size,
            "num_train_timesteps": num_train_timesteps,
            "train_max_timestep": train_max_timestep,
            "schedule": schedule,
            "prediction_type": prediction_type,
            "denoiser_overrides": denoiser_overrides,
            "pixdim": pixdim,
        }

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.enabled:
            export_pipeline(
                self.autoencoder, self.unet, self.filepath, trained_iterations=engine.state.iteration,
                **self.description_args,
            )
            engine.logger.info(f"wrote the combined pipeline weights to {self.filepath}")
