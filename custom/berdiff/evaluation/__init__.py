# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Evaluation of anomaly maps (``docs/evaluation.md``): the scores (:mod:`.metrics`), the post-processing
(:mod:`.postprocess`), the protocols (:mod:`.protocols`), the scoring of cases (:mod:`.scoring`), the files
(:mod:`.cases`), ``python -m berdiff evaluate`` (:mod:`.evaluate`), its outputs (:mod:`.reports`) and the paired
bootstrap (:mod:`.statistics`).
"""

from berdiff.evaluation.cases import find_cases, load_case
from berdiff.evaluation.evaluate import EvaluationResult, evaluate, evaluate_arrays, load_threshold, read_calibration
from berdiff.evaluation.metrics import best_dice, dice, pixel_auprc, pixel_auroc, psnr, threshold_at_fpr
from berdiff.evaluation.postprocess import (
    AreaRule,
    brain_mask_from_image,
    reference_slice_postprocess,
    remove_small_components,
    volume_postprocess,
)
from berdiff.evaluation.protocols import (
    ThresholdMap,
    mean_std,
    per_slice_protocol,
    per_volume_protocol,
    score_slices,
    slice_detection_auroc,
    slice_statistics,
    summarise_slices,
)
from berdiff.evaluation.scoring import MAP_KEYS, ProtocolSettings
from berdiff.evaluation.statistics import paired_bootstrap_ci

__all__ = [
    "AreaRule",
    "EvaluationResult",
    "MAP_KEYS",
    "ProtocolSettings",
    "ThresholdMap",
    "best_dice",
    "brain_mask_from_image",
    "dice",
    "evaluate",
    "evaluate_arrays",
    "find_cases",
    "load_case",
    "load_threshold",
    "mean_std",
    "paired_bootstrap_ci",
    "per_slice_protocol",
    "per_volume_protocol",
    "pixel_auprc",
    "pixel_auroc",
    "psnr",
    "read_calibration",
    "reference_slice_postprocess",
    "remove_small_components",
    "score_slices",
    "slice_detection_auroc",
    "slice_statistics",
    "summarise_slices",
    "threshold_at_fpr",
    "volume_postprocess",
]
