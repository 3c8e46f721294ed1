# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The run steps the bundle configs call around the engines: checks before the first case or step (:func:`preflight`,
:func:`training_preflight`), the evaluator run with the configured error policy (:class:`OnError`,
:func:`run_evaluator`) and the exit status after failed cases (:func:`report_failures`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from monai.utils import StrEnum, look_up_option

from berdiff.io.checkpoints import check_checkpoint
from berdiff.io.datalists import MissingData, check_unique_outputs, inference_datalist
from berdiff.utils import MODALITIES
from berdiff.validation.errors import exit_on_error, root_cause
from berdiff.validation.knobs import check_settings

__all__ = ["OnError", "inference_mode", "preflight", "training_preflight", "run_evaluator", "report_failures"]

logger = logging.getLogger(__name__)


class OnError(StrEnum):
    """
    What happens when a case fails: ``exit`` stops the run and exits with ``error: <root cause>`` (status 1, no
    stack trace), ``raise`` stops it and raises the root cause (Python API), ``continue`` records the failed case in
    ``run_summary.json``, runs the others and exits with status 1 at the end (:func:`report_failures`).
    """

    RAISE = "raise"
    EXIT = "exit"
    CONTINUE = "continue"


@contextmanager
def inference_mode(*nets: torch.nn.Module) -> Generator[list, None, None]:
    """
    Like ``monai.networks.utils.eval_mode`` (networks in eval mode, restored afterwards) but under
    ``torch.inference_mode`` instead of ``torch.no_grad``; usable as an engine's ``mode``.

    Args:
        nets: networks to put in eval mode.
    """
    training = [n for n in nets if getattr(n, "training", False)]
    try:
        with torch.inference_mode():
            yield [n.eval() if hasattr(n, "eval") else n for n in nets]
    finally:
        for n in training:
            n.train()


def _fail(error: BaseException, on_error: str) -> None:
    """Reports ``error``'s root cause: ``exit`` without a stack trace (:func:`berdiff.validation.exit_on_error`), or
    ``raise``."""
    cause = root_cause(error)
    if on_error in (OnError.EXIT, OnError.CONTINUE):
        logger.debug(f"run failed: {type(cause).__name__}: {cause}")
        exit_on_error(error)
    if cause is error:
        raise error
    raise cause from None


def _check_on_error(on_error: str) -> None:
    try:
        look_up_option(on_error, OnError)
    except ValueError:
        raise ValueError(f"on_error must be one of {[m.value for m in OnError]}, got {on_error!r}.") from None


def preflight(
    image: Any = None,
    datalist: Any = None,
    dataset_dir: Any = None,
    modalities: Sequence[str] = MODALITIES,
    datalist_key: str | None = None,
    ckpt_path: str | None = None,
    allow_random_weights: bool = False,
    on_error: str = OnError.EXIT,
    settings: Mapping[str, Any] | None = None,
    threshold_file: str | None = None,
) -> int:
    """
    Checks the settings (:func:`berdiff.validation.check_settings`), the inputs
    (:func:`berdiff.io.inference_datalist`; no two cases with the same output names), the calibration file and the
    model weights (present, and a state dict of the preset of ``models/model.json``, else the configured one; L
    within the trained range) before the workflow builds its components, so
    that a bad knob, input folder or datalist gives one clear error line instead of a configuration stack trace.
    Arguments as in ``configs/inference.yaml``; ``settings``: knob name -> value (the config's ``checked_settings``).

    Returns:
        the number of cases.
    """
    _check_on_error(on_error)
    try:
        settings = check_settings(settings or {})
        cases = inference_datalist(image, datalist, dataset_dir, modalities, datalist_key)
        check_unique_outputs(cases)
        if threshold_file:
            from berdiff.evaluation import load_threshold

            load_threshold(threshold_file)
        if ckpt_path is not None:
            preset, in_channels = settings.get("preset"), len(modalities)
            if "noise_level" in settings:  # models/model.json decides the sizes and the trained range of L
                from berdiff.model_description import inference_settings

                model = inference_settings(
                    ckpt_path, preset, in_channels, settings.get("spatial_size"),
                    settings.get("num_train_timesteps", 1000), settings["noise_level"],
                    settings.get("num_inference_steps"), pixdim=settings.get("pixdim", "auto"),
                )
                preset, in_channels = model["preset"], model["in_channels"]
            check_checkpoint(ckpt_path, allow_random_weights, preset, in_channels)
    except Exception as e:
        _fail(e, on_error)
    return len(cases)


def training_preflight(
    settings: Mapping[str, Any] | None = None,
    datalist: Sequence[Any] | None = None,
    weights: str | Sequence[str] | None = None,
    on_error: str = OnError.EXIT,
) -> int:
    """
    The first step of a training config's ``run``: checks the settings (:func:`berdiff.validation.check_settings`),
    that the training data are there (a :class:`berdiff.io.MissingData` list reports its error) and not empty,
    and that the weights of the earlier stage exist, before anything is built or written.

    Args:
        settings: knob name -> value.
        datalist: the training datalist (``@train#datalist``).
        weights: the earlier stage's checkpoint (or candidate files, the first existing one is used); None: none.
        on_error: an :class:`OnError`.

    Returns:
        the number of training items.
    """
    _check_on_error(on_error)
    try:
        check_settings(settings or {})
        if isinstance(datalist, MissingData):
            raise datalist.error
        if datalist is not None and len(datalist) == 0:
            raise ValueError("the training datalist holds no items: nothing to train on.")
        if weights is not None:
            candidates = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
            if not any(os.path.isfile(p) for p in candidates):
                raise FileNotFoundError(
                    f"checkpoint not found: {', '.join(map(str, candidates))} (train the earlier stage first)."
                )
    except Exception as e:
        _fail(e, on_error)
    return len(datalist or [])


def run_evaluator(
    evaluator: Any,
    ckpt_path: str | None = None,
    allow_random_weights: bool = False,
    on_error: str = OnError.EXIT,
    use_inference_mode: bool = True,
) -> Any:
    """
    Runs an evaluator (the bundle's ``run`` step): checks the model weights first (:func:`berdiff.io.
    check_checkpoint`), and on failure reports the root cause of the error (the clear ``ValueError`` of an input check
    rather than MONAI's ``RuntimeError("applying transform ...")`` wrapper).

    Args:
        evaluator: the ``SupervisedEvaluator``.
        ckpt_path: the model weights; None skips the check.
        allow_random_weights: allow a missing ``ckpt_path`` (tests, debugging).
        on_error: an :class:`OnError`: ``exit`` prints ``error: <root cause>`` and exits with status 1 without a
            stack trace (command line), ``raise`` raises the root cause (Python API).
        use_inference_mode: run the network under :func:`inference_mode` (``torch.inference_mode``) instead of
            the evaluator's default ``no_grad`` context.

    Returns:
        the evaluator's state.
    """
    _check_on_error(on_error)
    if use_inference_mode:
        evaluator.mode = inference_mode
    try:
        if ckpt_path is not None and not check_checkpoint(ckpt_path, allow_random_weights):
            logger.warning(f"model weights {ckpt_path} not found: running with RANDOM weights (allow_random_weights).")
        evaluator.run()
    except Exception as e:
        _fail(e, on_error)
    return evaluator.state


def report_failures(evaluator: Any, on_error: str = OnError.EXIT) -> int:
    """
    The last step of a run with ``on_error=continue``: when some cases failed (recorded in ``run_summary.json``
    by :class:`RunSummaryHandler`), prints ``error: N case(s) failed: ...`` and exits with status 1 (``raise``:
    raises a ``RuntimeError``); the other cases' outputs are complete. A no-op when no case failed.

    Args:
        evaluator: the evaluator that ran (its ``state.run_summary``).
        on_error: an :class:`OnError`.

    Returns:
        the number of failed cases (0).
    """
    summary = getattr(getattr(evaluator, "state", None), "run_summary", None) or {}
    failed = list(summary.get("failed") or [])
    if not failed:
        return 0
    shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    error = RuntimeError(
        f"{len(failed)} of {summary.get('num_cases')} case(s) failed: {shown} (errors in run_summary.json; the "
        "other cases are complete)"
    )
    _fail(error, OnError.RAISE if on_error == OnError.RAISE else OnError.EXIT)
    return len(failed)
