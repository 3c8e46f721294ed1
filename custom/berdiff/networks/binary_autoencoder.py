# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Binarizing autoencoder composed from MONAI's ``autoencoderkl`` encoder and decoder blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from monai.utils import StrEnum, ensure_tuple_rep, look_up_option

__all__ = ["BinarizationMode", "BinaryQuantizer", "BinaryAutoencoder"]


class BinarizationMode(StrEnum):
    """
    How probabilities become bits.

    bernoulli: sample ``z ~ B(p)`` (stochastic code).
    threshold: ``z = 1[p > threshold]`` (deterministic code).
    """

    BERNOULLI = "bernoulli"
    THRESHOLD = "threshold"


def _check_mode(name: str, value: str) -> BinarizationMode:
    try:
        return look_up_option(value, BinarizationMode)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in BinarizationMode]}, got {value!r}.") from None


class BinaryQuantizer(nn.Module):
    """
    Bernoulli bottleneck: bits from probabilities with a straight-through gradient ``z + p - sg(p)``.

    Args:
        train_mode: :class:`BinarizationMode` used in training mode (default: Bernoulli sampling, as the reference).
        eval_mode: :class:`BinarizationMode` used in eval mode (default: threshold, deterministic codes).
        threshold: probability threshold of the ``threshold`` mode.
    """

    def __init__(
        self,
        train_mode: str = BinarizationMode.BERNOULLI,
        eval_mode: str = BinarizationMode.THRESHOLD,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.train_mode = _check_mode("train_mode", train_mode)
        self.eval_mode = _check_mode("eval_mode", eval_mode)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
        self.threshold = threshold

    def forward(self, probs: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """
        Args:
            probs: bit probabilities in [0, 1].
            mode: overrides the train/eval mode for this call.

        Returns:
            binary code (values exactly 0 or 1) whose gradient w.r.t. ``probs`` is the identity.
        """
        mode = (self.train_mode if self.training else self.eval_mode) if mode is None else _check_mode("mode", mode)
        with torch.autocast(device_type=probs.device.type, enabled=False):
            probs = probs.float()
            if mode == BinarizationMode.BERNOULLI:
                bits = torch.bernoulli(probs.detach())
            else:
                bits = (probs.detach() > self.threshold).float()
            return bits + (probs - probs.detach())  # exact bits forward, identity gradient


class BinaryAutoencoder(nn.Module):
    """
    Autoencoder with a binary latent code, as used by masked Bernoulli diffusion (Wolleb et al., MICCAI 2024,
    https://arxiv.org/abs/2403.11667). Encoder: MONAI ``autoencoderkl.Encoder`` -> 1x1 projection to
    ``latent_channels`` logits -> sigmoid probabilities -> :class:`BinaryQuantizer`. Decoder: bias-free 1x1
    projection of the bits -> GroupNorm -> MONAI ``autoencoderkl.Decoder``, with no final activation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: number of image channels (1 for IXI/OCT, 4 for BraTS).
        out_channels: number of reconstructed channels; ``in_channels`` when None.
        channels: widths of the resolution levels; the code is ``2 ** (len(channels) - 1)`` times smaller.
        latent_channels: number of bits per latent position.
        hidden_channels: width of the encoder output and of the decoder input (256 in the reference).
        num_res_blocks: residual blocks per level (int or one per level).
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        attention_levels: attention per level (default: none).
        with_nonlocal_attn: attention in the mid blocks of encoder and decoder.
        train_mode: binarization in training mode (see :class:`BinarizationMode`).
        eval_mode: binarization in eval mode.
        threshold: probability threshold of the deterministic code.
        use_flash_attention: use PyTorch's scaled-dot-product attention in the attention blocks.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (32, 64, 64, 128),
        latent_channels: int = 128,
        hidden_channels: int = 256,
        num_res_blocks: Sequence[int] | int = 2,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        attention_levels: Sequence[bool] | None = None,
        with_nonlocal_attn: bool = True,
        train_mode: str = BinarizationMode.BERNOULLI,
        eval_mode: str = BinarizationMode.THRESHOLD,
        threshold: float = 0.5,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or latent_channels < 1:
            raise ValueError(f"in_channels and latent_channels must be positive, got {in_channels}, {latent_channels}.")
        for name, width in [("channels", c) for c in channels] + [("hidden_channels", hidden_channels)]:
            if width % norm_num_groups:
                raise ValueError(f"{name} ({width}) must be divisible by norm_num_groups ({norm_num_groups}).")
        levels = len(channels)
        num_res_blocks = ensure_tuple_rep(num_res_blocks, levels)
        attention_levels = (False,) * levels if attention_levels is None else tuple(attention_levels)
        if len(attention_levels) != levels:
            raise ValueError(f"attention_levels needs {levels} entries (one per level), got {len(attention_levels)}.")
        out_channels = in_channels if out_channels is None else out_channels

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (levels - 1)

        self.encoder = Encoder(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            channels=channels,
            out_channels=hidden_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_nonlocal_attn,
            use_flash_attention=use_flash_attention,
        )
        self.to_logits = Convolution(
            spatial_dims, hidden_channels, latent_channels, kernel_size=1, padding=0, conv_only=True
        )
        self.quantizer = BinaryQuantizer(train_mode, eval_mode, threshold)
        self.embed = Convolution(
            spatial_dims, latent_channels, hidden_channels, kernel_size=1, padding=0, bias=False, conv_only=True
        )
        self.norm_in = nn.GroupNorm(norm_num_groups, hidden_channels, eps=norm_eps, affine=True)
        self.decoder = Decoder(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=hidden_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_nonlocal_attn,
            use_flash_attention=use_flash_attention,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (B, C, {'H, W' if self.spatial_dims == 2 else 'H, W, D'}) tensor, got shape "
                f"{tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)}).")
        bad = [s for s in x.shape[2:] if s % self.downsample_factor]
        if bad:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {self.downsample_factor} "
                f"(2 ** (number of levels - 1))."
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bit probabilities ``p`` of shape (B, latent_channels, *spatial / downsample_factor)."""
        self._check_input(x)
        return torch.sigmoid(self.to_logits(self.encoder(x)).float())

    def binarize(self, probs: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Binary code from probabilities (see :class:`BinaryQuantizer`)."""
        return self.quantizer(probs, mode)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Image from a binary or soft code in [0, 1]."""
        if code.ndim != self.spatial_dims + 2 or code.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected a code of shape (B, {self.latent_channels}, ...) with {self.spatial_dims} spatial dims, "
                f"got {tuple(code.shape)}."
            )
        return self.decoder(self.norm_in(self.embed(code.to(self.embed.conv.weight.dtype))))

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """
        Deterministic binary code ``1[p > threshold]`` (the input of the diffusion model). Always computed with
        autocast disabled, in the weights' precision (float32), so that the code of an image is the same bits at
        training (codes cached once, usually without autocast) and at inference (often under bf16 autocast, which
        would otherwise move some probabilities across the threshold).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(self.to_logits.conv.weight.dtype)
            return self.binarize(self.encode(x), BinarizationMode.THRESHOLD).detach()

    def decode_stage_2_outputs(self, code: torch.Tensor) -> torch.Tensor:
        """Image from a (binary or soft) code, as ``LatentDiffusionInferer`` expects."""
        return self.decode(code)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Returns:
            ``(reconstruction, probabilities, code)``; the code is Bernoulli-sampled in training mode and thresholded
            in eval mode (by default), with a straight-through gradient to the encoder.
        """
        probs = self.encode(x)
        code = self.binarize(probs)
        return self.decode(code), probs, code
