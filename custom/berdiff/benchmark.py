# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""
One harness for masked Bernoulli diffusion and its baselines on folders of 2D images
(``python -m berdiff benchmark --train_dir HEALTHY_DIR --test_dir PAIRS_DIR --out OUT_DIR [--methods ...]``).

What it does, in order:

1. reads the healthy training images (PNG or NIfTI), scales them to [0, 1] and pads + resizes them to ``size``;
2. reads the test pairs ``PAIRS_DIR/images/<name>`` + ``PAIRS_DIR/labels/<name>`` (label > 0 anomalous) and the
   optional healthy images ``PAIRS_DIR/healthy/<name>`` (without a test folder, a lesion set is generated from the
   IXI validation images with :func:`berdiff.data.lesions.make_lesions`);
3. splits the test names with a seeded permutation into a **tuning** split and a held-out **test** split;
4. trains (or loads from ``OUT_DIR/checkpoints``, keyed by a hash of the training-file listing and the training
   settings) the binary autoencoder, the Bernoulli denoiser on its codes and an image-space Gaussian DDPM, each with
   MONAI's ``SupervisedTrainer``;
5. tunes, on the tuning split only, (L, P) and then K of masked Bernoulli diffusion, L of the unmasked variant and of
   the DDPM, and the best global threshold on protocol A's soft map for every method;
6. scores every method at its tuned settings on the test split (protocol A of ``docs/evaluation.md``: Dice at the
   fixed 0.5 threshold, Dice at the tuned threshold, per-slice oracle Dice, pixel AUROC/AUPRC, slice-level detection
   AUROC against the healthy images), times it on single slices (median) with its peak memory, and
7. writes ``OUT_DIR/results.json`` and ``OUT_DIR/benchmarks.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.engines.utils import DiffusionPrepareBatch, default_prepare_batch
from monai.inferers import DiffusionInferer, SimpleInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from monai.utils import StrEnum

from berdiff.baselines import AutoencoderReconstructionInferer, GaussianPartialNoisingInferer
from berdiff.data.images2d import brain_mask, list_images, load_folder, read_image, resize_label, stem
from berdiff.engines import BernoulliPrepareBatch
from berdiff.inferers import MaskedBernoulliInferer
from berdiff.losses import AutoencoderLoss, timestep_only_bce
from berdiff.metrics import (
    AreaRule,
    best_dice,
    dice,
    pixel_auprc,
    pixel_auroc,
    psnr,
    reference_slice_postprocess,
    remove_small_components,
    slice_detection_auroc,
)
from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
from berdiff.schedulers import BernoulliScheduler
from berdiff.statistics import paired_bootstrap_ci

__all__ = ["Method", "DEFAULT_DATA_DIR", "benchmark", "cache_key", "render_markdown"]

#: the IXI slices, relative to the repository root
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ixi_t1_midaxial"

#: (L, P) of the reference repository, always included in the masked sweep
REFERENCE_SETTINGS = ((100, 0.6), (200, 0.5), (300, 0.8))

#: threshold grid on protocol A's soft map for "Dice at the tuned threshold"
THRESHOLD_GRID = np.round(np.arange(0.05, 1.0, 0.05), 2)


class Method(StrEnum):
    """
    Benchmarked methods.

    ae: reconstruction error of the binary autoencoder alone.
    unmasked: Bernoulli diffusion partial denoising of the code without the mask.
    masked: masked Bernoulli diffusion (this project's method).
    ddpm: image-space Gaussian DDPM partial noising + DDIM denoising.
    """

    AE = "ae"
    UNMASKED = "unmasked"
    MASKED = "masked"
    DDPM = "ddpm"


METHOD_LABELS = {
    Method.AE: "AE (binary autoencoder only)",
    Method.UNMASKED: "Bernoulli diffusion, unmasked",
    Method.MASKED: "Bernoulli diffusion, masked (ours)",
    Method.DDPM: "Gaussian DDPM (image space)",
}


def _log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- data


