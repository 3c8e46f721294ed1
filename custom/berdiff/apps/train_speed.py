# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Training throughput, side by side (``python -m berdiff train_speed``): samples/s of both stages and presets through
the project's training path (:func:`berdiff.training.build_trainer`) and through the configuration the bundles
used before it ("legacy"), alternated in one process on synthetic data of the same shapes.

legacy: MONAI ``DataLoader`` over per-sample dicts (``num_workers`` worker processes), ``SupervisedTrainer`` with
fp16 AMP + gradient scaler on CUDA, ``torch.optim.Adam``/``AdamW`` with PyTorch's default implementation, ignite's
``EMAHandler``, the loss read back (``.item()``) every iteration, the binary check of the codes every iteration.
fast: device-resident batches (:class:`~berdiff.data.tensor_loader.TensorLoader`), fused AdamW, bf16 autocast and
``channels_last`` on CUDA, the warm-up EMA with one fused update, the loss read every 50 iterations, optional
``torch.compile``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Events
from ignite.handlers import EMAHandler
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer
from monai.utils import StrEnum, look_up_option

from berdiff.data.tensor_loader import TensorLoader
from berdiff.engines import BernoulliPrepareBatch
from berdiff.losses import AutoencoderLoss
from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
from berdiff.schedulers import BernoulliScheduler
from berdiff.training import LossMonitor, WarmupEMAHandler, adamw, build_trainer
from berdiff.utils import atomic_write_json

__all__ = ["Stage", "TrainPath", "measure", "train_speed"]


class Stage(StrEnum):
    """autoencoder: stage 1 on images; diffusion: stage 2 on binary codes."""

    AUTOENCODER = "autoencoder"
    DIFFUSION = "diffusion"


class TrainPath(StrEnum):
    """See the module docstring."""

    LEGACY = "legacy"
    FAST = "fast"


def _setup(stage: str, preset: str, size: int, channels: int, n: int, seed: int) -> tuple[nn.Module, dict, Any, Any, Any]:
    torch.manual_seed(seed)
    ae = autoencoder_from_preset(preset, in_channels=channels)
    if stage == Stage.AUTOENCODER:
        images = torch.rand(n, channels, size, size)
        return ae, {"image": images}, AutoencoderLoss(), None, None
    with torch.no_grad():
        shape = ae.eval().encode_stage_2_inputs(torch.zeros(1, channels, size, size)).shape[1:]
    codes = torch.randint(0, 2, (n, *shape), dtype=torch.uint8)
    sched = BernoulliScheduler()
    unet = denoiser_from_preset(preset, latent_channels=ae.latent_channels)
    return unet, {"image": codes}, nn.BCEWithLogitsLoss(), DiffusionInferer(sched), sched


