# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The benchmark's settings as typed, frozen objects: what to read (:class:`DataSettings`), how to train
(:class:`TrainingSettings`), what to sweep and score (:class:`SweepSettings`), gathered in :class:`BenchmarkSettings`,
which :meth:`BenchmarkSettings.from_flags` builds and checks from the flags of ``python -m berdiff benchmark``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.utils import StrEnum, look_up_option

from berdiff.schedulers import BernoulliPredictionType

__all__ = [
    "DATA_DIR_ENV",
    "METHOD_LABELS",
    "REFERENCE_SETTINGS",
    "THRESHOLD_GRID",
    "BenchmarkSettings",
    "DataSettings",
    "Method",
    "SweepSettings",
    "TrainingSettings",
    "as_tuple",
]

#: environment variable naming the IXI T1 mid-axial slice folder (``train/`` and ``val/``), see docs/benchmarks.md
DATA_DIR_ENV = "BERDIFF_IXI_DIR"

#: (L, P) of the reference repository, always included in the masked sweep
REFERENCE_SETTINGS = ((100, 0.6), (200, 0.5), (300, 0.8))

#: threshold grid on protocol A's soft map for "Dice at the tuned threshold"
THRESHOLD_GRID = np.round(np.arange(0.05, 1.0, 0.05), 2)


class Method(StrEnum):
    """
    Benchmarked methods.

    ae: reconstruction error of the binary autoencoder alone.
    unmasked: Bernoulli diffusion partial denoising of the code without the mask.
    masked: masked Bernoulli diffusion (this project's method).
    ddpm: image-space Gaussian DDPM partial noising + DDIM denoising.
    """

    AE = "ae"
    UNMASKED = "unmasked"
    MASKED = "masked"
    DDPM = "ddpm"


METHOD_LABELS = {
    Method.AE: "AE (binary autoencoder only)",
    Method.UNMASKED: "Bernoulli diffusion, unmasked",
    Method.MASKED: "Bernoulli diffusion, masked (ours)",
    Method.DDPM: "Gaussian DDPM (image space)",
}


def as_tuple(x: Any) -> tuple:
    """
    A tuple from a comma-separated string, a number or a sequence (the forms ``fire`` passes a list flag in).

    Args:
        x: the flag value.
    """
    if isinstance(x, str):
        return tuple(v.strip() for v in x.split(",") if v.strip())
    if isinstance(x, (int, float)):
        return (x,)
    return tuple(x)


@dataclass(frozen=True)
class DataSettings:
    """
    What the benchmark reads and where it writes.

    Args:
        train_dir: folder of healthy 2D training images (default: ``<data_dir>/train``).
        test_dir: folder with ``images/``, ``labels/`` (and optional ``healthy/``); default: a lesion set generated
            with ``make_lesions(seed=lesion_seed)`` from ``<data_dir>/val`` into ``out/lesion_set``.
        data_dir: the IXI T1 mid-axial slice folder (``train/``, ``val/``); default: ``$BERDIFF_IXI_DIR``.
        out: output folder (checkpoints under ``out/checkpoints``).
        size: image side after padding + resizing.
        seed: seed of training, of the tuning/test split and of the inference noise.
        lesion_seed: seed of the generated lesion set.
        tune_fraction: fraction of the lesion images used for tuning (the rest is the held-out test split).
        limit_train: use only the first N training images.
    """

    train_dir: str | None = None
    test_dir: str | None = None
    data_dir: str | None = None
    out: str = "outputs/benchmark"
    size: int = 128
    seed: int = 0
    lesion_seed: int = 0
    tune_fraction: float = 0.4
    limit_train: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.tune_fraction < 1:
            raise ValueError(f"tune_fraction must be in (0, 1), got {self.tune_fraction}.")

    def folder(self, split: str) -> Path:
        """
        ``<data_dir>/<split>`` of the IXI slice folder given by ``data_dir`` or ``$BERDIFF_IXI_DIR``.

        Args:
            split: ``train`` or ``val``.

        Raises:
            FileNotFoundError: neither is set, or the folder does not exist.
        """
        root = self.data_dir or os.environ.get(DATA_DIR_ENV)
        flag = "--train_dir" if split == "train" else "--test_dir"
        if not root:
            raise FileNotFoundError(
                f"no {split} images: pass {flag}, or --data_dir (or set {DATA_DIR_ENV}) to a folder of IXI T1 "
                "mid-axial slices with train/ and val/ sub-folders (docs/benchmarks.md says how to build it)."
            )
        path = Path(root) / split
        if not path.is_dir():
            raise FileNotFoundError(f"the IXI slice folder {root!r} has no {split}/ sub-folder (docs/benchmarks.md).")
        return path


