# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Masked Bernoulli sampling: the options of the masked anomaly inference and the reverse process itself
(:class:`MaskedBernoulliSampler`), below both the networks (:class:`berdiff.networks.AnomalyPipeline` runs it) and
the inferers (:class:`berdiff.inferers.MaskedBernoulliInferer` is its MONAI ``Inferer`` form).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import StrEnum, look_up_option

from berdiff.residual import ResidualSign, check_channel_weights, residual_map
from berdiff.schedulers import BernoulliScheduler, bernoulli, uniform_like

__all__ = [
    "AnomalyReference",
    "FinalCode",
    "LATENT_MAP_KEYS",
    "LatentMap",
    "LatentReduction",
    "GeneratorLike",
    "MaskedBernoulliSampler",
    "StepPosterior",
    "latent_map_keys",
]

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


class FinalCode(StrEnum):
    """
    What is decoded after the last step.

    binary: ``1[x0_tilde > 0.5]``, masked like every other step (project default).
    soft: the masked soft estimate ``x0_tilde`` itself (what the reference decodes).
    """

    BINARY = "binary"
    SOFT = "soft"


class AnomalyReference(StrEnum):
    """
    What the pseudo-healthy reconstruction is compared with in ``anomaly_map``.

    input: the input image, ``sum_c (x_hat - x)^2`` (the paper's map).
    autoencoder: the autoencoder's reconstruction of the input code, ``sum_c (x_hat - D(z_in))^2``: only what the
        masked denoising changed, without the autoencoder's own reconstruction error (zero wherever the code was
        kept). Useful when the autoencoder is imperfect (short training); costs one extra decoding.
    """

    INPUT = "input"
    AUTOENCODER = "autoencoder"


class LatentReduction(StrEnum):
    """How the flip probability is reduced over the latent channels for ``latent_flip_probability``."""

    MEAN = "mean"
    MAX = "max"


class StepPosterior(StrEnum):
    """
    How a reverse step turns the network's soft estimate ``x0_hat = P(x_0 = 1 | x_t)`` into ``P(x_s = 1 | x_t)``.

    marginal: ``x0_hat q(x_s = 1 | x_t, x_0 = 1) + (1 - x0_hat) q(x_s = 1 | x_t, x_0 = 0)``, the exact reverse step
        of a denoiser trained (with BCE) to predict ``P(x_0 | x_t)``: ancestral sampling then draws from the model's
        distribution of clean codes.
    plug_in: ``q(x_s = 1 | x_t, x_0 = x0_hat)``, the soft estimate plugged into the binary posterior formula (the
        reference implementation). It weighs each candidate ``x_0`` by ``q(x_t | x_0)`` once more, so it favours
        keeping the bits of ``x_t``: in the masked inference, anomalous input bits are healed less often and noised
        healthy bits are kept more often than the denoiser predicts.
    """

    MARGINAL = "marginal"
    PLUG_IN = "plug_in"


class LatentMap(StrEnum):
    """
    Latent anomaly scores of :class:`MaskedBernoulliSampler`, each a map (B, 1, ...) in [0, 1] resized to the image;
    the output dict holds each under ``"latent_" + value``.

    code_change: the probability that the predicted healthy code differs from the input code, ``|x0_hat - z_in|``
        averaged over the latent channels and the K steps (``x0_hat`` is the network's soft estimate of the clean
        code at each step, so ``|x0_hat - z_in|`` is the probability of a bit that differs from the input's).
    mask_fraction: the share of latent channels in the final mask (bits the masked inference allowed to change).
    changed_bits: the share of latent channels whose final code differs from the input code (``|code - z_in|`` for
        ``final_code="soft"``).
    flip_probability: the predicted flip probability of the noisy code ``x_t``, reduced over channels (see
        :class:`LatentReduction`) and averaged over the K steps (the paper's latent map; it mostly measures the
        noise injected at each step, not the input's anomalous bits).
    confident_change: the share of latent channels whose predicted healthy bit differs from the input bit with
        probability above :data:`CONFIDENT_CHANGE` (``|x0_hat - z_in| > 0.9``), averaged over the K steps: the bits
        the denoiser is sure are not healthy. Unlike ``code_change`` it does not count the bits the denoiser is merely
        unsure about, which are most frequent in finely textured healthy tissue.
    """

    CODE_CHANGE = "code_change"
    MASK_FRACTION = "mask_fraction"
    CHANGED_BITS = "changed_bits"
    FLIP_PROBABILITY = "flip_probability"
    CONFIDENT_CHANGE = "confident_change"


