# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Inference at scale: resumable case plans, cases loaded in workers, head-slice batches with out-of-memory back-off,
background writing, and multi-process runs with one merged ``run_summary.json``.
"""

from __future__ import annotations

from berdiff.scale.cases import CaseStatus, case_outputs, outputs_complete, CasePlan, plan_cases
from berdiff.scale.dataset import CASE_ERROR_KEY, CaseDataset
from berdiff.scale.distributed import (
    rank_and_world_size,
    local_device,
    init_distributed,
    summary_filename,
    merge_run_summaries,
    finish_distributed,
    destroy_distributed,
)
from berdiff.scale.evaluator import CaseEvaluator
from berdiff.scale.inferer import (
    CPU_SW_BATCH_SIZE,
    CUDA_MAX_SW_BATCH_SIZE,
    CUDA_BYTES_PER_PIXEL,
    is_out_of_memory,
    HeadSliceInferer,
)
from berdiff.scale.writer import WriteQueue, background_writer

__all__ = [
    "CaseStatus",
    "case_outputs",
    "outputs_complete",
    "CasePlan",
    "plan_cases",
    "CASE_ERROR_KEY",
    "CaseDataset",
    "CPU_SW_BATCH_SIZE",
    "CUDA_MAX_SW_BATCH_SIZE",
    "CUDA_BYTES_PER_PIXEL",
    "is_out_of_memory",
    "HeadSliceInferer",
    "CaseEvaluator",
    "WriteQueue",
    "background_writer",
    "rank_and_world_size",
    "local_device",
    "init_distributed",
    "summary_filename",
    "merge_run_summaries",
    "finish_distributed",
    "destroy_distributed",
]
