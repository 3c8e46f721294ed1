# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Stage 2 trains on latent codes: the dataset encoded once (:func:`encode_dataset`) and its loaders."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from berdiff.data.tensor_loader import TensorLoader

__all__ = ["encode_dataset", "code_loader", "diffusion_loader"]


@torch.no_grad()
def encode_dataset(
    dataset: Dataset, autoencoder: nn.Module, device: torch.device | str, key: str = "image", batch_size: int = 64,
    num_workers: int = 0,
) -> torch.Tensor:
    """
    Deterministic binary codes of every item's ``key`` (stage-2 pre-encoding), encoded in batches on ``device``
    with autocast off (the same fp32 code as at inference) and kept there as ``uint8`` (N, C_lat, h, w).
    Images are streamed through a ``DataLoader``, so the data set never has to fit in memory as images.
    """
    device = torch.device(device)
    autoencoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    codes = []
    for batch in loader:
        # plain tensors: the codes are training data, and collated MetaTensors would carry batched meta data that
        # breaks indexing the codes later
        images = torch.as_tensor(batch[key] if isinstance(batch, dict) else batch).as_subclass(torch.Tensor)
        images = images.float().to(device)
        with torch.autocast(device.type, enabled=False):
            codes.append(autoencoder.encode_stage_2_inputs(images).to(torch.uint8))
    if not codes:
        raise ValueError("the data set is empty: nothing to encode (check the datalist).")
    return torch.cat(codes)


def code_loader(
    dataset: Dataset,
    autoencoder: nn.Module,
    batch_size: int,
    device: torch.device | str,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    encode_batch_size: int = 64,
    num_workers: int = 0,
) -> TensorLoader:
    """
    The stage-2 loader: the data set's images encoded once (:func:`encode_dataset`) and served from the device as
    float batches under ``"image"`` (:class:`~berdiff.data.tensor_loader.TensorLoader`).
    """
    codes = encode_dataset(dataset, autoencoder, device, batch_size=encode_batch_size, num_workers=num_workers)
    return TensorLoader({"image": codes}, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, dtype=torch.float32)


def diffusion_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    autoencoder: nn.Module | None = None,
    pre_encode: bool = True,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    placement: str = "auto",
    num_workers: int = 0,
) -> Iterable:
    """
    The stage-2 loader of the bundle configs: pre-encoded codes on the device (:func:`code_loader`, the default),
    or the images themselves (:func:`~berdiff.data.tensor_loader.device_loader`) for on-the-fly encoding by
    ``BernoulliPrepareBatch(autoencoder=...)``.

    Raises:
        ValueError: ``pre_encode`` without an autoencoder.
    """
    from berdiff.data.tensor_loader import device_loader

    if pre_encode and len(dataset) > 0:  # (an empty list only without data: reported when the run starts)
        if autoencoder is None:
            raise ValueError("pre_encode=True needs the frozen autoencoder.")
        return code_loader(
            dataset, autoencoder, batch_size, device, shuffle=shuffle, drop_last=drop_last, seed=seed,
            num_workers=num_workers,
        )
    return device_loader(
        dataset, batch_size, device, shuffle=shuffle, drop_last=drop_last, seed=seed, placement=placement,
        num_workers=num_workers,
    )
