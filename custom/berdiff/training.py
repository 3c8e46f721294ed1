# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""Small helpers called by the bundle's training configs (two-stage training, resume, export of ``models/model.pt``)."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines import AdversarialTrainer, SupervisedTrainer
from monai.inferers import Inferer
from monai.losses import PatchAdversarialLoss
from monai.utils import AdversarialKeys

from berdiff.model_description import description_path, make_model_description, write_model_description
from berdiff.networks.anomaly_pipeline import AnomalyPipeline
from berdiff.trainers import Precision, build_trainer, resolve_precision

__all__ = [
    "ReconstructionInferer",
    "DelayedAdversarialLoss",
    "autoencoder_trainer",
    "training_loss_output",
    "training_datalist",
    "init_distributed",
    "load_weights",
    "latest_checkpoint",
    "save_state_dict",
    "export_pipeline",
    "ExportPipeline",
]


class ReconstructionInferer(Inferer):
    """Runs the autoencoder and returns only its reconstruction (the first element of a tuple output)."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = network(inputs, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class DelayedAdversarialLoss(nn.Module):
    """
    PatchGAN adversarial loss (MONAI ``PatchAdversarialLoss``) that is zero before ``start_iteration``, shaped for
    MONAI's ``AdversarialTrainer``: ``g_loss_function(fake_logits)`` and ``d_loss_function(real_logits,
    fake_logits)``. The iteration is taken from the trainer it is attached to (put it in ``train_handlers``).

    Args:
        for_discriminator: discriminator loss (two arguments) instead of the generator loss (one argument).
        weight: factor of the loss once started.
        start_iteration: first trainer iteration (1-based) at which the loss is active.
        criterion: ``"hinge"`` (the reference), ``"least_squares"`` or ``"bce"``.
    """

    def __init__(
        self, for_discriminator: bool, weight: float = 1.0, start_iteration: int = 0, criterion: str = "hinge"
    ) -> None:
        super().__init__()
        if weight < 0 or start_iteration < 0:
            raise ValueError(f"weight and start_iteration must be >= 0, got {weight}, {start_iteration}.")
        self.for_discriminator = for_discriminator
        self.weight = weight
        self.start_iteration = int(start_iteration)
        self.loss = PatchAdversarialLoss(criterion=criterion, reduction="mean")
        self.iteration = 0

    def attach(self, engine: Engine) -> None:
        """Track ``engine.state.iteration``."""
        engine.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(self, "iteration", e.state.iteration))

    @staticmethod
    def _last(logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return logits[-1] if isinstance(logits, (list, tuple)) else logits  # PatchDiscriminator returns all features

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], fake_logits: Any = None) -> torch.Tensor:
        first = self._last(logits)
        active = self.iteration >= self.start_iteration and self.weight > 0
        if self.for_discriminator:
            if fake_logits is None:
                raise ValueError("the discriminator loss needs real and fake logits.")
            fake = self._last(fake_logits)
            if not active:
                return (first.sum() + fake.sum()) * 0.0  # keeps the graph so that backward() works
            real_loss = self.loss(first.float(), target_is_real=True, for_discriminator=True)
            fake_loss = self.loss(fake.float(), target_is_real=False, for_discriminator=True)
            return self.weight * 0.5 * (real_loss + fake_loss)
        if not active:
            return first.sum() * 0.0
        return self.weight * self.loss(first.float(), target_is_real=True, for_discriminator=False)


def autoencoder_trainer(
    adversarial: bool,
    device: torch.device | str,
    max_epochs: int,
    train_data_loader: Any,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_function: nn.Module,
    d_network: nn.Module | None = None,
    d_optimizer: torch.optim.Optimizer | None = None,
    g_adv_loss: nn.Module | None = None,
    d_adv_loss: nn.Module | None = None,
    precision: str = "auto",
    channels_last: bool | None = None,
    compile: bool = False,
    **kwargs: Any,
) -> SupervisedTrainer | AdversarialTrainer:
    """
    The stage-1 trainer: MONAI ``SupervisedTrainer`` (L1 only, through :func:`berdiff.trainers.build_trainer`), or
    ``AdversarialTrainer`` with a PatchGAN
    discriminator when ``adversarial`` is True.

    Args:
        adversarial: add the adversarial loss (needs ``d_network``, ``d_optimizer``, ``g_adv_loss``, ``d_adv_loss``).
        device, max_epochs, train_data_loader: as for MONAI trainers.
        network: the autoencoder (the generator).
        optimizer: its optimiser.
        loss_function: the reconstruction loss.
        d_network: the discriminator.
        d_optimizer: its optimiser.
        g_adv_loss: generator adversarial loss (e.g. :class:`DelayedAdversarialLoss`), attached to the trainer.
        d_adv_loss: discriminator adversarial loss, attached to the trainer.
        precision, channels_last, compile: see :func:`berdiff.trainers.build_trainer` (the adversarial trainer
            takes only the precision).
        kwargs: other trainer arguments (``inferer`` is passed as ``g_inferer`` to the adversarial trainer).
    """
    if not adversarial:
        return build_trainer(
            device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
            optimizer=optimizer, loss_function=loss_function, precision=precision, channels_last=channels_last,
            compile=compile, **kwargs,
        )
    missing = [n for n, v in {"d_network": d_network, "d_optimizer": d_optimizer, "g_adv_loss": g_adv_loss,
                              "d_adv_loss": d_adv_loss}.items() if v is None]
    if missing:
        raise ValueError(f"adversarial training needs {', '.join(missing)}.")
    kwargs["g_inferer"] = kwargs.pop("inferer", None) or ReconstructionInferer()
    bf16 = resolve_precision(precision, device) == Precision.BF16
    kwargs.update(amp=bf16, amp_kwargs={"dtype": torch.bfloat16} if bf16 else None)
    trainer = AdversarialTrainer(
        device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, g_network=network,
        g_optimizer=optimizer, g_loss_function=g_adv_loss, recon_loss_function=loss_function, d_network=d_network,
        d_optimizer=d_optimizer, d_loss_function=d_adv_loss, **kwargs,
    )
    for loss in (g_adv_loss, d_adv_loss):
        if hasattr(loss, "attach"):
            loss.attach(trainer)
    # the trainer's state_dict would otherwise hold the networks and optimisers themselves (not loadable with
    # weights_only=True); they are checkpointed separately, so keep only the progress (epoch, iteration)
    trainer._state_dict_user_keys.clear()
    return trainer


def training_loss_output(output: Mapping[str, Any]) -> float | dict[str, float]:
    """
    ``output_transform`` for ``StatsHandler`` / ``TensorBoardStatsHandler`` of the stage-1 trainers (``decollate``
    off): the loss of ``SupervisedTrainer``; the reconstruction, generator and discriminator losses of
    ``AdversarialTrainer``.
    """
    if AdversarialKeys.RECONSTRUCTION_LOSS in output:
        keys = (AdversarialKeys.RECONSTRUCTION_LOSS, AdversarialKeys.GENERATOR_LOSS, AdversarialKeys.DISCRIMINATOR_LOSS)
        return {f"train_{k}": float(torch.as_tensor(output[k]).detach()) for k in keys if k in output}
    return float(torch.as_tensor(output["loss"]).detach())


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

    from berdiff.io import MissingData

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


def init_distributed() -> bool:
    """
    Initialises the default process group of the multi-process training configs: from the environment that
    ``torchrun`` sets (NCCL on GPUs, gloo on CPU), or, when the process was not started by ``torchrun``, as a group
    of one process (so that the configuration also builds and runs as a plain single-process job).

    Returns:
        True when a group was initialised now, False when one already existed.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


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
    from berdiff.io import check_state_dict, load_state_dict

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


def save_state_dict(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Saves ``state`` with ``torch.save`` atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".pt.tmp")
    os.close(fd)
    try:
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        )
    pipeline = AnomalyPipeline(autoencoder, unet)
    state = {k: v.detach().cpu() for k, v in pipeline.state_dict().items()}
    save_state_dict(state, path)
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
