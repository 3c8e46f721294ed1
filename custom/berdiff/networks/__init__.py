# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Networks: the binarizing autoencoder, size presets and the single-tensor anomaly pipeline."""

from __future__ import annotations

from berdiff.networks.anomaly_pipeline import PIPELINE_OUTPUT_KEYS, AnomalyPipeline, bundle_output_layout
from berdiff.networks.binary_autoencoder import BinarizationMode, BinaryAutoencoder, BinaryQuantizer
from berdiff.networks.presets import (
    AUTOENCODER_PRESETS,
    DENOISER_PRESETS,
    PRESET_GRIDS,
    Preset,
    autoencoder_from_preset,
    denoiser_from_preset,
    preset_grid,
)

__all__ = [
    "AnomalyPipeline",
    "PIPELINE_OUTPUT_KEYS",
    "BinarizationMode",
    "BinaryAutoencoder",
    "BinaryQuantizer",
    "Preset",
    "AUTOENCODER_PRESETS",
    "DENOISER_PRESETS",
    "autoencoder_from_preset",
    "denoiser_from_preset",
    "PRESET_GRIDS",
    "preset_grid",
    "bundle_output_layout",
]
