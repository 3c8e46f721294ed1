# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Threshold calibration on healthy data (evaluation protocol C): ``python -m berdiff calibrate`` runs the bundle's
inference pipeline on healthy validation volumes and stores the anomaly-map threshold giving a target
false-positive rate; ``configs/inference.yaml`` reads it with ``--threshold_file``
(:func:`berdiff.evaluation.load_threshold`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from berdiff.evaluation.metrics import threshold_at_fpr
from berdiff.io import check_checkpoint, load_datalist, load_pipeline_weights
from berdiff.transforms import volume_preprocessing
from berdiff.utils import atomic_write_json
from berdiff.validation import check_settings, root_cause

__all__ = ["healthy_scores", "threshold_from_maps", "calibrate", "CALIBRATION_VERSION"]

logger = logging.getLogger(__name__)

#: format version of the calibration JSON
CALIBRATION_VERSION = 1


def healthy_scores(
    anomaly_map: np.ndarray | torch.Tensor,
    image: np.ndarray | torch.Tensor | None = None,
    label: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """
    The healthy voxels' scores of one volume: the anomaly map inside the head (any image channel > 0, when the
    image is given), restricted to the axial slices (last axis) without any label voxel > 0 (when a label is given).

    Args:
        anomaly_map: (1, H, W, D) or (H, W, D) map.
        image: (C, H, W, D) preprocessed image.
        label: (1, H, W, D) or (H, W, D) segmentation; any value > 0 is anomalous.

    Returns:
        float32 1D array.
    """
    amap = np.asarray(torch.as_tensor(anomaly_map).detach().cpu().float())
    amap = amap[0] if amap.ndim == 4 else amap
    keep = np.ones(amap.shape, dtype=bool)
    if image is not None:
        img = np.asarray(torch.as_tensor(image).detach().cpu().float())
        keep &= (img > 0).any(axis=0)
    if label is not None:
        lab = np.asarray(torch.as_tensor(label).detach().cpu())
        lab = lab[0] if lab.ndim == 4 else lab
        if lab.shape != amap.shape:
            raise ValueError(f"label shape {lab.shape} differs from the anomaly map's {amap.shape}.")
        diseased_slices = (lab > 0).reshape(-1, lab.shape[-1]).any(axis=0)
        keep[..., diseased_slices] = False
    return amap[keep].astype(np.float32)


def threshold_from_maps(
    maps: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
    fpr: float,
    masks: Sequence[np.ndarray | torch.Tensor] | None = None,
) -> float:
    """
    Threshold on anomaly maps of healthy data giving the false-positive rate ``fpr`` (rule ``score > t``), with
    :func:`berdiff.evaluation.metrics.threshold_at_fpr` on the pooled values (inside ``masks`` when given).

    Args:
        maps: healthy anomaly maps (any shapes), or one array.
        fpr: target false-positive rate in (0, 1).
        masks: optional boolean masks, one per map, selecting the voxels that count.
    """
    if isinstance(maps, (np.ndarray, torch.Tensor)):
        maps = [maps]
    values = []
    for i, m in enumerate(maps):
        arr = np.asarray(torch.as_tensor(m).detach().cpu().float())
        if masks is not None:
            mask = np.asarray(torch.as_tensor(masks[i]).detach().cpu()).astype(bool)
            if mask.shape != arr.shape:
                raise ValueError(f"mask {i} has shape {mask.shape}, map {i} has {arr.shape}.")
            arr = arr[mask]
        values.append(arr.ravel())
    return threshold_at_fpr(values, fpr)


def _overrides(bundle_root: str, device: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    out = {"bundle_root": bundle_root}
    if device is not None:
        out["device"] = device
    out.update(overrides)
    return out


def calibrate(
    bundle_root: str = ".",
    datalist: str | None = None,
    fpr: float = 0.01,
    out: str = "calibration.json",
    config_file: str | None = None,
    datalist_key: str | None = None,
    device: str | None = None,
    max_cases: int | None = None,
    allow_random_weights: bool = False,
    **overrides: Any,
) -> str | None:
    """
    Runs the bundle's inference pipeline (``network_def`` and ``inferer`` of ``configs/inference.yaml`` with the
    weights ``ckpt_path``, default ``models/model.pt``) on healthy validation volumes and writes the threshold on the
    raw anomaly map whose false-positive rate on the healthy voxels is ``fpr``.

    Healthy voxels: head voxels (any preprocessed channel > 0) of the axial slices without tumour. Items of the
    datalist may hold a ``label``: then only the slices without label > 0 are used (healthy slices of diseased
    volumes); without a label the whole volume counts as healthy. The preprocessing is the bundle's (shared with
    training); inference settings (L, P, K, preset, ...) come from the config and ``overrides``, and are stored in
    the JSON, so use the same ones at inference.

    Args:
        bundle_root: the bundle folder.
        datalist: a datalist JSON of healthy validation volumes (see :func:`berdiff.io.load_datalist`).
        fpr: target false-positive rate in (0, 1), e.g. 0.01.
        out: output JSON file.
        config_file: the inference config; ``<bundle_root>/configs/inference.yaml`` when None.
        datalist_key: key of the list in a dict datalist.
        device: e.g. ``cpu`` or ``cuda:0``; the config's default when None.
        max_cases: use only the first cases.
        allow_random_weights: allow a missing checkpoint (tests, debugging).
        overrides: config overrides, e.g. ``noise_level=100``, ``num_inference_steps=25``, ``preset="small"``.

    Returns:
        None for ``--help``, otherwise the path of the written JSON (keys ``threshold``, ``fpr``, ``achieved_fpr``, ``num_values``, ``num_cases``,
        ``settings``, ...).
    """
    from monai.bundle import ConfigParser

    if overrides.pop("help", False) or overrides.pop("h", False):  # fire passes --help into **overrides
        print(calibrate.__doc__)
        return None
    if datalist is None:
        raise ValueError("calibrate needs --datalist: a JSON list of healthy validation volumes.")
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}.")
    bundle_root = os.fspath(bundle_root)
    config_file = config_file or os.path.join(bundle_root, "configs", "inference.yaml")
    if not os.path.isfile(config_file):
        raise ValueError(f"inference config not found: {config_file}")
    items = load_datalist(datalist, datalist_key)
    if max_cases is not None:
        items = items[: int(max_cases)]

    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update(_overrides(bundle_root, device, overrides))
    if "checked_settings" in parser:  # the knobs, with the bundle run's one-line messages
        check_settings(parser.get_parsed_content("checked_settings"))
    dev = torch.device(parser.get_parsed_content("device"))
    ckpt_path = parser.get_parsed_content("ckpt_path")
    try:  # models/model.json when present, else the config's values; raise its clear error, not monai's wrapper
        model = parser.get_parsed_content("model_settings")
    except RuntimeError as e:
        raise (e.__cause__ if isinstance(e.__cause__, ValueError) else e) from None
    network = parser.get_parsed_content("network_def", instantiate=True).to(dev)
    if check_checkpoint(ckpt_path, allow_random_weights, model["preset"], model["in_channels"]):
        load_pipeline_weights(network, ckpt_path, dev, model["preset"], model["in_channels"])
    else:
        logger.warning(f"{ckpt_path} not found: calibrating RANDOM weights (allow_random_weights).")
    network.eval()
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    spatial_size = model["spatial_size"]
    num_channels = len(parser.get_parsed_content("modalities"))
    amp = bool(parser.get_parsed_content("amp")) and dev.type == "cuda"

    values = []
    for i, item in enumerate(items):
        has_label = "label" in item
        transform = volume_preprocessing(
            "image", label_key="label" if has_label else None, num_channels=num_channels, spatial_size=spatial_size,
            pixdim=model.get("pixdim"),
        )
        try:
            data = transform({k: item[k] for k in ("image", "label") if k in item})
        except Exception as e:  # report the clear input error, not MONAI's wrapper
            raise root_cause(e) from None
        image = data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"]
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            pred = inferer(image[None].to(dev), network)
        amap = pred[0, :1].float().cpu()
        values.append(healthy_scores(amap, image, data["label"] if has_label else None))
        logger.info(f"calibration case {i + 1}/{len(items)}: {values[-1].size} healthy voxels")
    pooled = np.concatenate(values) if values else np.empty(0, dtype=np.float32)
    if pooled.size == 0:
        raise ValueError("no healthy voxel found in the datalist (all slices diseased or all images empty).")
    threshold = threshold_at_fpr(pooled, fpr)
    settings = {
        k: model[k] if k in ("preset", "num_inference_steps", "spatial_size") else parser.get_parsed_content(k)
        for k in ("preset", "noise_level", "prob_threshold", "num_inference_steps", "spatial_size", "seed")
    }
    result = {
        "version": CALIBRATION_VERSION,
        "threshold": threshold,
        "fpr": fpr,
        "achieved_fpr": float(np.mean(pooled > threshold)),
        "rule": "anomaly_map > threshold (raw map: sum over channels of the squared residual)",
        "region": "head voxels (any preprocessed channel > 0) of axial slices without label > 0",
        "num_values": int(pooled.size),
        "num_cases": len(items),
        "datalist": os.path.abspath(os.fspath(datalist)),
        "checkpoint": os.path.abspath(ckpt_path) if os.path.isfile(ckpt_path) else None,
        "settings": settings,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(result, out)
    logger.info(f"threshold {threshold:.6g} at FPR {fpr} written to {out}")
    print(f"threshold {threshold:.6g} at FPR {fpr} (achieved {result['achieved_fpr']:.4g}) -> {out}")
    return out
