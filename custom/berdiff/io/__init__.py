# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Input and output of the bundles: image headers through ITK, atomic NIfTI writing, checkpoints and datalists."""

from __future__ import annotations

from berdiff.io.itk import ITK_SUFFIXES, ImageHeader, is_itk_image, read_itk_header
from berdiff.io.writers import AtomicNibabelWriter, case_name_formatter
from berdiff.io.checkpoints import (
    load_state_dict,
    check_state_dict,
    check_checkpoint,
    identify_preset,
    load_pipeline_weights,
    PipelineCheckpointLoader,
)
from berdiff.io.datalists import load_datalist, MissingData, inference_datalist, check_unique_outputs

__all__ = [
    "ITK_SUFFIXES",
    "ImageHeader",
    "is_itk_image",
    "read_itk_header",
    "AtomicNibabelWriter",
    "case_name_formatter",
    "load_state_dict",
    "check_state_dict",
    "check_checkpoint",
    "identify_preset",
    "load_pipeline_weights",
    "PipelineCheckpointLoader",
    "load_datalist",
    "MissingData",
    "inference_datalist",
    "check_unique_outputs",
]
