# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Tuning on the tuning split: :class:`Runners` builds each method at given settings, :func:`score_split` scores a
method on a split with protocol A (``docs/evaluation.md``), :func:`sweep` is the one loop over candidate settings that
every method's tuning uses, and :func:`tune_methods` runs the sweeps: (L, P), K and the map reference of masked
Bernoulli diffusion, L of the unmasked variant and of the DDPM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from berdiff.apps.benchmark.baselines import AutoencoderReconstructionInferer, GaussianPartialNoisingInferer
from berdiff.apps.benchmark.fit import Models, log
from berdiff.apps.benchmark.settings import REFERENCE_SETTINGS, THRESHOLD_GRID, BenchmarkSettings, Method
from berdiff.apps.benchmark.timing import RunFn, generators, run_maps
from berdiff.data.images2d import brain_mask
from berdiff.evaluation.metrics import pixel_auprc, pixel_auroc, psnr
from berdiff.evaluation.protocols import mean_std, score_slices, slice_detection_auroc
from berdiff.inferers import MaskedBernoulliInferer

__all__ = ["Runners", "better", "score_split", "sweep", "tune_methods"]


@dataclass(frozen=True)
class Runners:
    """
    Builds each method as a :data:`~berdiff.apps.benchmark.timing.RunFn` at given settings.

    Args:
        models: the trained models.
        seed: seed of the inference noise.
        device: the device.
        ddpm_eta: DDIM eta of the DDPM.
    """

    models: Models
    seed: int
    device: torch.device
    ddpm_eta: float = 0.0

    def autoencoder(self) -> RunFn:
        """The binary autoencoder's own reconstruction error."""
        inf = AutoencoderReconstructionInferer()
        return lambda x, idx: inf(x, self.models.ae)

    def bernoulli(
        self, L: int, P: float, K: int, masked: bool, reference: str = "input", weighting: str | None = None
    ) -> RunFn:
        """
        Bernoulli diffusion partial denoising of the code.

        Args:
            L, P, K: noise level, mask threshold and strided steps (``min(K, L)``).
            masked: the masked variant (this project's method) or the unmasked one.
            reference: what the anomaly map compares the reconstruction with.
            weighting: latent map that weights the residual (``latent_weighting``; None: the residual alone).
        """
        inf = MaskedBernoulliInferer(self.models.bernoulli, noise_level=L, prob_threshold=P,
                                     num_inference_steps=min(K, L), masked=masked, anomaly_reference=reference,
                                     latent_weighting=weighting)
        return lambda x, idx: inf(x, self.models.ae, self.models.unet, generators(idx, self.seed, self.device))

    def ddpm(self, L: int, K: int) -> RunFn:
        """
        The image-space Gaussian DDPM, one image at a time (each with its own generator).

        Args:
            L, K: noise level and strided steps (``min(K, L)``).
        """
        inf = GaussianPartialNoisingInferer(self.models.gaussian, noise_level=L, num_inference_steps=min(K, L),
                                            eta=self.ddpm_eta)

        def run(x: torch.Tensor, idx: Sequence[int]) -> dict[str, torch.Tensor]:
            outs = [inf(x[i : i + 1], self.models.ddpm, generators([j], self.seed, self.device)[0])
                    for i, j in enumerate(idx)]
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

        return run


def _slice_auroc(maps: np.ndarray, images: np.ndarray, healthy_maps: np.ndarray, healthy: np.ndarray) -> float:
    """Slice-level detection AUROC: 99th percentile of the raw map inside each image's brain mask."""
    if len(healthy_maps) == 0 or len(maps) == 0:
        return float("nan")
    all_maps = np.concatenate([maps, healthy_maps])
    gts = np.concatenate([np.ones(maps.shape, bool), np.zeros(healthy_maps.shape, bool)])
    masks = np.stack([brain_mask(x) for x in np.concatenate([images, healthy])])
    masks[~masks.reshape(len(masks), -1).any(axis=1)] = True  # an empty mask falls back to the whole slice
    return slice_detection_auroc(
        [np.moveaxis(all_maps, 0, -1)], [np.moveaxis(gts, 0, -1)], [np.moveaxis(masks, 0, -1)], axis=-1
    )


