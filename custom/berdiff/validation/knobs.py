# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Settings checked up front: each ``check_*`` raises a :class:`~berdiff.validation.errors.KnobError` naming the knob,
its value and the allowed range; :func:`check_settings` checks a mapping of named knobs (the bundle configs call it at
the start of their run, the ``python -m berdiff`` commands call the single checks).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from berdiff.validation.errors import KnobError

if TYPE_CHECKING:  # torch and monai are imported when needed: python -m berdiff --help stays fast
    import torch

__all__ = [
    "check_int",
    "check_float",
    "check_bool",
    "check_option",
    "check_preset",
    "spatial_multiple",
    "check_spatial_size",
    "check_pixdim",
    "check_device",
    "check_noise_level",
    "check_num_inference_steps",
    "check_prob_threshold",
    "SETTING_CHECKS",
    "check_settings",
]


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


def check_pixdim(value: Any, knob: str = "pixdim") -> float | None:
    """
    Checks an in-plane voxel size in mm to resample to: a number in ``(0, 20]``, or None or ``"input"`` (keep the
    input's).

    Returns:
        the voxel size as a float, or None.
    """
    if value is None or value == "input":
        return None
    if isinstance(value, str):
        raise KnobError(knob, value, "a voxel size in mm in (0, 20], input (keep the input's) or auto")
    return float(check_float(knob, value, 0.0, 20.0, low_open=True))


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


def _latent_weighting(knob: str, value: Any) -> Any:
    from berdiff.inferers import LatentMap

    if value is None or value == "none":
        return None
    return check_option(knob, value, LatentMap)


def _residual_sign(knob: str, value: Any) -> Any:
    from berdiff.residual import ResidualSign

    return check_option(knob, value, ResidualSign)


def _channel_names(knob: str, value: Any) -> Any:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise KnobError(knob, value, "'all' or a non-empty list of channel names (e.g. [flair])")
    return value


def _channel_name_or_none(knob: str, value: Any) -> Any:
    if value is None or (isinstance(value, str) and value):
        return value
    raise KnobError(knob, value, "null or a channel name (e.g. flair)")


def _on_error(knob: str, value: Any) -> Any:
    return check_option(knob, value, ("raise", "exit", "continue"))


def _sw_batch_size(knob: str, value: Any) -> Any:
    return value if value == "auto" else check_int(knob, value, 1)


def _precision(knob: str, value: Any) -> Any:
    from berdiff.training.trainers import Precision

    return check_option(knob, value, Precision)


def _placement(knob: str, value: Any) -> Any:
    from berdiff.data.tensor_loader import Placement

    return check_option(knob, value, Placement)


def _prediction_type(knob: str, value: Any) -> Any:
    from berdiff.schedulers import BernoulliPredictionType

    return check_option(knob, value, BernoulliPredictionType)


def _lr_rule(knob: str, value: Any) -> Any:
    from berdiff.training.trainers import LearningRateRule

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
    "prediction_type": _prediction_type,
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
    "latent_weighting": _latent_weighting,
    "latent_weight_floor": lambda k, v: check_float(k, v, 0.0, 1.0, low_open=True),
    "residual_sign": _residual_sign,
    "residual_channels": _channel_names,
    "intensity_prior": _channel_name_or_none,
    "intensity_prior_power": lambda k, v: check_float(k, v, 0.0, low_open=True),
    "intensity_prior_floor": lambda k, v: check_float(k, v, 0.0),
    "on_error": _on_error,
    "progress": _bool,
    "save_reconstruction": _bool,
    "allow_random_weights": _bool,
    "resume": _bool,
    "adversarial": _bool,
    "pre_encode": _bool,
}


#: knobs checked against others by :func:`check_settings`
_RELATED = ("preset", "spatial_size", "pixdim", "noise_level", "num_inference_steps", "train_max_timestep")


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """
    Checks named settings (the knobs of a bundle config), in this order: the independent ones
    (:data:`SETTING_CHECKS`), ``preset``, ``spatial_size`` (a multiple of the preset's factor) and ``pixdim``
    (``"auto"`` for either: the preset's, :data:`berdiff.networks.PRESET_GRIDS`), ``noise_level`` in
    ``[1, num_train_timesteps]`` (T = 1000 when not given), ``num_inference_steps`` >= 1 (capped at ``noise_level``),
    ``train_max_timestep`` null or in ``[1, T]``. The first bad one raises a :class:`KnobError`.

    Args:
        settings: knob name -> value; every name must be known.

    Returns:
        the settings, with ``preset`` as a plain string, ``spatial_size`` as a list and ``pixdim`` as a float or
        None (``"auto"`` resolved when ``preset`` is given).

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
    for name in ("spatial_size", "pixdim"):
        if name in settings and settings[name] == "auto":
            if preset is None:
                raise KnobError(name, "auto", "an explicit value ('auto' needs the preset)")
            from berdiff.networks.presets import PRESET_GRIDS

            out[name] = PRESET_GRIDS[preset][name]
    if "spatial_size" in settings:
        out["spatial_size"] = check_spatial_size(out["spatial_size"], preset)
    if "pixdim" in settings:
        out["pixdim"] = check_pixdim(out["pixdim"])
    num_train_timesteps = int(settings.get("num_train_timesteps", 1000))
    if "noise_level" in settings:
        check_noise_level(settings["noise_level"], num_train_timesteps)
        if "num_inference_steps" in settings:
            check_num_inference_steps(settings["num_inference_steps"], settings["noise_level"])
    if "train_max_timestep" in settings:
        check_int("train_max_timestep", settings["train_max_timestep"], 1, num_train_timesteps, allow_none=True)
    return out
