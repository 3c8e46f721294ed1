# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Ignite handlers and run steps of the bundles: run summary, training progress, preflight checks and errors."""

from __future__ import annotations

from berdiff.handlers.memory import uses_cuda, peak_memory_mb
from berdiff.handlers.run_summary import RUN_SUMMARY_FIELDS, CASE_FIELDS, RunSummaryHandler
from berdiff.handlers.progress import format_duration, TrainingProgress
from berdiff.handlers.workflow import (
    OnError,
    inference_mode,
    preflight,
    training_preflight,
    run_evaluator,
    report_failures,
)

__all__ = [
    "uses_cuda",
    "peak_memory_mb",
    "RUN_SUMMARY_FIELDS",
    "CASE_FIELDS",
    "RunSummaryHandler",
    "format_duration",
    "TrainingProgress",
    "OnError",
    "inference_mode",
    "preflight",
    "training_preflight",
    "run_evaluator",
    "report_failures",
]
