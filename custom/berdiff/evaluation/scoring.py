# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Scoring of in-memory cases with every protocol: :class:`ProtocolSettings` (the one settings object of the protocols),
:func:`score_case` (one case, every map), :func:`summarise_map` (the means over cases) and :func:`describe_settings`
(the settings as written into ``metrics.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.utils import look_up_option

from berdiff.evaluation.metrics import pixel_auroc, psnr
from berdiff.evaluation.postprocess import brain_mask_from_image
from berdiff.evaluation.protocols import (
    ThresholdMap,
    mean_std,
    per_slice_protocol,
    per_volume_protocol,
    slice_statistics,
    summarise_slices,
)
from berdiff.sampling import LatentMap

__all__ = [
    "EXTRA_MAPS",
    "MAP_KEYS",
    "ProtocolSettings",
    "describe_settings",
    "input_reference_maps",
    "map_names",
    "score_case",
    "squeeze_to_3d",
    "summarise_map",
]

#: case-dict keys of the maps that are scored, in order (``score`` is the anomaly map). Every map but the anomaly map
#: is optional and read from ``<case>_<name>.nii.gz``: the autoencoder-only map, the latent maps of
#: ``berdiff.inferers.LatentMap`` and ``latent_flip`` (the former name of ``latent_flip_probability``).
MAP_KEYS = {
    "anomaly": "score",
    "autoencoder": "autoencoder",
    **{f"latent_{m.value}": f"latent_{m.value}" for m in LatentMap},
    "latent_flip": "latent_flip",
}
#: the optional maps (case key = map name = file postfix)
EXTRA_MAPS = tuple(k for k in MAP_KEYS if k != "anomaly")


@dataclass(frozen=True)
class ProtocolSettings:
    """
    The settings of protocols A, B and slice detection, shared by every case of one evaluation.

    Args:
        threshold: protocol B threshold for the anomaly map (``None``: only best Dice, AUROC, AUPRC).
        brain_mask: ``None`` uses a mask for every case that has ``brain_mask`` or ``image``; ``True`` requires one;
            ``False`` never masks.
        axis: slicing axis for protocol A and slice detection (default last: axial for RAS volumes).
        median_size_2d: protocol A's median filter (5 in the reference).
        min_component_2d: protocol A's component filter, in pixels of filled area (15 in the reference).
        median_size_3d: protocol B's 3D median filter (5).
        min_component_3d: protocol B's component filter, in voxels (7).
        erode: protocol B's brain-mask erosion (``True``: ``shape[0] // 25`` iterations; an int: that many).
        detection_percentile: per-slice statistic of slice-level detection.
        figure_channel: channel of a 4D ``image``/``recon`` shown in the figure (-1: FLAIR in the bundle's order).
        compute_psnr: PSNR of ``recon`` against ``image`` (only meaningful when both share intensity space).
        threshold_on: member of :class:`~berdiff.evaluation.protocols.ThresholdMap`: the map ``threshold`` applies to.
        input_references: also score each channel of ``image`` as a map of its own (``input_<channel>``, e.g.
            ``input_flair``): the input intensity with no learning at all, the reference every method of the field
            must beat (a plain FLAIR threshold is strong on BraTS).
    """

    threshold: float | None = None
    brain_mask: bool | None = None
    axis: int = -1
    median_size_2d: int = 5
    min_component_2d: int = 15
    median_size_3d: int = 5
    min_component_3d: int = 7
    erode: bool | int = True
    detection_percentile: float = 99.0
    figure_channel: int = -1
    compute_psnr: bool = True
    threshold_on: str = ThresholdMap.PROCESSED
    input_references: bool = False

    def __post_init__(self) -> None:
        if self.threshold is not None:
            threshold = float(self.threshold)
            if not math.isfinite(threshold):
                raise ValueError(f"threshold must be finite, got {threshold}.")
            object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "threshold_on", look_up_option(self.threshold_on, ThresholdMap))


