# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Baselines for the benchmark harness, with the same output dict as :class:`berdiff.inferers.MaskedBernoulliInferer`
(``reconstruction`` and ``anomaly_map = sum_c (x_hat_c - x_c)^2``):

* :class:`AutoencoderReconstructionInferer`: the binarizing autoencoder's own reconstruction error (no diffusion);
* :class:`GaussianPartialNoisingInferer`: image-space Gaussian DDPM partial noising to level L, then denoising
  over K strided steps (AnoDDPM, Wyatt et al. 2022; Wolleb et al. 2022), with a MONAI ``DDPMScheduler``'s noise
  schedule and a MONAI ``DiffusionModelUNet`` trained to predict the noise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.inferers import Inferer
from monai.networks.schedulers import Scheduler

__all__ = ["AutoencoderReconstructionInferer", "GaussianPartialNoisingInferer", "partial_timesteps"]


def partial_timesteps(noise_level: int, num_inference_steps: int | None, num_train_timesteps: int) -> torch.Tensor:
    """
    Strictly decreasing timesteps from ``L - 1`` to 0 with (at most) ``K`` entries, evenly spaced and rounded.

    Args:
        noise_level: L, ``1 <= L <= num_train_timesteps``.
        num_inference_steps: K, ``1 <= K <= L`` (L when None).
        num_train_timesteps: T.
    """
    noise_level = int(noise_level)
    if not 1 <= noise_level <= num_train_timesteps:
        raise ValueError(f"noise_level (L) must be in [1, {num_train_timesteps}], got {noise_level}.")
    k = noise_level if num_inference_steps is None else int(num_inference_steps)
    if not 1 <= k <= noise_level:
        raise ValueError(f"num_inference_steps (K) must be in [1, L={noise_level}], got {k}.")
    steps = torch.linspace(noise_level - 1, 0, k).round().long()
    return torch.unique_consecutive(steps)


class AutoencoderReconstructionInferer(Inferer):
    """Anomaly map of the binary autoencoder alone: ``x_hat = clamp(D(1[E(x) > 0.5]), 0, 1)``."""

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, autoencoder: nn.Module, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """
        Args:
            inputs: (B, C, H, W) images in [0, 1].
            autoencoder: a binary autoencoder (``encode_stage_2_inputs`` / ``decode_stage_2_outputs``).

        Returns:
            dict with ``reconstruction`` and ``anomaly_map`` (B, 1, H, W).
        """
        if not torch.is_floating_point(inputs):
            raise TypeError(f"inputs must be a floating point tensor, got {inputs.dtype}.")
        recon = autoencoder.decode_stage_2_outputs(autoencoder.encode_stage_2_inputs(inputs)).float().clamp(0.0, 1.0)
        return {"reconstruction": recon, "anomaly_map": (recon - inputs.float()).pow(2).sum(dim=1, keepdim=True)}


class GaussianPartialNoisingInferer(Inferer):
    """
    Gaussian partial-noising reconstruction: images in [0, 1] are mapped to [-1, 1], noised to ``t = L - 1`` with
    ``q(x_t | x_0)``, and denoised over K strided timesteps with the DDIM update (Song et al. 2021)

    ``x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z``,
    ``sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)``,

    where ``x0_hat`` is clipped to [-1, 1]. ``eta = 0`` is deterministic (Wolleb et al. 2022 style); ``eta = 1`` with
    ``K = L`` is ancestral DDPM sampling (AnoDDPM style, Gaussian noise). The update is written here because MONAI's
    ``DDIMScheduler.step`` assumes a uniform stride over the full ``[0, T)`` range, while partial noising starts at
    ``L - 1``; the noise schedule (``alphas_cumprod``) and the forward noising come from the MONAI scheduler.

    Args:
        scheduler: the MONAI scheduler the network was trained with (``DDPMScheduler``, epsilon prediction).
        noise_level: L.
        num_inference_steps: K (L when None).
        eta: DDIM stochasticity in [0, 1].
    """

    def __init__(
        self, scheduler: Scheduler, noise_level: int = 200, num_inference_steps: int | None = None, eta: float = 0.0
    ) -> None:
        super().__init__()
        if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "add_noise"):
            raise TypeError(f"scheduler must be a MONAI noise scheduler, got {type(scheduler).__name__}.")
        if getattr(scheduler, "prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"only epsilon prediction is supported, got {scheduler.prediction_type!r}.")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}.")
        self.scheduler = scheduler
        self.noise_level = int(noise_level)
        self.eta = float(eta)
        self.timesteps = partial_timesteps(noise_level, num_inference_steps, scheduler.num_train_timesteps)
        self.num_inference_steps = len(self.timesteps)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: nn.Module,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            inputs: (B, C, H, W) images in [0, 1].
            diffusion_model: the noise-predicting ``DiffusionModelUNet``.
            generator: optional random generator (noise draws).

        Returns:
            dict with ``reconstruction`` (in [0, 1]) and ``anomaly_map`` (B, 1, H, W).
        """
        if not torch.is_floating_point(inputs):
            raise TypeError(f"inputs must be a floating point tensor, got {inputs.dtype}.")
        device = inputs.device
        ab = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        x0 = inputs.float() * 2.0 - 1.0
        batch = x0.shape[0]

        def randn() -> torch.Tensor:
            return torch.randn(x0.shape, generator=generator, device=device if generator is None else generator.device).to(device)

        t0 = self.timesteps[0]
        x = self.scheduler.add_noise(x0, randn(), t0.expand(batch).to(device))
        for i, t in enumerate(self.timesteps):
            eps = diffusion_model(x, timesteps=t.expand(batch).to(device)).float()
            ab_t = ab[t]
            x0_hat = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1.0, 1.0)
            if i + 1 == len(self.timesteps):
                x = x0_hat
                break
            ab_s = ab[self.timesteps[i + 1]]
            sigma = self.eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).clamp(min=0).sqrt()
            # re-derive eps from the clipped x0_hat so that the update stays consistent with the clipping
            eps = (x - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
            x = ab_s.sqrt() * x0_hat + (1 - ab_s - sigma**2).clamp(min=0).sqrt() * eps
            if self.eta > 0:
                x = x + sigma * randn()
        recon = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        return {"reconstruction": recon, "anomaly_map": (recon - inputs.float()).pow(2).sum(dim=1, keepdim=True)}
