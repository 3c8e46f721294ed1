# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Side-by-side speed of the anomaly inference (``python -m berdiff speed``), in one process, on one device:

* **ours**: ``AnomalyPipeline`` at the bundle's shipped defaults (L = 200, K = 10 strided steps, batches of head
  slices sized like ``sw_batch_size="auto"`` of :class:`berdiff.scale.HeadSliceInferer`, bf16 autocast on CUDA);
* **reference algorithm**: the same networks with K = L (one denoising step per noise step) and one slice at a time,
  as the public reference implementation runs it;
* **Gaussian DDPM**: an image-space DDPM (:class:`berdiff.apps.benchmark.baselines.GaussianPartialNoisingInferer`) whose UNet has
  the denoiser preset's widths on the 4-channel image instead of the binary code (about the same parameter count),
  at the same L, K and batch as ours.

Random weights (speed does not depend on them), random slices in [0, 1] (every slice counts as a head slice). Per
slice: wall time of a batch / its slices, after one warm-up batch; per volume: per slice x ``volume_slices`` (a
BraTS volume has 155 axial slices; its head slices are fewer, so this is an upper bound). Peak memory: tensor memory
above the weights during one batch (CUDA allocator peak; on CPU the ``torch.profiler`` allocation trace, measured in
a separate run with K = 1 since the peak does not depend on K), see :class:`berdiff.apps.benchmark.timing.PeakMemory`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from berdiff.apps.benchmark.baselines import GaussianPartialNoisingInferer
from berdiff.apps.benchmark.timing import PeakMemory
from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
from berdiff.networks.presets import DENOISER_PRESETS, Preset
from berdiff.scale import HeadSliceInferer, is_out_of_memory
from berdiff.utils import atomic_write_json

__all__ = ["speed", "SpeedResults", "render_speed_table"]

#: axial slices of a BraTS volume
BRATS_SLICES = 155


class SpeedResults(dict):
    """The result of :func:`speed`; printed as a Markdown table."""

    def __str__(self) -> str:
        return render_speed_table(self)

    __repr__ = __str__


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_batches(
    fn: Callable[[torch.Tensor], Any], images: torch.Tensor, batch: int, device: torch.device, warmup: Callable | None = None
) -> float:
    """Seconds per slice: one warm-up batch (``warmup`` or ``fn``), then every slice of ``images`` in batches."""
    with torch.inference_mode():
        (warmup or fn)(images[:batch])
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, images.shape[0], batch):
            fn(images[start : start + batch])
        _sync(device)
    return (time.perf_counter() - t0) / images.shape[0]


def _peak(fn: Callable[[torch.Tensor], Any], images: torch.Tensor, device: torch.device) -> float:
    with torch.inference_mode(), PeakMemory(device) as peak:
        fn(images)
    return round(peak.peak_mib, 3)


def _autocast(device: torch.device, amp: bool) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else torch.autocast("cpu", enabled=False)


