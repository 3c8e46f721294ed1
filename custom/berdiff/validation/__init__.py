# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Settings checked up front and the one way bad input is reported (``error: <message>``, exit status 1)."""

from __future__ import annotations

from berdiff.validation.errors import (
    DEBUG_ENV,
    USER_ERRORS,
    KnobError,
    debug_enabled,
    root_cause,
    error_line,
    exit_on_error,
)
from berdiff.validation.knobs import (
    check_int,
    check_float,
    check_bool,
    check_option,
    check_preset,
    spatial_multiple,
    check_spatial_size,
    check_pixdim,
    check_device,
    check_noise_level,
    check_num_inference_steps,
    check_prob_threshold,
    SETTING_CHECKS,
    check_settings,
)

__all__ = [
    "DEBUG_ENV",
    "USER_ERRORS",
    "KnobError",
    "debug_enabled",
    "root_cause",
    "error_line",
    "exit_on_error",
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
