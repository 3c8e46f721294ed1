# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Training progress on the console: iterations per second, losses and the time left (:class:`TrainingProgress`)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["format_duration", "TrainingProgress"]

logger = logging.getLogger(__name__)


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour); ``?`` when unknown."""
    if seconds is None or not seconds == seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _loss_values(output: Any) -> dict[str, float]:
    """The loss(es) of a trainer iteration output (``decollate`` off: a dict; on: a list of dicts)."""
    from berdiff.training.autoencoder import training_loss_output

    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]
    if not isinstance(output, Mapping):
        return {}
    try:
        value = training_loss_output(output)
    except (KeyError, TypeError, ValueError):
        return {}
    return dict(value) if isinstance(value, Mapping) else {"loss": float(value)}


class TrainingProgress:
    """
    Training progress in the terminal (stdout, flushed): one line per epoch with the epoch's mean loss, the elapsed
    time and the estimated time left, and within long epochs one line at least every ``interval_s`` seconds, so that a
    slow run can be told from a hung one. The estimate extrapolates the iterations done in this run (a resumed run
    counts from where it resumed). Attach it as a trainer handler (``train_handlers``) on the main process only.

    Args:
        name: the run's name at the start of every line (e.g. ``train_autoencoder``).
        interval_s: longest silence within an epoch, in seconds (one line after the iteration that exceeds it).
        stream: where the lines go (default ``sys.stdout`` at the time of printing).
        enabled: False prints nothing (e.g. ranks other than 0).
    """

    def __init__(
        self, name: str = "training", interval_s: float = 20.0, stream: Any = None, enabled: bool = True
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}.")
        self.name = name
        self.interval_s = float(interval_s)
        self.stream = stream
        self.enabled = enabled
        self._t0 = self._t_line = 0.0
        self._start_iteration = 0
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Any) -> None:
        """Registers the event handlers on an ignite engine."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _print(self, text: str) -> None:
        if self.enabled:
            print(f"{self.name}: {text}", file=self.stream or sys.stdout, flush=True)
        self._t_line = time.perf_counter()

    def _timing(self, engine: Any) -> str:
        state = engine.state
        elapsed = time.perf_counter() - self._t0
        done = state.iteration - self._start_iteration
        total = (state.max_epochs or 0) * (state.epoch_length or 0)
        eta = elapsed / done * max(total - state.iteration, 0) if done > 0 and total else None
        return f"elapsed {format_duration(elapsed)}, eta {format_duration(eta)}"

    def _losses(self) -> str:
        if not self._count:
            return ""
        return ", ".join(f"{k} {v / self._count:.4f}" for k, v in self._sums.items()) + ", "

    def started(self, engine: Any) -> None:
        self._t0 = time.perf_counter()
        self._start_iteration = engine.state.iteration
        state = engine.state
        self._print(
            f"starting at epoch {state.epoch + 1}/{state.max_epochs} ({state.epoch_length} iterations per epoch)"
        )

    def epoch_started(self, engine: Any) -> None:
        self._sums, self._count = {}, 0

    def iteration_completed(self, engine: Any) -> None:
        for k, v in _loss_values(engine.state.output).items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        if time.perf_counter() - self._t_line >= self.interval_s:
            state = engine.state
            within = (state.iteration - 1) % state.epoch_length + 1 if state.epoch_length else state.iteration
            self._print(
                f"epoch {state.epoch}/{state.max_epochs}, iteration {within}/{state.epoch_length}, "
                f"{self._losses()}{self._timing(engine)}"
            )

    def epoch_completed(self, engine: Any) -> None:
        state = engine.state
        self._print(f"epoch {state.epoch}/{state.max_epochs}, {self._losses()}{self._timing(engine)}")

    def completed(self, engine: Any) -> None:
        self._print(f"done in {format_duration(time.perf_counter() - self._t0)}")