def speed(
    preset: str = Preset.SMALL,
    device: str | None = None,
    spatial_size: int = 256,
    num_slices: int | None = None,
    volume_slices: int = BRATS_SLICES,
    noise_level: int = 200,
    num_inference_steps: int = 10,
    reference_slices: int = 1,
    amp: bool | None = None,
    methods: tuple[str, ...] | list[str] | str = ("ours", "reference", "ddpm"),
    seed: int = 0,
    out: str | None = None,
) -> SpeedResults:
    """
    Times ours (shipped defaults), the reference algorithm (K = L, batch 1) and an image-space Gaussian DDPM of
    similar size on the same device, per slice and per volume, with peak memory. See the module docstring.

    Args:
        preset: network sizes (``reference``, ``small``, ``tiny``).
        device: ``cpu``, ``cuda``, ``cuda:1``...; CUDA when available by default.
        spatial_size: in-plane size of the 4-channel slices.
        num_slices: slices timed for ours and the DDPM (default: a whole volume, ``volume_slices``, on CUDA; 16 on
            CPU).
        volume_slices: slices per volume for the per-volume column.
        noise_level: L.
        num_inference_steps: K of ours and of the DDPM.
        reference_slices: slices timed for the reference algorithm (K = L steps each).
        amp: bf16 autocast (default: on CUDA only, like the bundle).
        methods: any of ``ours``, ``reference``, ``ddpm``.
        seed: seed of the weights and slices.
        out: optional JSON file for the results.

    Returns:
        a :class:`SpeedResults` (``rows`` and the settings); ``print`` shows the Markdown table.
    """
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available.")
    amp = dev.type == "cuda" if amp is None else bool(amp)
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = sorted(set(methods) - {"ours", "reference", "ddpm"})
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from ours, reference, ddpm.")
    if num_slices is None:
        num_slices = volume_slices if dev.type == "cuda" else 16
    if int(num_slices) < 1 or int(reference_slices) < 1 or int(volume_slices) < 1:
        raise ValueError("num_slices, reference_slices and volume_slices must be >= 1.")
    torch.manual_seed(seed)
    size = (4, int(spatial_size), int(spatial_size))
    images = torch.rand(int(num_slices), *size, device=dev)
    batch = HeadSliceInferer(sw_batch_size="auto", amp=amp).batch_size_for(images.shape[0], size, dev)
    rows: list[dict[str, Any]] = []

    def pipeline(k: int) -> AnomalyPipeline:
        torch.manual_seed(seed)
        return AnomalyPipeline(
            autoencoder_from_preset(preset, in_channels=4), denoiser_from_preset(preset),
            noise_level=noise_level, num_inference_steps=k, seed=seed,
        ).to(dev).eval()

    def row(method: str, params: int, k: int, b: int, fn: Callable, peak: Callable, timed: torch.Tensor, warmup: Callable) -> None:
        """Times ``fn`` in batches of ``b`` (halved after an out-of-memory error), then its peak memory."""
        while True:
            try:
                per_slice = _time_batches(fn, timed, b, dev, warmup)
                peak_mib = _peak(peak, timed[:b], dev)
                break
            except Exception as e:
                if not (is_out_of_memory(e) and b > 1):
                    raise
                b //= 2
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append({
            "method": method, "params": params, "noise_level": noise_level, "num_inference_steps": k, "batch": b,
            "slices_timed": int(timed.shape[0]), "s_per_slice": round(per_slice, 4),
            "s_per_volume": round(per_slice * volume_slices, 2), "peak_mib": peak_mib, "amp_bf16": amp,
        })

    def runner(net: nn.Module) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            with _autocast(dev, amp):
                return net.run(x) if isinstance(net, AnomalyPipeline) else net(x)

        return run

    # on CPU the profiler's peak is taken from a K = 1 run (the peak does not depend on K; the trace is slow)
    if "ours" in methods:
        net, net_k1 = pipeline(num_inference_steps), pipeline(1)
        ours = runner(net)
        row("ours (shipped defaults)", _n_params(net), num_inference_steps, batch, ours,
            ours if dev.type == "cuda" else runner(net_k1), images, ours)
    if "reference" in methods:
        net, net_k1 = pipeline(noise_level), pipeline(1)
        n_ref = int(reference_slices)
        ref_images = images[:n_ref] if n_ref <= images.shape[0] else torch.rand(n_ref, *size, device=dev)
        row("reference algorithm (K = L, batch 1)", _n_params(net), noise_level, 1, runner(net),
            runner(net if dev.type == "cuda" else net_k1), ref_images, runner(net_k1))
    if "ddpm" in methods:
        torch.manual_seed(seed)
        unet = DiffusionModelUNet(spatial_dims=2, in_channels=4, out_channels=4, **DENOISER_PRESETS[preset]).to(dev).eval()
        scheduler = DDPMScheduler(num_train_timesteps=1000)

        def ddpm(k: int) -> Callable[[torch.Tensor], Any]:
            inferer = GaussianPartialNoisingInferer(scheduler, noise_level=noise_level, num_inference_steps=k)

            def run(x: torch.Tensor) -> Any:
                with _autocast(dev, amp):
                    return inferer(x, unet)

            return run

        row("Gaussian DDPM (image space)", _n_params(unet), num_inference_steps, batch, ddpm(num_inference_steps),
            ddpm(num_inference_steps if dev.type == "cuda" else 1), images, ddpm(num_inference_steps))
    results = SpeedResults(
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        torch_threads=torch.get_num_threads(),
        preset=str(preset),
        spatial_size=int(spatial_size),
        volume_slices=int(volume_slices),
        versions={"python": platform.python_version(), "torch": torch.__version__},
        rows=rows,
    )
    if out:
        atomic_write_json(dict(results), os.fspath(out))
    return results


def render_speed_table(results: dict[str, Any]) -> str:
    """
    A Markdown table of :func:`speed`'s results.

    Args:
        results: the results of :func:`speed`.
    """
    head = (
        f"device: {results['device']} ({results['device_name']}, {results['torch_threads']} threads), preset "
        f"{results['preset']}, slices 4x{results['spatial_size']}x{results['spatial_size']}, per volume = per slice x "
        f"{results['volume_slices']}\n\n"
        "| method | parameters | L | K | batch | slices timed | s / slice | s / volume | peak MiB | bf16 |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {r['params'] / 1e6:.2f} M | {r['noise_level']} | {r['num_inference_steps']} | {r['batch']} | "
        f"{r['slices_timed']} | {r['s_per_slice']:.4f} | {r['s_per_volume']:.1f} | {r['peak_mib']} | {r['amp_bf16']} |"
        for r in results["rows"]
    ]
    return head + "\n".join(lines)

