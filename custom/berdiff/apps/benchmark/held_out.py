# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The held-out test split: every method at its tuned settings scored once (Dice at 0.5 and at the tuned threshold,
per lesion family), the paired bootstrap of masked minus each baseline, and the timing of all methods back to back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from berdiff.apps.benchmark.fit import METHOD_PARTS, Models, log
from berdiff.apps.benchmark.settings import THRESHOLD_GRID, BenchmarkSettings, Method
from berdiff.apps.benchmark.sweep import score_split
from berdiff.apps.benchmark.timing import time_method
from berdiff.evaluation.protocols import mean_std
from berdiff.evaluation.statistics import paired_bootstrap_ci

__all__ = ["compare_to_masked", "score_held_out", "time_methods"]


def _by_family(res: Mapping[str, Any], families: list[str]) -> dict[str, dict[str, Any]]:
    return {
        fam: {
            "n": sum(f == fam for f in families),
            "dice_fixed": mean_std([d for d, f in zip(res["dice_per_slice"], families) if f == fam])["mean"],
            "auprc": mean_std([a for a, f in zip(res["auprc_per_slice"], families) if f == fam])["mean"],
        }
        for fam in sorted(set(families))
    }


def score_held_out(
    settings: BenchmarkSettings,
    chosen: Mapping[str, dict[str, Any]],
    test: Mapping[str, Any],
    models: Models,
    training: Mapping[str, dict[str, Any]],
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """
    Score every tuned method on the held-out test split.

    Args:
        settings: the benchmark settings.
        chosen: the tuned methods of :func:`~berdiff.apps.benchmark.sweep.tune_methods`.
        test: the test split.
        models: the trained models (for the parameter counts).
        training: the training records (for the training time and compute of each method).
        device: the device.

    Returns:
        per method: ``settings``, ``settings_text``, ``threshold`` (tuned on the tuning split), ``test`` scores,
        ``params``, ``train_seconds``, ``train_tflop`` and the ``tune`` scores.
    """
    s = settings.sweep
    results: dict[str, dict[str, Any]] = {}
    for m in [m for m in Method.__members__.values() if m in chosen]:
        c = chosen[m]
        grid = np.nan_to_num(np.asarray(c["tune"]["dice_grid"], dtype=float), nan=-1.0)
        t_idx = int(np.argmax(grid))
        r = score_split(c["fn"], test, s.eval_batch_size, device, s.min_component, healthy=True)
        r["dice_tuned"] = r["dice_grid"][t_idx] if r["dice_grid"] else float("nan")
        r["dice_tuned_per_slice"] = [float(row[t_idx]) for row in r.pop("dice_grid_per_slice")]
        r["by_family"] = _by_family(r, test["families"])
        log(f"{m}: test Dice@0.5 {r['dice_fixed']:.3f}, Dice@t* {r['dice_tuned']:.3f}, AUPRC {r['auprc']:.3f}")
        parts = METHOD_PARTS.get(m, ("autoencoder", "bernoulli denoiser"))
        results[m] = {
            "settings": c["settings"],
            "settings_text": c["text"],
            "threshold": float(THRESHOLD_GRID[t_idx]),
            "test": r,
            "params": models.params(m),
            "train_seconds": sum(training[p]["train_seconds"] for p in parts),
            "train_tflop": sum(training[p].get("train_tflop", float("nan")) for p in parts),
            "tune": {k: v for k, v in c["tune"].items() if k != "dice_grid"},
        }
    return results


def compare_to_masked(results: dict[str, dict[str, Any]], seed: int) -> None:
    """
    Add ``vs_masked`` to every baseline: the paired bootstrap (masked minus baseline) over the held-out lesion slices
    of Dice at 0.5, Dice at the tuned threshold and AUPRC. Nothing happens without the masked method.

    Args:
        results: the results of :func:`score_held_out`, changed in place.
        seed: seed of the resampling.
    """
    if Method.MASKED not in results:
        return
    ours = results[Method.MASKED]["test"]
    for m, r in results.items():
        if m == Method.MASKED:
            continue
        r["vs_masked"] = {
            metric: paired_bootstrap_ci(ours[key], r["test"][key], seed=seed)
            for metric, key in (("dice_fixed", "dice_per_slice"), ("dice_tuned", "dice_tuned_per_slice"),
                                ("auprc", "auprc_per_slice"))
        }


def time_methods(
    results: dict[str, dict[str, Any]],
    chosen: Mapping[str, dict[str, Any]],
    test: Mapping[str, Any],
    timing_slices: int,
    device: torch.device,
) -> None:
    """
    Time all methods back to back on the same single slices (``timing``) and relate each to the masked method
    (``speed_ratio_to_masked``).

    Args:
        results: the results of :func:`score_held_out`, changed in place.
        chosen: the tuned methods.
        test: the test split (its lesion images, then its healthy images, are timed).
        timing_slices: single-slice runs per method.
        device: the device.
    """
    images = np.concatenate([test["images"], test["healthy"]])[: max(1, timing_slices)]
    for m in results:
        results[m]["timing"] = time_method(chosen[m]["fn"], images, timing_slices, device)
        log(f"{m}: {results[m]['timing']['seconds_per_slice']:.3f} s/slice")
    masked_t = results.get(Method.MASKED, {}).get("timing", {}).get("seconds_per_slice")
    for r in results.values():
        r["speed_ratio_to_masked"] = r["timing"]["seconds_per_slice"] / masked_t if masked_t else None
