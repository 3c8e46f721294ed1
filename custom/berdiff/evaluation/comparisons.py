# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The method's map against the reference maps of the same cases: paired bootstrap 95 % intervals of the difference
(:func:`berdiff.evaluation.statistics.paired_bootstrap_ci`) over volumes (protocol B: best Dice, AUROC, AUPRC) and over
diseased slices (protocol A: Dice, AUROC, AUPRC), as :func:`compare_maps` returns them and
:func:`comparison_text` prints them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from berdiff.evaluation.statistics import paired_bootstrap_ci

__all__ = ["COMPARED_METRICS", "compare_maps", "comparison_text", "default_references"]

#: the compared metrics: name -> (protocol, key); protocol ``a`` pairs slices, ``b`` pairs volumes
COMPARED_METRICS = {
    "volume_best_dice": ("b", "best_dice"),
    "volume_auroc": ("b", "auroc"),
    "volume_auprc": ("b", "auprc"),
    "slice_dice": ("a", "dice"),
    "slice_auroc": ("a", "auroc"),
    "slice_auprc": ("a", "auprc"),
}


def default_references(names: Sequence[str], method: str = "anomaly") -> list[str]:
    """The reference maps among ``names``: the input intensities (``input*``) and the autoencoder-only map."""
    return [n for n in names if n != method and (n.startswith("input") or n == "autoencoder")]


def _paired_values(scored: Sequence[dict], method: str, reference: str, protocol: str, key: str) -> tuple[list, list]:
    a: list[float] = []
    b: list[float] = []
    for case in scored:
        maps = case["maps"]
        if method not in maps or reference not in maps:
            continue
        if protocol == "b":
            if case["row"]["tumour_voxels"] == 0:
                continue  # volumes without a tumour have no best Dice, AUROC or AUPRC
            a.append(maps[method]["b"][key])
            b.append(maps[reference]["b"][key])
        else:  # the same diseased slices, in the same order, for both maps of a case
            a += list(maps[method]["a"][f"{key}_per_slice"])
            b += list(maps[reference]["a"][f"{key}_per_slice"])
    return a, b


def compare_maps(
    scored: Sequence[dict],
    method: str = "anomaly",
    references: Sequence[str] | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """
    Paired bootstrap 95 % intervals of ``method - reference`` for every reference map and metric of
    :data:`COMPARED_METRICS`: volumes are resampled for protocol B, diseased slices (pooled over cases) for protocol A.

    Args:
        scored: per-case results of :func:`berdiff.evaluation.scoring.score_case`.
        method: the map being judged.
        references: the maps it is compared with (default: :func:`default_references` of the scored maps).
        n_resamples: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``{reference: {metric: {"diff", "low", "high", "n", "p_not_better"}}}`` (positive ``diff``: the method is
        better); empty when no case has the method's map.
    """
    names: list[str] = []
    for case in scored:
        names += [m for m in case["maps"] if m not in names]
    if method not in names:
        return {}
    references = default_references(names, method) if references is None else list(references)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for reference in references:
        if reference not in names:
            raise ValueError(f"reference map {reference!r} was not scored; scored maps: {names}.")
        out[reference] = {}
        for metric, (protocol, key) in COMPARED_METRICS.items():
            a, b = _paired_values(scored, method, reference, protocol, key)
            out[reference][metric] = paired_bootstrap_ci(a, b, n_resamples=n_resamples, seed=seed)
    return out


def comparison_text(comparisons: dict, method: str = "anomaly") -> str:
    """
    The comparisons as printed lines: per reference, ``metric diff [low, high]`` for each metric.

    Args:
        comparisons: the output of :func:`compare_maps`.
        method: the name of the judged map, for the heading.
    """
    if not comparisons:
        return ""
    lines = [f"{method} minus each reference, paired bootstrap 95 % interval (volumes for volume_*, slices for slice_*):"]
    for reference, metrics in comparisons.items():
        parts = []
        for metric, ci in metrics.items():
            if ci["n"] == 0 or not np.isfinite(ci["diff"]):
                parts.append(f"{metric} n/a")
            else:
                parts.append(f"{metric} {ci['diff']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]")
        lines.append(f"  vs {reference}: " + ", ".join(parts))
    return "\n".join(lines)
