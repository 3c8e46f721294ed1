# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Dictionary transforms applied to the pipeline's volume output: channel split and anomaly mask."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from berdiff.evaluation.postprocess import reference_slice_postprocess

__all__ = ["SplitChannelsd", "AnomalyMaskd", "threshold_description"]


def _like(data: torch.Tensor, ref: Any) -> torch.Tensor:
    """``data`` as a MetaTensor carrying ``ref``'s meta data (when ``ref`` has any)."""
    if isinstance(ref, MetaTensor):
        return MetaTensor(data, meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return data


class SplitChannelsd(MapTransform):
    """
    Splits a channel-first tensor into named parts along the channel axis, e.g. the 6-channel output of
    ``AnomalyPipeline(output_keys=("anomaly_map", "latent_code_change", "reconstruction"))`` into ``anomaly`` (1),
    ``latent_code_change`` (1) and ``reconstruction`` (4). Parts keep the meta data of the source.

    Args:
        keys: the key to split (one key).
        names: output keys, in channel order.
        sizes: channels of each part; the sizes must add up to the channels of the input.
        delete_original: remove the source key afterwards.
        allow_missing_keys: don't raise for a missing key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        names: Sequence[str],
        sizes: Sequence[int],
        delete_original: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"SplitChannelsd splits one key, got {self.keys}.")
        if len(names) != len(sizes) or not names:
            raise ValueError(f"names and sizes must be non-empty and of equal length, got {names} and {sizes}.")
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must be positive, got {sizes}.")
        self.names = tuple(names)
        self.sizes = tuple(int(s) for s in sizes)
        self.delete_original = delete_original

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            src = d[key]
            if src.shape[0] != sum(self.sizes):
                raise ValueError(
                    f"{key!r} has {src.shape[0]} channels, expected {sum(self.sizes)} = "
                    f"{dict(zip(self.names, self.sizes))}."
                )
            start = 0
            for name, size in zip(self.names, self.sizes):
                d[name] = _like(torch.as_tensor(src)[start : start + size].clone(), src)
                start += size
            if self.delete_original:
                del d[key]
        return d


def threshold_description(threshold: float | None) -> dict[str, Any]:
    """How the anomaly mask is made, for run summaries: protocol A (``threshold=None``) or a calibrated threshold."""
    if threshold is None:
        return {
            "mode": "protocol_a",
            "description": "per axial slice: 5x5 median of each channel's squared residual, sum, p1/p99 clip, "
            "min-max, > 0.5, 8-connected components <= 15 px removed",
            "value": 0.5,
            "applies_to": "per-slice normalised map",
        }
    return {
        "mode": "calibrated",
        "description": "raw anomaly map > threshold (voxel-wise)",
        "value": float(threshold),
        "applies_to": "raw anomaly map",
    }


class AnomalyMaskd(MapTransform):
    """
    Binary (uint8 0/1) anomaly mask from the anomaly map, on the pipeline's grid (before ``Invertd``, so that axial
    slices are the last spatial axis in RAS):

    * ``threshold=None``: the reference's fixed per-slice protocol A, applied to every axial slice with
      :func:`berdiff.evaluation.reference_slice_postprocess` (5x5 median of each channel's squared residual, sum,
      p1/p99 clip, min-max, ``> 0.5``, 8-connected components of ``<= min_component`` pixels removed). The
      per-channel residual ``(reconstruction - image)^2`` is used when both keys are present, otherwise the
      channel-summed map. Slices whose map is constant (e.g. skipped background slices) give an empty mask.
    * ``threshold`` a number (e.g. calibrated at a false-positive rate by ``python -m berdiff calibrate``): the raw
      map ``> threshold``, voxel-wise.

    Args:
        keys: the anomaly map key (channel-first, one channel).
        output_key: key of the mask.
        threshold: None for protocol A, or an absolute threshold on the raw map.
        image_key: preprocessed image key (for the per-channel residual).
        reconstruction_key: reconstruction key (for the per-channel residual).
        min_component: protocol A component size rule.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str = "anomaly_mask",
        threshold: float | None = None,
        image_key: str | None = "image",
        reconstruction_key: str | None = "reconstruction",
        min_component: int = 15,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"AnomalyMaskd takes one anomaly map key, got {self.keys}.")
        if threshold is not None:
            threshold = float(threshold)
            if not np.isfinite(threshold):
                raise ValueError(f"threshold must be a finite number or None, got {threshold}.")
        if int(min_component) < 0:
            raise ValueError(f"min_component must be >= 0, got {min_component}.")
        self.output_key = output_key
        self.threshold = threshold
        self.image_key = image_key
        self.reconstruction_key = reconstruction_key
        self.min_component = int(min_component)

    def _protocol_a(self, d: Mapping[Hashable, Any], amap: np.ndarray) -> np.ndarray:
        if self.image_key in d and self.reconstruction_key in d:
            image = np.asarray(torch.as_tensor(d[self.image_key]).detach().cpu().float())
            recon = np.asarray(torch.as_tensor(d[self.reconstruction_key]).detach().cpu().float())
            if image.shape != recon.shape:
                raise ValueError(f"image {image.shape} and reconstruction {recon.shape} shapes differ.")
            residual = (recon - image) ** 2  # (C, H, W, D)
        else:
            residual = amap  # (1, H, W, D): the channel-summed map
        mask = np.zeros(amap.shape[1:], dtype=np.uint8)
        for z in range(amap.shape[-1]):
            slice_map = amap[0, ..., z]
            if slice_map.max() <= slice_map.min():
                continue  # constant slice (background): nothing is anomalous
            res = residual[..., z] if residual.shape[0] > 1 else residual[0, ..., z]
            _, binary = reference_slice_postprocess(res, min_component=self.min_component)
            mask[..., z] = binary
        return mask

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            src = d[key]
            amap = np.asarray(torch.as_tensor(src).detach().cpu().float())
            if amap.ndim < 3 or amap.shape[0] != 1:
                raise ValueError(f"{key!r} must be a one-channel map (1, H, W[, D]), got shape {amap.shape}.")
            if amap.ndim == 3:  # a single 2D slice
                amap = amap[..., None]
                squeeze = True
            else:
                squeeze = False
            if self.threshold is None:
                mask = self._protocol_a(d if not squeeze else {}, amap)
            else:
                mask = (amap[0] > self.threshold).astype(np.uint8)
            if squeeze:
                mask = mask[..., 0]
            d[self.output_key] = _like(torch.from_numpy(mask[None]), src)
        return d
