# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Training the benchmark's models at equal settings or equal compute: :func:`fit` (the project's one training path),
the checkpoint cache (:func:`cache_key`, :func:`cached`) and :func:`train_models`, which trains or reuses the binary
autoencoder, the Bernoulli denoiser on its codes and the image-space Gaussian DDPM.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Events
from monai.engines.utils import DiffusionPrepareBatch, default_prepare_batch
from monai.inferers import DiffusionInferer, SimpleInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from berdiff.apps.benchmark.settings import REFERENCE_SETTINGS, BenchmarkSettings, Method, as_tuple
from berdiff.engines import BernoulliPrepareBatch
from berdiff.losses import AutoencoderLoss, timestep_only_bce
from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
from berdiff.schedulers import BernoulliPredictionType, BernoulliScheduler
from berdiff.utils import atomic_save_torch, to_json_safe

__all__ = ["METHOD_PARTS", "Models", "cache_key", "cached", "fit", "log", "max_timestep", "n_params", "train_models"]


def log(msg: str) -> None:
    """
    Print one timestamped progress line of the benchmark.

    Args:
        msg: the message.
    """
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def n_params(*modules: nn.Module | None) -> int:
    """
    The number of parameters of the given modules together.

    Args:
        modules: networks (``None`` entries are skipped).
    """
    return int(sum(p.numel() for m in modules if m is not None for p in m.parameters()))


