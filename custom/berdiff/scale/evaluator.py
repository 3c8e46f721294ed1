# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The evaluator of the scaled inference run: one case at a time, a failed case recorded (:class:`CaseEvaluator`)."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping
from typing import Any

from monai.engines import SupervisedEvaluator

from berdiff.scale.dataset import CASE_ERROR_KEY
from berdiff.utils import case_name
from berdiff.validation.errors import root_cause

__all__ = ["CaseEvaluator"]

logger = logging.getLogger(__name__)


def _uncollate(value: Any) -> Any:
    """The item of a batch of one: ``['a']`` -> ``'a'``, ``[('a',), ('b',)]`` -> ``['a', 'b']``."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) and len(v) == 1 for v in value):
        value = [v[0] for v in value]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value


class CaseEvaluator(SupervisedEvaluator):
    """
    A MONAI ``SupervisedEvaluator`` over whole cases (``batch_size=1``) that can go on after a failing case. With
    ``continue_on_error`` an error item of :class:`CaseDataset` or an exception in the network or the
    post-processing (incl. ``SaveImaged``) of a case is recorded in ``engine.state.case_failure``
    (``{"case", "image", "error"}``, read by :class:`berdiff.handlers.RunSummaryHandler`) and the next case runs;
    otherwise errors propagate as in ``SupervisedEvaluator``.

    Args:
        args: as ``SupervisedEvaluator``.
        continue_on_error: record failing cases and go on.
        kwargs: as ``SupervisedEvaluator``.
    """

    def __init__(self, *args: Any, continue_on_error: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.continue_on_error = bool(continue_on_error)
        self.state.case_failure = None

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """
        As ``SupervisedEvaluator.run``; with no case to run (all skipped, or a torchrun rank without cases) the
        ``STARTED`` and ``COMPLETED`` events still fire, so that the run summary is written (MONAI skips the run).
        """
        try:
            empty = len(self.data_loader) == 0
        except TypeError:
            empty = False
        if not empty:
            super().run(global_epoch)
            return
        from ignite.engine import Events

        self.state.case_failure = None
        self._fire_event(Events.STARTED)
        self._fire_event(Events.COMPLETED)

    @staticmethod
    def _failure(batchdata: Any, error: str) -> dict[str, Any]:
        """The failed case (named like its output files, see :func:`berdiff.utils.case_name`), its files, the error."""
        case = image = None
        if isinstance(batchdata, Mapping):
            image = batchdata.get("image")
            meta = getattr(image, "meta", None)
            image = _uncollate(meta.get("filename_or_obj") if meta is not None else image)
            case = _uncollate(batchdata.get("case"))
        try:
            case = case_name(image) if image else case
        except (TypeError, ValueError):
            pass
        return {"case": None if case is None else str(case), "image": image, "error": error}

    def _iteration(self, engine: Any, batchdata: Any) -> dict:
        engine.state.case_failure = None
        error = batchdata.get(CASE_ERROR_KEY) if isinstance(batchdata, Mapping) else None
        if error is not None:
            error = error[0] if isinstance(error, (list, tuple)) else error
            kind = batchdata.get(f"{CASE_ERROR_KEY}_type", "RuntimeError")
            kind = kind[0] if isinstance(kind, (list, tuple)) else kind
            if not self.continue_on_error:  # the root cause, with its built-in type (ValueError, OSError, ...)
                exc_type = getattr(builtins, str(kind), None)
                if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
                    exc_type = RuntimeError
                raise exc_type(str(error))
            error = f"{kind}: {error}"
            engine.state.case_failure = self._failure(batchdata, error)
            logger.error(f"case {engine.state.case_failure['case']} failed: {error}")
            return {}
        if not self.continue_on_error:
            return super()._iteration(engine, batchdata)
        try:
            return super()._iteration(engine, batchdata)
        except Exception as e:
            cause = root_cause(e)
            engine.state.case_failure = self._failure(batchdata, f"{type(cause).__name__}: {cause}")
            logger.error(f"case {engine.state.case_failure['case']} failed: {type(cause).__name__}: {cause}")
            return {}
