# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""
Settings checked up front, and the one way bad input is reported on the command line.

Every check raises :class:`KnobError` (a ``ValueError``) whose message reads ``<knob> = <value>: <allowed range>``.
:func:`check_settings` checks a mapping of named knobs (the bundle configs call it at the start of their run, the
``python -m berdiff`` commands call the single checks). :func:`exit_on_error` turns an error into the one line
``error: <message>`` and exit status 1, unless ``BERDIFF_DEBUG=1`` is set (then the traceback is kept): it is used by
``python -m berdiff`` (:mod:`berdiff.cli`) and by the bundles' ``on_error: exit`` (:mod:`berdiff.handlers`).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # torch and monai are imported when needed: python -m berdiff --help stays fast
    import torch

__all__ = [
    "DEBUG_ENV",
    "USER_ERRORS",
    "KnobError",
    "debug_enabled",
    "error_line",
    "exit_on_error",
    "check_int",
    "check_float",
    "check_bool",
    "check_option",
    "check_preset",
    "spatial_multiple",
    "check_spatial_size",
    "check_device",
    "check_noise_level",
    "check_num_inference_steps",
    "check_prob_threshold",
    "SETTING_CHECKS",
    "check_settings",
]

#: set this environment variable (to anything but "" or "0") to keep the traceback of command-line errors
DEBUG_ENV = "BERDIFF_DEBUG"

#: exceptions that mean "bad input or settings": one line on the command line instead of a stack trace
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    OSError,  # e.g. no space left on the device
)


class KnobError(ValueError):
    """
    A setting outside its allowed values; the message is ``<knob> = <value>: <allowed>``.

    Args:
        knob: the setting's name (as on the command line).
        value: the value given.
        allowed: the allowed values, in words (``an integer in [1, 1000]``).
    """

    def __init__(self, knob: str, value: Any, allowed: str) -> None:
        self.knob, self.value, self.allowed = knob, value, allowed
        super().__init__(f"{knob} = {value!r}: {allowed}")


def debug_enabled() -> bool:
    """Whether ``BERDIFF_DEBUG`` asks for tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _unwrap(error: BaseException) -> BaseException:
    """The original exception behind MONAI's wrappers (transforms, config expressions and instantiation)."""
    from berdiff.transforms import root_cause

    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        error = root_cause(error)
        text = str(error)
        wrapped = isinstance(error, RuntimeError) and (
            "Failed to evaluate" in text or "Failed to instantiate" in text or "applying transform" in text
        )
        if not (wrapped and error.__cause__ is not None):
            break
        error = error.__cause__
    return error


def _writer_failure(message: str) -> str | None:
    """
    MONAI's ``SaveImage`` replaces a writer's error (e.g. a full disk) by ``RuntimeError("... cannot find a suitable
    writer for <file> ...")`` holding the original traceback as text: the file and the original error's last line.
    """
    head = message.split("\n", 1)[0]
    if "cannot find a suitable writer for" not in head:
        return None
    filename = head.split("cannot find a suitable writer for", 1)[1].strip().rstrip(".")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return f"cannot write {filename}: {last}" if last and last != head.strip() else None


def error_line(error: BaseException) -> str:
    """``error: <message of the root cause>``: the line printed for ``error`` on the command line."""
    cause = _unwrap(error)
    message = _writer_failure(str(cause)) if isinstance(cause, RuntimeError) else None
    message = message or str(cause)
    if isinstance(cause, (KeyError,)) and message.startswith(("'", '"')):
        message = message[1:-1]
    if not message:
        message = type(cause).__name__
    return f"error: {message}"


def exit_on_error(error: BaseException) -> NoReturn:
    """
    Reports ``error`` on the command line: prints :func:`error_line` to stderr and exits with status 1 without a
    stack trace. With ``BERDIFF_DEBUG=1`` the (root cause) exception is raised instead.

    Args:
        error: the exception caught.
    """
    if debug_enabled():
        cause = _unwrap(error)
        if cause is error:
            raise error
        raise cause from error
    sys.stdout.flush()
    print(error_line(error), file=sys.stderr, flush=True)
    raise SystemExit(1) from None


# ------------------------------------------------------------------------------------------------ single checks


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"


def check_int(knob: str, value: Any, low: int | None = None, high: int | None = None, allow_none: bool = False) -> Any:
    """
    Checks an integer setting in ``[low, high]``.

    Args:
        knob: the setting's name.
        value: the value given.
        low: smallest allowed value (None: unbounded).
        high: largest allowed value (None: unbounded).
        allow_none: None is allowed too (a default).

    Returns:
        the value.
    """
    if value is None and allow_none:
        return value
    allowed = f"an integer in {_interval(low, high, False, False)}" + (" or null" if allow_none else "")
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        raise KnobError(knob, value, allowed)
    return value


