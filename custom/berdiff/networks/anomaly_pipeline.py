# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Single-tensor anomaly pipeline: the module bundle configs, ``SliceInferer`` and MONAI Label see."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from berdiff.sampling import (
    LATENT_MAP_KEYS,
    AnomalyReference,
    FinalCode,
    GeneratorLike,
    LatentReduction,
    MaskedBernoulliSampler,
    StepPosterior,
    latent_map_keys,
)
from berdiff.schedulers import BernoulliScheduler

__all__ = ["AnomalyPipeline", "PIPELINE_OUTPUT_KEYS", "bundle_output_layout", "slice_seeds"]

#: keys of :meth:`AnomalyPipeline.run` that ``forward`` can concatenate along the channel axis (one channel each,
#: except ``reconstruction``: the image's channels). ``residual_map`` is ``anomaly_map`` before the latent weighting;
#: ``input_residual_map`` is the residual against the input (the paper's map) whatever ``anomaly_reference`` is;
#: ``latent_flip_map`` is the former name of ``latent_flip_probability``.
PIPELINE_OUTPUT_KEYS = (
    "anomaly_map", "residual_map", "input_residual_map", "autoencoder_map", *LATENT_MAP_KEYS, "latent_flip_map",
    "reconstruction",
)


def bundle_output_layout(
    latent_maps: str | Sequence[str] | None, save_autoencoder_map: bool, num_channels: int
) -> dict[str, list]:
    """
    Channel layout of the inference bundle's pipeline output: ``keys`` (the pipeline's ``output_keys``), ``names``
    (the post-processing keys, which are also the saved file postfixes) and ``sizes`` (channels of each), in the order
    anomaly map, latent maps (``latent_<name>``), reconstruction, autoencoder-only map (when ``save_autoencoder_map``).

    Args:
        latent_maps: :class:`~berdiff.sampling.LatentMap` value(s) to write; None, ``"none"`` or ``[]`` for none.
        save_autoencoder_map: also output the autoencoder-only map (``<case>_autoencoder``).
        num_channels: image channels (of the reconstruction).

    Raises:
        ValueError: unknown or repeated latent map names.
    """
    latent = latent_map_keys(latent_maps)
    keys = ["anomaly_map", *latent, "reconstruction"] + (["autoencoder_map"] if save_autoencoder_map else [])
    names = ["anomaly", *latent, "reconstruction"] + (["autoencoder"] if save_autoencoder_map else [])
    sizes = [1] * (1 + len(latent)) + [int(num_channels)] + ([1] if save_autoencoder_map else [])
    return {"keys": keys, "names": names, "sizes": sizes}

#: modulus of the content hash (the Mersenne prime 2**31 - 1) and the multipliers of its positional weights
_HASH_MOD = 2**31 - 1
_HASH_MUL, _HASH_ADD = 48271, 11


def slice_seeds(image: torch.Tensor, seed: int) -> list[int]:
    """
    One random seed per sample, derived from ``seed`` and a cheap deterministic hash of the sample's content, so a
    slice gets the same noise whatever batch it is in: ``SliceInferer`` does not tell the network a slice's index,
    but the slice's values are the same in every batch (and identical slices rightly get identical maps).

    The hash is exact integer arithmetic on the device: the float32 bit patterns ``b_j`` of the sample's values
    (C, H, W flattened) are weighted by fixed positional weights ``w_j = (48271 * j + 11) mod (2**31 - 1)`` and
    summed modulo ``2**31 - 1`` (no float rounding, no order dependence, equal on CPU and CUDA); the seed is
    ``splitmix64(seed * 2**31 + hash)``. One small device-to-host copy of B integers per call.

    Args:
        image: (B, ...) batch.
        seed: the pipeline's seed.
    """
    flat = image.detach().as_subclass(torch.Tensor).reshape(image.shape[0], -1).float().contiguous()
    bits = flat.view(torch.int32).to(torch.int64)
    positions = torch.arange(flat.shape[1], device=flat.device, dtype=torch.int64)
    weights = (positions * _HASH_MUL + _HASH_ADD).remainder(_HASH_MOD)
    # |bits * weights| < 2**62 and at most ~2**31 terms of < 2**31 after the first remainder: no int64 overflow
    hashes = (bits * weights).remainder(_HASH_MOD).sum(dim=1).remainder(_HASH_MOD).tolist()
    return [_splitmix64((int(seed) << 31) + int(h)) for h in hashes]


