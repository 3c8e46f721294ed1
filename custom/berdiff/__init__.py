# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff: masked Bernoulli diffusion for unsupervised anomaly detection, built on MONAI."""

from __future__ import annotations

__version__ = "0.1.0"
