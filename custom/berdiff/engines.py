# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Engine helpers: batch preparation for Bernoulli diffusion training with MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.engines.utils import DiffusionPrepareBatch, default_prepare_batch

from berdiff.schedulers import BernoulliPredictionType, BernoulliScheduler

__all__ = ["BernoulliPrepareBatch"]


class BernoulliPrepareBatch(DiffusionPrepareBatch):
    """
    ``prepare_batch`` for Bernoulli diffusion training: uniform noise in [0, 1), uniform timesteps in [0, T), and the
    flip mask ``1[noise < (1 - alpha_bar_t) / 2] = x_t XOR x_0`` as target (or ``x_0`` for ``"sample"`` prediction).
    Used with ``SupervisedTrainer(network=unet, inferer=DiffusionInferer(scheduler),
    loss_function=torch.nn.BCEWithLogitsLoss(), prepare_batch=BernoulliPrepareBatch(scheduler))``.

    Args:
        scheduler: the :class:`BernoulliScheduler` (its ``num_train_timesteps`` sets the timestep range).
        autoencoder: optional frozen binary autoencoder; when given, the batch's images are encoded on the fly to
            binary codes (``encode_stage_2_inputs``, no gradient) and the codes are diffused. When None, the batch
            must already hold binary codes (pre-encoded).
        condition_name: optional batch key passed to the inferer as ``condition``.
        max_timestep: timesteps are drawn uniformly from ``[0, max_timestep)`` (default: all ``num_train_timesteps``).
            Masked inference from noise level L only visits ``t < L``, so a short training run can spend its
            iterations there; the network still embeds the raw timestep, so the model is valid for any ``L <=
            max_timestep``.
        check_every_batch: check that every batch holds binary codes; when False (the default) only the first batch
            is checked (the check reads a value back to the host, which would stall a GPU every iteration).
    """

    def __init__(
        self,
        scheduler: BernoulliScheduler,
        autoencoder: nn.Module | None = None,
        condition_name: str | None = None,
        max_timestep: int | None = None,
        check_every_batch: bool = False,
    ) -> None:
        if not isinstance(scheduler, BernoulliScheduler):
            raise TypeError(f"scheduler must be a BernoulliScheduler, got {type(scheduler).__name__}.")
        total = scheduler.num_train_timesteps
        if max_timestep is not None and not 1 <= int(max_timestep) <= total:
            raise ValueError(f"max_timestep must be in [1, {total}], got {max_timestep}.")
        super().__init__(num_train_timesteps=total if max_timestep is None else int(max_timestep), condition_name=condition_name)
        self.scheduler = scheduler
        self.autoencoder = autoencoder
        self.check_every_batch = check_every_batch
        self._checked = False

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        """Uniform noise in [0, 1) (the Bernoulli forward process draws bit flips from it)."""
        return torch.rand_like(images, dtype=torch.float32)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Flip mask (float 0/1) for ``"flip"`` prediction, the clean code for ``"sample"`` prediction."""
        if not self._checked and not torch.all((images == 0) | (images == 1)):
            raise ValueError(
                "BernoulliPrepareBatch expects binary codes under 'image'; got non-binary values. Pass the frozen "
                "autoencoder as `autoencoder=` to encode images on the fly, or pre-encode them."
            )
        self._checked = self.check_every_batch is False
        if self.scheduler.prediction_type == BernoulliPredictionType.SAMPLE:
            return images.float()
        return (noise < self.scheduler.flip_prob(timesteps, images)).float()

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        if self.autoencoder is None:
            return super().__call__(batchdata, device, non_blocking, **kwargs)
        images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        self.autoencoder.eval()
        with torch.no_grad():
            codes = self.autoencoder.encode_stage_2_inputs(images)
        data = dict(batchdata) if isinstance(batchdata, dict) else {}
        data["image"] = codes
        return super().__call__(data, device, non_blocking, **kwargs)
