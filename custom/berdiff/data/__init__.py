# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Data: BraTS-layout preparation, synthetic demo volumes, synthetic lesions on 2D images.

Submodules are imported explicitly (``from berdiff.data.brats import ...``) so that optional dependencies of one
(e.g. nilearn for the demo generator) are not needed by the others.
"""
