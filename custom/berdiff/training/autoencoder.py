# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Stage 1: the autoencoder trainer with the delayed PatchGAN loss, and the reconstruction inferer of its validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines import AdversarialTrainer, SupervisedTrainer
from monai.inferers import Inferer
from monai.losses import PatchAdversarialLoss
from monai.utils import AdversarialKeys

from berdiff.training.trainers import Precision, build_trainer, resolve_precision

__all__ = ["ReconstructionInferer", "DelayedAdversarialLoss", "autoencoder_trainer", "training_loss_output"]


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
    The stage-1 trainer: MONAI ``SupervisedTrainer`` (L1 only, through :func:`berdiff.training.build_trainer`), or
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
        precision, channels_last, compile: see :func:`berdiff.training.build_trainer` (the adversarial trainer
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
