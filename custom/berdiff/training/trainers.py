# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The one training path of both stages and the benchmark: :func:`build_trainer` (MONAI's ``SupervisedTrainer`` with
device-held batches and bf16 autocast), the AdamW optimiser and the learning-rate rule for other batch sizes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import default_prepare_batch
from monai.utils import StrEnum, look_up_option

__all__ = [
    "Precision",
    "LearningRateRule",
    "resolve_precision",
    "scaled_learning_rate",
    "adamw",
    "build_trainer",
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
