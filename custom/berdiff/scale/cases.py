# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Which cases a run has to do: case outputs, resumable plans (:func:`plan_cases`) and the case status."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from monai.utils import StrEnum

from berdiff.scale.distributed import rank_and_world_size
from berdiff.utils import case_name

__all__ = ["CaseStatus", "case_outputs", "outputs_complete", "CasePlan", "plan_cases"]

logger = logging.getLogger(__name__)


class CaseStatus(StrEnum):
    """Status of a case in ``run_summary.json``."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    WRITING = "writing"  # computed, files still being written by the background thread


def case_outputs(output_dir: str, case: str, output_postfixes: Sequence[str], output_ext: str = ".nii.gz") -> list[str]:
    """The output files of a case: ``<output_dir>/<case>_<postfix><output_ext>``."""
    return [os.path.join(os.fspath(output_dir), f"{case}_{p}{output_ext}") for p in output_postfixes]


def outputs_complete(
    output_dir: str, case: str, output_postfixes: Sequence[str], output_ext: str = ".nii.gz"
) -> bool:
    """
    True when every output file of ``case`` exists and is not empty. Output files are written atomically (temporary
    file, then ``os.replace``), so a file under its final name is complete; a case killed mid-way misses some of
    its files and is therefore redone.
    """
    files = case_outputs(output_dir, case, output_postfixes, output_ext)
    return bool(files) and all(os.path.isfile(f) and os.path.getsize(f) > 0 for f in files)


def _remove_stale_temp_files(output_dir: str, case: str) -> None:
    """Removes the hidden temporary files (``.<case>_<postfix>...tmp...``) a killed run left for ``case``."""
    folder = os.fspath(output_dir)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(f".{case}_") and ".tmp" in name:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


@dataclass
class CasePlan:
    """
    The cases of one process.

    Attributes:
        todo: the datalist items to run.
        skipped: the items whose outputs were already complete (``skip_existing``).
        rank: this process's rank.
        world_size: the number of processes.
        num_total: the number of cases of the whole run (all ranks, before skipping).
        names: the case names of the whole run, in datalist order.
    """

    todo: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    num_total: int = 0
    names: list[str] = field(default_factory=list)


def plan_cases(
    items: Sequence[Mapping],
    output_dir: str,
    output_postfixes: Sequence[str],
    skip_existing: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    output_ext: str = ".nii.gz",
) -> CasePlan:
    """
    The cases this process runs. Under torchrun every rank takes ``items[rank::world_size]``: each case belongs to
    exactly one rank (no padding, nothing written twice) and is processed wholly by it. The split is made on the
    full list before skipping, so it does not depend on what other ranks have already written.

    Args:
        items: the datalist (items with ``image`` and ``case``).
        output_dir: the output folder.
        output_postfixes: postfixes of the files written per case.
        skip_existing: leave out the cases whose outputs are all complete (:func:`outputs_complete`); the hidden
            temporary files a killed run left for this process's cases are removed.
        rank: this process's rank; from ``torch.distributed`` when None.
        world_size: the number of processes; from ``torch.distributed`` when None.
        output_ext: extension of the output files.
    """
    r, w = rank_and_world_size()
    rank = r if rank is None else int(rank)
    world_size = w if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    # outputs are named after the first image file (berdiff.io.case_name_formatter)
    names = [case_name(it["image"]) for it in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several inputs have the same case name (their outputs would overwrite each other): {duplicates}")
    plan = CasePlan(rank=rank, world_size=world_size, num_total=len(items), names=names)
    for item, name in list(zip(items, names))[rank::world_size]:
        if skip_existing:
            _remove_stale_temp_files(output_dir, name)
        if skip_existing and outputs_complete(output_dir, name, output_postfixes, output_ext):
            plan.skipped.append(dict(item))
        else:
            plan.todo.append(dict(item))
    if plan.skipped:
        logger.info(f"skip_existing: {len(plan.skipped)} complete case(s) skipped, {len(plan.todo)} to run.")
    return plan
