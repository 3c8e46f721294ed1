# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Peak memory of a run: CUDA's peak allocation on a GPU, the process's peak resident set size otherwise."""

from __future__ import annotations

import resource
import sys

import torch

__all__ = ["uses_cuda", "peak_memory_mb"]


def uses_cuda(device: torch.device | str) -> bool:
    """
    Whether ``device`` is a CUDA device and CUDA is available.

    Args:
        device: a device or its name.
    """
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def peak_memory_mb(device: torch.device | str) -> tuple[str, float]:
    """
    Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a CUDA device (since the last reset), otherwise the
    process's peak resident set size (``resource.getrusage``, the peak over the process lifetime).

    Args:
        device: the inference device.

    Returns:
        ``(kind, MiB)`` with kind ``"cuda_max_allocated"`` or ``"process_max_rss"``.
    """
    if uses_cuda(device):
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return "process_max_rss", rss / (2**20 if sys.platform == "darwin" else 2**10)