def score_split(
    fn: RunFn,
    split: Mapping[str, Any],
    batch_size: int,
    device: torch.device,
    min_component: int,
    healthy: bool = False,
) -> dict[str, Any]:
    """
    Protocol A on the lesion slices of a split (no brain mask; Dice at 0.5 and on :data:`THRESHOLD_GRID`, per-slice
    oracle Dice, AUROC, AUPRC), with the method's mask fraction and wall time; with ``healthy`` also the pooled
    AUROC/AUPRC inside the brain masks, slice detection against the healthy images and their PSNR.

    Args:
        fn: the method.
        split: a split of :func:`~berdiff.apps.benchmark.data.split_pairs`.
        batch_size: images per call.
        device: the device.
        min_component: protocol A's component filter.
        healthy: also score the healthy images (the held-out test split).
    """
    stats: dict[str, Any] = {}
    maps, _, seconds = run_maps(fn, split["images"], batch_size, device, stats=stats)
    per = score_slices(maps, split["labels"], min_component=min_component, oracle=True, grid=THRESHOLD_GRID)
    grid = np.asarray(per["dice_grid"], dtype=np.float64).reshape(len(maps), len(THRESHOLD_GRID))
    dice_fixed = mean_std(per["dice"])
    res: dict[str, Any] = {
        "dice_fixed": dice_fixed["mean"],
        "dice_fixed_std": dice_fixed["std"],
        "dice_oracle": mean_std(per["best_dice"])["mean"],
        "auroc": mean_std(per["auroc"])["mean"],
        "auprc": mean_std(per["auprc"])["mean"],
        "dice_grid": [mean_std(col)["mean"] for col in grid.T] if len(maps) else [],
        "n_slices": len(maps),
        "dice_per_slice": [float(d) for d in per["dice"]],
        "dice_grid_per_slice": grid.tolist(),
        "auprc_per_slice": [float(a) for a in per["auprc"]],
        "mask_fraction": stats["mask_fraction"],
        "wall_seconds_per_slice": seconds / max(1, len(maps)),
    }
    if healthy:
        # pooled over all lesion-slice pixels inside the brain masks (the second variant of docs/evaluation.md)
        masks = np.stack([brain_mask(x) for x in split["images"]])
        res["auroc_brain_pooled"] = pixel_auroc(maps, split["labels"], masks)
        res["auprc_brain_pooled"] = pixel_auprc(maps, split["labels"], masks)
        # the latent maps (masked and unmasked methods), scored the same way as the image-space map
        res["latent_maps"] = {
            name: {"auroc_brain_pooled": pixel_auroc(lat, split["labels"], masks),
                   "auprc_brain_pooled": pixel_auprc(lat, split["labels"], masks)}
            for name, lat in stats["latent"].items()
        }
        h_maps, h_recons, _ = run_maps(fn, split["healthy"], batch_size, device, offset=10_000)
        res["slice_auroc"] = _slice_auroc(maps, split["images"], h_maps, split["healthy"])
        res["psnr_healthy"] = mean_std([psnr(r, x, max_val=1.0) for r, x in zip(h_recons, split["healthy"])])["mean"]
        res["n_healthy"] = len(h_maps)
    return res


def better(a: Mapping[str, Any], b: Mapping[str, Any] | None) -> bool:
    """
    Model selection on the tuning split: Dice at the fixed threshold, then AUPRC.

    Args:
        a: the candidate's scores.
        b: the best so far (``None``: ``a`` wins).
    """
    if b is None:
        return True
    ka = (np.nan_to_num(a["dice_fixed"], nan=-1.0), np.nan_to_num(a["auprc"], nan=-1.0))
    kb = (np.nan_to_num(b["dice_fixed"], nan=-1.0), np.nan_to_num(b["auprc"], nan=-1.0))
    return ka > kb


