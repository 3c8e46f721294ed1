# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Does the stage-1 autoencoder already erase the anomalies? (:func:`autoencoder_check`, ``python -m berdiff
autoencoder_check``)

Masked Bernoulli diffusion heals the *code* of an anomaly. That only helps when the autoencoder carries the anomaly
into its code, i.e. reconstructs it: then the autoencoder-only residual ``sum_c (decode(encode(x)) - x)^2`` is weak
inside the anomaly and the diffusion model is what finds it. An autoencoder that cannot reproduce the anomaly (its
intensities were never seen in healthy training data, or it is too blurry) already replaces it by healthy-looking
tissue: its residual is large inside the anomaly, and the code there is a healthy code that the diffusion model has
no reason to change. This check measures which regime a trained autoencoder is in, on the prepared diseased slices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from berdiff.utils import atomic_write_json

__all__ = ["autoencoder_check", "residual_contrast"]


def residual_contrast(residual: torch.Tensor, label: torch.Tensor, brain: torch.Tensor) -> float:
    """
    Mean residual inside the anomaly divided by the mean residual in the rest of the brain (1: the residual does not
    see the anomaly; well above 1: the autoencoder does not reproduce it).

    Args:
        residual: (N, 1, H, W) per-pixel residual.
        label: (N, 1, H, W) anomaly mask (> 0).
        brain: (N, 1, H, W) brain mask (> 0); only pixels inside it count.

    Raises:
        ValueError: shapes differ, or no anomalous or no healthy brain pixel.
    """
    if not residual.shape == label.shape == brain.shape:
        raise ValueError(f"residual {tuple(residual.shape)}, label {tuple(label.shape)} and brain "
                         f"{tuple(brain.shape)} must have the same shape.")
    inside = (label > 0) & (brain > 0)
    outside = (label <= 0) & (brain > 0)
    if not inside.any() or not outside.any():
        raise ValueError("residual_contrast needs anomalous and healthy brain pixels.")
    return float(residual[inside].mean() / residual[outside].mean().clamp_min(1e-12))


def _load_autoencoder(weights: str, preset: str, in_channels: int) -> torch.nn.Module:
    from berdiff.io.checkpoints import load_state_dict
    from berdiff.networks import autoencoder_from_preset

    state = load_state_dict(weights)
    if any(k.startswith("autoencoder.") for k in state):  # models/model.pt (the whole pipeline)
        state = {k[len("autoencoder."):]: v for k, v in state.items() if k.startswith("autoencoder.")}
    autoencoder = autoencoder_from_preset(preset, in_channels=in_channels)
    try:
        autoencoder.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not hold a {preset!r} autoencoder with {in_channels} channel(s): "
                         f"{str(e).splitlines()[0]}") from None
    return autoencoder.eval()


def _stack(prepared: str, entries: list[dict[str, Any]], key: str) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.load(os.path.join(prepared, e[key])) for e in entries]).astype(np.float32))


def autoencoder_check(
    prepared: str,
    weights: str,
    preset: str = "small",
    split: str = "training",
    batch_size: int = 32,
    out: str | None = None,
    verbose: bool = True,
    residual_sign: str = "both",
    residual_channels: str | Sequence[str] = "all",
) -> dict[str, Any]:
    """
    Reconstructs the prepared slices with a trained autoencoder and reports: the PSNR on the healthy slices of
    ``split`` (data range 1), and on its diseased slices the autoencoder-only map's in-brain pixel AUROC and AUPRC
    and :func:`residual_contrast`. Prints one JSON line; ``out`` also writes it.

    How to read it: a high AUROC and a contrast well above 1 mean the autoencoder does not reproduce the anomalies,
    so their code is already healthy and masked diffusion can add little to the image-space map (then the anomaly
    map is mostly the autoencoder's); a contrast near 1 with a good PSNR means the anomalies survive into the code,
    the regime the method is for.

    Args:
        prepared: a ``prepare_brats`` output folder (``datalist.json`` with ``<split>`` and ``<split>_diseased``).
        weights: the stage-1 weights (``autoencoder_best.pt``, ``autoencoder_final.pt``) or ``models/model.pt``.
        preset: the autoencoder's preset.
        split: ``training`` (tuning slices) or ``validation``.
        batch_size: slices per network call.
        out: optional JSON file for the result.
        verbose: print the result as one JSON line.
        residual_sign: which sign of ``input - reconstruction`` the residual counts
            (:class:`berdiff.residual.ResidualSign`; ``both``: the paper's squared residual).
        residual_channels: the channels summed in the residual, by the names of the datalist's ``modalities``
            (``all``: every channel), e.g. ``[flair]`` as the brain bundle's inference uses by default.

    Raises:
        ValueError: unknown split, no diseased slices, weights that do not fit.
        FileNotFoundError: missing datalist or weights.
    """
    from berdiff.evaluation.metrics import pixel_auprc, pixel_auroc, psnr

    if split not in ("training", "validation"):
        raise ValueError(f"split must be 'training' or 'validation', got {split!r}.")
    datalist_path = os.path.join(prepared, "datalist.json")
    for path in (datalist_path, weights):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"not found: {path}")
    with open(datalist_path) as f:
        datalist = json.load(f)
    healthy, diseased = datalist.get(split, []), datalist.get(f"{split}_diseased", [])
    if not diseased:
        raise ValueError(f"{datalist_path} has no {split}_diseased slices to check the autoencoder on.")
    images = _stack(prepared, diseased, "image")
    labels = _stack(prepared, diseased, "label")
    autoencoder = _load_autoencoder(weights, preset, images.shape[1])

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([
                autoencoder.decode_stage_2_outputs(autoencoder.encode_stage_2_inputs(x[i:i + batch_size]).float())
                for i in range(0, len(x), batch_size)
            ]).float()

    from berdiff.residual import channel_weights_for, residual_map

    channels = datalist.get("modalities") or [f"c{i}" for i in range(images.shape[1])]
    channel_weights = channel_weights_for(channels, residual_channels)
    residual = residual_map(reconstruct(images), images, residual_sign, channel_weights)
    brain = images.amax(1, keepdim=True) > 0
    result: dict[str, Any] = {
        "weights": os.path.abspath(weights),
        "split": split,
        "diseased_slices": len(diseased),
        "autoencoder_only_auroc": round(pixel_auroc(residual, labels, brain), 4),
        "autoencoder_only_auprc": round(pixel_auprc(residual, labels, brain), 4),
        "residual_contrast": round(residual_contrast(residual, labels, brain.float()), 3),
        "residual": {"sign": str(residual_sign), "channels": residual_channels},
    }
    if healthy:
        x = _stack(prepared, healthy, "image")
        result["healthy_psnr_db"] = round(psnr(reconstruct(x), x, max_val=1.0), 2)
    if verbose:
        print(json.dumps(result), flush=True)
    if out:
        atomic_write_json(result, out)
    return result