#: probability of a differing bit above which ``LatentMap.CONFIDENT_CHANGE`` counts it
CONFIDENT_CHANGE = 0.9


#: output-dict keys of the latent maps, in :class:`LatentMap` order
LATENT_MAP_KEYS = tuple(f"latent_{m.value}" for m in LatentMap)


def _option(knob: str, value: str, options: type[StrEnum]) -> str:
    """``value`` checked with ``monai.utils.look_up_option`` against ``options``; a one-line error names ``knob``."""
    try:
        return look_up_option(value, options)
    except ValueError:
        raise ValueError(f"{knob} must be one of {[m.value for m in options]}, got {value!r}.") from None


def latent_map_keys(latent_maps: str | Sequence[str] | None) -> list[str]:
    """
    Validated output-dict keys (``latent_<name>``) of the latent maps named in ``latent_maps`` (a :class:`LatentMap`
    value, a list of them, or None / ``"none"`` / an empty list for no latent map), in the given order.

    Raises:
        ValueError: an unknown or repeated name.
    """
    if latent_maps is None:
        return []
    names = [latent_maps] if isinstance(latent_maps, str) else list(latent_maps)
    if names == ["none"]:
        return []
    allowed = [m.value for m in LatentMap]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"unknown latent map(s) {bad}; choose from {allowed} (or 'none').")
    if len(set(names)) != len(names):
        raise ValueError(f"latent maps must not repeat, got {names}.")
    return [f"latent_{n}" for n in names]