@dataclass(frozen=True)
class TrainingSettings:
    """
    How the models are trained (the same budget for both diffusion models).

    Args:
        ae_preset: autoencoder preset (``berdiff.networks.Preset``).
        ae_iterations, ae_batch_size, ae_lr: autoencoder training budget.
        denoiser_preset: Bernoulli denoiser preset; ``denoiser_channels`` overrides its widths (None keeps them).
        denoiser_channels: see ``denoiser_preset``.
        ddpm_channels: widths of the image-space DDPM UNet (attention at the last level).
        diffusion_iterations, diffusion_batch_size, diffusion_lr: the budget of both diffusion models.
        budget_tflop: equal compute per method, in training TFLOP; replaces the iteration counts. The Bernoulli
            methods spend ``ae_share`` of it on the autoencoder and the rest on the denoiser; the DDPM gets all of it.
        ae_share: fraction of ``budget_tflop`` for the autoencoder.
        train_max_timestep: diffusion training timesteps are drawn from ``[0, max)``: ``"auto"`` = the largest L of
            the method's sweep, None = all T.
        prediction_type: what the Bernoulli denoiser's logits predict (``berdiff.schedulers.BernoulliPredictionType``):
            ``sample`` (the clean code) or ``flip`` (x_t XOR x_0).
        ema_momentum: final momentum of the warm-up EMA whose weights are evaluated.
        precision: training precision (``berdiff.training.Precision``).
        compile: ``torch.compile`` the networks for training.
        max_train_seconds: optional wall-clock cap per model.
        num_train_timesteps: T of both diffusion models.
    """

    ae_preset: str = "small"
    ae_iterations: int = 600
    ae_batch_size: int = 16
    ae_lr: float = 1e-3
    denoiser_preset: str = "small"
    denoiser_channels: Sequence[int] | None = (32, 64, 64)
    ddpm_channels: Sequence[int] = (16, 32, 64, 64)
    diffusion_iterations: int = 600
    diffusion_batch_size: int = 16
    diffusion_lr: float = 5e-4
    budget_tflop: float | None = None
    ae_share: float = 0.5
    train_max_timestep: int | str | None = "auto"
    prediction_type: str = "sample"
    ema_momentum: float = 0.001
    precision: str = "auto"
    compile: bool = False
    max_train_seconds: float | None = None
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.budget_tflop is not None and not (float(self.budget_tflop) > 0 and 0 < self.ae_share < 1):
            raise ValueError(f"need budget_tflop > 0 and ae_share in (0, 1), got {self.budget_tflop}, {self.ae_share}.")
        prediction = look_up_option(self.prediction_type, BernoulliPredictionType)
        object.__setattr__(self, "prediction_type", str(prediction))

    @property
    def budget_flops(self) -> float | None:
        """The equal-compute budget in FLOPs (``None`` without one)."""
        return None if self.budget_tflop is None else float(self.budget_tflop) * 1e12

    def fit_options(self) -> dict[str, Any]:
        """The options every model's training shares (EMA, precision, compile, time cap)."""
        return {
            "ema_momentum": self.ema_momentum,
            "precision": self.precision,
            "compile": self.compile,
            "max_seconds": self.max_train_seconds,
        }


