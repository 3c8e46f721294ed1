# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Bernoulli (bit-flip) diffusion scheduler built on MONAI's :class:`~monai.networks.schedulers.Scheduler`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.schedulers import Scheduler
from monai.utils import StrEnum, look_up_option

__all__ = ["BernoulliPredictionType", "BernoulliScheduler"]


class BernoulliPredictionType(StrEnum):
    """
    What the denoiser's logits predict.

    flip: the probability that each bit of ``x_t`` differs from ``x_0`` (the reference's "epsilon" mean type).
    sample: the probability that each bit of ``x_0`` is one.
    """

    FLIP = "flip"
    SAMPLE = "sample"


TimestepLike = int | torch.Tensor


class BernoulliScheduler(Scheduler):
    """
    Bernoulli diffusion on binary tensors with the symmetric bit-flip kernel
    ``q(x_t | x_0) = B(alpha_bar_t * x_0 + (1 - alpha_bar_t) / 2)``: every bit flips independently with probability
    ``(1 - alpha_bar_t) / 2``. The reverse step samples the exact posterior ``q(x_s | x_t, x_0_hat)`` for any
    ``s < t`` (strided schedules stay exact through ``alpha_{t|s} = alpha_bar_t / alpha_bar_s``).

    Wolleb et al., "Binary Noise for Binary Tasks: Masked Bernoulli Diffusion for Unsupervised Anomaly Detection",
    MICCAI 2024, https://arxiv.org/abs/2403.11667; Chen et al., "BerDiff", https://arxiv.org/abs/2304.04429.

    Args:
        num_train_timesteps: number of diffusion steps used to train the model.
        schedule: member of ``monai.networks.schedulers.NoiseSchedules`` giving the betas.
        prediction_type: member of :class:`BernoulliPredictionType`: what the model's logits predict.
        schedule_args: arguments passed to the schedule function (e.g. ``beta_start``, ``beta_end``).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        prediction_type: str = BernoulliPredictionType.FLIP,
        **schedule_args,
    ) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps}.")
        try:
            look_up_option(prediction_type, BernoulliPredictionType)
        except ValueError:
            allowed = [m.value for m in BernoulliPredictionType]
            raise ValueError(f"prediction_type must be one of {allowed}, got {prediction_type!r}.") from None
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        self.schedule = schedule
        self.schedule_args = dict(schedule_args)
        self.prediction_type = BernoulliPredictionType(prediction_type)

    # ------------------------------------------------------------------ schedule

    def get_config(self) -> dict:
        """The constructor arguments: ``BernoulliScheduler(**sch.get_config())`` rebuilds an equal scheduler."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "schedule": self.schedule,
            "prediction_type": str(self.prediction_type),
            **self.schedule_args,
        }

    def get_timesteps(
        self, num_inference_steps: int, start_timestep: int | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """
        A strictly decreasing schedule of ``num_inference_steps`` integer timesteps from ``start_timestep`` to 0,
        evenly spaced and rounded. The scheduler's state is not changed.

        Args:
            num_inference_steps: number of denoising steps K, ``1 <= K <= start_timestep + 1``.
            start_timestep: first (noisiest) timestep; ``num_train_timesteps - 1`` when None. Masked inference from
                noise level L uses ``L - 1``.
            device: device of the returned tensor.
        """
        start = self.num_train_timesteps - 1 if start_timestep is None else int(start_timestep)
        if not 0 <= start < self.num_train_timesteps:
            raise ValueError(f"start_timestep must be in [0, {self.num_train_timesteps - 1}], got {start_timestep}.")
        if not 1 <= int(num_inference_steps) <= start + 1:
            raise ValueError(
                f"num_inference_steps must be in [1, start_timestep + 1 = {start + 1}] so that every step is a distinct "
                f"timestep, got {num_inference_steps}."
            )
        # evenly spaced values at least 1 apart round to distinct integers, so the schedule is strictly decreasing
        steps = np.round(np.linspace(start, 0, int(num_inference_steps))).astype(np.int64)
        return torch.as_tensor(steps, device=device)

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None, start_timestep: int | None = None
    ) -> None:
        """
        Sets the descending timesteps used by :meth:`step` (see :meth:`get_timesteps`).

        Args:
            num_inference_steps: number of denoising steps.
            device: target device of the stored schedule.
            start_timestep: first timestep of the schedule; ``num_train_timesteps - 1`` when None.
        """
        self.timesteps = self.get_timesteps(num_inference_steps, start_timestep, device)
        self.num_inference_steps = int(num_inference_steps)

    def previous_timestep(self, timestep: TimestepLike) -> int:
        """The entry after ``timestep`` in the stored schedule, or -1 when ``timestep`` is the last one."""
        t = int(timestep)
        schedule = self.timesteps.tolist()
        if t not in schedule:
            raise ValueError(f"timestep {t} is not in the schedule set by set_timesteps: {schedule[:8]}...")
        idx = schedule.index(t)
        return schedule[idx + 1] if idx + 1 < len(schedule) else -1

    # ------------------------------------------------------------------ forward process

    def _alpha_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``alphas_cumprod`` on ``device`` in ``dtype``, copied once (no host-device copy per denoising step)."""
        key = (str(device), dtype, id(self.alphas_cumprod))
        cache = self.__dict__.setdefault("_alpha_tables", {})
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return cache[key]

    def _alpha_bar(self, timesteps: TimestepLike, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at ``timesteps`` (int or tensor of shape () or (B,)), broadcast to ``like``'s rank and dtype."""
        if _is_int(timesteps):  # checked on the host, indexed without a device sync
            if not 0 <= int(timesteps) < self.num_train_timesteps:
                raise ValueError(f"timesteps must be in [0, {self.num_train_timesteps - 1}], got {int(timesteps)}.")
            return self._alpha_table(like.device, like.dtype)[int(timesteps)].reshape((1,) * like.ndim)
        t = torch.as_tensor(timesteps, device=like.device).long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must be in [0, {self.num_train_timesteps - 1}], got {t.tolist()}.")
        alpha_bar = self._alpha_table(like.device, like.dtype)[t]
        return alpha_bar.reshape(alpha_bar.shape + (1,) * (like.ndim - alpha_bar.ndim))

    def flip_prob(self, timesteps: TimestepLike, like: torch.Tensor) -> torch.Tensor:
        """Probability ``(1 - alpha_bar_t) / 2`` that a bit is flipped at ``timesteps``, broadcast to ``like``."""
        return (1.0 - self._alpha_bar(timesteps, like.float())) / 2.0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        Draw ``x_t ~ q(x_t | x_0)``: a bit flips where ``noise < (1 - alpha_bar_t) / 2``.

        Args:
            original_samples: binary tensor ``x_0`` of shape (B, ...).
            noise: uniform noise in [0, 1) with the shape of ``original_samples`` (e.g. ``torch.rand_like``).
            timesteps: timesteps of shape (B,) (or a scalar used for every sample).

        Returns:
            the noised binary tensor, with the dtype of ``original_samples``.

        Raises:
            ValueError: when the noise is not in [0, 1) (Gaussian noise passed by mistake) or shapes differ (on CUDA
                the range is checked asynchronously and a violation surfaces as a device-side assertion).
        """
        if noise.shape != original_samples.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != samples shape {tuple(original_samples.shape)}.")
        if noise.numel() and noise.is_cuda:
            # checked on the device: a host synchronisation here would stall every training iteration
            valid = torch.isfinite(noise).all() & (noise.min() >= 0) & (noise.max() < 1)
            torch._assert_async(valid, "BernoulliScheduler.add_noise expects uniform noise in [0, 1) (torch.rand_like).")
        elif noise.numel() and (not torch.isfinite(noise).all() or noise.min() < 0 or noise.max() >= 1):
            raise ValueError(
                "BernoulliScheduler.add_noise expects uniform noise in [0, 1) (torch.rand_like), got values in "
                f"[{noise.min().item():.3g}, {noise.max().item():.3g}]; Gaussian noise would flip about half of "
                "all bits at every timestep."
            )
        flips = noise < self.flip_prob(timesteps, original_samples).to(noise.dtype)
        return torch.where(flips, 1 - original_samples, original_samples)

    # ------------------------------------------------------------------ reverse process

    def predict_original(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """
        ``x_0_hat = P(x_0 = 1 | x_t)`` from the model's logits (float32).

        Args:
            model_output: logits of the denoiser (flip logits or x_0 logits, see ``prediction_type``).
            sample: the current binary sample ``x_t``.
        """
        prob = torch.sigmoid(model_output.float())
        if self.prediction_type == BernoulliPredictionType.FLIP:
            x_t = sample.float()
            return x_t * (1.0 - prob) + (1.0 - x_t) * prob
        return prob

    def predict_flip(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Predicted probability that each bit of ``sample`` differs from ``x_0`` (float32)."""
        prob = torch.sigmoid(model_output.float())
        if self.prediction_type == BernoulliPredictionType.FLIP:
            return prob
        x_t = sample.float()
        return x_t * (1.0 - prob) + (1.0 - x_t) * prob

    def posterior(
        self, x0_prob: torch.Tensor, sample: torch.Tensor, timestep: TimestepLike, prev_timestep: TimestepLike
    ) -> torch.Tensor:
        """
        ``P(x_s = 1 | x_t = sample, x_0_hat = x0_prob)`` for ``s = prev_timestep < t = timestep``:
        ``theta_1 / (theta_0 + theta_1)`` with ``theta_1 = [a x_t + (1 - a)/2] [ab_s x0 + (1 - ab_s)/2]``,
        ``theta_0 = [a (1 - x_t) + (1 - a)/2] [ab_s (1 - x0) + (1 - ab_s)/2]`` and ``a = ab_t / ab_s``.
        ``prev_timestep = -1`` returns ``x0_prob`` itself.

        Args:
            x0_prob: soft estimate of ``x_0`` in [0, 1].
            sample: binary ``x_t``.
            timestep: t, an int or a tensor of shape () or (B,).
            prev_timestep: s, an int or a tensor of the same form; -1 means "no previous step".

        Returns:
            the Bernoulli parameter of ``x_s`` (float32, in [0, 1]; computed in float64, because
            ``1 - alpha_{t|s}`` is tiny for neighbouring timesteps). With Python ints for t and s the checks run on
            the host: no device synchronisation (the inference loop's form).
        """
        x0 = x0_prob.double()
        x_t = sample.double()
        if _is_int(timestep) and _is_int(prev_timestep):
            if int(prev_timestep) >= int(timestep):
                raise ValueError(f"prev_timestep must be smaller than timestep, got s={prev_timestep}, t={timestep}.")
            if int(prev_timestep) < 0:
                return x0_prob.float()
            return self._posterior(x0, x_t, self._alpha_bar(timestep, x0), self._alpha_bar(prev_timestep, x0))
        t = torch.as_tensor(timestep, device=x0.device).long()
        s = torch.as_tensor(prev_timestep, device=x0.device).long()
        if torch.any(s >= t):
            raise ValueError(f"prev_timestep must be smaller than timestep, got s={s.tolist()}, t={t.tolist()}.")
        last = s < 0
        if torch.all(last):
            return x0_prob.float()
        prob = self._posterior(x0, x_t, self._alpha_bar(t, x0), self._alpha_bar(s.clamp(min=0), x0))
        if torch.any(last):
            prob = torch.where(last.reshape(last.shape + (1,) * (x0.ndim - last.ndim)), x0, prob.double())
        return prob.clamp(0.0, 1.0).float()

    @staticmethod
    def _posterior(x0: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor) -> torch.Tensor:
        """``theta_1 / (theta_0 + theta_1)`` of :meth:`posterior` (float64 in, float32 in [0, 1] out)."""
        a_ts = ab_t / ab_s
        theta_1 = (a_ts * x_t + (1 - a_ts) / 2) * (ab_s * x0 + (1 - ab_s) / 2)
        theta_0 = (a_ts * (1 - x_t) + (1 - a_ts) / 2) * (ab_s * (1 - x0) + (1 - ab_s) / 2)
        return (theta_1 / (theta_0 + theta_1)).clamp(0.0, 1.0).float()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: TimestepLike,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        One reverse step from ``timestep`` to the next entry of the schedule set by :meth:`set_timesteps`.

        Args:
            model_output: the denoiser's logits at ``(sample, timestep)``.
            timestep: current timestep t (must be in the stored schedule).
            sample: current binary sample ``x_t``.
            generator: random generator for the Bernoulli draw.

        Returns:
            ``(prev_sample, x0_prob)``: the binary sample at the previous timestep (``1[x0_prob > 0.5]`` at the last
            step), in the dtype of ``sample``, and the float32 estimate of ``P(x_0 = 1)``.
        """
        x0_prob = self.predict_original(model_output, sample)
        prev_t = self.previous_timestep(timestep)
        if prev_t < 0:
            return (x0_prob > 0.5).to(sample.dtype), x0_prob
        prob = self.posterior(x0_prob, sample, int(timestep), prev_t)
        return bernoulli(prob, generator).to(sample.dtype), x0_prob


def _is_int(value: object) -> bool:
    """A Python or NumPy integer (not a tensor, not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def bernoulli(prob: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """
    Binary draw ``1[u < prob]`` with ``u ~ U[0, 1)`` from :func:`uniform_like`.

    Args:
        prob: Bernoulli parameters.
        generator: None, one generator, or one generator per batch element (see :func:`uniform_like`).
    """
    return (uniform_like(prob, generator) < prob).to(prob.dtype)


def uniform_like(
    like: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """
    Float32 uniform noise in [0, 1) with the shape and device of ``like``.

    Args:
        like: reference tensor of shape (B, ...).
        generator: None (global RNG), one ``torch.Generator`` for the whole tensor, or a sequence of B generators,
            one per batch element, so that a batch reproduces the draws of the same samples run one at a time.
            Generators may live on another device than ``like`` (the draw is moved).
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = like.device if generator is None else generator.device
        u = torch.rand(like.shape, generator=generator, device=gen_device, dtype=torch.float32)
    else:
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}.")
        u = torch.cat(
            [
                torch.rand((1, *like.shape[1:]), generator=g, device=g.device, dtype=torch.float32).to(like.device)
                for g in generator
            ]
        )
    return u.to(like.device)
