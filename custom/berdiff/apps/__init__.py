# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The applications behind ``python -m berdiff <command>`` (:mod:`.cli`): calibration, the demo, the benchmark, the
speed measurements and the release bundles. Each is imported only when its command runs.
"""

__all__: list[str] = []