@dataclass(frozen=True)
class SweepSettings:
    """
    What is tuned on the tuning split and how methods are scored.

    Args:
        noise_levels, prob_thresholds: (L, P) grid of masked Bernoulli diffusion (L grid also for unmasked).
        ddpm_noise_levels: L grid of the DDPM.
        tune_steps: K used in the (L, P) and L sweeps (``min(K, L)``).
        k_values: K grid of the K sweep (values above L are dropped).
        k_tolerance: the tuned K is the smallest K whose tuning Dice is within this of the best K's.
        ddpm_steps: K of the DDPM.
        ddpm_eta: DDIM eta of the DDPM (0 deterministic, 1 ancestral).
        timing_slices: single-slice runs per method for the time and memory figures (median).
        eval_batch_size: batch size of the evaluation runs.
        min_component: protocol A's component-size filter.
    """

    noise_levels: tuple[int, ...] = (50, 100, 200, 300)
    prob_thresholds: tuple[float, ...] = (0.2, 0.35, 0.5, 0.6, 0.8)
    ddpm_noise_levels: tuple[int, ...] = (100, 200, 300)
    tune_steps: int = 10
    k_values: tuple[int, ...] = (5, 10, 25, 50, 100)
    k_tolerance: float = 0.01
    ddpm_steps: int = 10
    ddpm_eta: float = 0.0
    timing_slices: int = 5
    eval_batch_size: int = 8
    min_component: int = 15

    def __post_init__(self) -> None:
        kinds = {"noise_levels": int, "prob_thresholds": float, "ddpm_noise_levels": int, "k_values": int}
        for name, kind in kinds.items():
            object.__setattr__(self, name, tuple(kind(v) for v in as_tuple(getattr(self, name))))
        if not self.prob_thresholds or any(not 0 <= p <= 1 for p in self.prob_thresholds):
            got = list(self.prob_thresholds)
            raise ValueError(f"prob_thresholds must be non-empty with values in [0, 1], got {got}.")

    def check_levels(self, num_train_timesteps: int) -> None:
        """
        Raise when a noise-level grid is empty or leaves ``[1, T]``.

        Args:
            num_train_timesteps: T.
        """
        for name in ("noise_levels", "ddpm_noise_levels"):
            grid = list(getattr(self, name))
            if not grid or any(not 1 <= v <= num_train_timesteps for v in grid):
                raise ValueError(f"{name} must be non-empty with values in [1, {num_train_timesteps}], got {grid}.")


@dataclass(frozen=True)
class BenchmarkSettings:
    """
    Every setting of one benchmark run.

    Args:
        data: what to read and where to write.
        training: how to train.
        sweep: what to tune and score.
        methods: the methods to run, in :class:`Method` order.
        device: torch device (default: CUDA if available, else CPU).
        threads: torch CPU threads (default: torch's choice).
    """

    data: DataSettings = field(default_factory=DataSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    methods: tuple[str, ...] = tuple(Method.__members__.values())
    device: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        names = [str(m) for m in as_tuple(self.methods)]
        all_methods = list(Method.__members__.values())
        bad = [m for m in names if m not in all_methods]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {all_methods}.")
        object.__setattr__(self, "methods", tuple(look_up_option(m, Method) for m in names))
        self.sweep.check_levels(self.training.num_train_timesteps)

    @classmethod
    def from_flags(cls, methods: Sequence[str] | str | None = None, **flags: Any) -> BenchmarkSettings:
        """
        The settings from the flat flags of ``python -m berdiff benchmark`` (each flag goes to the group that has a
        field of its name).

        Args:
            methods: subset of :class:`Method` names (default: all).
            flags: the other flags.

        Raises:
            TypeError: a flag no group knows.
        """
        groups: dict[str, dict[str, Any]] = {"data": {}, "training": {}, "sweep": {}, "top": {}}
        classes = {"data": DataSettings, "training": TrainingSettings, "sweep": SweepSettings}
        owners = {f.name: g for g, c in classes.items() for f in dataclasses.fields(c)}
        owners.update(device="top", threads="top")
        for name, value in flags.items():
            if name not in owners:
                raise TypeError(f"unknown benchmark setting {name!r}.")
            groups[owners[name]][name] = value
        return cls(
            data=DataSettings(**groups["data"]),
            training=TrainingSettings(**groups["training"]),
            sweep=SweepSettings(**groups["sweep"]),
            methods=tuple(Method.__members__.values()) if methods is None else methods,
            **groups["top"],
        )

    def record(self) -> dict[str, Any]:
        """The flat settings dict written into ``results.json`` (without the folders)."""
        folders = ("train_dir", "test_dir", "data_dir", "out")
        data = {k: v for k, v in dataclasses.asdict(self.data).items() if k not in folders}
        sweep = dataclasses.asdict(self.sweep)
        return {**data, **dataclasses.asdict(self.training), **sweep, "methods": [str(m) for m in self.methods]}
