# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Named network sizes ("reference" = the paper's, "small" = CPU-trainable) selected by one config value."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import DiffusionModelUNet
from monai.utils import StrEnum

from berdiff.networks.binary_autoencoder import BinaryAutoencoder

__all__ = [
    "Preset",
    "AUTOENCODER_PRESETS",
    "DENOISER_PRESETS",
    "autoencoder_from_preset",
    "denoiser_from_preset",
    "PRESET_GRIDS",
    "AUTO",
    "INPUT_PIXDIM",
    "preset_grid",
]


class Preset(StrEnum):
    """
    Network sizes.

    reference: the paper's sizes (4x256x256 -> 128x32x32 code, 4.1 M AE parameters; 36,034,432 UNet parameters).
    small: a few hundred thousand parameters, trainable on a laptop CPU in minutes.
    tiny: unit-test size.
    """

    REFERENCE = "reference"
    SMALL = "small"
    TINY = "tiny"


AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    Preset.REFERENCE: {
        "channels": (32, 64, 64, 128),
        "latent_channels": 128,
        "hidden_channels": 256,
        "num_res_blocks": 2,
        "norm_num_groups": 32,
        "with_nonlocal_attn": True,
    },
    Preset.SMALL: {
        "channels": (16, 32, 64),
        "latent_channels": 32,
        "hidden_channels": 64,
        "num_res_blocks": 1,
        "norm_num_groups": 16,
        "with_nonlocal_attn": False,
    },
    Preset.TINY: {
        "channels": (8, 8),
        "latent_channels": 4,
        "hidden_channels": 8,
        "num_res_blocks": 1,
        "norm_num_groups": 4,
        "with_nonlocal_attn": False,
    },
}

DENOISER_PRESETS: dict[str, dict[str, Any]] = {
    Preset.REFERENCE: {
        "channels": (128, 256, 256, 256),
        "attention_levels": (False, True, False, False),
        "num_res_blocks": 2,
        "num_head_channels": (128, 256, 256, 256),
        "norm_num_groups": 32,
    },
    Preset.SMALL: {
        "channels": (32, 64, 64),
        "attention_levels": (False, False, True),
        "num_res_blocks": 1,
        "num_head_channels": (32, 64, 64),
        "norm_num_groups": 16,
    },
    Preset.TINY: {
        "channels": (8, 8),
        "attention_levels": (False, False),
        "num_res_blocks": 1,
        "num_head_channels": 8,
        "norm_num_groups": 4,
    },
}


def _preset(table: dict[str, dict[str, Any]], preset: str, what: str) -> dict[str, Any]:
    if preset not in table:
        raise ValueError(f"unknown {what} preset {preset!r}; choose one of {sorted(str(k) for k in table)}.")
    return dict(table[preset])


def autoencoder_from_preset(preset: str = "reference", in_channels: int = 1, spatial_dims: int = 2, **overrides) -> BinaryAutoencoder:
    """
    A :class:`BinaryAutoencoder` of a named size.

    Args:
        preset: a :class:`Preset` name.
        in_channels: number of image channels.
        spatial_dims: 2 or 3.
        overrides: constructor arguments that replace the preset's.
    """
    kwargs = _preset(AUTOENCODER_PRESETS, preset, "autoencoder")
    kwargs.update(overrides)
    return BinaryAutoencoder(spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)


def denoiser_from_preset(preset: str = "reference", latent_channels: int | None = None, spatial_dims: int = 2, **overrides) -> DiffusionModelUNet:
    """
    A MONAI ``DiffusionModelUNet`` of a named size that maps a binary code to logits (no final activation; of x_0 or of the flips, see the scheduler's ``prediction_type``).

    Args:
        preset: a :class:`Preset` name.
        latent_channels: bits per latent position (in and out channels); the autoencoder preset's when None.
        spatial_dims: 2 or 3.
        overrides: constructor arguments that replace the preset's.
    """
    kwargs = _preset(DENOISER_PRESETS, preset, "denoiser")
    if latent_channels is None:
        latent_channels = AUTOENCODER_PRESETS[preset]["latent_channels"]
    kwargs.update(overrides)
    return DiffusionModelUNet(
        spatial_dims=spatial_dims, in_channels=latent_channels, out_channels=latent_channels, **kwargs
    )


#: the working grid of each preset for 3D volumes: in-plane size of the slices and in-plane voxel size (mm) the
#: volumes are resampled to (None: the input's own voxel size). "small" is the CPU preset: 2 mm slices of 128 x 128
#: (a BraTS volume of 240 x 240 at 1 mm becomes 120 x 120), a quarter of the pixels of the reference grid.
PRESET_GRIDS: dict[str, dict[str, Any]] = {
    Preset.REFERENCE: {"spatial_size": [256, 256], "pixdim": None},
    Preset.SMALL: {"spatial_size": [128, 128], "pixdim": 2.0},
    Preset.TINY: {"spatial_size": [256, 256], "pixdim": None},
}

#: the config value that selects the preset's entry of :data:`PRESET_GRIDS`
AUTO = "auto"

#: the ``pixdim`` value that keeps the input's voxel size, like None (a command-line ``--pixdim None`` is dropped by
#: ``monai.bundle``, which ignores None overrides; ``--pixdim input`` is not)
INPUT_PIXDIM = "input"


def preset_grid(preset: str, spatial_size: Any = AUTO, pixdim: Any = AUTO) -> dict[str, Any]:
    """
    The working grid ``{"spatial_size": [H, W], "pixdim": float | None}``: each of ``spatial_size`` and ``pixdim``
    as given, or the preset's value (:data:`PRESET_GRIDS`) where it is ``"auto"``. Values other than ``"auto"`` are
    returned as they are (an int size as ``[S, S]``); :func:`berdiff.validation.check_settings` checks them.

    Args:
        preset: a :class:`Preset` name.
        spatial_size: in-plane size (int or [H, W]) or ``"auto"``.
        pixdim: in-plane voxel size in mm, None or ``"input"`` (keep the input's), or ``"auto"``.
    """
    grid = _preset(PRESET_GRIDS, preset, "grid")
    if not (isinstance(spatial_size, str) and spatial_size == AUTO):
        grid["spatial_size"] = [int(spatial_size)] * 2 if isinstance(spatial_size, int) else list(spatial_size)
    if not (isinstance(pixdim, str) and pixdim == AUTO):
        grid["pixdim"] = None if isinstance(pixdim, str) and pixdim == INPUT_PIXDIM else pixdim
    grid["spatial_size"] = list(grid["spatial_size"])
    return grid
