# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""Losses with constructor weights (``nn.Module``s usable as ``loss_function`` of MONAI trainers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["AutoencoderLoss"]


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
