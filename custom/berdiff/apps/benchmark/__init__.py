# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The benchmark harness (``python -m berdiff benchmark``, docs/benchmarks.md): settings (:mod:`.settings`), data
(:mod:`.data`), training (:mod:`.fit`), the baselines (:mod:`.baselines`), tuning (:mod:`.sweep`), the held-out
scores (:mod:`.held_out`), timing (:mod:`.timing`), the report (:mod:`.report`) and the orchestration (:mod:`.run`).
"""

from berdiff.apps.benchmark.fit import cache_key
from berdiff.apps.benchmark.report import BenchmarkResults, render_markdown
from berdiff.apps.benchmark.run import benchmark, run_benchmark
from berdiff.apps.benchmark.settings import (
    BenchmarkSettings,
    DataSettings,
    Method,
    SweepSettings,
    TrainingSettings,
)

__all__ = [
    "BenchmarkResults",
    "BenchmarkSettings",
    "DataSettings",
    "Method",
    "SweepSettings",
    "TrainingSettings",
    "benchmark",
    "cache_key",
    "render_markdown",
    "run_benchmark",
]
