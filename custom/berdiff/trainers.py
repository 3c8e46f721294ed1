# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""
The one fast training path of the bundle configs and the benchmark harness: MONAI's ``SupervisedTrainer`` configured
for throughput (bf16 autocast and ``channels_last`` on CUDA, fused AdamW, optional ``torch.compile``, no
per-iteration host synchronisation), an EMA with warm-up, a loss monitor that synchronises only every N iterations,
codes encoded once and kept on the device, and a learning-rate rule for large batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from monai.engines import SupervisedTrainer
from monai.engines.utils import default_prepare_batch
from monai.utils import StrEnum, look_up_option
from torch.utils.data import DataLoader, Dataset

from berdiff.data.tensor_loader import TensorLoader

__all__ = [
    "Precision",
    "LearningRateRule",
    "resolve_precision",
    "scaled_learning_rate",
    "adamw",
    "build_trainer",
    "WarmupEMAHandler",
    "LossMonitor",
    "encode_dataset",
    "code_loader",
    "diffusion_loader",
    "training_flops",
]

logger = logging.getLogger(__name__)


class Precision(StrEnum):
    """
    Arithmetic of the training forward pass.

    auto: bf16 autocast on CUDA, fp32 elsewhere (CPUs without bf16 units run bf16 slower than fp32).
    fp32: no autocast.
    bf16: bf16 autocast (CUDA only; no loss scaling is needed for bf16).
    """

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class LearningRateRule(StrEnum):
    """How :func:`scaled_learning_rate` adapts a learning rate tuned at one batch size to another: ``none``,
    ``sqrt`` (lr x sqrt(batch / base batch), the usual rule for Adam) or ``linear`` (lr x batch / base batch)."""

    NONE = "none"
    SQRT = "sqrt"
    LINEAR = "linear"


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """
    The precision to train with on ``device``.

    Raises:
        ValueError: an unknown name, or ``bf16`` on a non-CUDA device.
    """
    precision = Precision(look_up_option(precision, Precision))
    device = torch.device(device)
    if precision == Precision.AUTO:
        return Precision.BF16 if device.type == "cuda" else Precision.FP32
    if precision == Precision.BF16 and device.type != "cuda":
        raise ValueError(f"precision 'bf16' needs a CUDA device, got {device}; use 'fp32' or 'auto'.")
    return precision


def scaled_learning_rate(base_lr: float, batch_size: int, base_batch_size: int, rule: str = LearningRateRule.SQRT) -> float:
    """
    ``base_lr`` (tuned at ``base_batch_size``) adapted to ``batch_size`` by a :class:`LearningRateRule`.

    Raises:
        ValueError: non-positive values or an unknown rule.
    """
    rule = look_up_option(rule, LearningRateRule)
    if base_lr <= 0 or batch_size < 1 or base_batch_size < 1:
        raise ValueError(f"need base_lr > 0 and batch sizes >= 1, got {base_lr}, {batch_size}, {base_batch_size}.")
    ratio = batch_size / base_batch_size
    factor = {LearningRateRule.NONE: 1.0, LearningRateRule.SQRT: math.sqrt(ratio), LearningRateRule.LINEAR: ratio}[rule]
    return float(base_lr * factor)


