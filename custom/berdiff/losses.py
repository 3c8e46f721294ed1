# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Losses with constructor weights (``nn.Module``s usable as ``loss_function`` of MONAI trainers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from berdiff.schedulers import BernoulliScheduler

__all__ = ["AutoencoderLoss", "timestep_only_bce"]


class AutoencoderLoss(nn.Module):
    """
    Stage-1 loss of the binarizing autoencoder: ``l1_weight * mean|x_hat - x| + code_weight * mean(p (1 - p))``.
    The reference trains with L1 only (its code regulariser has weight 0); the optional term pushes the bit
    probabilities ``p`` towards 0 or 1.

    Args:
        l1_weight: weight of the L1 reconstruction term.
        code_weight: weight of the bit-entropy surrogate ``p (1 - p)``.
    """

    def __init__(self, l1_weight: float = 1.0, code_weight: float = 0.0) -> None:
        super().__init__()
        if l1_weight < 0 or code_weight < 0:
            raise ValueError(f"loss weights must be non-negative, got l1_weight={l1_weight}, code_weight={code_weight}.")
        self.l1_weight = l1_weight
        self.code_weight = code_weight

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: the autoencoder's ``(reconstruction, probabilities, code)`` or a reconstruction tensor alone.
            target: the input image.
        """
        if isinstance(pred, torch.Tensor):
            recon, probs = pred, None
        else:
            recon, probs = pred[0], pred[1]
        if recon.shape != target.shape:
            raise ValueError(f"reconstruction shape {tuple(recon.shape)} != target shape {tuple(target.shape)}.")
        loss = self.l1_weight * (recon.float() - target.float()).abs().mean()
        if self.code_weight > 0:
            if probs is None:
                raise ValueError("code_weight > 0 needs the bit probabilities: pass the autoencoder's full output.")
            loss = loss + self.code_weight * (probs * (1 - probs)).mean()
        return loss


def timestep_only_bce(scheduler: BernoulliScheduler, max_timestep: int | None = None) -> float:
    """
    Expected flip BCE (in nats, as ``BCEWithLogitsLoss``) of the best predictor that sees only the timestep: the
    flip target is Bernoulli(p_t) with p_t = (1 - alpha_bar_t) / 2 whatever the code, so that predictor outputs p_t
    and scores the binary entropy H(p_t), averaged over the uniformly drawn training timesteps ``[0, max_timestep)``.
    A trained denoiser whose loss does not go below this value has learned nothing about the codes.

    Args:
        scheduler: the training :class:`~berdiff.schedulers.BernoulliScheduler`.
        max_timestep: the training range's end (default: all ``num_train_timesteps``).

    Raises:
        ValueError: when ``max_timestep`` is outside ``[1, num_train_timesteps]``.
    """
    total = scheduler.num_train_timesteps
    end = total if max_timestep is None else int(max_timestep)
    if not 1 <= end <= total:
        raise ValueError(f"max_timestep must be in [1, {total}], got {max_timestep}.")
    p = ((1.0 - scheduler.alphas_cumprod[:end].double()) / 2).clamp(1e-12, 1 - 1e-12)
    return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())
