# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Multi-process inference: ranks, devices, the process group and the merged ``run_summary.json``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from berdiff.utils import atomic_write_json

__all__ = [
    "rank_and_world_size",
    "local_device",
    "init_distributed",
    "summary_filename",
    "merge_run_summaries",
    "finish_distributed",
    "destroy_distributed",
]

logger = logging.getLogger(__name__)


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` (torchrun's variable, 0 when unset) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None) -> tuple[int, int]:
    """
    Joins torchrun's process group (NCCL on CUDA, gloo on CPU; ``env://`` rendezvous: ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` set by torchrun) unless already initialised, and selects the CUDA device.
    Outside torchrun (no ``WORLD_SIZE``) nothing is initialised: a single process.

    Args:
        device: this process's device (default :func:`local_device`).

    Returns:
        ``(rank, world_size)``.
    """
    device = torch.device(device) if device is not None else local_device()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = rank_and_world_size()
    if rank != 0:  # console logs from rank 0 only
        logging.getLogger("berdiff").setLevel(logging.WARNING)
    return rank, world


def summary_filename(filename: str = "run_summary.json") -> str:
    """``run_summary.json`` in a single process, ``run_summary.rank<r>.json`` for rank r of several."""
    rank, world = rank_and_world_size()
    if world == 1:
        return filename
    stem, ext = os.path.splitext(filename)
    return f"{stem}.rank{rank}{ext}"


def _barrier() -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def merge_run_summaries(
    summaries: Sequence[Mapping[str, Any]], order: Sequence[str] | None = None
) -> dict[str, Any]:
    """
    One run summary from those of several processes: cases, skipped/done/failed lists and time splits joined
    (in ``order`` of case names when given), totals summed, ``wall_time_s`` from the earliest start to the latest
    finish (the processes run concurrently), peak memory the maximum; status ``failed`` if any process failed,
    ``completed_with_failures`` if any case failed, else ``completed``. ``processes`` keeps each process's device,
    wall time and number of cases.

    Args:
        summaries: the per-process summaries (as written by :class:`berdiff.handlers.RunSummaryHandler`).
        order: case names in datalist order.
    """
    if not summaries:
        raise ValueError("no run summaries to merge.")
    merged: dict[str, Any] = {k: v for k, v in summaries[0].items()}
    rank_of = {name: i for i, name in enumerate(order or [])}

    def sort(names: list) -> list:
        key = (lambda n: rank_of.get(n if isinstance(n, str) else n.get("case"), len(rank_of)))
        return sorted(names, key=key) if order else names

    merged["cases"] = sort([c for s in summaries for c in s.get("cases", [])])
    for key in ("skipped", "done", "failed"):
        merged[key] = sort([c for s in summaries for c in s.get(key, [])])
    for key in ("num_cases", "num_slices", "num_done", "num_skipped", "num_failed"):
        merged[key] = sum(int(s.get(key) or 0) for s in summaries)
    starts = [s.get("started_utc") for s in summaries if s.get("started_utc")]
    ends = [s.get("finished_utc") for s in summaries if s.get("finished_utc")]
    merged["started_utc"] = min(starts) if starts else None
    merged["finished_utc"] = max(ends) if ends and len(ends) == len(summaries) else None
    merged["wall_time_s"] = max(float(s.get("wall_time_s") or 0.0) for s in summaries)
    wall = merged["wall_time_s"]
    merged["cases_per_s"] = round(merged["num_done"] / wall, 4) if wall > 0 else None
    busy = sum(float(c.get("wall_time_s") or 0.0) for c in merged["cases"])
    merged["slices_per_s"] = round(merged["num_slices"] / busy, 3) if busy > 0 else None
    mems = [s.get("peak_memory_mb") for s in summaries if s.get("peak_memory_mb") is not None]
    merged["peak_memory_mb"] = max(mems) if mems else None
    if "time_split_s" in merged:
        parts = {k for s in summaries for k in (s.get("time_split_s") or {})}
        merged["time_split_s"] = {
            k: round(sum(float((s.get("time_split_s") or {}).get(k) or 0.0) for s in summaries), 4) for k in sorted(parts)
        }
    statuses = [s.get("status") for s in summaries]
    errors = [s.get("error") for s in summaries if s.get("error")]
    if "failed" in statuses:
        merged["status"] = "failed"
    elif merged["num_failed"]:
        merged["status"] = "completed_with_failures"
    elif all(st == "completed" for st in statuses):
        merged["status"] = "completed"
    else:
        merged["status"] = "running"
    merged["error"] = "; ".join(errors) if errors else None
    merged["processes"] = [
        {k: s.get(k) for k in ("rank", "device", "device_name", "wall_time_s", "num_cases", "peak_memory_mb", "status")}
        for s in summaries
    ]
    merged["num_processes"] = len(summaries)
    merged.pop("rank", None)
    return merged


def finish_distributed(output_dir: str, filename: str = "run_summary.json", order: Sequence[str] | None = None) -> str | None:
    """
    After the evaluator has run on every rank: waits for all ranks, and on rank 0 merges their
    ``run_summary.rank<r>.json`` into ``<output_dir>/<filename>`` (atomically) and removes the per-rank files. A
    no-op in a single process.

    Args:
        output_dir: the output folder.
        filename: the merged summary's name.
        order: case names in datalist order (the merged ``cases`` follow it).

    Returns:
        the merged summary's path on rank 0, None elsewhere.
    """
    import json

    rank, world = rank_and_world_size()
    if world == 1:
        return os.path.join(os.fspath(output_dir), filename)
    _barrier()
    path = None
    if rank == 0:
        stem, ext = os.path.splitext(filename)
        parts = [os.path.join(os.fspath(output_dir), f"{stem}.rank{r}{ext}") for r in range(world)]
        summaries = []
        for r, p in enumerate(parts):
            with open(p) as f:
                s = json.load(f)
            s["rank"] = r
            summaries.append(s)
        merged = merge_run_summaries(summaries, order)
        merged["settings"] = dict(merged.get("settings") or {}, world_size=world)
        path = atomic_write_json(merged, os.path.join(os.fspath(output_dir), filename))
        for p in parts:
            os.remove(p)
        logger.info(f"run summary of {world} processes merged: {path}")
    _barrier()
    return path


def destroy_distributed() -> bool:
    """
    Tears the default process group down, if one is initialised, after a barrier: every rank reaches the barrier
    before any of them destroys its group, so no rank closes its connections while a peer still has gloo or NCCL
    work in flight (a gloo rank that lost its peers mid-teardown could abort at exit, failing a finished run).

    Returns:
        True when a group was destroyed, False when there was none.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_world_size() > 1:
        _barrier()
    dist.destroy_process_group()
    return True
