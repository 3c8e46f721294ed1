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
        scheduler: the :class:`~berdiff.schedulers.BernoulliScheduler` the denoiser was trained with.
        noise_level: L, the number of noise steps (``1 <= L <= num_train_timesteps``).
        prob_threshold: P, flip probability above which a latent entry may be re-generated (in [0, 1]).
        num_inference_steps: K, the number of denoising steps (network calls); L when None.
        final_code: a :class:`FinalCode`.
        masked: False switches the masking off (plain partial denoising, the "unmasked" ablation).
        latent_reduction: a :class:`LatentReduction` over latent channels for ``latent_flip_probability``.
        anomaly_reference: an :class:`AnomalyReference`: what ``anomaly_map`` compares the reconstruction with.
        step_posterior: a :class:`StepPosterior`: how each reverse step uses the soft estimate of ``x_0``.
    """
