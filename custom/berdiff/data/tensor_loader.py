# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Batches drawn from tensors that already live on the training device (no worker processes, no host copies)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.data import DataLoader, DistributedSampler
from monai.utils import StrEnum, look_up_option
from torch.utils.data import Dataset

__all__ = ["TensorLoader", "Placement", "stack_dataset", "device_loader"]


class Placement(StrEnum):
    """
    Where :func:`device_loader` keeps the training data.

    device: the whole data set as tensors on the training device (:class:`TensorLoader`).
    loader: a MONAI ``DataLoader`` over the dataset (host memory, batches copied every iteration).
    auto: ``device`` when the stacked data set takes at most ``max_bytes``, else ``loader``.
    """

    DEVICE = "device"
    LOADER = "loader"
    AUTO = "auto"


class TensorLoader:
    """
    An iterable of dict batches indexed out of tensors held on one device, for MONAI/ignite trainers
    (``train_data_loader`` of ``SupervisedTrainer``). Small 2D data sets (slices, binary codes) fit on a GPU, so
    a batch is one ``index_select`` on the device instead of a collate and a host-to-device copy.

    Each epoch draws a new permutation from a generator seeded with ``seed + epoch`` (the same on every rank), so
    runs are reproducible. Under ``torch.distributed`` each rank takes every ``world_size``-th index of the
    permutation: disjoint samples, the same number of batches on every rank (without ``drop_last`` the permutation
    is padded with its first samples to a multiple of ``world_size``, as ``DistributedSampler`` does).

    Args:
        data: name -> tensor, all with the same first (sample) dimension.
        batch_size: samples per batch (per rank).
        shuffle: new random order every epoch (else the stored order).
        drop_last: drop the last incomplete batch (keeps batch statistics and compiled shapes constant).
        seed: seed of the permutations.
        aliases: extra batch keys that repeat another key's batch, e.g. ``{"label": "image"}`` for autoencoders
            (no second copy in memory).
        dtype: when given, floating point and integer tensors are cast to it per batch (e.g. codes stored as
            ``uint8`` and trained as ``float32``).
        memory_format: optional ``torch.channels_last`` for 4D batches.
        rank, world_size: shard of this process (default: from ``torch.distributed`` when initialised).

    Raises:
        ValueError: empty data, mismatched lengths, a batch size below 1, or fewer samples than one batch with
            ``drop_last``.
    """

    def __init__(
        self,
        data: Mapping[str, torch.Tensor],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        aliases: Mapping[str, str] | None = None,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not data:
            raise ValueError("TensorLoader needs at least one tensor.")
        lengths = {k: int(v.shape[0]) for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all tensors must have the same number of samples, got {lengths}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.aliases = dict(aliases or {})
        bad = {k: v for k, v in self.aliases.items() if v not in data}
        if bad:
            raise ValueError(f"aliases {bad} name keys that are not in the data {sorted(data)}.")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = int(rank if rank is not None else (dist.get_rank() if distributed else 0))
        self.world_size = int(world_size if world_size is not None else (dist.get_world_size() if distributed else 1))
        self.data = dict(data)
        self.num_samples = next(iter(lengths.values()))
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.dtype = dtype
        self.memory_format = memory_format
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(
                f"{self.num_samples} samples on {self.world_size} process(es) give no batch of {self.batch_size} "
                "with drop_last=True; lower the batch size."
            )

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    def _per_rank(self) -> int:
        return self.num_samples // self.world_size if self.drop_last else math.ceil(self.num_samples / self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen)
        else:
            order = torch.arange(self.num_samples)
        per_rank = self._per_rank()
        if per_rank * self.world_size > self.num_samples:  # drop_last off: pad with repeats so every rank gets as many
            order = torch.cat([order, order[: per_rank * self.world_size - self.num_samples]])
        return order[self.rank :: self.world_size][:per_rank].to(self.device)

    def _take(self, tensor: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        batch = tensor.index_select(0, idx)
        if self.dtype is not None and batch.dtype != self.dtype:
            batch = batch.to(self.dtype)
        if self.memory_format is not None and batch.ndim == 4:
            batch = batch.contiguous(memory_format=self.memory_format)
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order()
        self.epoch += 1
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            batch = {k: self._take(v, idx) for k, v in self.data.items()}
            batch.update({alias: batch[key] for alias, key in self.aliases.items()})
            yield batch


def stack_dataset(dataset: Dataset | Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """
    Runs every item of ``dataset`` once and stacks ``keys`` into tensors (N, ...) on the CPU.

    Raises:
        ValueError: an empty data set, a missing key, or items of different shapes (name the item and the shapes).
    """
    if len(dataset) == 0:
        raise ValueError("the data set is empty: nothing to train on (check the datalist).")
    items = [dataset[i] for i in range(len(dataset))]
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if key not in items[0]:
            raise ValueError(f"data set items have no {key!r} key (keys: {sorted(items[0])}).")
        tensors = [torch.as_tensor(item[key]) for item in items]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"items under {key!r} have different shapes {sorted(shapes)}; pad/crop them to one size.")
        out[key] = torch.stack([t.as_subclass(torch.Tensor) if hasattr(t, "as_tensor") else t for t in tensors])
    return out


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def device_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str = "cpu",
    keys: Sequence[str] = ("image",),
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    placement: str = Placement.AUTO,
    max_fraction: float = 0.25,
    aliases: Mapping[str, str] | None = None,
    num_workers: int = 0,
) -> TensorLoader | DataLoader:
    """
    The training loader of the bundle configs and the benchmark: the data set stacked onto ``device``
    (:class:`TensorLoader`) when it fits, else a MONAI ``DataLoader`` (with a ``DistributedSampler`` under
    ``torch.distributed``).

    Args:
        dataset: a (cached) MONAI dataset of dict items.
        batch_size: samples per batch and process.
        device: the training device.
        keys: item keys to stack (device placement only; the loader path yields whole items).
        shuffle, drop_last, seed: as for :class:`TensorLoader`.
        placement: a :class:`Placement`.
        max_fraction: ``auto`` keeps the data on the device when it takes at most this fraction of the device's
            free memory (host memory on CPU).
        aliases: see :class:`TensorLoader`.
        num_workers: worker processes of the ``DataLoader`` fallback.
    """
    placement = look_up_option(placement, Placement)
    device = torch.device(device)
    if placement != Placement.LOADER and len(dataset) > 0:  # (an empty list only without data: reported at run time)
        first = dataset[0] if len(dataset) else {}
        per_item = sum(torch.as_tensor(first[k]).element_size() * torch.as_tensor(first[k]).numel() for k in keys if k in first)
        fits = per_item * len(dataset) <= max_fraction * _free_bytes(device)
        if placement == Placement.DEVICE or fits:
            data = {k: v.to(device) for k, v in stack_dataset(dataset, keys).items()}
            return TensorLoader(data, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, aliases=aliases)
    distributed = dist.is_available() and dist.is_initialized()
    sampler = DistributedSampler(dataset, even_divisible=True, shuffle=shuffle) if distributed else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None and len(dataset) > 0, sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers, pin_memory=device.type == "cuda",
    )
