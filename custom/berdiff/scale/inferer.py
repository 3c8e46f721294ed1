# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Slice-batched inference over the head slices of a volume (:class:`HeadSliceInferer`), with out-of-memory back-off."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

__all__ = [
    "CPU_SW_BATCH_SIZE",
    "CUDA_MAX_SW_BATCH_SIZE",
    "CUDA_BYTES_PER_PIXEL",
    "is_out_of_memory",
    "HeadSliceInferer",
]

logger = logging.getLogger(__name__)

#: ``sw_batch_size="auto"`` on CPU: slices per network call (larger batches barely help a CPU and cost memory)
CPU_SW_BATCH_SIZE = 16
#: ``sw_batch_size="auto"`` on CUDA: upper bound of the first try (then halved on out-of-memory)
CUDA_MAX_SW_BATCH_SIZE = 512
#: ``sw_batch_size="auto"`` on CUDA: bytes per slice pixel assumed when sizing the first try from the free memory,
#: from the issue's H200 measurement (reference preset, 155 slices of 256x256, bf16: 9.8 GB peak, ~970 B/pixel),
#: doubled without bf16 autocast
CUDA_BYTES_PER_PIXEL = 1024


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CUDA (or CPU allocator) out-of-memory error."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(error, oom)) or "out of memory" in str(error).lower()


class HeadSliceInferer(Inferer):
    """
    Runs a 2D network over the axial slices of a volume in whole-volume batches of the head slices: the slices that
    are not constant (everything outside the head is background) are sent through ``network`` in batches of
    ``sw_batch_size``; the constant slices go through in their own calls (``AnomalyPipeline`` gives them zero maps
    without running its networks). With ``sw_batch_size="auto"``: on CPU :data:`CPU_SW_BATCH_SIZE`; on CUDA all head
    slices of the volume at once, capped by the device's free memory (:data:`CUDA_BYTES_PER_PIXEL`) and
    :data:`CUDA_MAX_SW_BATCH_SIZE`, halved (and remembered) whenever a batch runs out of memory.

    Input ``(B, C, *spatial)``, output ``(B, C_out, *spatial)`` like ``monai.inferers.SliceInferer`` with a
    ``roi_size`` equal to the in-plane size; the output is a ``MetaTensor`` with the input's metadata when the input
    is one. :attr:`last_stats` holds the network time (synchronised on CUDA once per volume), the number of calls and
    the batch size used of the last call.

    Args:
        sw_batch_size: slices per network call, or ``"auto"``.
        spatial_dim: the slicing axis among the spatial axes (2: the axial axis of RAS volumes).
        amp: whether the caller runs under bf16 autocast (sizes the ``auto`` batch on CUDA).
    """

    def __init__(self, sw_batch_size: int | str = "auto", spatial_dim: int = 2, amp: bool = False) -> None:
        super().__init__()
        if isinstance(sw_batch_size, str):
            if sw_batch_size != "auto":
                raise ValueError(f"sw_batch_size must be a positive integer or 'auto', got {sw_batch_size!r}.")
        elif int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be a positive integer or 'auto', got {sw_batch_size}.")
        self.sw_batch_size = sw_batch_size if isinstance(sw_batch_size, str) else int(sw_batch_size)
        self.spatial_dim = int(spatial_dim)
        self.amp = bool(amp)
        self._cap: int | None = None  # "auto": batch size after the last out-of-memory error
        self.last_stats: dict[str, Any] = {}

    def batch_size_for(self, num_slices: int, slice_shape: Sequence[int], device: torch.device) -> int:
        """The batch size used for ``num_slices`` head slices of ``slice_shape`` (C, H, W) on ``device``."""
        if self.sw_batch_size != "auto":
            return max(1, min(int(self.sw_batch_size), num_slices))
        if device.type != "cuda":
            cap = CPU_SW_BATCH_SIZE
        else:
            cap = CUDA_MAX_SW_BATCH_SIZE
            if torch.cuda.is_available():
                free, _ = torch.cuda.mem_get_info(device)
                pixels = 1
                for n in slice_shape[1:]:
                    pixels *= int(n)
                per_slice = CUDA_BYTES_PER_PIXEL * pixels * (1 if self.amp else 2)
                cap = min(cap, int(0.8 * free // max(per_slice, 1)))
        if self._cap is not None:  # lowered after an out-of-memory error
            cap = min(cap, self._cap)
        return max(1, min(cap, num_slices))

    def _run_chunks(self, x: torch.Tensor, idx: torch.Tensor, network: Callable, batch: int, out: list, *args: Any, **kwargs: Any) -> int:
        """Runs ``network`` on ``x[idx]`` in chunks of ``batch`` (halved on CUDA out-of-memory with ``auto``)."""
        calls = 0
        start = 0
        while start < len(idx):
            sel = idx[start : start + batch]
            try:
                out.append((sel, network(x[sel], *args, **kwargs)))
            except Exception as e:
                if not (self.sw_batch_size == "auto" and is_out_of_memory(e) and batch > 1):
                    raise
                batch = max(1, batch // 2)
                self._cap = batch
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
                logger.warning(f"out of memory: sw_batch_size 'auto' lowered to {batch} slices per call.")
                continue
            calls += 1
            start += len(sel)
        return calls

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            inputs: ``(B, C, *spatial)`` with 3 spatial axes.
            network: a 2D network ``(N, C, H, W) -> (N, C_out, H, W)``.
            args: passed to ``network``.
            kwargs: passed to ``network``.
        """
        if inputs.ndim != 5:
            raise ValueError(f"HeadSliceInferer expects (B, C, H, W, D) inputs, got shape {tuple(inputs.shape)}.")
        t0 = time.perf_counter()
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        axis = 2 + self.spatial_dim
        b, c = data.shape[:2]
        moved = data.movedim(axis, 2)  # (B, C, D, h, w)
        depth, plane = moved.shape[2], moved.shape[3:]
        x = moved.permute(0, 2, 1, 3, 4).reshape(b * depth, c, *plane)
        flat = x.reshape(x.shape[0], -1)
        head = flat.amax(dim=1) > flat.amin(dim=1)  # one host sync per volume
        head_idx = head.nonzero().flatten()
        background_idx = (~head).nonzero().flatten()
        batch = self.batch_size_for(len(head_idx), x.shape[1:], x.device)
        pieces: list = []
        calls = self._run_chunks(x, head_idx, network, batch, pieces, *args, **kwargs)
        batch = min(batch, self._cap or batch)
        calls += self._run_chunks(x, background_idx, network, max(batch, 1), pieces, *args, **kwargs)
        first = pieces[0][1]
        result = torch.empty((x.shape[0], first.shape[1], *first.shape[2:]), dtype=first.dtype, device=first.device)
        for sel, value in pieces:
            result[sel.to(result.device)] = value.to(result.dtype)
        out = result.reshape(b, depth, result.shape[1], *result.shape[2:]).permute(0, 2, 1, 3, 4).movedim(2, axis)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        self.last_stats = {
            "network_time_s": time.perf_counter() - t0,
            "num_calls": calls,
            "sw_batch_size": int(batch),
            "num_head_slices": int(len(head_idx)),
        }
        out = out.contiguous()
        if isinstance(inputs, MetaTensor):
            out = convert_to_dst_type(out, inputs, device=out.device)[0]
        return out