def _channel_first(x: np.ndarray | None, spatial: tuple[int, ...], what: str) -> np.ndarray | None:
    """3D volumes pass through; 4D volumes are returned channel-first (accepts channel-first or channel-last)."""
    if x is None:
        return None
    x = np.asarray(x)
    if x.shape == spatial:
        return x
    if x.ndim == 4 and x.shape[1:] == spatial:
        return x
    if x.ndim == 4 and x.shape[:3] == spatial:
        return np.moveaxis(x, -1, 0)
    raise ValueError(f"{what} has shape {x.shape}, which does not match the anomaly map's spatial shape {spatial}.")


def squeeze_to_3d(x: np.ndarray, what: str) -> np.ndarray:
    """
    A 3D volume from an array with singleton channel dimensions (first or last).

    Args:
        x: the array.
        what: its description, for the error message.
    """
    x = np.asarray(x)
    while x.ndim > 3 and (x.shape[-1] == 1 or x.shape[0] == 1):
        x = x[..., 0] if x.shape[-1] == 1 else x[0]
    if x.ndim != 3:
        raise ValueError(f"{what} must be a 3D volume (singleton channel dimensions allowed), got shape {x.shape}.")
    return x


def _figure_slice(image: np.ndarray | None, channel: int, axis: int, z: int) -> np.ndarray | None:
    if image is None:
        return None
    vol = image[channel] if image.ndim == 4 else image
    return np.take(vol, z, axis=axis).astype(np.float32)


def _brain_mask(case: Mapping[str, Any], name: str, image: np.ndarray | None, shape: tuple, use: bool | None) -> Any:
    brain = case.get("brain_mask")
    if use is False:
        brain = None
    elif brain is None and image is not None:
        brain = brain_mask_from_image(image, channel_axis=0)
    if use and brain is None:
        raise ValueError(f"case {name!r}: a brain mask was requested but the case has no 'brain_mask' or 'image'.")
    if brain is not None:
        brain = np.asarray(brain) > 0
        if brain.shape != shape:
            raise ValueError(f"case {name!r}: brain_mask has shape {brain.shape} but score has shape {shape}.")
    return brain