def cache_key(files: Sequence[str | os.PathLike], settings: dict[str, Any]) -> str:
    """
    A short hash of a training-file listing (names and byte sizes) and the training settings: checkpoints are reused
    exactly when both are unchanged.

    Args:
        files: the training files.
        settings: the model's training settings.
    """
    listing = [(Path(f).name, Path(f).stat().st_size) for f in files]
    blob = json.dumps({"files": listing, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit(
    network: nn.Module,
    loss_function: Callable,
    data: dict[str, torch.Tensor],
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    name: str,
    iterations: int | None = None,
    budget_flops: float | None = None,
    inferer: Any = None,
    prepare_batch: Callable | None = None,
    max_seconds: float | None = None,
    aliases: dict[str, str] | None = None,
    ema_momentum: float = 0.001,
    precision: str = "auto",
    compile: bool = False,
) -> dict[str, Any]:
    """
    Train ``network`` through the project's one training path (:func:`berdiff.training.build_trainer`: device-held
    batches, fused AdamW, bf16 on CUDA, warm-up EMA whose weights are loaded into ``network`` at the end) for
    ``iterations`` iterations, or for as many as ``budget_flops`` buys (training FLOPs of one iteration counted
    with ``FlopCounterMode``), optionally capped at ``max_seconds``.

    Args:
        network: the network, trained in place (it ends in eval mode with the EMA weights).
        loss_function: the loss.
        data: the training tensors (``image``, ...), moved to ``device``.
        batch_size, lr, seed: batch size, learning rate and seed.
        device: the training device.
        name: the model's name in the log.
        iterations: the iterations (ignored when ``budget_flops`` is given).
        budget_flops: training FLOPs to spend.
        inferer, prepare_batch: the trainer's inferer and batch preparation (diffusion models).
        max_seconds: optional wall-clock cap.
        aliases: extra batch keys that alias a data key (``{"label": "image"}`` for the autoencoder).
        ema_momentum, precision, compile: see :class:`~berdiff.apps.benchmark.settings.TrainingSettings`.

    Returns:
        the training record (iterations, seconds, samples/s, FLOPs, final loss and loss history).
    """
    from berdiff.data.tensor_loader import TensorLoader
    from berdiff.training import LossMonitor, WarmupEMAHandler, adamw, build_trainer, training_flops

    torch.manual_seed(seed)
    data = {k: v.to(device) for k, v in data.items()}
    loader = TensorLoader(data, batch_size=min(batch_size, len(next(iter(data.values())))), seed=seed, aliases=aliases)
    prepare = prepare_batch if prepare_batch is not None else default_prepare_batch
    run_inferer = inferer if inferer is not None else SimpleInferer()

    def one_step() -> torch.Tensor:
        batch = prepare(next(iter(loader)), device)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        return loss_function(run_inferer(inputs, network, *args, **kwargs), targets).mean()

    network.train()
    flops = training_flops(one_step)
    network.zero_grad(set_to_none=True)
    if budget_flops is not None:
        iterations = max(1, int(budget_flops // flops))
    if iterations is None or iterations < 1:
        raise ValueError(f"{name}: give iterations >= 1 or a training budget, got {iterations}.")
    trainer = build_trainer(
        device, max_epochs=max(1, math.ceil(iterations / len(loader))), train_data_loader=loader, network=network,
        optimizer=adamw(network.parameters(), lr), loss_function=loss_function, inferer=inferer,
        prepare_batch=prepare, precision=precision, compile=compile, max_iterations=iterations,
    )
    ema = WarmupEMAHandler(network, momentum=ema_momentum)
    ema.attach(trainer)
    monitor = LossMonitor(interval=max(1, min(100, iterations // 10)), name=name, print_fn=log)
    monitor.attach(trainer)
    start = time.perf_counter()
    if max_seconds is not None:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(every=10),
            lambda e: e.terminate() if time.perf_counter() - start > max_seconds else None,
        )
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    network.load_state_dict(ema.ema_model.state_dict())
    network.eval()
    done = int(trainer.state.iteration)
    return {
        "iterations": done,
        "train_seconds": seconds,
        "samples_per_second": done * loader.batch_size / max(seconds, 1e-9),
        "flops_per_iteration": flops,
        "train_tflop": done * flops / 1e12,
        "final_loss": monitor.final_loss(last=3),
        "loss_history": monitor.history,
    }


def max_timestep(setting: int | str | None, levels: Sequence[int], total: int) -> int | None:
    """
    The training timestep range's end: ``"auto"`` = the largest noise level of the sweep (inference from L visits
    only t < L), None = all ``total`` timesteps, or the given number.

    Args:
        setting: ``"auto"``, ``None`` or a number in ``[1, total]``.
        levels: the noise levels the method's sweep visits.
        total: T.
    """
    if setting is None:
        return None
    if setting == "auto":
        return int(max(levels))
    value = int(setting)
    if not 1 <= value <= total:
        raise ValueError(f"train_max_timestep must be 'auto', None or in [1, {total}], got {setting}.")
    return value


def cached(
    path: Path, network: nn.Module, train: Callable[[], dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    """
    Load ``network``'s weights from the checkpoint cache ``path`` when it is readable, else run ``train`` and save
    the weights, the training record and the settings there (atomically).

    Args:
        path: the cache file (its name holds :func:`cache_key`).
        network: the network to load into or train.
        train: trains ``network`` and returns its training record.
        settings: the training settings, stored for the record.

    Returns:
        the training record with ``cached`` (whether the weights were reused).
    """
    if path.is_file():
        try:  # tensors and strings only (info and settings as JSON), so weights_only=True reads it
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            info = ckpt["info"]  # JSON text; caches of earlier versions hold the dict itself
            info = json.loads(info) if isinstance(info, str) else dict(info)
        except Exception as e:  # a cache written by an older version (pickled dicts): train again
            log(f"ignoring unreadable checkpoint cache {path.name} ({type(e).__name__})")
        else:
            network.load_state_dict(ckpt["state_dict"])
            network.eval()
            log(f"reusing checkpoint {path.name}")
            return {**info, "cached": True}
    info = train()
    settings_text = json.dumps(to_json_safe(settings))
    record = {"state_dict": network.state_dict(), "info": json.dumps(info), "settings": settings_text}
    atomic_save_torch(record, path)
    return {**info, "cached": False}


@dataclass
class Models:
    """
    The trained networks and schedulers of one run (``None`` for a network no requested method needs).

    Args:
        ae: the binary autoencoder.
        unet: the Bernoulli denoiser.
        ddpm: the image-space Gaussian DDPM.
        bernoulli: the Bernoulli scheduler.
        gaussian: the DDPM scheduler.
    """

    ae: nn.Module | None
    unet: nn.Module | None
    ddpm: nn.Module | None
    bernoulli: BernoulliScheduler
    gaussian: DDPMScheduler

    def params(self, method: str) -> int:
        """
        The parameters a method uses (the Bernoulli methods count the autoencoder too).

        Args:
            method: a :class:`~berdiff.apps.benchmark.settings.Method`.
        """
        return {Method.AE: lambda: n_params(self.ae), Method.DDPM: lambda: n_params(self.ddpm)}.get(
            method, lambda: n_params(self.ae, self.unet)
        )()


#: the trained models behind each method (training records are summed over them)
METHOD_PARTS = {Method.AE: ("autoencoder",), Method.DDPM: ("gaussian ddpm",)}


def _denoiser_overrides(channels: Sequence[int] | None) -> dict[str, Any]:
    if channels is None:
        return {}
    ch = tuple(int(c) for c in as_tuple(channels))
    overrides: dict[str, Any] = {"channels": ch, "num_head_channels": ch, "norm_num_groups": min(16, math.gcd(*ch))}
    if len(ch) != 3:
        overrides["attention_levels"] = tuple([False] * (len(ch) - 1) + [True])
    return overrides


def train_models(
    settings: BenchmarkSettings, train_images: Any, train_files: Sequence[Path], device: torch.device, out_dir: Path
) -> tuple[Models, dict[str, dict[str, Any]]]:
    """
    Train (or reuse from ``out_dir/checkpoints``) every network the requested methods need. With a budget, the
    Bernoulli methods pay for the autoencoder and the denoiser and the DDPM gets the same total.

    Args:
        settings: the benchmark settings.
        train_images: (N, size, size) float32 training images in [0, 1].
        train_files: their files (for the cache key).
        device: the training device.
        out_dir: the output folder.

    Returns:
        the models and the training records (``autoencoder``, ``bernoulli denoiser``, ``gaussian ddpm``).
    """
    t, seed, methods = settings.training, settings.data.seed, set(settings.methods)
    T = t.num_train_timesteps
    listing = [str(p) for p in train_files]
    ckpt_dir = out_dir / "checkpoints"
    training: dict[str, dict[str, Any]] = {}
    bernoulli = BernoulliScheduler(num_train_timesteps=T, prediction_type=t.prediction_type)
    models = Models(None, None, None, bernoulli, DDPMScheduler(num_train_timesteps=T))
    budget = t.budget_flops
    ae_budget = None if budget is None else t.ae_share * budget
    fit_kwargs = t.fit_options()
    images_t = torch.from_numpy(train_images[:, None])
    if {Method.AE, Method.MASKED, Method.UNMASKED} & methods:
        ae_settings = {"model": "ae", "preset": t.ae_preset, "size": settings.data.size, "iterations": t.ae_iterations,
                       "budget": ae_budget, "batch_size": t.ae_batch_size, "lr": t.ae_lr, "seed": seed,
                       "max_seconds": t.max_train_seconds, "ema": t.ema_momentum}
        ae_key = cache_key(listing, ae_settings)
        ae = models.ae = autoencoder_from_preset(t.ae_preset, in_channels=1).to(device)
        info = cached(
            ckpt_dir / f"ae_{ae_key}.pt", ae,
            lambda: fit(ae, AutoencoderLoss(), {"image": images_t}, t.ae_batch_size, t.ae_lr, seed, device,
                        "autoencoder", iterations=t.ae_iterations, budget_flops=ae_budget, aliases={"label": "image"},
                        **fit_kwargs),
            ae_settings,
        )
        training["autoencoder"] = {**info, "batch_size": t.ae_batch_size, "lr": t.ae_lr, "params": n_params(ae),
                                   "key": ae_key}
    if {Method.MASKED, Method.UNMASKED} & methods:
        overrides = _denoiser_overrides(t.denoiser_channels)
        visited = list(settings.sweep.noise_levels) + [L for L, _ in REFERENCE_SETTINGS if L <= T]
        b_max_t = max_timestep(t.train_max_timestep, visited, T)
        un_budget = None if budget is None else budget - training["autoencoder"]["train_tflop"] * 1e12
        un_settings = {"model": "bernoulli_denoiser", "ae_key": ae_key, "preset": t.denoiser_preset,
                       "overrides": overrides, "T": T, "max_timestep": b_max_t, "iterations": t.diffusion_iterations,
                       "budget": un_budget, "batch_size": t.diffusion_batch_size, "lr": t.diffusion_lr, "seed": seed,
                       "max_seconds": t.max_train_seconds, "ema": t.ema_momentum}
        if t.prediction_type != BernoulliPredictionType.FLIP:  # flip checkpoints keep their earlier cache key
            un_settings["prediction_type"] = t.prediction_type
        un_key = cache_key(listing, un_settings)
        unet = models.unet = denoiser_from_preset(t.denoiser_preset, latent_channels=ae.latent_channels, **overrides)
        unet.to(device)

        def train_unet() -> dict[str, Any]:
            from berdiff.training import encode_dataset

            codes = encode_dataset([{"image": x} for x in images_t], ae, device, batch_size=64)
            return fit(unet, nn.BCEWithLogitsLoss(), {"image": codes.float()}, t.diffusion_batch_size, t.diffusion_lr,
                       seed, device, "bernoulli denoiser", iterations=t.diffusion_iterations, budget_flops=un_budget,
                       inferer=DiffusionInferer(models.bernoulli),
                       prepare_batch=BernoulliPrepareBatch(models.bernoulli, max_timestep=b_max_t), **fit_kwargs)

        info = cached(ckpt_dir / f"bernoulli_{un_key}.pt", unet, train_unet, un_settings)
        training["bernoulli denoiser"] = {**info, "batch_size": t.diffusion_batch_size, "lr": t.diffusion_lr,
                                          "params": n_params(unet), "key": un_key, "max_timestep": b_max_t,
                                          "prediction_type": t.prediction_type,
                                          "baseline_loss": timestep_only_bce(models.bernoulli, b_max_t),
                                          "baseline": "timestep-only flip predictor (closed form)"}
    if Method.DDPM in methods:
        ch = tuple(int(c) for c in as_tuple(t.ddpm_channels))
        g_max_t = max_timestep(t.train_max_timestep, settings.sweep.ddpm_noise_levels, T)
        ddpm_settings = {"model": "ddpm", "channels": ch, "size": settings.data.size, "T": T, "max_timestep": g_max_t,
                         "iterations": t.diffusion_iterations, "budget": budget, "batch_size": t.diffusion_batch_size,
                         "lr": t.diffusion_lr, "seed": seed, "max_seconds": t.max_train_seconds, "ema": t.ema_momentum}
        dd_key = cache_key(listing, ddpm_settings)
        ddpm = models.ddpm = DiffusionModelUNet(
            spatial_dims=2, in_channels=1, out_channels=1, channels=ch,
            attention_levels=tuple([False] * (len(ch) - 1) + [True]), num_res_blocks=1, num_head_channels=ch[-1],
            norm_num_groups=min(16, math.gcd(*ch)),
        ).to(device)
        info = cached(
            ckpt_dir / f"ddpm_{dd_key}.pt", ddpm,
            lambda: fit(ddpm, nn.MSELoss(), {"image": images_t * 2.0 - 1.0}, t.diffusion_batch_size, t.diffusion_lr,
                        seed, device, "gaussian ddpm", iterations=t.diffusion_iterations, budget_flops=budget,
                        inferer=DiffusionInferer(models.gaussian),
                        prepare_batch=DiffusionPrepareBatch(num_train_timesteps=g_max_t or T), **fit_kwargs),
            ddpm_settings,
        )
        training["gaussian ddpm"] = {**info, "batch_size": t.diffusion_batch_size, "lr": t.diffusion_lr,
                                     "params": n_params(ddpm), "key": dd_key, "max_timestep": g_max_t,
                                     "baseline_loss": 1.0, "baseline": "zero-noise predictor (E[eps^2] = 1)"}
    return models, training