def _splitmix64(x: int) -> int:
    """The splitmix64 finaliser (a bijective 64-bit mix): nearby inputs give unrelated seeds."""
    mask = 2**64 - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


class AnomalyPipeline(nn.Module):
    """
    Binary autoencoder + Bernoulli denoiser + masked inference in one ``nn.Module``. ``forward(image)`` returns the
    anomaly map of a batch of slices; ``state_dict()`` (keys ``autoencoder.*`` and ``unet.*``) is the bundle's
    combined ``models/model.pt``.

    Args:
        autoencoder: a :class:`~berdiff.networks.BinaryAutoencoder`.
        unet: the denoiser (e.g. ``monai.networks.nets.DiffusionModelUNet``) returning flip logits.
        scheduler: the training :class:`BernoulliScheduler`; a default linear one with T = 1000 when None.
        noise_level: L.
        prob_threshold: P.
        num_inference_steps: K (L when None).
        final_code: see :class:`~berdiff.sampling.FinalCode`.
        masked: False for the unmasked ablation.
        latent_reduction: see :class:`~berdiff.sampling.LatentReduction`.
        anomaly_reference: see :class:`~berdiff.sampling.AnomalyReference` ("input": the paper's map).
        step_posterior: see :class:`~berdiff.sampling.StepPosterior`.
        latent_weighting, latent_weight_floor: see :class:`~berdiff.sampling.MaskedBernoulliSampler` (None: the
            paper's map, the residual alone).
        residual_sign, channel_weights, intensity_channel, intensity_power, intensity_floor: the residual rule of every image-space map, see
            :class:`~berdiff.sampling.MaskedBernoulliSampler` and :func:`berdiff.residual.residual_map` (defaults:
            the paper's ``sum_c (x_hat_c - x_c)^2``).
        output_keys: what ``forward`` returns, concatenated along channels, from :data:`PIPELINE_OUTPUT_KEYS`
            (default: the anomaly map only, one channel).
        seed: when not None, every ``forward`` call gives each sample its own generator, seeded from ``seed`` and
            a hash of the sample's content (:func:`slice_seeds`): a slice's maps are reproducible and do not depend
            on the batch it is in (``sw_batch_size``, its position, skipped empty slices beside it).
        skip_empty: samples whose image is constant (e.g. slices outside the head) are not sent through the
            networks; their maps are zero and their reconstruction equals the input.
        num_samples: draws of the noising and denoising per image (>= 1); every output (the maps and the
            reconstruction) is their mean. One draw is the paper's; several average out the sampling noise of the
            maps, at ``num_samples`` times the cost. With ``seed`` set, the draws follow each other on each sample's
            generator, so the first draw is the single-draw result.

    Raises:
        ValueError: unknown ``output_keys`` or ``num_samples`` < 1 (the sampler's own arguments are checked by
            :class:`~berdiff.sampling.MaskedBernoulliSampler`).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        unet: nn.Module,
        scheduler: BernoulliScheduler | None = None,
        noise_level: int = 200,
        prob_threshold: float = 0.5,
        num_inference_steps: int | None = None,
        final_code: str = FinalCode.BINARY,
        masked: bool = True,
        latent_reduction: str = LatentReduction.MEAN,
        anomaly_reference: str = AnomalyReference.INPUT,
        step_posterior: str = StepPosterior.MARGINAL,
        latent_weighting: str | None = None,
        latent_weight_floor: float = 0.02,
        residual_sign: str = "both",
        channel_weights: Sequence[float] | None = None,
        intensity_channel: int | None = None,
        intensity_power: float = 1.0,
        intensity_floor: float = 0.0,
        output_keys: Sequence[str] = ("anomaly_map",),
        seed: int | None = 0,
        skip_empty: bool = True,
        num_samples: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
        self.autoencoder = autoencoder
        self.unet = unet
        self.scheduler = BernoulliScheduler() if scheduler is None else scheduler
        self.inferer = MaskedBernoulliSampler(
            self.scheduler,
            noise_level=noise_level,
            prob_threshold=prob_threshold,
            num_inference_steps=num_inference_steps,
            final_code=final_code,
            masked=masked,
            latent_reduction=latent_reduction,
            anomaly_reference=anomaly_reference,
            step_posterior=step_posterior,
            latent_weighting=latent_weighting,
            latent_weight_floor=latent_weight_floor,
            residual_sign=residual_sign,
            channel_weights=channel_weights,
            intensity_channel=intensity_channel,
            intensity_power=intensity_power,
            intensity_floor=intensity_floor,
            # the input code is decoded a second time only for the autoencoder-only map
            autoencoder_map="autoencoder_map" in tuple(output_keys),
        )
        output_keys = tuple(output_keys)
        unknown = [k for k in output_keys if k not in PIPELINE_OUTPUT_KEYS]
        if not output_keys or unknown:
            raise ValueError(f"output_keys must be a non-empty subset of {PIPELINE_OUTPUT_KEYS}, got {output_keys}.")
        self.output_keys = output_keys
        self.seed = seed
        self.skip_empty = skip_empty
        self.num_samples = num_samples

    def _sample(self, image: torch.Tensor, generator: GeneratorLike) -> dict[str, torch.Tensor]:
        """The sampler's outputs for ``image``, averaged over ``num_samples`` draws."""
        outputs = self.inferer(image, self.autoencoder, self.unet, generator)
        if self.num_samples == 1:
            return outputs
        outputs = {k: v.float() for k, v in outputs.items()}
        for _ in range(self.num_samples - 1):
            for key, value in self.inferer(image, self.autoencoder, self.unet, generator).items():
                outputs[key] = outputs[key] + value.float()  # out of place: some outputs share one tensor
        return {k: v / self.num_samples for k, v in outputs.items()}

    def _generator(self, image: torch.Tensor) -> list[torch.Generator] | None:
        """One generator per sample, seeded from ``seed`` and the sample's content (see :func:`slice_seeds`)."""
        if self.seed is None:
            return None
        return [torch.Generator(device=image.device).manual_seed(s) for s in slice_seeds(image, int(self.seed))]

    @torch.no_grad()
    def run(self, image: torch.Tensor, generator: GeneratorLike = None) -> dict[str, torch.Tensor]:
        """
        All outputs of :class:`~berdiff.sampling.MaskedBernoulliSampler` for a batch of images in [0, 1]
        (``autoencoder_map`` only when it is one of ``output_keys``: it costs one more decoder call).

        Args:
            image: (B, C, H, W) tensor.
            generator: random generator(s); when None, one seeded with ``seed`` (if set).
        """
        if not torch.isfinite(image).all():
            raise ValueError("the input image contains NaN or infinite values.")
        if generator is None:
            generator = self._generator(image)
        flat = image.reshape(image.shape[0], -1)
        active = (flat.amax(dim=1) > flat.amin(dim=1)) if self.skip_empty else torch.ones_like(flat[:, 0], dtype=torch.bool)
        if bool(active.all()):
            return self._sample(image, generator)
        # constant slices (background): zero maps, identity reconstruction
        zeros = torch.zeros_like(image[:, :1], dtype=torch.float32)
        outputs = {
            "reconstruction": image.float().clone(), "anomaly_map": zeros, "residual_map": zeros.clone(),
            "input_residual_map": zeros.clone(),
        }
        if self.inferer.autoencoder_map:
            outputs["autoencoder_map"] = zeros.clone()
        outputs.update({k: zeros.clone() for k in LATENT_MAP_KEYS})
        if bool(active.any()):
            idx = active.nonzero().flatten()
            if generator is not None and not isinstance(generator, torch.Generator):
                generator = [generator[int(i)] for i in idx]
            sub = self._sample(image[idx], generator)
            for key in outputs:
                outputs[key][idx] = sub[key]
        outputs["latent_flip_map"] = outputs["latent_flip_probability"]
        return outputs

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Anomaly map (B, 1, H, W) of a batch of slices, or the channels named by ``output_keys``."""
        outputs = self.run(image)
        return torch.cat([outputs[k] for k in self.output_keys], dim=1)
