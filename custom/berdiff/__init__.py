# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""berdiff: masked Bernoulli diffusion for unsupervised anomaly detection, built on MONAI."""

from __future__ import annotations

__version__ = "0.1.0"
