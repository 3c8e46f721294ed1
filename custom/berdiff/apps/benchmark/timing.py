# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Running a method on images and timing it: :data:`RunFn` (a method: images -> anomaly maps), :func:`run_maps`,
:func:`time_method` and :class:`PeakMemory` (also used by ``python -m berdiff speed``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["PeakMemory", "RunFn", "generators", "run_maps", "time_method"]

#: a method: (B, 1, H, W) images and their indices -> ``anomaly_map``, ``reconstruction`` (and optional ``mask``)
RunFn = Callable[[torch.Tensor, Sequence[int]], dict[str, torch.Tensor]]


class PeakMemory:
    """
    Peak tensor memory allocated during a block, above what was allocated before it (network weights excluded):
    the CUDA allocator's peak on GPU; on CPU the running sum of the allocations and frees that
    ``torch.profiler`` records with ``profile_memory=True``, in time order (the resident set size of a process is
    useless here: the CPU allocator reuses freed blocks).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._prof.__exit__(*exc)
        running = peak = 0
        for event in sorted(self._prof.events(), key=lambda e: e.time_range.start):
            running += event.self_cpu_memory_usage
            peak = max(peak, running)
        self.peak_mib = peak / 2**20


def generators(indices: Sequence[int], seed: int, device: torch.device) -> list[torch.Generator]:
    """
    One seeded random generator per image index, so that an image gets the same noise in every batch layout.

    Args:
        indices: the images' indices.
        seed: the run's seed.
        device: the generators' device.
    """
    return [torch.Generator(device=device).manual_seed(int(seed) * 100_003 + int(i)) for i in indices]


def run_maps(
    fn: RunFn, images: np.ndarray, batch_size: int, device: torch.device, offset: int = 0, stats: dict | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """
    Anomaly maps and reconstructions (N, H, W) of ``images`` and the wall time.

    Args:
        fn: the method.
        images: (N, H, W) images in [0, 1].
        batch_size: images per call.
        device: the device.
        offset: index of the first image (seeds its noise).
        stats: gets ``mask_fraction``, the mean fraction of latent entries in the final mask (methods that return a
            ``mask``; ``None`` otherwise), and ``latent``: every ``latent_<name>`` map the method returns, (N, H, W).
    """
    maps, recons, fractions = [], [], []
    latent: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    for b in range(0, len(images), batch_size):
        x = torch.as_tensor(images[b : b + batch_size], dtype=torch.float32, device=device)[:, None]
        out = fn(x, list(range(offset + b, offset + b + len(x))))
        maps.append(out["anomaly_map"][:, 0].cpu().numpy())
        recons.append(out["reconstruction"][:, 0].cpu().numpy())
        if "mask" in out:
            fractions += out["mask"].float().flatten(1).mean(1).cpu().tolist()
        for key in (k for k in out if k.startswith("latent_") and k != "latent_flip_map"):
            latent.setdefault(key[len("latent_"):], []).append(out[key][:, 0].float().cpu().numpy())
    seconds = time.perf_counter() - start
    if stats is not None:
        stats["mask_fraction"] = float(np.mean(fractions)) if fractions else None
        stats["latent"] = {name: np.concatenate(parts) for name, parts in latent.items()}
    if not maps:
        shape = (0, *images.shape[1:])
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32), seconds
    return np.concatenate(maps), np.concatenate(recons), seconds


def time_method(fn: RunFn, images: np.ndarray, n: int, device: torch.device) -> dict[str, Any]:
    """
    Median seconds per slice over ``n`` single-slice runs (after one warm-up), then the peak tensor memory of one
    more single-slice run (measured separately: the CPU memory profiler slows the run down).

    Args:
        fn: the method.
        images: (N, H, W) images; the first ``n`` are used (cycled when fewer).
        n: the timed runs.
        device: the device.
    """
    x_all = torch.as_tensor(images[: max(1, n)], dtype=torch.float32, device=device)[:, None]
    fn(x_all[:1], [0])  # warm-up
    times = []
    for i in range(max(1, n)):
        x = x_all[i % len(x_all)][None]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(x, [i])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    with PeakMemory(device) as mem:
        fn(x_all[:1], [0])
    return {
        "seconds_per_slice": float(statistics.median(times)),
        "seconds_all": times,
        "peak_memory_mib": float(mem.peak_mib),
    }
