# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Stage-1 augmentation with random foreign blobs (:func:`random_blobs`, :class:`BlobAugmentPrepareBatch`): the
autoencoder learns to reproduce intensities it never sees in healthy slices, so that an anomaly reaches the binary
code instead of being replaced by healthy tissue already in the encoder; healing it is then the diffusion model's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch, default_prepare_batch

__all__ = ["random_blobs", "BlobAugmentPrepareBatch"]


def _pair(name: str, value: Sequence[float], low: float, high: float | None = None) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not (low <= a <= b and (high is None or b <= high)):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a (min, max) pair with min <= max, each {bound}; got {tuple(value)}.")
    return a, b


def random_blobs(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    prob: float = 0.5,
    max_blobs: int = 3,
    radius: Sequence[float] = (0.03, 0.12),
    intensity: Sequence[float] = (0.0, 1.2),
    opacity: Sequence[float] = (0.5, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Paint random soft-edged ellipses into a batch of 2D images, inside their foreground (any channel > 0).

    Each sample gets blobs with probability ``prob`` (then 1 to ``max_blobs`` of them). A blob has semi-axes of
    ``radius`` times the image's smaller side, a random orientation, a one-pixel soft edge and, per channel, its own
    intensity drawn from ``intensity``; it replaces the image by ``(1 - a w) x + a w v`` with the opacity ``a`` and
    the edge weight ``w``. The background (zero in every channel) stays zero.

    Args:
        images: (B, C, H, W) floating point images.
        generator: random generator on the images' device (None: the global one).
        prob: probability that a sample gets blobs.
        max_blobs: most blobs per sample.
        radius: (min, max) semi-axis, as a fraction of min(H, W).
        intensity: (min, max) of the per-channel blob intensities.
        opacity: (min, max) of the blend weight at the blob's centre.

    Returns:
        the augmented images and the blob weight map (B, 1, H, W) in [0, 1] (where and how strongly they changed).
    """
    if images.ndim != 4 or not torch.is_floating_point(images):
        raise ValueError(f"images must be a floating point (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}.")
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}.")
    if int(max_blobs) < 1:
        raise ValueError(f"max_blobs must be >= 1, got {max_blobs}.")
    r_lo, r_hi = _pair("radius", radius, 0.0, 1.0)
    i_lo, i_hi = _pair("intensity", intensity, -math.inf)
    a_lo, a_hi = _pair("opacity", opacity, 0.0, 1.0)
    b, c, h, w = images.shape
    dev, k = images.device, int(max_blobs)

    def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator, device=dev)

    foreground = (images != 0).any(dim=1)  # (B, H, W)
    # blob centres: uniformly among each sample's foreground pixels (anywhere for an empty image)
    weights = foreground.flatten(1).float() + (~foreground.flatten(1).any(1, keepdim=True)).float()
    flat = torch.multinomial(weights, k, replacement=True, generator=generator)  # (B, K)
    cy, cx = (flat // w).float(), (flat % w).float()
    count = 1 + (uniform(b) * k).long().clamp(max=k - 1)  # 1..K blobs per sample
    active = (uniform(b) < prob)[:, None] & (torch.arange(k, device=dev)[None] < count[:, None])  # (B, K)
    side = float(min(h, w))
    axes = uniform(b, k, 2, lo=r_lo * side, hi=r_hi * side).clamp(min=1.0)
    angle = uniform(b, k, lo=0.0, hi=math.pi)
    values = uniform(b, k, c, lo=i_lo, hi=i_hi)
    alpha = uniform(b, k, lo=a_lo, hi=a_hi) * active
    yy = torch.arange(h, device=dev, dtype=torch.float32)[None, None, :, None]
    xx = torch.arange(w, device=dev, dtype=torch.float32)[None, None, None, :]
    dy, dx = yy - cy[..., None, None], xx - cx[..., None, None]  # (B, K, H, W)
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    u = (cos * dx + sin * dy) / axes[..., 0, None, None]
    v = (-sin * dx + cos * dy) / axes[..., 1, None, None]
    radial = torch.sqrt(u**2 + v**2)
    # one-pixel soft edge: the normalised radius changes by ~1 / (mean semi-axis) per pixel
    edge = torch.sigmoid((1.0 - radial) * axes.mean(-1)[..., None, None] * 2.0)
    blend = (alpha[..., None, None] * edge * foreground[:, None].float()).to(images.dtype)  # (B, K, H, W)
    out = images
    for j in range(k):
        wj = blend[:, j : j + 1]
        out = (1.0 - wj) * out + wj * values[:, j, :, None, None].to(images.dtype)
    out = torch.where(foreground[:, None], out, images)
    changed = 1.0 - torch.prod(1.0 - blend, dim=1, keepdim=True)
    return out, changed


class BlobAugmentPrepareBatch(PrepareBatch):
    """
    A MONAI ``PrepareBatch`` for stage 1 that paints :func:`random_blobs` into the batch and returns it as both the
    input and the reconstruction target (an autoencoder should reproduce what it is given).

    Healthy-only training otherwise teaches the autoencoder to turn everything into healthy tissue: an anomaly is then
    erased by the encoder, its code is a healthy code, and the masked diffusion has nothing to heal
    (``python -m berdiff autoencoder_check`` measures this). With ``prob=0`` it is the default ``prepare_batch``.

    Args:
        prob, max_blobs, radius, intensity, opacity: see :func:`random_blobs`.
        seed: seed of the generator (created on the batch's device on first use; offset by the rank under
            torch.distributed so that ranks draw different blobs). Not part of resume checkpoints.
    """

    def __init__(
        self,
        prob: float = 0.5,
        max_blobs: int = 3,
        radius: Sequence[float] = (0.03, 0.12),
        intensity: Sequence[float] = (0.0, 1.2),
        opacity: Sequence[float] = (0.5, 1.0),
        seed: int = 0,
    ) -> None:
        # checked here (with the message random_blobs gives) so that a bad config fails before training starts
        random_blobs(torch.zeros(1, 1, 2, 2), None, prob, max_blobs, radius, intensity, opacity)
        self.prob, self.max_blobs = float(prob), int(max_blobs)
        self.radius, self.intensity, self.opacity = tuple(radius), tuple(intensity), tuple(opacity)
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed + 1_000_003 * rank)
        return self._generator

    def __call__(
        self,
        batchdata: Any,
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if self.prob == 0.0:
            return image, image
        augmented, _ = random_blobs(
            image, self._generator_for(image.device), self.prob, self.max_blobs, self.radius, self.intensity,
            self.opacity,
        )
        return augmented, augmented
