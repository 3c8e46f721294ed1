# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Masked anomaly inference with a binary autoencoder and a Bernoulli denoiser, as a MONAI ``Inferer``."""

from __future__ import annotations

from monai.inferers import Inferer

from berdiff.sampling import (
    LATENT_MAP_KEYS,
    AnomalyReference,
    FinalCode,
    LatentMap,
    LatentReduction,
    MaskedBernoulliSampler,
    StepPosterior,
    latent_map_keys,
)

__all__ = [
    "AnomalyReference",
    "FinalCode",
    "LATENT_MAP_KEYS",
    "LatentMap",
    "LatentReduction",
    "MaskedBernoulliInferer",
    "StepPosterior",
    "latent_map_keys",
]


class MaskedBernoulliInferer(MaskedBernoulliSampler, Inferer):
    """
    The masked Bernoulli diffusion anomaly inference (:class:`berdiff.sampling.MaskedBernoulliSampler`) as a MONAI
    ``Inferer``: ``inferer(inputs, autoencoder, diffusion_model, generator)`` returns the dict of maps, codes and the
    pseudo-healthy reconstruction. Its options (:class:`FinalCode`, :class:`AnomalyReference`,
    :class:`LatentReduction`, :class:`StepPosterior`, :class:`LatentMap`) are importable from here as well.

    Args:
        scheduler, noise_level, prob_threshold, num_inference_steps, final_code, masked, latent_reduction,
            anomaly_reference, step_posterior: see :class:`~berdiff.sampling.MaskedBernoulliSampler`.
    """
