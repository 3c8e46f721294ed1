# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The tuning sweep of the OCT bundle's inference settings: ``python -m berdiff oct_sweep --bundle_root B --val_dir
OCT_DIR/val --out sweep.json``.

The trained pipeline (``B/models/model.pt`` and ``model.json``) runs once per (L, P) on every validation scan, on the
bundle's grid (:func:`berdiff.data.oct.prepare_scan`); every map it produces is scored with every
:class:`berdiff.io.oct.ImageScore` and smoothing ``sigma``, and the image-level AUROC is computed on the *tuning*
split only (:func:`berdiff.apps.oct_validation.validation_items`). The untouched split's scans are run too (the same
networks), but their labels are not read here: choose the settings from this sweep's table, then measure them with
``configs/inference.yaml`` and ``python -m berdiff oct_validation``.

``extra_normals`` adds normal scans to the tuning set: with cross-fitting (:mod:`berdiff.apps.oct_folds`), the
training scans held out of the model's training (``--bundle_root`` trained with ``--train_dir FOLDS/fold<f>.json``,
swept with ``--extra_normals FOLDS/fold<f>.json``), which makes the tuning set's normal side several times larger.

Maps: ``anomaly`` (the residual weighted by a latent map, ``latent_weighting``), ``residual`` (the residual
alone, against ``anomaly_reference``), ``input_residual`` (the paper's map: the residual against the input),
``autoencoder`` (no diffusion), the latent maps, and ``anomaly_relative``: the ``anomaly`` map's score divided by
the mean of the ``autoencoder`` map over the same pixels (:func:`berdiff.io.oct.relative_image_score`).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from berdiff.apps.oct_folds import HELD_OUT_KEY
from berdiff.apps.oct_validation import validation_items
from berdiff.data.oct import (
    DEFAULT_ALIGNMENT,
    DEFAULT_BAND_RATIO,
    DEFAULT_RPE_POSITION,
    prepare_scan,
    read_scan,
    rpe_columns,
)
from berdiff.io.oct import ImageScore, image_score, relative_image_score
from berdiff.utils import atomic_write_json

__all__ = ["EXTRA_SPLIT", "RELATIVE_MAP", "SWEEP_MAPS", "load_oct_pipeline", "oct_sweep"]

#: the pipeline outputs the sweep scores, by the name used in its table
SWEEP_MAPS: dict[str, str] = {
    "anomaly": "anomaly_map",
    "residual": "residual_map",
    "input_residual": "input_residual_map",
    "autoencoder": "autoencoder_map",
    "latent_confident_change": "latent_confident_change",
    "latent_code_change": "latent_code_change",
    "latent_changed_bits": "latent_changed_bits",
    "latent_mask_fraction": "latent_mask_fraction",
    "latent_flip_probability": "latent_flip_probability",
}
#: the name, in the sweep's table, of the anomaly map's score divided by the autoencoder map's mean
#: (:func:`berdiff.io.oct.relative_image_score`, the bundle's default ``score``)
RELATIVE_MAP = "anomaly_relative"
#: the split of the ``extra_normals`` scans, scored with the tuning split
EXTRA_SPLIT = "extra_normal"


def _extra_normal_items(source: str, key: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``extra_normals`` scans as normal tuning items (see :func:`oct_sweep`)."""
    from berdiff.training import training_datalist

    if not os.path.exists(source):
        raise FileNotFoundError(f"extra_normals not found: {source!r} (a folder of normal scans or a datalist JSON).")
    listed = training_datalist(source, key, defer_missing=False)
    if not listed:
        raise ValueError(f"extra_normals {source!r} lists no scans (datalist section {key!r}).")
    seen = {os.path.realpath(i["image"]) for i in items}
    extra = []
    for entry in listed:
        path = os.fspath(entry["image"])
        if os.path.realpath(path) in seen:
            raise ValueError(f"extra_normals {source!r}: {path} is also a validation scan.")
        seen.add(os.path.realpath(path))
        extra.append({"image": path, "class": "extra_normal", "label": 0, "name": path, "split": EXTRA_SPLIT})
    return extra


def load_oct_pipeline(bundle_root: str, device: str | torch.device = "cpu", **settings: Any) -> tuple[Any, dict]:
    """
    The bundle's trained :class:`~berdiff.networks.AnomalyPipeline` (sizes from ``models/model.json``).

    Args:
        bundle_root: the bundle folder holding ``models/model.pt`` and ``models/model.json``.
        device: where it runs.
        settings: other :class:`~berdiff.networks.AnomalyPipeline` arguments (noise_level, prob_threshold, ...).

    Returns:
        ``(pipeline, description)``.
    """
    from berdiff.io.checkpoints import load_pipeline_weights
    from berdiff.model_description import read_model_description
    from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
    from berdiff.schedulers import BernoulliScheduler

    ckpt = os.path.join(bundle_root, "models", "model.pt")
    desc = read_model_description(ckpt, required=True)
    pipe = AnomalyPipeline(
        autoencoder_from_preset(desc["preset"], in_channels=desc["in_channels"]),
        denoiser_from_preset(desc["preset"], latent_channels=desc["latent_channels"]),
        BernoulliScheduler(num_train_timesteps=desc["num_train_timesteps"], prediction_type=desc["prediction_type"]),
        **settings,
    )
    load_pipeline_weights(pipe, ckpt, map_location="cpu")
    return pipe.to(device).eval(), desc


def oct_sweep(
    bundle_root: str,
    val_dir: str,
    out: str | None = None,
    noise_levels: Sequence[int] = (100, 200, 300, 400, 500),
    prob_thresholds: Sequence[float] = (0.2, 0.5, 0.8),
    num_inference_steps: int = 10,
    sigmas: Sequence[float] = (0.0, 1.0, 2.0, 4.0),
    band_ratio: float = DEFAULT_BAND_RATIO,
    batch_size: int = 16,
    device: str | None = None,
    seed: int = 0,
    latent_weighting: str = "confident_change",
    anomaly_reference: str = "autoencoder",
    smooth_sigma: float = 0.0,
    band_alignment: str = DEFAULT_ALIGNMENT,
    rpe_position: float = DEFAULT_RPE_POSITION,
    score_rows: Sequence[float] | None = (0.25, 0.92),
    score_cols: Sequence[float] | None = (0.05, 0.95),
    num_samples: int = 1,
    score_rpe_columns: bool = True,
    extra_normals: str | None = None,
    extra_normals_key: str = HELD_OUT_KEY,
) -> dict[str, Any]:
    """
    Tuning-split AUROC of every (L, P, map, statistic, sigma) (module docstring).

    Args:
        bundle_root: the bundle folder with the trained weights.
        val_dir: the validation folder (``NORMAL/`` and abnormal class folders).
        out: JSON file for every row (None: not written).
        noise_levels: the L values (each <= the weights' train_max_timestep).
        prob_thresholds: the P values.
        num_inference_steps: K (capped at L).
        sigmas: the smoothing of the image score, in grid pixels.
        band_ratio: the retina band of training.
        batch_size: scans per network call.
        device: e.g. ``cuda``; None: CUDA when available.
        seed: the pipeline's seed.
        smooth_sigma: the input smoothing of training (:func:`berdiff.data.oct.prepare_scan`).
        latent_weighting: the latent map that weights the ``anomaly`` map (a :class:`~berdiff.sampling.LatentMap`).
        anomaly_reference: what the ``anomaly`` and ``residual`` maps compare the reconstruction with (an
            :class:`~berdiff.sampling.AnomalyReference`; ``input_residual`` is always the paper's map).
        band_alignment, rpe_position: the band of training (:func:`berdiff.data.oct.prepare_scan`).
        score_rows: the grid rows every score reads (:func:`berdiff.io.oct.image_score`; None: all).
        score_cols: the grid columns every score reads (None: all).
        num_samples: draws averaged into every map (:class:`~berdiff.networks.AnomalyPipeline`).
        score_rpe_columns: score only the grid columns whose band holds the scan's RPE
            (:func:`berdiff.data.oct.rpe_columns`), as the bundle's inference does by default.
        extra_normals: more normal scans for the tuning set, scans the model was not trained on: a folder of scans
            or a datalist JSON (e.g. a fold file of :func:`berdiff.apps.oct_folds.oct_folds`); None: none.
        extra_normals_key: the datalist section read from an ``extra_normals`` JSON.

    Returns:
        ``{"best": {map: row}, "settings": ...}`` (the best row of each map; every row is in ``out``); a row holds
        L, P, map, statistic, sigma, tuning_auroc (over the tuning split and the ``extra_normals``) and, with
        ``extra_normals``, validation_tuning_auroc (the tuning split alone).

    Raises:
        FileNotFoundError: a missing validation folder, or missing ``extra_normals``.
        ValueError: an unreadable or empty ``extra_normals`` list, or one that repeats a validation scan.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    items = validation_items(val_dir)
    if extra_normals is not None:
        items += _extra_normal_items(extra_normals, extra_normals_key, items)
    tuning = [k for k, i in enumerate(items) if i["split"] in ("tuning", EXTRA_SPLIT)]
    labels = [items[k]["label"] for k in tuning]
    own = [j for j, k in enumerate(tuning) if items[k]["split"] == "tuning"]  # the validation tuning split's places
    from berdiff.networks import AnomalyPipeline

    trained, desc = load_oct_pipeline(bundle_root, dev)
    grid_list, column_masks = [], []
    for item in items:
        image = read_scan(item["image"])
        grid, geometry = prepare_scan(image, desc["spatial_size"], band_ratio, smooth_sigma, band_alignment, rpe_position)
        grid_list.append(torch.as_tensor(grid)[None])
        column_masks.append(rpe_columns(image, geometry, grid.shape[-1]) if score_rpe_columns else None)
    grids = torch.stack(grid_list)
    rows: list[dict[str, Any]] = []
    for L, P in itertools.product(noise_levels, prob_thresholds):
        start = time.time()
        pipe = AnomalyPipeline(
            trained.autoencoder, trained.unet, trained.scheduler, noise_level=int(L), prob_threshold=float(P),
            num_inference_steps=min(int(num_inference_steps), int(L)), latent_weighting=latent_weighting,
            anomaly_reference=anomaly_reference,
            output_keys=tuple(SWEEP_MAPS.values()), seed=seed, num_samples=int(num_samples),
        ).eval()
        outputs: dict[str, list[np.ndarray]] = {k: [] for k in SWEEP_MAPS}
        for b in range(0, len(items), batch_size):
            res = pipe.run(grids[b : b + batch_size].to(dev))
            for name, key in SWEEP_MAPS.items():
                outputs[name] += list(res[key][:, 0].float().cpu().numpy())
        for name, stat, sigma in itertools.product(
            list(SWEEP_MAPS) + [RELATIVE_MAP], [m.value for m in ImageScore], sigmas
        ):
            if name == RELATIVE_MAP:  # the anomaly map's score relative to the autoencoder's residual (the bundle's)
                scores = [
                    relative_image_score(
                        outputs["anomaly"][k], outputs["autoencoder"][k], stat, sigma, score_rows, score_cols,
                        column_masks[k],
                    )
                    for k in tuning
                ]
            else:
                scores = [
                    image_score(outputs[name][k], stat, sigma, score_rows, score_cols, column_masks[k]) for k in tuning
                ]
            rows.append({
                "noise_level": int(L), "prob_threshold": float(P), "map": name, "statistic": stat,
                "sigma": float(sigma), "score_rows": None if score_rows is None else list(score_rows),
                "score_cols": None if score_cols is None else list(score_cols),
                "tuning_auroc": float(roc_auc_score(labels, scores)),
            })
            if extra_normals is not None:  # the validation set's tuning split alone, for comparison
                rows[-1]["validation_tuning_auroc"] = float(
                    roc_auc_score([labels[j] for j in own], [scores[j] for j in own])
                )
        print(f"L={L} P={P}: {time.time() - start:.1f} s", flush=True)
    best: dict[str, Any] = {}
    for row in rows:
        if row["map"] not in best or row["tuning_auroc"] > best[row["map"]]["tuning_auroc"]:
            best[row["map"]] = row
    for name, row in best.items():
        print(f"best {name:26s} tuning AUROC {row['tuning_auroc']:.3f}: L={row['noise_level']} "
              f"P={row['prob_threshold']} {row['statistic']} sigma={row['sigma']}")
    settings = {"num_inference_steps": num_inference_steps, "seed": seed, "latent_weighting": latent_weighting,
                "anomaly_reference": anomaly_reference, "num_samples": int(num_samples),
                "score_rpe_columns": bool(score_rpe_columns),
                "n_tuning": len(tuning), "n_extra_normals": sum(i["split"] == EXTRA_SPLIT for i in items),
                "extra_normals": None if extra_normals is None else os.fspath(extra_normals)}
    if out:
        atomic_write_json({"rows": rows, "best": best, "settings": settings}, out)
    return {"best": best, "settings": settings}