def sweep(
    name: str,
    candidates: Sequence[Mapping[str, Any]],
    score: Callable[[Mapping[str, Any]], dict[str, Any]],
    known: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """
    The one tuning loop: score every candidate setting, keep the rows and the best by :func:`better` (the first of
    equals).

    Args:
        name: the method, for the log.
        candidates: settings dicts (e.g. ``{"L": 100, "P": 0.5, "K": 10}``), added to their rows.
        score: the tuning scores of one candidate.
        known: rows already scored; a candidate whose settings match one of them reuses it.

    Returns:
        ``(rows, best)``.
    """
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for cand in candidates:
        reuse = next((r for r in known if all(r.get(k) == v for k, v in cand.items())), None)
        row = {**(reuse if reuse is not None else score(cand)), **cand}
        rows.append(row)
        text = " ".join(f"{k}={v}" for k, v in cand.items())
        mask = row.get("mask_fraction")
        log(f"{name} {text}: tune Dice {row['dice_fixed']:.3f} AUPRC {row['auprc']:.3f}"
            + ("" if mask is None else f" mask {mask:.4f}") + f" ({row['wall_seconds_per_slice']:.3f} s/slice)")
        if better(row, best):
            best = row
    if best is None:
        raise ValueError(f"{name}: nothing to tune.")
    return rows, best


def tune_methods(
    settings: BenchmarkSettings, runners: Runners, tune: Mapping[str, Any], device: torch.device
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """
    Tune every requested method on the tuning split.

    Args:
        settings: the benchmark settings.
        runners: builds the methods.
        tune: the tuning split.
        device: the device.

    Returns:
        ``(tuning, chosen)``: the sweep rows per sweep, and per method its run function ``fn``, ``settings``,
        ``text`` and tuning scores ``tune``.
    """
    s, methods, T = settings.sweep, settings.methods, settings.training.num_train_timesteps

    def tune_eval(fn: RunFn) -> dict[str, Any]:
        return score_split(fn, tune, s.eval_batch_size, device, s.min_component)

    tuning: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    if Method.AE in methods:
        chosen[Method.AE] = {"fn": runners.autoencoder(), "settings": {}, "text": "-",
                             "tune": tune_eval(runners.autoencoder())}
    if Method.MASKED in methods:
        pairs = [(L, P) for L in s.noise_levels for P in s.prob_thresholds]
        pairs += [ref for ref in REFERENCE_SETTINGS if ref not in pairs and ref[0] <= T]
        def masked(c: Mapping[str, Any]) -> dict[str, Any]:
            return tune_eval(runners.bernoulli(c["L"], c["P"], c["K"], True, c.get("reference", "input"),
                                               c.get("weighting")))

        tuning["masked_lp"], best = sweep(
            "masked", [{"L": L, "P": P, "K": min(s.tune_steps, L)} for L, P in pairs], masked
        )
        L, P = best["L"], best["P"]
        k_grid = sorted({k for k in s.k_values if k <= L} | {best["K"]})
        tuning["masked_k"], _ = sweep("masked", [{"L": L, "P": P, "K": K} for K in k_grid], masked, known=[best])
        top = max(np.nan_to_num(r["dice_fixed"], nan=-1.0) for r in tuning["masked_k"])
        k_best = next(r for r in tuning["masked_k"] if np.nan_to_num(r["dice_fixed"], nan=-1.0) >= top - s.k_tolerance)
        K = k_best["K"]
        # the anomaly map against the input (the paper) or against the AE's reconstruction of the input code, and
        # the input's residual weighted by the confident code change
        refs = [{"L": L, "P": P, "K": K, "reference": ref, "weighting": w}
                for ref, w in (("input", None), ("autoencoder", None), ("input", "confident_change"))]
        tuning["masked_reference"], chosen_ref = sweep("masked", refs, masked, known=[{**k_best, "reference": "input"}])
        ref, weighting = chosen_ref["reference"], chosen_ref.get("weighting")
        text = f"L={L}, P={P}, K={K}, map vs {ref}" + (f" x {weighting}" if weighting else "")
        chosen[Method.MASKED] = {"fn": runners.bernoulli(L, P, K, True, ref, weighting),
                                 "settings": {"L": L, "P": P, "K": K, "reference": ref, "weighting": weighting},
                                 "text": text, "tune": chosen_ref}
    if Method.UNMASKED in methods:
        tuning["unmasked_l"], best = sweep(
            "unmasked", [{"L": L, "K": min(s.tune_steps, L)} for L in s.noise_levels],
            lambda c: tune_eval(runners.bernoulli(c["L"], 0.5, c["K"], False)),
        )
        chosen[Method.UNMASKED] = {"fn": runners.bernoulli(best["L"], 0.5, best["K"], False),
                                   "settings": {"L": best["L"], "K": best["K"]},
                                   "text": f"L={best['L']}, K={best['K']}", "tune": best}
    if Method.DDPM in methods:
        tuning["ddpm_l"], best = sweep(
            "ddpm", [{"L": L, "K": min(s.ddpm_steps, L)} for L in s.ddpm_noise_levels],
            lambda c: tune_eval(runners.ddpm(c["L"], c["K"])),
        )
        chosen[Method.DDPM] = {"fn": runners.ddpm(best["L"], best["K"]),
                               "settings": {"L": best["L"], "K": best["K"], "eta": s.ddpm_eta},
                               "text": f"L={best['L']}, K={best['K']}, eta={s.ddpm_eta}", "tune": best}
    return tuning, chosen