def measure(
    stage: str, preset: str, path: str, device: str | torch.device = "cpu", batch_size: int = 16, size: int = 128,
    channels: int = 1, warmup: int = 3, iterations: int = 10, num_workers: int = 2, compile: bool = False, seed: int = 0,
) -> float:
    """
    Samples per second of one training run: ``warmup`` iterations, then ``iterations`` timed ones.

    Args:
        stage: a :class:`Stage`.
        preset: network preset.
        path: a :class:`TrainPath`.
        device: the training device.
        batch_size, size, channels: batch and image shape.
        warmup, iterations: untimed and timed iterations.
        num_workers: DataLoader worker processes of the legacy path.
        compile: ``torch.compile`` the network (fast path).
        seed: seed of the weights and data.
    """
    stage, path = look_up_option(stage, Stage), look_up_option(path, TrainPath)
    device = torch.device(device)
    n = batch_size * (warmup + iterations)
    network, data, loss, inferer, sched = _setup(stage, preset, size, channels, n, seed)
    network = network.to(device)
    total = warmup + iterations
    if path == TrainPath.LEGACY:
        key = "image"
        samples = [{key: data[key][i].float(), **({"label": data[key][i].float()} if stage == Stage.AUTOENCODER else {})}
                   for i in range(n)]
        loader = DataLoader(samples, batch_size=batch_size, shuffle=True, num_workers=num_workers)
        opt_cls = torch.optim.Adam if stage == Stage.AUTOENCODER else torch.optim.AdamW
        kwargs = {"prepare_batch": BernoulliPrepareBatch(sched, check_every_batch=True)} if sched is not None else {}
        trainer = SupervisedTrainer(
            device=device, max_epochs=1, train_data_loader=loader, network=network,
            optimizer=opt_cls(network.parameters(), 1e-4), loss_function=loss, inferer=inferer,
            amp=device.type == "cuda", decollate=False, **kwargs,
        )
        EMAHandler(network, momentum=0.001).attach(trainer)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: e.state.output["loss"].item())
    else:
        tl = TensorLoader(
            {k: v.to(device) for k, v in data.items()}, batch_size, seed=seed,
            aliases={"label": "image"} if stage == Stage.AUTOENCODER else None,
            dtype=torch.float32,
        )
        kwargs = {"prepare_batch": BernoulliPrepareBatch(sched)} if sched is not None else {}
        trainer = build_trainer(
            device, 1, tl, network, adamw(network.parameters(), 1e-4), loss, inferer=inferer, compile=compile, **kwargs
        )
        WarmupEMAHandler(network, momentum=0.001).attach(trainer)
        LossMonitor(interval=50, log=False).attach(trainer)
    marks: dict[str, float] = {}

    def _mark(engine: Any) -> None:
        if engine.state.iteration in (warmup, total):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[str(engine.state.iteration)] = time.perf_counter()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, _mark)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=total), lambda e: e.terminate())
    trainer.run()
    return iterations * batch_size / (marks[str(total)] - marks[str(warmup)])


def train_speed(
    stages: Sequence[str] | str = ("autoencoder", "diffusion"),
    presets: Sequence[str] | str = ("small", "reference"),
    paths: Sequence[str] | str = ("legacy", "fast"),
    device: str | None = None,
    batch_size: int = 16,
    size: int = 128,
    channels: int = 1,
    warmup: int = 3,
    iterations: int = 10,
    repeats: int = 3,
    num_workers: int = 2,
    compile: bool = False,
    threads: int | None = None,
    out: str | None = None,
) -> dict[str, Any]:
    """
    Samples/s of every (stage, preset, path), median of ``repeats`` runs, the paths alternated within each repeat so
    that they share the machine's conditions; prints a markdown table and the fast/legacy ratio, optionally writes
    the results as JSON to ``out``.

    Args:
        stages, presets, paths: what to measure (lists or comma-separated strings).
        device: the device (CUDA when available by default).
        batch_size, size, channels, warmup, iterations, num_workers, compile: see :func:`measure`.
        repeats: runs per (stage, preset, path); the median is reported.
        threads: torch CPU threads.
        out: optional JSON file for the results (written atomically).
    """
    as_list = lambda v: [x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)  # noqa: E731
    if threads is not None:
        torch.set_num_threads(int(threads))
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for stage in as_list(stages):
        for preset in as_list(presets):
            runs: dict[str, list[float]] = {p: [] for p in as_list(paths)}
            for _ in range(max(1, int(repeats))):
                for path in runs:
                    runs[path].append(measure(stage, preset, path, dev, batch_size, size, channels, warmup, iterations,
                                              num_workers, compile and path == TrainPath.FAST))
            row = {"stage": stage, "preset": preset, **{p: statistics.median(v) for p, v in runs.items()}, "runs": runs}
            if "legacy" in runs and "fast" in runs:
                row["ratio"] = statistics.median(f / l for f, l in zip(runs["fast"], runs["legacy"]))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    result = {"device": str(dev), "batch_size": batch_size, "size": size, "channels": channels, "iterations": iterations,
              "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    print("| stage | preset | legacy samples/s | fast samples/s | fast / legacy (median of paired runs) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['preset']} | {r.get('legacy', float('nan')):.1f} | {r.get('fast', float('nan')):.1f} "
              f"| {r.get('ratio', float('nan')):.2f} |")
    if out:
        atomic_write_json(result, out, indent=1)
    return result