def cache_key(files: Sequence[str | os.PathLike], settings: dict[str, Any]) -> str:
    """
    A short hash of a training-file listing (names and byte sizes) and the training settings: checkpoints are reused
    exactly when both are unchanged.
    """
    listing = [(Path(f).name, Path(f).stat().st_size) for f in files]
    blob = json.dumps({"files": listing, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_pairs(test_dir: Path, size: int) -> dict[str, Any]:
    img_dir, lab_dir = test_dir / "images", test_dir / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise FileNotFoundError(f"test folder {str(test_dir)!r} must hold 'images/' and 'labels/' sub-folders.")
    images, names = load_folder(img_dir, size)
    labels_by = {stem(p): p for p in list_images(lab_dir)}
    missing = [n for n in names if n not in labels_by]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) in {str(img_dir)!r} have no label in {str(lab_dir)!r}, e.g. {missing[:3]}.")
    labels = np.stack([resize_label(read_image(labels_by[n]), size) for n in names])
    healthy_images, healthy_names = np.zeros((0, size, size), np.float32), []
    if (test_dir / "healthy").is_dir():
        healthy_images, healthy_names = load_folder(test_dir / "healthy", size)
    # images without any anomalous pixel are healthy images too
    empty = [i for i in range(len(names)) if not labels[i].any()]
    if empty:
        healthy_images = np.concatenate([healthy_images, images[empty]])
        healthy_names = healthy_names + [f"{names[i]}" for i in empty]
        keep = [i for i in range(len(names)) if labels[i].any()]
        images, labels, names = images[keep], labels[keep], [names[i] for i in keep]
    if len(names) < 2:
        raise ValueError(f"the test folder {str(test_dir)!r} needs at least 2 images with anomalies, got {len(names)}.")
    families: dict[str, str] = {}
    record = test_dir / "lesions.json"
    if record.is_file():  # written by make_lesions: lesion family of every image, for a per-family breakdown
        try:
            entries = json.loads(record.read_text()).get("images", {})
            families = {n: "+".join(sorted({les["family"] for les in e["lesions"]})) for n, e in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            families = {}
    return {"images": images, "labels": labels, "names": names, "healthy": healthy_images, "healthy_names": healthy_names,
            "families": [families.get(n, "unknown") for n in names]}


def _split(pairs: dict[str, Any], tune_fraction: float, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    names = pairs["names"]
    n = len(names)
    n_tune = min(n - 1, max(1, int(round(tune_fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    tune_idx, test_idx = np.sort(perm[:n_tune]), np.sort(perm[n_tune:])
    tune_names = {names[i] for i in tune_idx}
    # a healthy image goes with its lesion image's split; other healthy images are split with the same fraction
    h_names = pairs["healthy_names"]
    h_perm = np.random.default_rng(seed + 1).permutation(len(h_names))
    h_tune = {int(i) for i in h_perm[: int(round(tune_fraction * len(h_names)))]}
    is_tune = [(h in tune_names) if h in set(names) else (i in h_tune) for i, h in enumerate(h_names)]

    def subset(idx: np.ndarray, h_mask: list[bool]) -> dict[str, Any]:
        hi = [i for i, m in enumerate(h_mask) if m]
        return {
            "images": pairs["images"][idx],
            "labels": pairs["labels"][idx],
            "names": [names[i] for i in idx],
            "families": [pairs["families"][i] for i in idx],
            "healthy": pairs["healthy"][hi] if hi else np.zeros((0, *pairs["images"].shape[1:]), np.float32),
            "healthy_names": [h_names[i] for i in hi],
        }

    return subset(tune_idx, is_tune), subset(test_idx, [not t for t in is_tune])


# ---------------------------------------------------------------------------------------------------- training


def _fit(
    network: nn.Module,
    loss_function: Callable,
    data: dict[str, torch.Tensor],
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    name: str,
    iterations: int | None = None,
    budget_flops: float | None = None,
    inferer: Any = None,
    prepare_batch: Callable | None = None,
    max_seconds: float | None = None,
    aliases: dict[str, str] | None = None,
    ema_momentum: float = 0.001,
    precision: str = "auto",
    compile: bool = False,
) -> dict[str, Any]:
    """
    Train ``network`` through the project's one training path (:func:`berdiff.trainers.build_trainer`: device-held
    batches, fused AdamW, bf16 on CUDA, warm-up EMA whose weights are loaded into ``network`` at the end) for
    ``iterations`` iterations, or for as many as ``budget_flops`` buys (training FLOPs of one iteration counted
    with ``FlopCounterMode``), optionally capped at ``max_seconds``.
    """
    from berdiff.data.tensor_loader import TensorLoader
    from berdiff.training import LossMonitor, WarmupEMAHandler, adamw, build_trainer, training_flops

    torch.manual_seed(seed)
    data = {k: v.to(device) for k, v in data.items()}
    loader = TensorLoader(data, batch_size=min(batch_size, len(next(iter(data.values())))), seed=seed, aliases=aliases)
    prepare = prepare_batch if prepare_batch is not None else default_prepare_batch
    run_inferer = inferer if inferer is not None else SimpleInferer()

    def one_step() -> torch.Tensor:
        batch = prepare(next(iter(loader)), device)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        return loss_function(run_inferer(inputs, network, *args, **kwargs), targets).mean()

    network.train()
    flops = training_flops(one_step)
    network.zero_grad(set_to_none=True)
    if budget_flops is not None:
        iterations = max(1, int(budget_flops // flops))
    if iterations is None or iterations < 1:
        raise ValueError(f"{name}: give iterations >= 1 or a training budget, got {iterations}.")
    trainer = build_trainer(
        device, max_epochs=max(1, math.ceil(iterations / len(loader))), train_data_loader=loader, network=network,
        optimizer=adamw(network.parameters(), lr), loss_function=loss_function, inferer=inferer,
        prepare_batch=prepare, precision=precision, compile=compile, max_iterations=iterations,
    )
    ema = WarmupEMAHandler(network, momentum=ema_momentum)
    ema.attach(trainer)
    monitor = LossMonitor(interval=max(1, min(100, iterations // 10)), name=name, print_fn=_log)
    monitor.attach(trainer)
    start = time.perf_counter()
    if max_seconds is not None:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(every=10),
            lambda e: e.terminate() if time.perf_counter() - start > max_seconds else None,
        )
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    network.load_state_dict(ema.ema_model.state_dict())
    network.eval()
    done = int(trainer.state.iteration)
    return {
        "iterations": done,
        "train_seconds": seconds,
        "samples_per_second": done * loader.batch_size / max(seconds, 1e-9),
        "flops_per_iteration": flops,
        "train_tflop": done * flops / 1e12,
        "final_loss": monitor.final_loss(last=3),
        "loss_history": monitor.history,
    }


def _max_timestep(setting: int | str | None, levels: Sequence[int], total: int) -> int | None:
    """The training timestep range's end: ``"auto"`` = the largest noise level of the sweep (inference from L visits
    only t < L), None = all ``total`` timesteps, or the given number."""
    if setting is None:
        return None
    if setting == "auto":
        return int(max(levels))
    value = int(setting)
    if not 1 <= value <= total:
        raise ValueError(f"train_max_timestep must be 'auto', None or in [1, {total}], got {setting}.")
    return value


def _cached(
    path: Path, network: nn.Module, train: Callable[[], dict[str, Any]], settings: dict[str, Any]
) -> dict[str, Any]:
    if path.is_file():
        try:  # tensors and strings only (info and settings as JSON), so weights_only=True reads it
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            info = json.loads(ckpt["info"])
        except Exception as e:  # a cache written by an older version (pickled dicts): train again
            _log(f"ignoring unreadable checkpoint cache {path.name} ({type(e).__name__})")
        else:
            network.load_state_dict(ckpt["state_dict"])
            network.eval()
            _log(f"reusing checkpoint {path.name}")
            return {**info, "cached": True}
    info = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(
        {"state_dict": network.state_dict(), "info": json.dumps(info), "settings": json.dumps(settings, default=str)},
        tmp,
    )
    os.replace(tmp, path)
    return {**info, "cached": False}


def _n_params(*modules: nn.Module) -> int:
    return int(sum(p.numel() for m in modules for p in m.parameters()))


# ---------------------------------------------------------------------------------------------------- inference


class _PeakMemory:
    """
    Peak tensor memory allocated during a block, above what was allocated before it (network weights excluded):
    the CUDA allocator's peak on GPU; on CPU the running sum of the allocations and frees that
    ``torch.profiler`` records with ``profile_memory=True``, in time order (the resident set size of a process is
    useless here: the CPU allocator reuses freed blocks).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = float("nan")

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._prof.__exit__(*exc)
        running = peak = 0
        for event in sorted(self._prof.events(), key=lambda e: e.time_range.start):
            running += event.self_cpu_memory_usage
            peak = max(peak, running)
        self.peak_mib = peak / 2**20


RunFn = Callable[[torch.Tensor, Sequence[int]], dict[str, torch.Tensor]]


def _generators(indices: Sequence[int], seed: int, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(seed) * 100_003 + int(i)) for i in indices]


def _run(
    fn: RunFn, images: np.ndarray, batch_size: int, device: torch.device, offset: int = 0, stats: dict | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Anomaly maps and reconstructions (N, H, W) of ``images`` and the wall time; ``stats["mask_fraction"]`` gets the
    mean fraction of latent entries in the final mask (methods that return a ``mask``)."""
    maps, recons, fractions = [], [], []
    start = time.perf_counter()
    for b in range(0, len(images), batch_size):
        x = torch.as_tensor(images[b : b + batch_size], dtype=torch.float32, device=device)[:, None]
        out = fn(x, list(range(offset + b, offset + b + len(x))))
        maps.append(out["anomaly_map"][:, 0].cpu().numpy())
        recons.append(out["reconstruction"][:, 0].cpu().numpy())
        if "mask" in out:
            fractions += out["mask"].float().flatten(1).mean(1).cpu().tolist()
    seconds = time.perf_counter() - start
    if stats is not None:
        stats["mask_fraction"] = float(np.mean(fractions)) if fractions else None
    if not maps:
        shape = (0, *images.shape[1:])
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32), seconds
    return np.concatenate(maps), np.concatenate(recons), seconds


def _time(fn: RunFn, images: np.ndarray, n: int, device: torch.device) -> dict[str, Any]:
    """Median seconds per slice over ``n`` single-slice runs (after one warm-up), then the peak tensor memory of one
    more single-slice run (measured separately: the CPU memory profiler slows the run down)."""
    x_all = torch.as_tensor(images[: max(1, n)], dtype=torch.float32, device=device)[:, None]
    fn(x_all[:1], [0])  # warm-up
    times = []
    for i in range(max(1, n)):
        x = x_all[i % len(x_all)][None]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(x, [i])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    with _PeakMemory(device) as mem:
        fn(x_all[:1], [0])
    return {
        "seconds_per_slice": float(statistics.median(times)),
        "seconds_all": times,
        "peak_memory_mib": float(mem.peak_mib),
    }


# ---------------------------------------------------------------------------------------------------- scoring


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _protocol_a(maps: np.ndarray, labels: np.ndarray, min_component: int) -> dict[str, Any]:
    """Protocol A per slice (no brain mask, 5x5 median, p1/p99 clip, min-max, > 0.5, components <= 15 px removed)."""
    d_fixed, d_oracle, aurocs, auprcs = [], [], [], []
    d_grid = np.zeros((len(maps), len(THRESHOLD_GRID)))
    for i, (m, g) in enumerate(zip(maps, labels)):
        prob, binary = reference_slice_postprocess(m, min_component=min_component)
        d_fixed.append(dice(binary, g))
        aurocs.append(pixel_auroc(prob, g))
        auprcs.append(pixel_auprc(prob, g))
        d_oracle.append(best_dice(prob, g)[0])
        for j, t in enumerate(THRESHOLD_GRID):
            pred = remove_small_components(prob > t, min_component, connectivity=2, area_rule=AreaRule.FILLED)
            d_grid[i, j] = dice(pred, g)
    return {
        "dice_fixed": _nanmean(d_fixed),
        "dice_fixed_std": float(np.nanstd(d_fixed)) if d_fixed else float("nan"),
        "dice_oracle": _nanmean(d_oracle),
        "auroc": _nanmean(aurocs),
        "auprc": _nanmean(auprcs),
        "dice_grid": np.nanmean(d_grid, axis=0).tolist() if len(maps) else [],
        "n_slices": len(maps),
        "dice_per_slice": [float(d) for d in d_fixed],
        "dice_grid_per_slice": d_grid.tolist(),
        "auprc_per_slice": [float(a) for a in auprcs],
    }


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


def _evaluate(fn: RunFn, split: dict[str, Any], batch_size: int, device: torch.device, min_component: int, healthy: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    maps, _, seconds = _run(fn, split["images"], batch_size, device, stats=stats)
    res = _protocol_a(maps, split["labels"], min_component)
    res["mask_fraction"] = stats["mask_fraction"]
    res["wall_seconds_per_slice"] = seconds / max(1, len(maps))
    if healthy:
        # pooled over all lesion-slice pixels inside the brain masks (evaluation.md section 6.4, second variant)
        masks = np.stack([brain_mask(x) for x in split["images"]])
        res["auroc_brain_pooled"] = pixel_auroc(maps, split["labels"], masks)
        res["auprc_brain_pooled"] = pixel_auprc(maps, split["labels"], masks)
        h_maps, h_recons, _ = _run(fn, split["healthy"], batch_size, device, offset=10_000)
        res["slice_auroc"] = _slice_auroc(maps, split["images"], h_maps, split["healthy"])
        res["psnr_healthy"] = _nanmean([psnr(r, x, max_val=1.0) for r, x in zip(h_recons, split["healthy"])])
        res["n_healthy"] = len(h_maps)
    return res


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    """Model selection on the tuning split: Dice at the fixed threshold, then AUPRC."""
    if b is None:
        return True
    ka = (np.nan_to_num(a["dice_fixed"], nan=-1.0), np.nan_to_num(a["auprc"], nan=-1.0))
    kb = (np.nan_to_num(b["dice_fixed"], nan=-1.0), np.nan_to_num(b["auprc"], nan=-1.0))
    return ka > kb


# ---------------------------------------------------------------------------------------------------- report


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(xf):
        return "n/a"
    return f"{xf:.{nd}f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The benchmark report (markdown) from the ``results.json`` content."""
    s = results["settings"]
    lines = [
        "# Benchmark: masked Bernoulli diffusion and baselines",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. Date: {results['date']}.",
        "",
        f"Training data: {results['data']['n_train']} healthy images from `{results['data']['train_dir']}`; "
        f"test pairs from `{results['data']['test_dir']}`: {results['data']['n_tune']} lesion images "
        f"(+{results['data']['n_tune_healthy']} healthy) for tuning, {results['data']['n_test']} lesion images "
        f"(+{results['data']['n_test_healthy']} healthy) held out for the table (split seed {s['seed']}). "
        f"Images padded to square and resized to {s['size']}x{s['size']}, intensities in [0, 1].",
        "",
        "## Held-out test split",
        "",
        "Protocol A (docs/evaluation.md §2): no brain mask, 5x5 median filter, p1/p99 clip, per-slice min-max, "
        f"components <= {s['min_component']} px removed, mean over lesion slices. *Dice@0.5*: fixed threshold; "
        "*Dice@t\\**: one global threshold on the soft map tuned on the tuning split; *oracle Dice*: per-slice best "
        "threshold (upper bound); AUROC/AUPRC: per slice on the soft map (sklearn `roc_auc_score` / "
        "`average_precision_score`), averaged; *slice AUROC*: lesion vs healthy slices scored by the 99th percentile "
        "of the raw map inside the brain mask; *brain AUROC/AUPRC*: raw map, pooled over all pixels of the lesion "
        "slices inside their brain masks (no median filter); PSNR of the reconstruction of healthy slices. Time: median of "
        f"{s['timing_slices']} single-slice runs in the same process, all methods timed back to back; *peak MiB*: peak "
        "tensor memory of one single-slice run above the weights (torch.profiler allocation trace on CPU, CUDA "
        "allocator peak on GPU).",
        "",
        "| method | settings | Dice@0.5 | Dice@t* (t*) | oracle Dice | AUROC | AUPRC | brain AUROC | brain AUPRC "
        "| slice AUROC | PSNR healthy | s / slice | x masked | peak MiB | params | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    masked_time = results["methods"].get(Method.MASKED, {}).get("timing", {}).get("seconds_per_slice")
    for name, r in results["methods"].items():
        t = r["test"]
        sec = r["timing"]["seconds_per_slice"]
        ratio = sec / masked_time if masked_time else float("nan")
        lines.append(
            f"| {METHOD_LABELS.get(name, name)} | {r['settings_text']} | {_fmt(t['dice_fixed'])} ± {_fmt(t['dice_fixed_std'], 2)} "
            f"| {_fmt(t['dice_tuned'])} ({_fmt(r['threshold'], 2)}) | {_fmt(t['dice_oracle'])} | {_fmt(t['auroc'])} "
            f"| {_fmt(t['auprc'])} | {_fmt(t.get('auroc_brain_pooled'))} | {_fmt(t.get('auprc_brain_pooled'))} "
            f"| {_fmt(t.get('slice_auroc'))} | {_fmt(t.get('psnr_healthy'), 1)} | {_fmt(sec, 3)} "
            f"| {_fmt(ratio, 2)} | {_fmt(r['timing']['peak_memory_mib'], 0)} | {r['params']:,} | {_fmt(r['train_seconds'], 0)} |"
        )
    fams = sorted({f for r in results["methods"].values() for f in r["test"].get("by_family", {})})
    if fams:
        names = list(results["methods"])
        lines += ["", "## Held-out test split by lesion family: Dice@0.5 / AUPRC", "",
                  "| family | n | " + " | ".join(METHOD_LABELS.get(m, m) for m in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for fam in fams:
            cells = []
            n = 0
            for m in names:
                bf = results["methods"][m]["test"].get("by_family", {}).get(fam, {})
                n = bf.get("n", n)
                cells.append(f"{_fmt(bf.get('dice_fixed'))} / {_fmt(bf.get('auprc'))}")
            lines.append(f"| {fam} | {n} | " + " | ".join(cells) + " |")
    boot = {m: r["vs_masked"] for m, r in results["methods"].items() if "vs_masked" in r}
    if boot:
        lines += ["", "## Masked minus each baseline on the held-out lesion slices (paired bootstrap, 95 % CI)", "",
                  "Mean per-slice difference, masked minus baseline, with the percentile interval of 10,000 paired "
                  "resamples of the test slices; an interval above 0 means masked is better.", "",
                  "| baseline | Dice@0.5 | Dice@t* | AUPRC |", "|---|---|---|---|"]
        for m, b in boot.items():
            cells = [f"{_fmt(b[k]['diff'])} [{_fmt(b[k]['low'])}, {_fmt(b[k]['high'])}]" for k in ("dice_fixed", "dice_tuned", "auprc")]
            lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", "## Training", "",
              "*TFLOP*: training compute (forward + backward FLOPs of one iteration from `FlopCounterMode`, times the "
              "iterations; matrix multiplications and convolutions only). *baseline loss*: the loss of a predictor that "
              "sees only the timestep; a diffusion model must end below it.", "",
              "| model | iterations | batch | lr | TFLOP | train s | samples/s | final loss | baseline loss | t range | params | cached |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in results["training"].items():
        lines.append(
            f"| {name} | {t['iterations']} | {t['batch_size']} | {t['lr']} | {_fmt(t.get('train_tflop'), 2)} "
            f"| {_fmt(t['train_seconds'], 0)} | {_fmt(t.get('samples_per_second'), 1)} | {_fmt(t['final_loss'], 4)} "
            f"| {_fmt(t.get('baseline_loss'), 4)} | {_fmt(t.get('max_timestep'))} | {t['params']:,} | {t['cached']} |"
        )
    tuning = results.get("tuning", {})
    if tuning.get("masked_lp"):
        lines += [
            "",
            f"## Sweep over (L, P), masked, tuning split, K = {s['tune_steps']} strided steps (min(K, L))",
            "",
            "Reference settings (100, 0.6), (200, 0.5), (300, 0.8) are included.",
            "",
            "*mask*: mean fraction of latent entries in the final mask (0: the output is the AE's reconstruction).",
            "",
            "| L | P | Dice@0.5 | oracle Dice | AUROC | AUPRC | mask | s / slice (batched) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in tuning["masked_lp"]:
            lines.append(
                f"| {row['L']} | {row['P']} | {_fmt(row['dice_fixed'])} | {_fmt(row['dice_oracle'])} | {_fmt(row['auroc'])} "
                f"| {_fmt(row['auprc'])} | {_fmt(row.get('mask_fraction'), 4)} | {_fmt(row['wall_seconds_per_slice'], 3)} |"
            )
    if tuning.get("masked_k"):
        lines += [
            "",
            "## Sweep over K (strided steps), masked, at the tuned (L, P), tuning split",
            "",
            "| K | Dice@0.5 | oracle Dice | AUPRC | mask | s / slice (batched) |",
            "|---|---|---|---|---|---|",
        ]
        for row in tuning["masked_k"]:
            lines.append(
                f"| {row['K']} | {_fmt(row['dice_fixed'])} | {_fmt(row['dice_oracle'])} | {_fmt(row['auprc'])} "
                f"| {_fmt(row.get('mask_fraction'), 4)} | {_fmt(row['wall_seconds_per_slice'], 3)} |"
            )
    if tuning.get("masked_reference"):
        lines += ["", "## Anomaly map reference, masked, at the tuned (L, P, K), tuning split", "",
                  "*input*: squared difference to the input image (the paper); *autoencoder*: to the AE's reconstruction "
                  "of the input code, so that the AE's own reconstruction error drops out.", "",
                  "| reference | Dice@0.5 | oracle Dice | AUPRC |", "|---|---|---|---|"]
        for row in tuning["masked_reference"]:
            lines.append(f"| {row['reference']} | {_fmt(row['dice_fixed'])} | {_fmt(row['dice_oracle'])} | {_fmt(row['auprc'])} |")
    for key, title in (("unmasked_l", "unmasked Bernoulli"), ("ddpm_l", "Gaussian DDPM")):
        if tuning.get(key):
            lines += ["", f"## Sweep over L, {title}, tuning split", "", "| L | K | Dice@0.5 | oracle Dice | AUPRC | s / slice (batched) |", "|---|---|---|---|---|---|"]
            for row in tuning[key]:
                lines.append(
                    f"| {row['L']} | {row['K']} | {_fmt(row['dice_fixed'])} | {_fmt(row['dice_oracle'])} | {_fmt(row['auprc'])} "
                    f"| {_fmt(row['wall_seconds_per_slice'], 3)} |"
                )
    lines += ["", "## Settings", "", "```json", json.dumps(s, indent=1, default=str), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main


def _as_tuple(x: Any) -> tuple:
    if isinstance(x, str):
        return tuple(v.strip() for v in x.split(",") if v.strip())
    if isinstance(x, (int, float)):
        return (x,)
    return tuple(x)


class BenchmarkResults(dict):
    """The benchmark's results (a dict); its string form is one line, so the command line does not print it all."""

    def __str__(self) -> str:
        return "benchmark results: see results.json and benchmarks.md in the output folder"

    __repr__ = __str__


def benchmark(
    train_dir: str | None = None,
    test_dir: str | None = None,
    out: str = "outputs/benchmark",
    methods: Sequence[str] | str | None = None,
    size: int = 128,
    seed: int = 0,
    lesion_seed: int = 0,
    tune_fraction: float = 0.4,
    ae_preset: str = "small",
    ae_iterations: int = 600,
    ae_batch_size: int = 16,
    ae_lr: float = 1e-3,
    denoiser_preset: str = "small",
    denoiser_channels: Sequence[int] | None = (32, 64, 64),
    ddpm_channels: Sequence[int] = (16, 32, 64, 64),
    diffusion_iterations: int = 600,
    diffusion_batch_size: int = 16,
    diffusion_lr: float = 5e-4,
    budget_tflop: float | None = None,
    ae_share: float = 0.5,
    train_max_timestep: int | str | None = "auto",
    ema_momentum: float = 0.001,
    precision: str = "auto",
    compile: bool = False,
    max_train_seconds: float | None = None,
    num_train_timesteps: int = 1000,
    noise_levels: Sequence[int] = (50, 100, 200, 300),
    prob_thresholds: Sequence[float] = (0.2, 0.35, 0.5, 0.6, 0.8),
    ddpm_noise_levels: Sequence[int] = (100, 200, 300),
    tune_steps: int = 10,
    k_values: Sequence[int] = (5, 10, 25, 50, 100),
    k_tolerance: float = 0.01,
    ddpm_steps: int = 10,
    ddpm_eta: float = 0.0,
    timing_slices: int = 5,
    eval_batch_size: int = 8,
    min_component: int = 15,
    device: str | None = None,
    threads: int | None = None,
    limit_train: int | None = None,
) -> dict[str, Any]:
    """
    Train (or reuse) and evaluate every method on the same data; write ``out/results.json`` and ``out/benchmarks.md``.

    Args:
        train_dir: folder of healthy 2D training images; default: the IXI ``train/`` folder.
        test_dir: folder with ``images/``, ``labels/`` (and optional ``healthy/``); default: a lesion set generated
            with ``make_lesions(seed=lesion_seed)`` from the IXI ``val/`` folder into ``out/lesion_set``.
        out: output folder (checkpoints under ``out/checkpoints``).
        methods: subset of :class:`Method` names (default: all).
        size: image side after padding + resizing.
        seed: seed of training, of the tuning/test split and of the inference noise.
        lesion_seed: seed of the generated lesion set.
        tune_fraction: fraction of the lesion images used for tuning (the rest is the held-out test split).
        ae_preset: autoencoder preset (``berdiff.networks.Preset``).
        ae_iterations, ae_batch_size, ae_lr: autoencoder training budget.
        denoiser_preset: Bernoulli denoiser preset; ``denoiser_channels`` overrides its widths (None keeps them).
        ddpm_channels: widths of the image-space DDPM UNet (attention at the last level).
        diffusion_iterations, diffusion_batch_size, diffusion_lr: the budget of both diffusion models (the same).
        budget_tflop: equal compute per method, in training TFLOP (forward + backward FLOPs of one iteration counted
            with ``FlopCounterMode``, times the iterations); replaces the iteration counts. The Bernoulli methods
            spend ``ae_share`` of it on the autoencoder and the rest on the denoiser; the DDPM gets all of it.
        ae_share: fraction of ``budget_tflop`` for the autoencoder (the AE baseline is that autoencoder).
        train_max_timestep: diffusion training timesteps are drawn from ``[0, max)``: ``"auto"`` = the largest L
            of the method's sweep (inference never visits higher t), None = all T.
        ema_momentum: final momentum of the warm-up EMA whose weights are evaluated.
        precision: training precision (``berdiff.trainers.Precision``; bf16 autocast on CUDA by default).
        compile: ``torch.compile`` the networks for training.
        max_train_seconds: optional wall-clock cap per model (training stops early; the iterations done are reported).
        num_train_timesteps: T of both diffusion models.
        noise_levels, prob_thresholds: (L, P) grid of masked Bernoulli diffusion (L grid also for unmasked).
        ddpm_noise_levels: L grid of the DDPM.
        tune_steps: K used in the (L, P) and L sweeps (``min(K, L)``).
        k_values: K grid of the K sweep (values above L are dropped; K = L is the full, unstrided schedule).
        k_tolerance: the tuned K is the smallest K whose tuning Dice is within this of the best K's.
        ddpm_steps: K of the DDPM.
        ddpm_eta: DDIM eta of the DDPM (0 deterministic, 1 ancestral).
        timing_slices: single-slice runs per method for the time and memory figures (median).
        eval_batch_size: batch size of the evaluation runs.
        min_component: protocol A's component-size filter.
        device: torch device (default: CUDA if available, else CPU).
        threads: torch CPU threads (default: torch's choice).
        limit_train: use only the first N training images.

    Returns:
        the results dict (also written to ``out/results.json``).
    """
    import platform
    import sys

    all_methods = list(Method.__members__.values())
    methods = [str(m) for m in (_as_tuple(methods) if methods is not None else all_methods)]
    bad = [m for m in methods if m not in all_methods]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {all_methods}.")
    if not 0 < tune_fraction < 1:
        raise ValueError(f"tune_fraction must be in (0, 1), got {tune_fraction}.")
    noise_levels = [int(v) for v in _as_tuple(noise_levels)]
    prob_thresholds = [float(v) for v in _as_tuple(prob_thresholds)]
    ddpm_noise_levels = [int(v) for v in _as_tuple(ddpm_noise_levels)]
    k_values = [int(v) for v in _as_tuple(k_values)]
    for name, grid in (("noise_levels", noise_levels), ("ddpm_noise_levels", ddpm_noise_levels)):
        if not grid or any(not 1 <= v <= num_train_timesteps for v in grid):
            raise ValueError(f"{name} must be non-empty with values in [1, {num_train_timesteps}], got {grid}.")
    if not prob_thresholds or any(not 0 <= p <= 1 for p in prob_thresholds):
        raise ValueError(f"prob_thresholds must be non-empty with values in [0, 1], got {prob_thresholds}.")
    if budget_tflop is not None and not (float(budget_tflop) > 0 and 0 < ae_share < 1):
        raise ValueError(f"need budget_tflop > 0 and ae_share in (0, 1), got {budget_tflop}, {ae_share}.")
    if threads is not None:
        torch.set_num_threads(int(threads))
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ data
    train_path = Path(train_dir) if train_dir is not None else DEFAULT_DATA_DIR / "train"
    train_files = list_images(train_path)
    if limit_train is not None:
        train_files = train_files[: int(limit_train)]
    train_images, _ = load_folder(train_path, size, names=[stem(p) for p in train_files])
    if test_dir is None:
        from berdiff.data.lesions import make_lesions

        test_path = out_dir / "lesion_set"
        make_lesions(str(DEFAULT_DATA_DIR / "val"), str(test_path), seed=lesion_seed)
    else:
        test_path = Path(test_dir)
    pairs = _load_pairs(test_path, size)
    tune, test = _split(pairs, tune_fraction, seed)
    _log(f"{len(train_images)} training images; {len(tune['names'])} tuning / {len(test['names'])} test lesion images, "
         f"{len(tune['healthy'])} / {len(test['healthy'])} healthy")

    # ------------------------------------------------------------------ models
    listing = [str(p) for p in train_files]
    ckpt_dir = out_dir / "checkpoints"
    training: dict[str, dict[str, Any]] = {}
    ae = unet = ddpm = None
    b_sched = BernoulliScheduler(num_train_timesteps=num_train_timesteps)
    g_sched = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    # equal compute: the Bernoulli methods pay for the autoencoder and the denoiser, the DDPM gets the same total
    budget = None if budget_tflop is None else float(budget_tflop) * 1e12
    ae_budget = None if budget is None else ae_share * budget
    fit_kwargs = {"ema_momentum": ema_momentum, "precision": precision, "compile": compile, "max_seconds": max_train_seconds}
    images_t = torch.from_numpy(train_images[:, None])
    if {Method.AE, Method.MASKED, Method.UNMASKED} & set(methods):
        ae_settings = {"model": "ae", "preset": ae_preset, "size": size, "iterations": ae_iterations, "budget": ae_budget,
                       "batch_size": ae_batch_size, "lr": ae_lr, "seed": seed, "max_seconds": max_train_seconds,
                       "ema": ema_momentum}
        ae_key = cache_key(listing, ae_settings)
        ae = autoencoder_from_preset(ae_preset, in_channels=1).to(dev)
        info = _cached(
            ckpt_dir / f"ae_{ae_key}.pt", ae,
            lambda: _fit(ae, AutoencoderLoss(), {"image": images_t}, ae_batch_size, ae_lr, seed, dev, "autoencoder",
                         iterations=ae_iterations, budget_flops=ae_budget, aliases={"label": "image"}, **fit_kwargs),
            ae_settings,
        )
        training["autoencoder"] = {**info, "batch_size": ae_batch_size, "lr": ae_lr, "params": _n_params(ae), "key": ae_key}
    if {Method.MASKED, Method.UNMASKED} & set(methods):
        overrides: dict[str, Any] = {}
        if denoiser_channels is not None:
            ch = tuple(int(c) for c in _as_tuple(denoiser_channels))
            overrides = {"channels": ch, "num_head_channels": ch, "norm_num_groups": min(16, math.gcd(*ch))}
            if len(ch) != 3:
                overrides["attention_levels"] = tuple([False] * (len(ch) - 1) + [True])
        visited = list(noise_levels) + [L for L, _ in REFERENCE_SETTINGS if L <= num_train_timesteps]
        b_max_t = _max_timestep(train_max_timestep, visited, num_train_timesteps)
        un_budget = None if budget is None else budget - training["autoencoder"]["train_tflop"] * 1e12
        un_settings = {"model": "bernoulli_denoiser", "ae_key": ae_key, "preset": denoiser_preset, "overrides": overrides,
                       "T": num_train_timesteps, "max_timestep": b_max_t, "iterations": diffusion_iterations,
                       "budget": un_budget, "batch_size": diffusion_batch_size, "lr": diffusion_lr, "seed": seed,
                       "max_seconds": max_train_seconds, "ema": ema_momentum}
        un_key = cache_key(listing, un_settings)
        unet = denoiser_from_preset(denoiser_preset, latent_channels=ae.latent_channels, **overrides).to(dev)

        def train_unet() -> dict[str, Any]:
            from berdiff.training import encode_dataset

            codes = encode_dataset([{"image": x} for x in images_t], ae, dev, batch_size=64)
            return _fit(unet, nn.BCEWithLogitsLoss(), {"image": codes.float()}, diffusion_batch_size, diffusion_lr,
                        seed, dev, "bernoulli denoiser", iterations=diffusion_iterations, budget_flops=un_budget,
                        inferer=DiffusionInferer(b_sched), prepare_batch=BernoulliPrepareBatch(b_sched, max_timestep=b_max_t),
                        **fit_kwargs)

        info = _cached(ckpt_dir / f"bernoulli_{un_key}.pt", unet, train_unet, un_settings)
        training["bernoulli denoiser"] = {**info, "batch_size": diffusion_batch_size, "lr": diffusion_lr,
                                          "params": _n_params(unet), "key": un_key, "max_timestep": b_max_t,
                                          "baseline_loss": timestep_only_bce(b_sched, b_max_t),
                                          "baseline": "timestep-only flip predictor (closed form)"}
    if Method.DDPM in methods:
        ch = tuple(int(c) for c in _as_tuple(ddpm_channels))
        groups = min(16, math.gcd(*ch))
        g_max_t = _max_timestep(train_max_timestep, ddpm_noise_levels, num_train_timesteps)
        ddpm_settings = {"model": "ddpm", "channels": ch, "size": size, "T": num_train_timesteps, "max_timestep": g_max_t,
                         "iterations": diffusion_iterations, "budget": budget, "batch_size": diffusion_batch_size,
                         "lr": diffusion_lr, "seed": seed, "max_seconds": max_train_seconds, "ema": ema_momentum}
        dd_key = cache_key(listing, ddpm_settings)
        ddpm = DiffusionModelUNet(
            spatial_dims=2, in_channels=1, out_channels=1, channels=ch, attention_levels=tuple([False] * (len(ch) - 1) + [True]),
            num_res_blocks=1, num_head_channels=ch[-1], norm_num_groups=groups,
        ).to(dev)
        info = _cached(
            ckpt_dir / f"ddpm_{dd_key}.pt", ddpm,
            lambda: _fit(ddpm, nn.MSELoss(), {"image": images_t * 2.0 - 1.0}, diffusion_batch_size, diffusion_lr, seed,
                         dev, "gaussian ddpm", iterations=diffusion_iterations, budget_flops=budget,
                         inferer=DiffusionInferer(g_sched),
                         prepare_batch=DiffusionPrepareBatch(num_train_timesteps=g_max_t or num_train_timesteps),
                         **fit_kwargs),
            ddpm_settings,
        )
        training["gaussian ddpm"] = {**info, "batch_size": diffusion_batch_size, "lr": diffusion_lr,
                                     "params": _n_params(ddpm), "key": dd_key, "max_timestep": g_max_t,
                                     "baseline_loss": 1.0, "baseline": "zero-noise predictor (E[eps^2] = 1)"}

    # ------------------------------------------------------------------ run functions
    def ae_fn() -> RunFn:
        inf = AutoencoderReconstructionInferer()
        return lambda x, idx: inf(x, ae)

    def bern_fn(L: int, P: float, K: int, masked: bool, reference: str = "input") -> RunFn:
        inf = MaskedBernoulliInferer(b_sched, noise_level=L, prob_threshold=P, num_inference_steps=min(K, L), masked=masked,
                                     anomaly_reference=reference)
        return lambda x, idx: inf(x, ae, unet, _generators(idx, seed, dev))

    def ddpm_fn(L: int, K: int) -> RunFn:
        inf = GaussianPartialNoisingInferer(g_sched, noise_level=L, num_inference_steps=min(K, L), eta=ddpm_eta)

        def run(x: torch.Tensor, idx: Sequence[int]) -> dict[str, torch.Tensor]:
            outs = [inf(x[i : i + 1], ddpm, _generators([j], seed, dev)[0]) for i, j in enumerate(idx)]
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

        return run

    def tune_eval(fn: RunFn) -> dict[str, Any]:
        return _evaluate(fn, tune, eval_batch_size, dev, min_component)

    # ------------------------------------------------------------------ tuning (tuning split only)
    tuning: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    if Method.AE in methods:
        chosen[Method.AE] = {"fn": ae_fn(), "settings": {}, "text": "-", "tune": tune_eval(ae_fn())}
    if Method.MASKED in methods:
        rows, best = [], None
        pairs_lp = [(L, P) for L in noise_levels for P in prob_thresholds]
        for ref in REFERENCE_SETTINGS:
            if ref not in pairs_lp and ref[0] <= num_train_timesteps:
                pairs_lp.append(ref)
        for L, P in pairs_lp:
            r = tune_eval(bern_fn(L, P, tune_steps, True))
            r.update({"L": L, "P": P, "K": min(tune_steps, L)})
            rows.append(r)
            _log(f"masked L={L} P={P}: tune Dice {r['dice_fixed']:.3f} AUPRC {r['auprc']:.3f} mask {r['mask_fraction']:.4f}")
            if _better(r, best):
                best = r
        tuning["masked_lp"] = rows
        L, P = best["L"], best["P"]
        k_rows = []
        for K in sorted({k for k in k_values if k <= L} | {best["K"]}):
            r = best if K == best["K"] else tune_eval(bern_fn(L, P, K, True))
            r = {**r, "K": K}
            k_rows.append(r)
            _log(f"masked L={L} P={P} K={K}: tune Dice {r['dice_fixed']:.3f} ({r['wall_seconds_per_slice']:.3f} s/slice)")
        tuning["masked_k"] = k_rows
        top = max(np.nan_to_num(r["dice_fixed"], nan=-1.0) for r in k_rows)
        k_best = next(r for r in k_rows if np.nan_to_num(r["dice_fixed"], nan=-1.0) >= top - k_tolerance)
        K = k_best["K"]
        # the anomaly map against the input (the paper) or against the AE's reconstruction of the input code
        ref_rows = {"input": k_best}
        ref_rows["autoencoder"] = {**tune_eval(bern_fn(L, P, K, True, "autoencoder")), "L": L, "P": P, "K": K}
        tuning["masked_reference"] = [{**r, "reference": name} for name, r in ref_rows.items()]
        ref = "autoencoder" if _better(ref_rows["autoencoder"], k_best) else "input"
        _log(f"masked L={L} P={P} K={K}: anomaly map against the {ref} (tuning Dice "
             f"{ref_rows['input']['dice_fixed']:.3f} input, {ref_rows['autoencoder']['dice_fixed']:.3f} autoencoder)")
        chosen[Method.MASKED] = {"fn": bern_fn(L, P, K, True, ref), "settings": {"L": L, "P": P, "K": K, "reference": ref},
                                 "text": f"L={L}, P={P}, K={K}, map vs {ref}", "tune": ref_rows[ref]}
    if Method.UNMASKED in methods:
        rows, best = [], None
        for L in noise_levels:
            r = tune_eval(bern_fn(L, 0.5, tune_steps, False))
            r.update({"L": L, "K": min(tune_steps, L)})
            rows.append(r)
            _log(f"unmasked L={L}: tune Dice {r['dice_fixed']:.3f} AUPRC {r['auprc']:.3f}")
            if _better(r, best):
                best = r
        tuning["unmasked_l"] = rows
        chosen[Method.UNMASKED] = {"fn": bern_fn(best["L"], 0.5, best["K"], False), "settings": {"L": best["L"], "K": best["K"]},
                                   "text": f"L={best['L']}, K={best['K']}", "tune": best}
    if Method.DDPM in methods:
        rows, best = [], None
        for L in ddpm_noise_levels:
            r = tune_eval(ddpm_fn(L, ddpm_steps))
            r.update({"L": L, "K": min(ddpm_steps, L)})
            rows.append(r)
            _log(f"ddpm L={L}: tune Dice {r['dice_fixed']:.3f} AUPRC {r['auprc']:.3f}")
            if _better(r, best):
                best = r
        tuning["ddpm_l"] = rows
        chosen[Method.DDPM] = {"fn": ddpm_fn(best["L"], best["K"]), "settings": {"L": best["L"], "K": best["K"], "eta": ddpm_eta},
                               "text": f"L={best['L']}, K={best['K']}, eta={ddpm_eta}", "tune": best}

    # ------------------------------------------------------------------ held-out test split
    results_methods: dict[str, Any] = {}
    for m in [m for m in all_methods if m in chosen]:
        c = chosen[m]
        grid = np.nan_to_num(np.asarray(c["tune"]["dice_grid"], dtype=float), nan=-1.0)
        t_idx = int(np.argmax(grid))
        r = _evaluate(c["fn"], test, eval_batch_size, dev, min_component, healthy=True)
        r["dice_tuned"] = r["dice_grid"][t_idx] if r["dice_grid"] else float("nan")
        r["dice_tuned_per_slice"] = [float(row[t_idx]) for row in r.pop("dice_grid_per_slice")]
        r["by_family"] = {
            fam: {
                "n": sum(f == fam for f in test["families"]),
                "dice_fixed": _nanmean([d for d, f in zip(r["dice_per_slice"], test["families"]) if f == fam]),
                "auprc": _nanmean([a for a, f in zip(r["auprc_per_slice"], test["families"]) if f == fam]),
            }
            for fam in sorted(set(test["families"]))
        }
        _log(f"{m}: test Dice@0.5 {r['dice_fixed']:.3f}, Dice@t* {r['dice_tuned']:.3f}, AUPRC {r['auprc']:.3f}")
        params = {Method.AE: lambda: _n_params(ae), Method.DDPM: lambda: _n_params(ddpm)}.get(m, lambda: _n_params(ae, unet))()
        parts = {Method.AE: ["autoencoder"], Method.DDPM: ["gaussian ddpm"]}.get(m, ["autoencoder", "bernoulli denoiser"])
        train_s = sum(training[p]["train_seconds"] for p in parts)
        train_tflop = sum(training[p].get("train_tflop", float("nan")) for p in parts)
        results_methods[m] = {"settings": c["settings"], "settings_text": c["text"], "threshold": float(THRESHOLD_GRID[t_idx]),
                              "test": r, "params": params, "train_seconds": train_s, "train_tflop": train_tflop,
                              "tune": {k: v for k, v in c["tune"].items() if k != "dice_grid"}}
    # paired bootstrap over the held-out lesion slices: masked minus each baseline
    if Method.MASKED in results_methods:
        ours = results_methods[Method.MASKED]["test"]
        for m, r in results_methods.items():
            if m == Method.MASKED:
                continue
            r["vs_masked"] = {
                metric: paired_bootstrap_ci(ours[key], r["test"][key], seed=seed)
                for metric, key in (("dice_fixed", "dice_per_slice"), ("dice_tuned", "dice_tuned_per_slice"),
                                    ("auprc", "auprc_per_slice"))
            }
    # timing: all methods back to back on the same slices
    timing_images = np.concatenate([test["images"], test["healthy"]])[: max(1, timing_slices)]
    for m in results_methods:
        results_methods[m]["timing"] = _time(chosen[m]["fn"], timing_images, timing_slices, dev)
        _log(f"{m}: {results_methods[m]['timing']['seconds_per_slice']:.3f} s/slice")
    masked_t = results_methods.get(Method.MASKED, {}).get("timing", {}).get("seconds_per_slice")
    for m, r in results_methods.items():
        r["speed_ratio_to_masked"] = r["timing"]["seconds_per_slice"] / masked_t if masked_t else None

    settings = {
        "size": size, "seed": seed, "lesion_seed": lesion_seed, "tune_fraction": tune_fraction, "ae_preset": ae_preset,
        "ae_iterations": ae_iterations, "ae_batch_size": ae_batch_size, "ae_lr": ae_lr, "denoiser_preset": denoiser_preset,
        "denoiser_channels": denoiser_channels, "ddpm_channels": ddpm_channels, "diffusion_iterations": diffusion_iterations,
        "diffusion_batch_size": diffusion_batch_size, "diffusion_lr": diffusion_lr, "max_train_seconds": max_train_seconds,
        "budget_tflop": budget_tflop, "ae_share": ae_share, "train_max_timestep": train_max_timestep,
        "ema_momentum": ema_momentum, "precision": precision, "compile": compile,
        "num_train_timesteps": num_train_timesteps, "noise_levels": noise_levels, "prob_thresholds": prob_thresholds,
        "ddpm_noise_levels": ddpm_noise_levels, "tune_steps": tune_steps, "k_values": k_values, "k_tolerance": k_tolerance,
        "ddpm_steps": ddpm_steps, "ddpm_eta": ddpm_eta, "timing_slices": timing_slices, "eval_batch_size": eval_batch_size,
        "min_component": min_component, "device": str(dev), "threads": torch.get_num_threads(), "methods": methods,
    }
    results = {
        "command": "python -m berdiff benchmark " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "benchmark"
        else f"berdiff.benchmark.benchmark(...) from {Path(sys.argv[0]).name}",
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
                   + f", torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": {"train_dir": str(train_path), "test_dir": str(test_path), "n_train": len(train_images),
                 "n_tune": len(tune["names"]), "n_test": len(test["names"]), "n_tune_healthy": len(tune["healthy"]),
                 "n_test_healthy": len(test["healthy"]), "tune_names": tune["names"], "test_names": test["names"]},
        "settings": settings,
        "training": training,
        "tuning": {k: [{kk: vv for kk, vv in row.items() if kk != "dice_grid"} for row in v] for k, v in tuning.items()},
        "methods": results_methods,
    }
    results = json.loads(json.dumps(results, default=_json_default))
    md = render_markdown(results)
    for name, text in (("results.json", json.dumps(results, indent=1)), ("benchmarks.md", md)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    _log(f"wrote {out_dir / 'benchmarks.md'} and {out_dir / 'results.json'}")
    return BenchmarkResults(results)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)
