# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Training recipes per network preset: the batch size, learning rate, epochs and EMA momentum each stage of the
brain MRI bundle uses by default (:func:`training_recipe`). The ``reference`` recipe is the paper's (long GPU runs
with small learning rates); the ``small`` recipe is the one validated on real BraTS subjects within 30 minutes of
training on a 2-core CPU (see docs/benchmarks.md, "Real BraTS"): a short run needs a larger learning rate and a
faster EMA, or stage 1 ends far from converged. Every value can still be overridden on the command line.
"""

from __future__ import annotations

from typing import Any

from monai.utils import StrEnum

__all__ = ["Stage", "TRAINING_RECIPES", "training_recipe"]


class Stage(StrEnum):
    """The two training stages."""

    AUTOENCODER = "autoencoder"
    DIFFUSION = "diffusion"


#: preset -> stage -> knob -> value (``learning_rate`` is for ``batch_size``; other batch sizes scale it by the
#: config's ``lr_rule``; ``train_max_timestep``: stage-2 timesteps drawn from ``[0, N)``, None for all T, so that a
#: short run trains the timesteps inference visits, ``t < L``)
TRAINING_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {
        "autoencoder": {"batch_size": 24, "learning_rate": 1.08e-4, "max_epochs": 100, "ema_momentum": 0.0005},
        "diffusion": {"batch_size": 36, "learning_rate": 1.0e-4, "max_epochs": 100, "ema_momentum": 0.001,
                      "train_max_timestep": None},
    },
    "small": {
        "autoencoder": {"batch_size": 8, "learning_rate": 2.0e-3, "max_epochs": 20, "ema_momentum": 0.02},
        "diffusion": {"batch_size": 32, "learning_rate": 1.0e-3, "max_epochs": 60, "ema_momentum": 0.02,
                      "train_max_timestep": 200},
    },
    "tiny": {
        "autoencoder": {"batch_size": 8, "learning_rate": 2.0e-3, "max_epochs": 2, "ema_momentum": 0.02},
        "diffusion": {"batch_size": 8, "learning_rate": 1.0e-3, "max_epochs": 2, "ema_momentum": 0.02,
                      "train_max_timestep": None},
    },
}


def training_recipe(preset: str, stage: str) -> dict[str, Any]:
    """
    The default training knobs of ``stage`` for networks of ``preset`` (a copy of :data:`TRAINING_RECIPES`' entry).

    Args:
        preset: a :class:`berdiff.networks.Preset` value.
        stage: a :class:`Stage` value.

    Raises:
        ValueError: an unknown preset or stage.
    """
    if str(preset) not in TRAINING_RECIPES:
        raise ValueError(f"preset must be one of {sorted(TRAINING_RECIPES)}, got {preset!r}.")
    if str(stage) not in [s.value for s in Stage]:
        raise ValueError(f"stage must be one of {[s.value for s in Stage]}, got {stage!r}.")
    return dict(TRAINING_RECIPES[str(preset)][str(stage)])
