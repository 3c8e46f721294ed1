# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
``python -m berdiff benchmark``: masked Bernoulli diffusion and its baselines on folders of 2D images, trained at
equal settings (or equal compute), tuned on a tuning split and scored on a held-out test split.

In order: :func:`~berdiff.apps.benchmark.data.load_data` (healthy training images, test pairs, seeded split),
:func:`~berdiff.apps.benchmark.fit.train_models` (or reuse from ``OUT/checkpoints``),
:func:`~berdiff.apps.benchmark.sweep.tune_methods` (tuning split only), the held-out scores, paired bootstrap and
timing of :mod:`~berdiff.apps.benchmark.held_out`, then ``OUT/results.json`` and ``OUT/benchmarks.md``
(:mod:`~berdiff.apps.benchmark.report`). The IXI data it reads by default is described in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from berdiff.apps.benchmark.data import load_data
from berdiff.apps.benchmark.fit import log, train_models
from berdiff.apps.benchmark.held_out import compare_to_masked, score_held_out, time_methods
from berdiff.apps.benchmark.report import BenchmarkResults, write_results
from berdiff.apps.benchmark.settings import BenchmarkSettings
from berdiff.apps.benchmark.sweep import Runners, tune_methods

__all__ = ["benchmark", "run_benchmark"]


def run_benchmark(settings: BenchmarkSettings) -> BenchmarkResults:
    """
    Train (or reuse) and evaluate every method on the same data; write ``out/results.json`` and ``out/benchmarks.md``.

    Args:
        settings: the benchmark settings.

    Returns:
        the results (also written to ``out/results.json``).
    """
    if settings.threads is not None:
        torch.set_num_threads(int(settings.threads))
    dev = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(settings.data.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_data(settings.data)
    tune, test = data["tune"], data["test"]
    log(f"{len(data['train_images'])} training images; {len(tune['names'])} tuning / {len(test['names'])} test lesion "
        f"images, {len(tune['healthy'])} / {len(test['healthy'])} healthy")
    models, training = train_models(settings, data["train_images"], data["train_files"], dev, out_dir)
    runners = Runners(models, settings.data.seed, dev, settings.sweep.ddpm_eta)
    tuning, chosen = tune_methods(settings, runners, tune, dev)
    methods = score_held_out(settings, chosen, test, models, training, dev)
    compare_to_masked(methods, settings.data.seed)
    time_methods(methods, chosen, test, settings.sweep.timing_slices, dev)
    cli = len(sys.argv) > 1 and sys.argv[1] == "benchmark"
    results = {
        "command": "python -m berdiff benchmark " + " ".join(sys.argv[2:]) if cli
        else f"berdiff.apps.benchmark.benchmark(...) from {Path(sys.argv[0]).name}",
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
                   + f", torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": {"train_dir": str(data["train_path"]), "test_dir": str(data["test_path"]),
                 "n_train": len(data["train_images"]), "n_tune": len(tune["names"]), "n_test": len(test["names"]),
                 "n_tune_healthy": len(tune["healthy"]), "n_test_healthy": len(test["healthy"]),
                 "tune_names": tune["names"], "test_names": test["names"]},
        "settings": {**settings.record(), "device": str(dev), "threads": torch.get_num_threads()},
        "training": training,
        "tuning": {k: [{c: v for c, v in r.items() if c != "dice_grid"} for r in rows] for k, rows in tuning.items()},
        "methods": methods,
    }
    written = write_results(results, out_dir)
    log(f"wrote {out_dir / 'benchmarks.md'} and {out_dir / 'results.json'}")
    return written


def benchmark(
    train_dir: str | None = None,
    test_dir: str | None = None,
    out: str = "outputs/benchmark",
    methods: Sequence[str] | str | None = None,
    data_dir: str | None = None,
    size: int = 128,
    seed: int = 0,
    lesion_seed: int = 0,
    tune_fraction: float = 0.4,
    ae_preset: str = "small",
    ae_iterations: int = 600,
    ae_batch_size: int = 16,
    ae_lr: float = 1e-3,
    denoiser_preset: str = "small",
    denoiser_channels: Sequence[int] | None = (32, 64, 64),
    ddpm_channels: Sequence[int] = (16, 32, 64, 64),
    diffusion_iterations: int = 600,
    diffusion_batch_size: int = 16,
    diffusion_lr: float = 5e-4,
    budget_tflop: float | None = None,
    ae_share: float = 0.5,
    train_max_timestep: int | str | None = "auto",
    prediction_type: str = "sample",
    ema_momentum: float = 0.001,
    precision: str = "auto",
    compile: bool = False,
    max_train_seconds: float | None = None,
    num_train_timesteps: int = 1000,
    noise_levels: Sequence[int] = (50, 100, 200, 300),
    prob_thresholds: Sequence[float] = (0.2, 0.35, 0.5, 0.6, 0.8),
    ddpm_noise_levels: Sequence[int] = (100, 200, 300),
    tune_steps: int = 10,
    k_values: Sequence[int] = (5, 10, 25, 50, 100),
    k_tolerance: float = 0.01,
    ddpm_steps: int = 10,
    ddpm_eta: float = 0.0,
    timing_slices: int = 5,
    eval_batch_size: int = 8,
    min_component: int = 15,
    device: str | None = None,
    threads: int | None = None,
    limit_train: int | None = None,
) -> dict[str, Any]:
    """
    The command line of :func:`run_benchmark`: every flag is a field of
    :class:`~berdiff.apps.benchmark.settings.BenchmarkSettings` (documented there, by group: ``DataSettings``,
    ``TrainingSettings``, ``SweepSettings``).

    Args:
        train_dir: folder of healthy 2D training images (default: ``<data_dir>/train``).
        test_dir: folder with ``images/``, ``labels/`` (and optional ``healthy/``); default: a lesion set generated
            from ``<data_dir>/val`` into ``out/lesion_set``.
        out: output folder (checkpoints under ``out/checkpoints``).
        methods: subset of ``ae``, ``unmasked``, ``masked``, ``ddpm`` (default: all).
        data_dir: the IXI T1 mid-axial slice folder (``train/``, ``val/``; default ``$BERDIFF_IXI_DIR``), used for
            whichever of ``train_dir`` / ``test_dir`` is not given (see docs/benchmarks.md).
        size, seed, lesion_seed, tune_fraction, limit_train: see ``DataSettings``.
        ae_preset, ae_iterations, ae_batch_size, ae_lr, denoiser_preset, denoiser_channels, ddpm_channels,
            diffusion_iterations, diffusion_batch_size, diffusion_lr, budget_tflop, ae_share, train_max_timestep,
            prediction_type, ema_momentum, precision, compile, max_train_seconds, num_train_timesteps: see ``TrainingSettings``.
        noise_levels, prob_thresholds, ddpm_noise_levels, tune_steps, k_values, k_tolerance, ddpm_steps, ddpm_eta,
            timing_slices, eval_batch_size, min_component: see ``SweepSettings``.
        device: torch device (default: CUDA if available, else CPU).
        threads: torch CPU threads (default: torch's choice).

    Returns:
        the results dict (also written to ``out/results.json``).
    """
    flags = dict(locals())
    return run_benchmark(BenchmarkSettings.from_flags(**flags))
