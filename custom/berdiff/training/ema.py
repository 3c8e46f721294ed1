# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The exponential moving average of the denoiser with warm-up (:class:`WarmupEMAHandler`) and the loss monitor."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler

__all__ = ["WarmupEMAHandler", "LossMonitor"]

logger = logging.getLogger(__name__)


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
        log: write log lines (``logging`` at INFO, logger ``berdiff.training.ema``, or ``print_fn``).
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