def adamw(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """
    AdamW with the fused kernel when every parameter is a floating point tensor on CUDA or the CPU (one kernel
    for all parameters instead of a loop of small ones), else the ``foreach`` implementation. With
    ``weight_decay=0`` it is Adam.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the optimiser got no trainable parameters.")
    fused = all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused, foreach=None if fused else True
    )


def build_trainer(
    device: torch.device | str,
    max_epochs: int,
    train_data_loader: Iterable,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_function: Callable,
    inferer: Any = None,
    prepare_batch: Callable = default_prepare_batch,
    precision: str = Precision.AUTO,
    channels_last: bool | None = None,
    compile: bool = False,
    max_iterations: int | None = None,
    train_handlers: Sequence | None = None,
    **kwargs: Any,
) -> SupervisedTrainer:
    """
    A MONAI ``SupervisedTrainer`` set up for throughput; every training run of berdiff goes through it.

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function, inferer, prepare_batch,
            train_handlers: as for ``SupervisedTrainer`` (``decollate`` is off).
        precision: a :class:`Precision`. bf16 runs under autocast with a disabled gradient scaler (bf16 needs
            no loss scaling, and the scaler's inf check would synchronise with the host every iteration).
        channels_last: convert the network to ``channels_last`` (default: on CUDA only, and not for a DDP-wrapped
            network; on the CPU the GroupNorm kernels are slower in that layout).
        compile: ``torch.compile`` the network (MONAI's ``compile`` option).
        max_iterations: stop after this many iterations (within ``max_epochs``).
        kwargs: other ``SupervisedTrainer`` arguments.
    """
    device = torch.device(device)
    prec = resolve_precision(precision, device)
    if channels_last is None:
        # not under DDP: converting a wrapped network's parameters would break its gradient buckets
        channels_last = device.type == "cuda" and not isinstance(network, nn.parallel.DistributedDataParallel)
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if max_iterations is not None and int(max_iterations) < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}.")
    kwargs.setdefault("decollate", False)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_data_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss_function,
        inferer=inferer,
        prepare_batch=prepare_batch,
        amp=prec == Precision.BF16,
        amp_kwargs={"dtype": torch.bfloat16} if prec == Precision.BF16 else None,
        compile=compile,
        optim_set_to_none=True,
        train_handlers=train_handlers,
        **kwargs,
    )
    if prec == Precision.BF16:
        trainer.scaler = torch.amp.GradScaler("cuda", enabled=False)
    if max_iterations is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=int(max_iterations)), lambda e: e.terminate())
    return trainer


class WarmupEMAHandler(EMAHandler):
    """
    ignite's ``EMAHandler`` (``ema = (1 - m) * ema + m * model`` every iteration) with a warm-up and one fused
    update for all parameters. With ``warmup`` the momentum at iteration t is ``max(momentum, 9 / (10 + t))``
    (the EMA decay ``min(1 - momentum, (1 + t) / (10 + t))`` of common diffusion recipes): early iterations
    follow the model closely, so a short run never exports weights that are mostly the initialisation (with a
    plain momentum of 0.001, 37 % of the EMA after 1,000 iterations is still the initial weights). The momentum
    depends only on the trainer's iteration, so a resumed run continues the same schedule.

    Args:
        model: the trained network (a DDP wrapper is unwrapped).
        momentum: the final momentum m (e.g. 0.001 = decay 0.999).
        warmup: apply the warm-up.
        handle_buffers: as for ignite's ``EMAHandler``.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.001, warmup: bool = True, handle_buffers: str = "copy") -> None:
        super().__init__(model, momentum=momentum, handle_buffers=handle_buffers)
        self.warmup = warmup

    def momentum_at(self, iteration: int) -> float:
        """The momentum used after trainer iteration ``iteration`` (1-based)."""
        return max(self.momentum, 9.0 / (10.0 + iteration)) if self.warmup else self.momentum

    def _update_ema_model(self, engine: Engine, name: str) -> None:
        momentum = self.momentum_at(engine.state.iteration)
        setattr(engine.state, name, momentum)
        with torch.no_grad():
            ema_params = list(self.ema_model.parameters())
            params = [p.detach() for p in self.model.parameters()]
            torch._foreach_lerp_(ema_params, params, momentum)
            for ema_b, model_b in zip(self.ema_model.buffers(), self.model.buffers()):
                if self.handle_buffers == "copy":
                    ema_b.data = model_b.data
                elif self.handle_buffers == "update":
                    if ema_b.is_floating_point():
                        ema_b.lerp_(model_b, momentum)
                    else:
                        ema_b.copy_(model_b)


class LossMonitor:
    """
    Tracks the training loss without a host synchronisation per iteration: losses are summed on the device and
    read (one ``.item()``) every ``interval`` iterations, when a line with the mean loss, samples/s and the
    elapsed time is logged. ``history`` holds ``(iteration, mean loss of the interval)`` pairs.

    Args:
        interval: iterations between reads.
        name: label of the log lines.
        loss_key: key of the loss in the trainer's output.
        log: write log lines (``logging`` at INFO, logger ``berdiff.trainers``, or ``print_fn``).
        print_fn: optional function that receives the log lines instead of the logger.
    """

    def __init__(
        self, interval: int = 50, name: str = "train", loss_key: str = "loss", log: bool = True,
        print_fn: Callable[[str], Any] | None = None,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        self.interval = int(interval)
        self.name = name
        self.loss_key = loss_key
        self.log = log
        self.print_fn = print_fn
        self.history: list[tuple[int, float]] = []
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._samples = 0
        self._start = self._last = 0.0
        self._last_iteration = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._flush)
        engine.add_event_handler(Events.TERMINATE, self._flush)

    def _started(self, engine: Engine) -> None:
        self._start = self._last = time.perf_counter()
        self._last_iteration = engine.state.iteration

    def _iteration(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output[self.loss_key] if isinstance(output, dict) else output
        loss = loss.detach().float()
        self._sum = loss if self._sum is None else self._sum + loss
        self._count += 1
        image = output.get("image") if isinstance(output, dict) else None
        self._samples += int(image.shape[0]) if isinstance(image, torch.Tensor) else 0
        if engine.state.iteration % self.interval == 0:
            self._flush(engine)

    def _flush(self, engine: Engine) -> None:
        if not self._count or self._sum is None:
            return
        mean = float(self._sum) / self._count  # the one host synchronisation of the interval
        now = time.perf_counter()
        it = engine.state.iteration
        self.history.append((it, mean))
        if self.log:
            rate = self._samples / max(now - self._last, 1e-9)
            line = f"{self.name}: iteration {it}, loss {mean:.4f}, {rate:.1f} samples/s, {now - self._start:.0f} s"
            (self.print_fn or logger.info)(line)
        self._sum, self._count, self._samples, self._last = None, 0, 0, now

    def final_loss(self, last: int = 1) -> float:
        """Mean of the last ``last`` interval means (NaN before the first read)."""
        if not self.history:
            return float("nan")
        values = [v for _, v in self.history[-last:]]
        return float(sum(values) / len(values))


@torch.no_grad()
def encode_dataset(
    dataset: Dataset, autoencoder: nn.Module, device: torch.device | str, key: str = "image", batch_size: int = 64,
    num_workers: int = 0,
) -> torch.Tensor:
    """
    Deterministic binary codes of every item's ``key`` (stage-2 pre-encoding), encoded in batches on ``device``
    with autocast off (the same fp32 code as at inference) and kept there as ``uint8`` (N, C_lat, h, w).
    Images are streamed through a ``DataLoader``, so the data set never has to fit in memory as images.
    """
    device = torch.device(device)
    autoencoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    codes = []
    for batch in loader:
        images = torch.as_tensor(batch[key] if isinstance(batch, dict) else batch).float().to(device)
        with torch.autocast(device.type, enabled=False):
            codes.append(autoencoder.encode_stage_2_inputs(images).to(torch.uint8))
    if not codes:
        raise ValueError("the data set is empty: nothing to encode (check the datalist).")
    return torch.cat(codes)


def code_loader(
    dataset: Dataset,
    autoencoder: nn.Module,
    batch_size: int,
    device: torch.device | str,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    encode_batch_size: int = 64,
    num_workers: int = 0,
) -> TensorLoader:
    """
    The stage-2 loader: the data set's images encoded once (:func:`encode_dataset`) and served from the device as
    float batches under ``"image"`` (:class:`~berdiff.data.tensor_loader.TensorLoader`).
    """
    codes = encode_dataset(dataset, autoencoder, device, batch_size=encode_batch_size, num_workers=num_workers)
    return TensorLoader({"image": codes}, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, dtype=torch.float32)


def diffusion_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    autoencoder: nn.Module | None = None,
    pre_encode: bool = True,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    placement: str = "auto",
    num_workers: int = 0,
) -> Iterable:
    """
    The stage-2 loader of the bundle configs: pre-encoded codes on the device (:func:`code_loader`, the default),
    or the images themselves (:func:`~berdiff.data.tensor_loader.device_loader`) for on-the-fly encoding by
    ``BernoulliPrepareBatch(autoencoder=...)``.

    Raises:
        ValueError: ``pre_encode`` without an autoencoder.
    """
    from berdiff.data.tensor_loader import device_loader

    if pre_encode and len(dataset) > 0:  # (an empty list only without data: reported when the run starts)
        if autoencoder is None:
            raise ValueError("pre_encode=True needs the frozen autoencoder.")
        return code_loader(
            dataset, autoencoder, batch_size, device, shuffle=shuffle, drop_last=drop_last, seed=seed,
            num_workers=num_workers,
        )
    return device_loader(
        dataset, batch_size, device, shuffle=shuffle, drop_last=drop_last, seed=seed, placement=placement,
        num_workers=num_workers,
    )


def training_flops(step: Callable[[], torch.Tensor]) -> int:
    """
    Floating point operations of one training step (forward and backward) counted by
    ``torch.utils.flop_counter.FlopCounterMode``: ``step`` computes a loss, and its backward is counted too.
    Used to give every method of the benchmark the same compute budget.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = step()
        loss.backward()
    return int(counter.get_total_flops())