class MaskedBernoulliSampler:
    """
    Masked Bernoulli diffusion anomaly inference (Wolleb et al., MICCAI 2024, https://arxiv.org/abs/2403.11667),
    without the defects of the reference implementation:

    1. encode the input deterministically, ``z_in = 1[E(x) > 0.5]``;
    2. draw ``x ~ q(x_{L-1} | z_in)``: the noising index equals the first timestep the network sees;
    3. denoise over ``K <= L`` strictly decreasing timesteps from ``L - 1`` to 0 (``K = L`` is one step at a time);
       at every step the per-sample mask grows by the entries whose predicted flip probability exceeds ``P``, and the
       entries outside the mask of ``x_0_hat`` are replaced by ``z_in`` before the exact posterior draw;
    4. the last step is masked too and gives a binary code (or the soft estimate with ``final_code="soft"``), which
       is decoded to the pseudo-healthy reconstruction.

    Args:
        scheduler: the :class:`BernoulliScheduler` the denoiser was trained with.
        noise_level: L, the number of noise steps (``1 <= L <= num_train_timesteps``).
        prob_threshold: P, flip probability above which a latent entry may be re-generated (in [0, 1]).
        num_inference_steps: K, the number of denoising steps (network calls); L when None.
        final_code: a :class:`FinalCode`.
        masked: False switches the masking off (plain partial denoising, the "unmasked" ablation).
        latent_reduction: a :class:`LatentReduction` over latent channels for ``latent_flip_probability``.
        anomaly_reference: an :class:`AnomalyReference`: what ``anomaly_map`` compares the reconstruction with.
        step_posterior: a :class:`StepPosterior`: how each reverse step uses the soft estimate of ``x_0``.
        autoencoder_map: also return ``autoencoder_map`` (one more decoder call per batch: the input code is decoded
            too); without it that call is made only for ``anomaly_reference="autoencoder"``.
        latent_weighting: None (or ``"none"``) for the image-space residual alone (the paper's map), or a
            :class:`LatentMap` name: ``anomaly_map`` is then the residual times ``latent_weight_floor`` plus that
            latent map, so that the residual counts where the denoiser found the input's code anomalous
            (``confident_change``: the bits it is sure are not healthy). Beyond the paper; the residual alone is in
            the output as well (``residual_map``).
        latent_weight_floor: the weight of the residual where the latent map is 0 (> 0, so that pixels no bit was
            flagged for are still ranked by their residual).
        residual_sign: a :class:`berdiff.residual.ResidualSign`: which sign of ``input - reconstruction`` counts
            (``both``: the paper's squared residual; ``positive``: only brighter than the healthy reconstruction).
        channel_weights: per-channel weights of the squared residual (None: every channel 1, the paper's sum).
        intensity_channel: None, or the input channel whose intensity multiplies the residual (an intensity prior,
            e.g. FLAIR for brain tumours; beyond the paper).
        intensity_power, intensity_floor: the prior's power (> 0) and the residual's floor under it (>= 0), see
            :func:`berdiff.residual.residual_map`.
        The residual rule (sign, weights, prior) applies to ``residual_map``, ``anomaly_map`` and ``autoencoder_map``
        alike, so that the autoencoder-only map is the same map without the diffusion model.
    """

    def __init__(
        self,
        scheduler: BernoulliScheduler,
        noise_level: int = 200,
        prob_threshold: float = 0.5,
        num_inference_steps: int | None = None,
        final_code: str = FinalCode.BINARY,
        masked: bool = True,
        latent_reduction: str = LatentReduction.MEAN,
        anomaly_reference: str = AnomalyReference.INPUT,
        step_posterior: str = StepPosterior.MARGINAL,
        autoencoder_map: bool = True,
        latent_weighting: str | None = None,
        latent_weight_floor: float = 0.02,
        residual_sign: str = ResidualSign.BOTH,
        channel_weights: Sequence[float] | None = None,
        intensity_channel: int | None = None,
        intensity_power: float = 1.0,
        intensity_floor: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(scheduler, BernoulliScheduler):
            raise TypeError(f"scheduler must be a BernoulliScheduler, got {type(scheduler).__name__}.")
        final_code = _option("final_code", final_code, FinalCode)
        latent_reduction = _option("latent_reduction", latent_reduction, LatentReduction)
        anomaly_reference = _option("anomaly_reference", anomaly_reference, AnomalyReference)
        step_posterior = _option("step_posterior", step_posterior, StepPosterior)
        if not 0.0 <= float(prob_threshold) <= 1.0:
            raise ValueError(f"prob_threshold (P) must be in [0, 1], got {prob_threshold}.")
        if latent_weighting is not None and latent_weighting != "none":
            latent_weighting = LatentMap(_option("latent_weighting", latent_weighting, LatentMap))
        else:
            latent_weighting = None
        if not 0.0 < float(latent_weight_floor) <= 1.0:
            raise ValueError(f"latent_weight_floor must be in (0, 1], got {latent_weight_floor}.")
        self.residual_sign = ResidualSign(_option("residual_sign", residual_sign, ResidualSign))
        self.channel_weights = check_channel_weights(channel_weights)
        if intensity_channel is not None and (isinstance(intensity_channel, bool) or int(intensity_channel) < 0):
            raise ValueError(f"intensity_channel must be None or a channel index >= 0, got {intensity_channel!r}.")
        self.intensity_channel = None if intensity_channel is None else int(intensity_channel)
        if not float(intensity_power) > 0:
            raise ValueError(f"intensity_power must be > 0, got {intensity_power}.")
        self.intensity_power = float(intensity_power)
        if not float(intensity_floor) >= 0:
            raise ValueError(f"intensity_floor must be >= 0, got {intensity_floor}.")
        self.intensity_floor = float(intensity_floor)
        self.latent_weighting: LatentMap | None = latent_weighting
        self.latent_weight_floor = float(latent_weight_floor)
        self.scheduler = scheduler
        self.prob_threshold = float(prob_threshold)
        self.final_code = FinalCode(final_code)
        self.masked = bool(masked)
        self.latent_reduction = LatentReduction(latent_reduction)
        self.anomaly_reference = AnomalyReference(anomaly_reference)
        self.step_posterior = StepPosterior(step_posterior)
        self.autoencoder_map = bool(autoencoder_map)
        self.noise_level = int(noise_level)
        self.num_inference_steps = self.noise_level if num_inference_steps is None else int(num_inference_steps)
        # validates 1 <= K <= L <= T
        self.timesteps = scheduler.get_timesteps(self.num_inference_steps, start_timestep=self.noise_level - 1)

    def residual(self, reconstruction: torch.Tensor, reference: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """
        The residual map (B, 1, ...) of ``reconstruction`` against ``reference`` with this sampler's rule
        (:func:`berdiff.residual.residual_map`: sign, channel weights, intensity prior from ``inputs``).
        """
        intensity = None
        if self.intensity_channel is not None:
            if self.intensity_channel >= inputs.shape[1]:
                raise ValueError(
                    f"intensity_channel {self.intensity_channel} is out of range for an input with "
                    f"{inputs.shape[1]} channel(s)."
                )
            intensity = inputs[:, self.intensity_channel : self.intensity_channel + 1]
        return residual_map(
            reconstruction, reference, self.residual_sign, self.channel_weights, intensity, self.intensity_power,
            self.intensity_floor,
        )

    def _reduce_channels(self, flip: torch.Tensor) -> torch.Tensor:
        if self.latent_reduction == LatentReduction.MAX:
            return flip.amax(dim=1, keepdim=True)
        return flip.mean(dim=1, keepdim=True)

    def _posterior(self, x0_prob: torch.Tensor, x: torch.Tensor, t: int, s: int) -> torch.Tensor:
        if self.step_posterior == StepPosterior.PLUG_IN:
            return self.scheduler.posterior(x0_prob, x, t, s)
        one = self.scheduler.posterior(torch.ones_like(x0_prob), x, t, s)
        zero = self.scheduler.posterior(torch.zeros_like(x0_prob), x, t, s)
        return (x0_prob * one + (1.0 - x0_prob) * zero).clamp(0.0, 1.0)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        autoencoder: nn.Module,
        diffusion_model: nn.Module,
        generator: GeneratorLike = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            inputs: images of shape (B, C, H, W) (or (B, C, H, W, D) for a 3D autoencoder), scaled to [0, 1].
            autoencoder: a binary autoencoder with ``encode_stage_2_inputs`` and ``decode_stage_2_outputs``.
            diffusion_model: the denoiser, called as ``diffusion_model(x, timesteps=t)`` and returning logits.
            generator: None, one ``torch.Generator``, or one generator per batch element (then a batch gives the
                same result as its samples run one at a time with the same generators).

        Returns:
            a dict with ``reconstruction`` (B, C, ...), ``residual_map`` (B, 1, ...): the squared residual summed over
            channels (against the input, or the autoencoder's reconstruction, see ``anomaly_reference``),
            ``input_residual_map`` (B, 1, ...): the squared residual against the input (the paper's map; the same
            tensor as ``residual_map`` unless ``anomaly_reference="autoencoder"``),
            ``anomaly_map`` (B, 1, ...): the residual map, weighted by a latent map with ``latent_weighting``,
            ``autoencoder_map`` (B, 1, ...; with ``autoencoder_map=True``): the autoencoder-only map
            ``sum_c (D(z_in) - x)^2`` (what the map would be without the diffusion model), the latent maps
            ``latent_code_change``, ``latent_mask_fraction``, ``latent_changed_bits``, ``latent_flip_probability``,
            ``latent_confident_change`` (B, 1, ...; see :class:`LatentMap`), resized to the
            image, ``latent_flip_map``: the same tensor as ``latent_flip_probability`` (its former name), ``mask``
            (B, latent_channels, ...): the final latent mask, ``input_code`` and ``code``: the input's and the
            output's latent codes.
        """
        if not torch.is_floating_point(inputs):
            raise TypeError(f"inputs must be a floating point tensor, got {inputs.dtype}.")
        z_in = autoencoder.encode_stage_2_inputs(inputs).float()
        timesteps = self.timesteps.to(z_in.device)
        # host copy of the schedule: the loop passes Python ints to the scheduler (no device sync per step)
        steps = [int(t) for t in self.timesteps.tolist()]
        batch = z_in.shape[0]
        x = self.scheduler.add_noise(z_in, uniform_like(z_in, generator), timesteps[0])
        mask = torch.zeros_like(z_in, dtype=torch.bool)
        flip_sum = torch.zeros((batch, 1, *z_in.shape[2:]), device=z_in.device, dtype=torch.float32)
        change_sum = torch.zeros_like(flip_sum)
        confident_sum = torch.zeros_like(flip_sum)
        code = z_in
        for i, t in enumerate(steps):
            logits = diffusion_model(x, timesteps=timesteps[i].expand(batch))
            flip = self.scheduler.predict_flip(logits, x)
            x0_hat = self.scheduler.predict_original(logits, x)
            flip_sum += self._reduce_channels(flip)
            difference = (x0_hat - z_in).abs()
            change_sum += difference.mean(dim=1, keepdim=True)
            confident_sum += (difference > CONFIDENT_CHANGE).float().mean(dim=1, keepdim=True)
            if self.masked:
                mask |= flip > self.prob_threshold
                x0_tilde = torch.where(mask, x0_hat, z_in)
            else:
                mask.fill_(True)
                x0_tilde = x0_hat
            if i + 1 < len(timesteps):
                x = bernoulli(self._posterior(x0_tilde, x, t, steps[i + 1]), generator)
            else:
                code = (x0_tilde > 0.5).float() if self.final_code == FinalCode.BINARY else x0_tilde
        reconstruction = autoencoder.decode_stage_2_outputs(code).float().clamp(0.0, 1.0)
        ae_reference = self.anomaly_reference == AnomalyReference.AUTOENCODER
        ae_reconstruction = None
        if self.autoencoder_map or ae_reference:
            ae_reconstruction = autoencoder.decode_stage_2_outputs(z_in).float().clamp(0.0, 1.0)
        reference = ae_reconstruction if ae_reference else inputs.float()
        anomaly_map = self.residual(reconstruction, reference, inputs)
        mode = "bilinear" if inputs.ndim == 4 else "trilinear"
        latent = {
            LatentMap.CODE_CHANGE: change_sum / len(timesteps),
            LatentMap.MASK_FRACTION: mask.float().mean(dim=1, keepdim=True),
            LatentMap.CHANGED_BITS: (code.float() - z_in).abs().mean(dim=1, keepdim=True),
            LatentMap.FLIP_PROBABILITY: flip_sum / len(timesteps),
            LatentMap.CONFIDENT_CHANGE: confident_sum / len(timesteps),
        }
        # the paper's map (the residual against the input) is kept whatever the reference of anomaly_map is
        input_residual = self.residual(reconstruction, inputs.float(), inputs) if ae_reference else anomaly_map
        outputs = {"reconstruction": reconstruction, "residual_map": anomaly_map, "input_residual_map": input_residual}
        if self.autoencoder_map:
            outputs["autoencoder_map"] = self.residual(ae_reconstruction, inputs.float(), inputs)
        for name, value in latent.items():
            outputs[f"latent_{name.value}"] = F.interpolate(value, size=inputs.shape[2:], mode=mode, align_corners=False)
        if self.latent_weighting is not None:
            weight = self.latent_weight_floor + outputs[f"latent_{self.latent_weighting.value}"]
            anomaly_map = anomaly_map * weight
        outputs["anomaly_map"] = anomaly_map
        outputs["latent_flip_map"] = outputs["latent_flip_probability"]
        outputs.update({"mask": mask, "input_code": z_in, "code": code})
        return outputs
