# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Training of both stages: the one trainer path (:func:`build_trainer`), the autoencoder stage, the EMA and loss
monitor, latent-code loaders of the diffusion stage, datalists, checkpoints and export of ``models/model.pt``.
"""

from __future__ import annotations

from berdiff.training.augment import BlobAugmentPrepareBatch, random_blobs
from berdiff.training.autoencoder import (
    ReconstructionInferer,
    DelayedAdversarialLoss,
    autoencoder_trainer,
    training_loss_output,
)
from berdiff.training.checkpoints import load_weights, latest_checkpoint, export_pipeline, ExportPipeline
from berdiff.training.codes import encode_dataset, code_loader, diffusion_loader
from berdiff.training.datalist import prepared_grid, training_datalist
from berdiff.training.distributed import init_distributed
from berdiff.training.ema import WarmupEMAHandler, LossMonitor
from berdiff.training.recipes import TRAINING_RECIPES, Stage, training_recipe
from berdiff.training.trainers import (
    Precision,
    LearningRateRule,
    resolve_precision,
    scaled_learning_rate,
    adamw,
    build_trainer,
    training_flops,
)

__all__ = [
    "BlobAugmentPrepareBatch",
    "random_blobs",
    "Precision",
    "LearningRateRule",
    "resolve_precision",
    "scaled_learning_rate",
    "adamw",
    "build_trainer",
    "training_flops",
    "ReconstructionInferer",
    "DelayedAdversarialLoss",
    "autoencoder_trainer",
    "training_loss_output",
    "WarmupEMAHandler",
    "LossMonitor",
    "encode_dataset",
    "code_loader",
    "diffusion_loader",
    "training_datalist",
    "prepared_grid",
    "load_weights",
    "latest_checkpoint",
    "export_pipeline",
    "ExportPipeline",
    "init_distributed",
    "TRAINING_RECIPES",
    "Stage",
    "training_recipe",
]