def check_float(
    knob: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> Any:
    """
    Checks a finite number in the interval given by ``low``, ``high`` (open ends when ``low_open``/``high_open``).

    Args:
        knob: the setting's name.
        value: the value given.
        low: lower bound (None: unbounded).
        high: upper bound (None: unbounded).
        low_open: ``low`` itself is not allowed.
        high_open: ``high`` itself is not allowed.
        allow_none: None is allowed too.

    Returns:
        the value.
    """
    if value is None and allow_none:
        return value
    allowed = f"a number in {_interval(low, high, low_open, high_open)}" + (" or null" if allow_none else "")
    if not _is_number(value) or not math.isfinite(float(value)):
        raise KnobError(knob, value, allowed)
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise KnobError(knob, value, allowed)
    if high is not None and (v > high or (high_open and v == high)):
        raise KnobError(knob, value, allowed)
    return value


def check_bool(knob: str, value: Any) -> Any:
    """Checks a boolean setting (``True``/``False``; on the command line ``--knob True``)."""
    if not isinstance(value, bool):
        raise KnobError(knob, value, "True or False")
    return value


def check_option(knob: str, value: Any, options: Sequence[str] | type) -> str:
    """
    Checks a named option with MONAI's ``look_up_option`` (which also suggests the closest name), reported as a
    :class:`KnobError` listing the options.

    Args:
        knob: the setting's name.
        value: the value given.
        options: the allowed names, or a ``StrEnum`` class.

    Returns:
        the option (a plain string).
    """
    from monai.utils import look_up_option

    names = [str(getattr(o, "value", o)) for o in options]
    try:
        return str(look_up_option(value, names))
    except (ValueError, TypeError) as e:
        text = str(e)
        hint = text.split("did you mean", 1)[1].split("?", 1)[0].strip() if "did you mean" in text else ""
        hint = f" (did you mean {hint}?)" if hint else ""
        raise KnobError(knob, value, f"one of {', '.join(names)}{hint}") from None


def check_preset(value: Any, knob: str = "preset") -> str:
    """Checks a network preset name (:class:`berdiff.networks.Preset`)."""
    from berdiff.networks.presets import Preset

    return check_option(knob, value, Preset)


def spatial_multiple(preset: str) -> int:
    """
    The factor the in-plane size must be a multiple of for ``preset``: the autoencoder's and the denoiser's
    downsampling factors multiplied (``tiny`` 4, ``small`` 16, ``reference`` 64).
    """
    from berdiff.networks.presets import AUTOENCODER_PRESETS, DENOISER_PRESETS

    preset = check_preset(preset)
    levels = len(AUTOENCODER_PRESETS[preset]["channels"]) - 1 + len(DENOISER_PRESETS[preset]["channels"]) - 1
    return 2**levels


def check_spatial_size(value: Any, preset: str | None = None, knob: str = "spatial_size", ndim: int = 2) -> list[int]:
    """
    Checks an in-plane size: one positive integer or ``ndim`` of them, each a multiple of
    :func:`spatial_multiple` of ``preset`` when it is given.

    Returns:
        the size as a list of ``ndim`` integers.
    """
    multiple = spatial_multiple(preset) if preset is not None else 1
    allowed = f"an integer or a list of {ndim} integers, each a positive multiple of {multiple}" + (
        f" (preset {preset!r})" if preset is not None else ""
    )
    size = [value] * ndim if _is_int(value) else value
    if (
        not isinstance(size, (list, tuple))
        or len(size) != ndim
        or not all(_is_int(s) and s > 0 and s % multiple == 0 for s in size)
    ):
        raise KnobError(knob, value, allowed)
    return [int(s) for s in size]


def check_device(value: Any, knob: str = "device") -> torch.device:
    """
    Checks a torch device: a valid name, and for CUDA an available device index.

    Returns:
        the ``torch.device``.
    """
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise KnobError(knob, value, "a torch device such as cpu, cuda or cuda:0") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KnobError(knob, value, "cpu (no CUDA device is available)")
        if device.index is not None and device.index >= count:
            raise KnobError(knob, value, f"cpu or cuda:0 .. cuda:{count - 1}")
    return device


def check_noise_level(value: Any, num_train_timesteps: int, knob: str = "noise_level") -> int:
    """Checks the noise level L: an integer in ``[1, T]`` (``T = num_train_timesteps``)."""
    if not _is_int(value) or not 1 <= value <= num_train_timesteps:
        raise KnobError(knob, value, f"an integer in [1, {num_train_timesteps}] (T = num_train_timesteps)")
    return int(value)


def check_num_inference_steps(value: Any, noise_level: int, knob: str = "num_inference_steps") -> Any:
    """
    Checks the number of denoising steps K: null (= L) or an integer >= 1; a K above L runs as L (the bundle's
    default K = 10 thus also serves small L), which is what is returned.
    """
    if value is None:
        return value
    if not _is_int(value) or value < 1:
        raise KnobError(knob, value, "null or an integer >= 1 (values above noise_level L run as L)")
    return min(int(value), int(noise_level))


def check_prob_threshold(value: Any, knob: str = "prob_threshold") -> float:
    """Checks the flip-probability threshold P: a number in ``(0, 1)``."""
    return float(check_float(knob, value, 0.0, 1.0, low_open=True, high_open=True))


# ------------------------------------------------------------------------------------------- named settings


def _positive_int(knob: str, value: Any) -> Any:
    return check_int(knob, value, 1)


def _non_negative_int(knob: str, value: Any) -> Any:
    return check_int(knob, value, 0)


def _positive_float(knob: str, value: Any) -> Any:
    return check_float(knob, value, 0.0, low_open=True)


def _unit_interval(knob: str, value: Any) -> Any:
    return check_float(knob, value, 0.0, 1.0)


def _momentum(knob: str, value: Any) -> Any:
    return check_float(knob, value, 0.0, 1.0, low_open=True)


def _device(knob: str, value: Any) -> Any:
    return check_device(value, knob)


def _bool(knob: str, value: Any) -> Any:
    return check_bool(knob, value)


def _anomaly_reference(knob: str, value: Any) -> Any:
    from berdiff.inferers import AnomalyReference

    return check_option(knob, value, AnomalyReference)


def _on_error(knob: str, value: Any) -> Any:
    return check_option(knob, value, ("raise", "exit", "continue"))


def _sw_batch_size(knob: str, value: Any) -> Any:
    return value if value == "auto" else check_int(knob, value, 1)


def _precision(knob: str, value: Any) -> Any:
    from berdiff.trainers import Precision

    return check_option(knob, value, Precision)


def _placement(knob: str, value: Any) -> Any:
    from berdiff.data.tensor_loader import Placement

    return check_option(knob, value, Placement)


def _lr_rule(knob: str, value: Any) -> Any:
    from berdiff.trainers import LearningRateRule

    return check_option(knob, value, LearningRateRule)


#: the check of each named knob that needs no other knob (see :func:`check_settings` for the others)
SETTING_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "device": _device,
    "amp": _bool,
    "seed": lambda k, v: check_int(k, v, 0, allow_none=True),
    "num_workers": _non_negative_int,
    "sw_batch_size": _sw_batch_size,
    "precision": _precision,
    "compile": _bool,
    "data_placement": _placement,
    "log_interval": _positive_int,
    "lr_rule": _lr_rule,
    "base_learning_rate": _positive_float,
    "ema_warmup": _bool,
    "batch_size": _positive_int,
    "max_epochs": _positive_int,
    "val_interval": _positive_int,
    "ckpt_interval": _positive_int,
    "num_channels": _positive_int,
    "num_train_timesteps": _positive_int,
    "learning_rate": _positive_float,
    "disc_learning_rate": _positive_float,
    "adv_weight": lambda k, v: check_float(k, v, 0.0),
    "adv_start_iteration": _non_negative_int,
    "cache_rate": _unit_interval,
    "ema_momentum": _momentum,
    "prob_threshold": lambda k, v: check_prob_threshold(v, k),
    "anomaly_reference": _anomaly_reference,
    "on_error": _on_error,
    "progress": _bool,
    "save_reconstruction": _bool,
    "allow_random_weights": _bool,
    "resume": _bool,
    "adversarial": _bool,
    "pre_encode": _bool,
}

