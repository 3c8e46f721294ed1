# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Small named functions the bundle configs call instead of long ``$`` expressions, so that the configs stay
declarative and the logic is tested here: sizes, logging intervals, checkpoint contents, a frozen stage-1 network,
DDP wrapping and rank-0 logging under ``torchrun``, and the 2D image loading of the IXI bundle.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "spatial_size_2d",
    "every_n_iterations",
    "training_state",
    "frozen",
    "distributed",
    "log_on_main_process_only",
    "load_image_2d",
    "scale_intensity_2d",
]


def spatial_size_2d(size: int | Sequence[int]) -> list[int]:
    """The in-plane size as ``[H, W]``: an int ``S`` gives ``[S, S]``, a pair is returned as a list.

    Args:
        size: an int, or a sequence of two ints.

    Raises:
        ValueError: ``size`` is neither an int nor a pair of ints.
    """
    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(size):
        return [int(size), int(size)]
    values = list(size) if isinstance(size, Sequence) and not isinstance(size, str) else []
    if len(values) != 2 or not all(is_int(v) for v in values):
        raise ValueError(f"spatial_size = {size!r}: an integer or a pair of integers [H, W].")
    return [int(v) for v in values]


def every_n_iterations(interval: int) -> Callable[[Any, int], bool]:
    """The ``iteration_log`` filter of MONAI's ``StatsHandler``: true at iterations ``interval``, ``2 * interval``, ...

    Args:
        interval: iterations between two logged lines (>= 1).

    Raises:
        ValueError: ``interval`` < 1.
    """
    if interval < 1:
        raise ValueError(f"log_interval = {interval!r}: an integer in [1, inf).")

    def log_now(engine: Any, iteration: int) -> bool:
        return iteration % interval == 0

    return log_now


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: nn.Module,
    trainer: Any,
    discriminator: nn.Module | None = None,
    d_optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """What a training checkpoint holds (``CheckpointSaver``/``CheckpointLoader`` ``save_dict``/``load_dict``): the
    network, its optimiser, the EMA copy, the trainer (its iteration), and the discriminator with its optimiser when
    the adversarial loss is on.

    Args:
        model: the trained network.
        optimizer: its optimiser.
        ema: the EMA copy of the network.
        trainer: the ignite engine.
        discriminator: the PatchGAN discriminator, or None.
        d_optimizer: its optimiser, or None.

    Raises:
        ValueError: only one of ``discriminator`` and ``d_optimizer`` is given.
    """
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "ema": ema, "trainer": trainer}
    if (discriminator is None) != (d_optimizer is None):
        raise ValueError("discriminator and d_optimizer are saved together: give both or neither.")
    if discriminator is not None:
        state.update(discriminator=discriminator, d_optimizer=d_optimizer)
    return state


def frozen(module: nn.Module, checkpoints: str | Sequence[str], device: torch.device | str) -> nn.Module:
    """``module`` with the weights of the first existing file of ``checkpoints``, on ``device``, in eval mode and
    without gradients (the stage-1 autoencoder during stage 2). A missing file leaves the weights as they are: the
    training configs report it when the run starts (:func:`berdiff.handlers.training_preflight`), so that the
    config also builds before stage 1 has run.

    Args:
        module: the network.
        checkpoints: a state-dict file or candidate files, first existing one wins.
        device: where the network goes.
    """
    from berdiff.training import load_weights

    return load_weights(module, checkpoints, missing_ok=True).to(device).eval().requires_grad_(False)


def distributed(module: nn.Module | None, device: torch.device | str) -> nn.Module | None:
    """``module`` on ``device`` wrapped in ``DistributedDataParallel`` (gradients averaged over the process group;
    ``device_ids`` only on CUDA); None stays None (the optional discriminator).

    Args:
        module: the network, or None.
        device: this process's device (:func:`berdiff.scale.local_device` under ``torchrun``).
    """
    if module is None:
        return None
    device = torch.device(device)
    module = module.to(device)
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def log_on_main_process_only() -> bool:
    """Silences INFO console logs on every rank but 0 of the default process group (one log per run); returns
    whether this process is rank 0. Without a process group this process counts as rank 0."""
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    if not main:
        logging.disable(logging.INFO)
    return main


def load_image_2d(path: str | os.PathLike, spatial_size: int) -> torch.Tensor:
    """One 2D single-channel image file (PNG/JPEG/TIFF or 2D NIfTI) as a ``(1, S, S)`` float32 tensor in [0, 1]: the
    intensity rule and square resize of :mod:`berdiff.data.images2d` (the IXI bundle's training loader; the same
    code as ``python -m berdiff benchmark``).

    Args:
        path: the image file.
        spatial_size: ``S``, the side of the square output.
    """
    from berdiff.data.images2d import read_image, resize_image, scale_intensity

    image = resize_image(scale_intensity(read_image(path)), spatial_size)
    return torch.as_tensor(image, dtype=torch.float32)[None]


def scale_intensity_2d(image: Any) -> Any:
    """:func:`berdiff.data.images2d.scale_intensity` on a loaded image (a ``MetaTensor`` or tensor), keeping its
    metadata and applied operations so that ``Invertd`` can map the outputs back to the input's grid (the IXI
    bundle's inference preprocessing).

    Args:
        image: a channel-first image, typically a ``monai.data.MetaTensor``.
    """
    from monai.data import MetaTensor

    from berdiff.data.images2d import scale_intensity

    scaled = torch.as_tensor(scale_intensity(torch.as_tensor(image).cpu().numpy()))
    if isinstance(image, MetaTensor):
        return MetaTensor(scaled, meta=image.meta, applied_operations=image.applied_operations)
    return scaled
