# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The process group of the multi-process training configurations (:func:`init_distributed`)."""

from __future__ import annotations

import os

import torch

__all__ = ["init_distributed"]


def init_distributed() -> bool:
    """
    Initialises the default process group of the multi-process training configs: from the environment that
    ``torchrun`` sets (NCCL on GPUs, gloo on CPU), or, when the process was not started by ``torchrun``, as a group
    of one process (so that the configuration also builds and runs as a plain single-process job).

    Returns:
        True when a group was initialised now, False when one already existed.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True