#: knobs checked against others by :func:`check_settings`
_RELATED = ("preset", "spatial_size", "noise_level", "num_inference_steps", "train_max_timestep")


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """
    Checks named settings (the knobs of a bundle config), in this order: the independent ones
    (:data:`SETTING_CHECKS`), ``preset``, ``spatial_size`` (a multiple of the preset's factor), ``noise_level`` in
    ``[1, num_train_timesteps]`` (T = 1000 when not given), ``num_inference_steps`` >= 1 (capped at ``noise_level``),
    ``train_max_timestep`` null or in ``[1, T]``. The first bad one raises a :class:`KnobError`.

    Args:
        settings: knob name -> value; every name must be known.

    Returns:
        the settings, with ``preset`` as a plain string and ``spatial_size`` as a list.

    Raises:
        KnobError: a value outside its allowed range.
        ValueError: an unknown knob name (a programming error in the caller).
    """
    unknown = sorted(set(settings) - set(SETTING_CHECKS) - set(_RELATED))
    if unknown:
        known = sorted(SETTING_CHECKS) + list(_RELATED)
        raise ValueError(f"check_settings: unknown settings {unknown}; known: {known}")
    out = dict(settings)
    for name, value in settings.items():
        if name in SETTING_CHECKS:
            SETTING_CHECKS[name](name, value)
    preset = None
    if "preset" in settings:
        preset = out["preset"] = check_preset(settings["preset"])
    if "spatial_size" in settings:
        out["spatial_size"] = check_spatial_size(settings["spatial_size"], preset)
    num_train_timesteps = int(settings.get("num_train_timesteps", 1000))
    if "noise_level" in settings:
        check_noise_level(settings["noise_level"], num_train_timesteps)
        if "num_inference_steps" in settings:
            check_num_inference_steps(settings["num_inference_steps"], settings["noise_level"])
    if "train_max_timestep" in settings:
        check_int("train_max_timestep", settings["train_max_timestep"], 1, num_train_timesteps, allow_none=True)
    return out