def input_reference_maps(image: np.ndarray | None, channels: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """
    The input-intensity reference maps of a case: ``{"input_<channel>": 3D intensity}`` for a channel-first 4D
    ``image`` (channel names from ``channels``, else ``c0``, ``c1``, ...), ``{"input": image}`` for a 3D one, ``{}``
    without an image.

    Args:
        image: the case's image (3D, or 4D channel-first), or None.
        channels: the names of its channels (e.g. ``["t1", "t1ce", "t2", "flair"]``).
    """
    if image is None:
        return {}
    image = np.asarray(image)
    if image.ndim == 3:
        return {"input": image.astype(np.float32)}
    names = list(channels) if channels is not None and len(channels) == image.shape[0] else [
        f"c{i}" for i in range(image.shape[0])
    ]
    return {f"input_{n}": image[i].astype(np.float32) for i, n in enumerate(names)}


def _extra_maps(case: Mapping[str, Any], name: str, shape: tuple) -> dict[str, np.ndarray]:
    extra: dict[str, np.ndarray] = {}
    for key in EXTRA_MAPS:
        if case.get(key) is None:
            continue
        extra[key] = squeeze_to_3d(np.asarray(case[key]), f"case {name!r}: {key}")
        if extra[key].shape != shape:
            raise ValueError(f"case {name!r}: {key} has shape {extra[key].shape} but score has shape {shape}.")
        if not np.isfinite(extra[key]).all():
            raise ValueError(f"case {name!r}: {key} contains NaN or infinite values.")
    return extra


def score_case(case: Mapping[str, Any], index: int, settings: ProtocolSettings) -> dict:
    """
    Every map of one case scored with protocols A, B and slice detection.

    Args:
        case: a case dict (see :func:`berdiff.evaluation.evaluate_arrays`).
        index: its position, for the default name ``case_<index>``.
        settings: the protocol settings.

    Returns:
        ``{"row": per-case CSV row, "maps": {map: {"a", "b", "det"}}, "figure": slices for the figure}``.
    """
    name = str(case.get("name", f"case_{index:03d}"))
    for key in ("score", "label"):
        if key not in case or case[key] is None:
            raise ValueError(f"case {name!r} has no {key!r} array.")
    score = squeeze_to_3d(np.asarray(case["score"]), f"case {name!r}: score")
    label = squeeze_to_3d(np.asarray(case["label"]), f"case {name!r}: label")
    if score.shape != label.shape:
        raise ValueError(f"case {name!r}: score has shape {score.shape} but label has shape {label.shape}.")
    if not np.isfinite(score).all():
        raise ValueError(f"case {name!r}: the anomaly map contains NaN or infinite values.")
    gt = label > 0
    image = _channel_first(case.get("image"), score.shape, f"case {name!r}: image")
    recon = _channel_first(case.get("recon"), score.shape, f"case {name!r}: recon")
    extra = _extra_maps(case, name, score.shape)
    brain = _brain_mask(case, name, image, score.shape, settings.brain_mask)

    s, ax = settings, settings.axis % 3
    row: dict[str, Any] = {"case": name, "tumour_voxels": int(gt.sum()), "brain_mask": brain is not None}
    maps: dict[str, dict] = {}
    references = input_reference_maps(image, case.get("image_channels")) if s.input_references else {}
    extra.update(references)
    for map_name, key in [*MAP_KEYS.items(), *((r, r) for r in references)]:
        vol = score if key == "score" else extra.get(key)
        if vol is None:
            continue
        a = per_slice_protocol(vol, gt, axis=ax, min_component=s.min_component_2d, median_size=s.median_size_2d)
        b = per_volume_protocol(
            vol,
            gt,
            brain_mask=brain,
            threshold=s.threshold if map_name == "anomaly" else None,
            median_size=s.median_size_3d,
            erode=s.erode,
            min_component=s.min_component_3d,
            threshold_on=s.threshold_on,
        )
        det_scores, det_labels = slice_statistics(vol, gt, mask=brain, axis=ax, percentile=s.detection_percentile)
        maps[map_name] = {"a": a, "b": b, "det": (det_scores, det_labels)}
        row.update(
            {
                f"{map_name}_a_dice": a["dice"]["mean"],
                f"{map_name}_a_auroc": a["auroc"]["mean"],
                f"{map_name}_a_auprc": a["auprc"]["mean"],
                f"{map_name}_a_n_slices": a["n_slices"],
                f"{map_name}_b_dice": b["dice"],
                f"{map_name}_b_best_dice": b["best_dice"],
                f"{map_name}_b_best_threshold": b["best_threshold"],
                f"{map_name}_b_auroc": b["auroc"],
                f"{map_name}_b_auprc": b["auprc"],
            }
        )
    row["psnr"] = psnr(recon, image) if s.compute_psnr and recon is not None and image is not None else float("nan")

    # figure material: the slice with the largest tumour area (the middle slice for a healthy case)
    areas = np.moveaxis(gt, ax, -1).reshape(-1, gt.shape[ax]).sum(axis=0)
    z = int(np.argmax(areas)) if areas.max() > 0 else gt.shape[ax] // 2
    fig = {
        "image": _figure_slice(image, s.figure_channel, ax, z),
        "recon": _figure_slice(recon, s.figure_channel, ax, z),
        "score": np.take(score, z, axis=ax).astype(np.float32),
        "autoencoder": np.take(extra["autoencoder"], z, axis=ax).astype(np.float32) if "autoencoder" in extra else None,
        "label": np.take(gt, z, axis=ax),
        "slice": z,
    }
    return {"row": row, "maps": maps, "figure": fig}


def map_names(scored: Sequence[dict]) -> list[str]:
    """The names of the maps scored in any case: :data:`MAP_KEYS` order, then the input references by first use."""
    names = [m for m in MAP_KEYS if any(m in c["maps"] for c in scored)]
    for c in scored:
        names += [m for m in c["maps"] if m not in names]
    return names


def summarise_map(scored: Sequence[dict], map_name: str) -> dict:
    """
    The means over cases of one map: protocol A pooled over the diseased slices of all cases, protocol B over
    volumes, slice detection pooled over all slices; ``{}`` when no case has the map.

    Args:
        scored: results of :func:`score_case`.
        map_name: a key of :data:`MAP_KEYS`.
    """
    items = [c["maps"][map_name] for c in scored if map_name in c["maps"]]
    if not items:
        return {}
    pooled = {k: [v for it in items for v in it["a"][f"{k}_per_slice"]] for k in ("dice", "auroc", "auprc")}
    det_s = np.concatenate([it["det"][0] for it in items])
    det_l = np.concatenate([it["det"][1] for it in items])
    return {
        "protocol_a": summarise_slices(pooled),
        "protocol_b": {
            "dice": mean_std([it["b"]["dice"] for it in items]),
            "best_dice_upper_bound": mean_std([it["b"]["best_dice"] for it in items]),
            "auroc": mean_std([it["b"]["auroc"] for it in items]),
            "auprc": mean_std([it["b"]["auprc"] for it in items]),
            "n_volumes": len(items),
        },
        "slice_detection": {
            "auroc": pixel_auroc(det_s, det_l) if det_s.size else float("nan"),
            "n_healthy_slices": int((~det_l).sum()),
            "n_diseased_slices": int(det_l.sum()),
        },
    }


def describe_settings(settings: ProtocolSettings, threshold_source: str, used_mask: Sequence[bool]) -> dict:
    """
    The protocols as run, in words, for ``metrics.json``.

    Args:
        settings: the protocol settings.
        threshold_source: how the threshold was chosen.
        used_mask: per case, whether a brain mask was used.
    """
    s = settings
    if all(used_mask) and used_mask:
        mask_rule = "yes (given, or from the image: any channel != 0, holes filled, largest component)"
    elif any(used_mask):
        mask_rule = f"mixed: {sum(used_mask)} of {len(used_mask)} cases"
    else:
        mask_rule = "no"
    erode = s.erode
    erosion = "shape[0] // 25 iterations" if erode is True else ("none" if not erode else f"{int(erode)} iterations")
    return {
        "protocol_a": {
            "unit": f"2D slices along axis {s.axis}, pooled over the diseased slices of all cases; "
            "mean, std over slices",
            "brain_mask": "no",
            "median_filter": f"2D {s.median_size_2d}x{s.median_size_2d} on the channel-summed map",
            "normalisation": "clip to the slice's [p1, p99], then min-max to [0, 1]",
            "threshold": "fixed 0.5",
            "components": f"2D 8-connected components with filled area <= {s.min_component_2d} px removed",
        },
        "protocol_b": {
            "unit": "volume; mean and std over volumes with a tumour",
            "brain_mask": mask_rule,
            "mask_erosion": erosion if any(used_mask) else "n/a",
            "median_filter": f"3D {s.median_size_3d}^3",
            "threshold": s.threshold,
            "threshold_source": threshold_source,
            "threshold_applies_to": (
                "anomaly map after masking and median filtering (not the latent flip map)"
                if s.threshold_on == ThresholdMap.PROCESSED
                else "raw anomaly map inside the (eroded) brain mask, no median filter (not the latent flip map)"
            ),
            "components": f"3D 26-connected components <= {s.min_component_3d} voxels removed before Dice",
            "best_dice": "per-volume oracle threshold, no component filter: an upper bound",
            "auroc_auprc_voxels": "inside the eroded brain mask when one is used, else all voxels",
        },
        "slice_detection": (
            f"per-slice score = {s.detection_percentile}th percentile of the raw map inside the head mask (all pixels "
            "without a mask; slices with an empty mask dropped); label = slice has a tumour voxel"
        ),
        "auprc_implementation": "sklearn average_precision_score (the reference used torcheval BinaryAUPRC)",
        "auroc_implementation": "sklearn roc_auc_score",
        "undefined_values": "Dice with empty prediction and ground truth, AUROC/AUPRC with one class: not averaged",
    }
