# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
One scripted run that measures training, inference and quality on one GPU (``python -m berdiff gpu_report``, started
by ``scripts/gpu_report.sh``; docs/benchmarks.md, "GPU run"). Four parts, each a list of subprocess steps with its own
time limit, run in this order:

* ``train_speed``: ``python -m berdiff train_speed`` for both stages, legacy and fast path side by side; one run for
  the ``small`` preset at the benchmark's shape and one for the ``reference`` preset at the brain bundle's shape;
* ``inference``: the brain bundle's ``configs/inference.yaml`` with random weights of the ``reference`` preset on
  BraTS-size volumes (made here from the BraTS sample: resampled in-plane and padded to 240 x 240 x 155 at 1 mm), read
  from its ``run_summary.json``;
* ``benchmark``: ``make_lesions`` on the IXI validation slices, then the equal-compute ``benchmark``; the budget in
  TFLOP per method is the largest of a ladder that the training rates of ``train_speed`` predict to fit;
* ``brats``: ``prepare_brats`` of the BraTS sample with 4 fixed validation subjects, both training stages of the
  brain bundle (epochs from the ``reference`` rates of ``train_speed``), inference on the validation subjects and
  ``evaluate``. Only the preset, device, epochs and paths are set: everything else is the bundle's default.

A step that fails or runs past its limit (its whole process group is stopped) is recorded with the tail of its log;
the other steps and parts still run. ``OUT/gpu_report.json`` and ``OUT/gpu_report.md`` are rewritten after every
part, logs go to ``OUT/logs/<part>/<step>.log``; large outputs (checkpoints, maps) stay in a scratch folder.

``dry_run=True`` runs the same steps with the same commands on the CPU with tiny sizes (``tiny`` presets, a few
iterations) on tiny synthetic data made on the fly, in a few minutes at most: a check of the script, not a measurement.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from berdiff.utils import MODALITIES, atomic_write, atomic_write_json

__all__ = [
    "PARTS",
    "BRATS_VAL_SUBJECTS",
    "ReportPlan",
    "REAL_PLAN",
    "DRY_PLAN",
    "StepError",
    "pick_budget",
    "pick_epochs",
    "make_brats_size_volumes",
    "write_synthetic_brats",
    "write_synthetic_slices",
    "render_markdown",
    "gpu_report",
]

#: the parts, in the order they run
PARTS: tuple[str, ...] = ("train_speed", "inference", "benchmark", "brats")

#: validation subjects of the BraTS sample (the rest train); the dry run's synthetic subjects carry the same names
BRATS_VAL_SUBJECTS: tuple[str, ...] = ("Brats18_2013_3_1", "Brats18_CBICA_AQN_1", "Brats18_TCIA02_370_1",
                                       "Brats18_TCIA10_639_1")

_BUNDLE = Path("bundles") / "brats_mri_bernoulli_anomaly"


@dataclasses.dataclass(frozen=True)
class ReportPlan:
    """
    Sizes and time limits of one report run. :data:`REAL_PLAN` is for one GPU and 9 minutes; :data:`DRY_PLAN` is the
    CPU check. The commands are built from these values only, so both plans run the same commands.

    Attributes:
        device: torch device of every step.
        threads: CPU threads of the ``train_speed`` and ``benchmark`` steps.
        total_s: the whole report's limit; a part's limit is cut to what is left of it.
        part_s: each part's limit (seconds).
        speed_runs: ``train_speed`` runs: ``role`` (``small``: the benchmark's rates, ``reference``: the bundle's;
            comma-separated when one run serves both) and its flags.
        volumes, volume_shape, volume_workers: part ``inference``: how many BraTS-size volumes of which shape, made
            by how many threads.
        inference_preset, inference_workers: the preset of the random weights and the bundle's ``num_workers``.
        inference_args: extra inference flags (the dry run's small grid).
        bench_size, bench_args: the benchmark's image size and fixed flags.
        bench_ladder: budgets (TFLOP per method) to choose from; ``bench_fallback`` without rates.
        bench_train_s: predicted training seconds the chosen budget must fit (all three models together).
        bench_max_train_s: the benchmark's ``--max_train_seconds`` (a cap per model, a safety net).
        bench_efficiency: share of ``train_speed``'s fast rate the benchmark is expected to reach.
        brats_preset, prepare_args: the brats part's preset and extra ``prepare_brats`` flags.
        stage_train_s: training seconds per stage that the epoch count aims at.
        brats_reserve_s: seconds of the brats part kept for what is not training (start-ups, inference, evaluation):
            the stages get less than ``stage_train_s`` when the part has less than twice that plus this left.
        stage_efficiency: share of ``train_speed``'s fast rate a bundle epoch is expected to reach (augmentation,
            smaller batches).
        epoch_overhead_s: seconds per epoch besides its iterations (validation, checkpoints).
        max_epochs_cap, fallback_epochs: epoch bounds; the fallback without rates.
    """

    device: str
    threads: int
    total_s: float
    part_s: Mapping[str, float]
    speed_runs: tuple[Mapping[str, Any], ...]
    volumes: int
    volume_shape: tuple[int, int, int]
    volume_workers: int
    inference_preset: str
    inference_workers: int
    inference_args: tuple[str, ...]
    bench_size: int
    bench_args: tuple[str, ...]
    bench_ladder: tuple[float, ...]
    bench_fallback: float
    bench_train_s: float
    bench_max_train_s: float
    bench_efficiency: float
    brats_preset: str
    prepare_args: tuple[str, ...]
    stage_train_s: float
    brats_reserve_s: float
    stage_efficiency: float
    epoch_overhead_s: float
    max_epochs_cap: int
    fallback_epochs: int


REAL_PLAN = ReportPlan(
    device="cuda",
    threads=8,
    total_s=535.0,
    part_s={"train_speed": 95.0, "inference": 85.0, "benchmark": 155.0, "brats": 195.0},
    speed_runs=(
        {"role": "small", "presets": "small", "size": 128, "channels": 1, "batch_size": 128, "warmup": 3,
         "iterations": 20, "repeats": 2, "num_workers": 2},
        {"role": "reference", "presets": "reference", "size": 256, "channels": 4, "batch_size": 32, "warmup": 3,
         "iterations": 10, "repeats": 2, "num_workers": 2},
    ),
    volumes=12,
    volume_shape=(240, 240, 155),
    volume_workers=8,
    inference_preset="reference",
    inference_workers=8,
    inference_args=(),
    bench_size=128,
    bench_args=(
        "--ae_share", "0.5", "--ae_batch_size", "128", "--diffusion_batch_size", "128", "--ae_lr", "1e-3",
        "--diffusion_lr", "5e-4", "--prediction_type", "sample", "--noise_levels", "[100,200,300,400,500]",
        "--prob_thresholds", "[0.2,0.35,0.5]", "--ddpm_noise_levels", "[100,200,300]", "--k_values", "[5,10]",
        "--tune_steps", "10", "--eval_batch_size", "64",
    ),
    bench_ladder=(50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0),
    bench_fallback=200.0,
    bench_train_s=50.0,
    bench_max_train_s=30.0,
    bench_efficiency=0.6,
    brats_preset="reference",
    prepare_args=(),
    stage_train_s=35.0,
    brats_reserve_s=90.0,
    stage_efficiency=0.5,
    epoch_overhead_s=0.5,
    max_epochs_cap=400,
    fallback_epochs=20,
)

DRY_PLAN = ReportPlan(
    device="cpu",
    threads=1,
    total_s=900.0,
    part_s={"train_speed": 150.0, "inference": 150.0, "benchmark": 240.0, "brats": 360.0},
    speed_runs=(
        {"role": "small,reference", "presets": "tiny", "size": 32, "channels": 1, "batch_size": 4, "warmup": 1,
         "iterations": 1, "repeats": 1, "num_workers": 0},
    ),
    volumes=2,
    volume_shape=(40, 40, 12),
    volume_workers=2,
    inference_preset="tiny",
    inference_workers=0,
    inference_args=("--spatial_size", "32"),
    bench_size=32,
    bench_args=(
        "--ae_preset", "tiny", "--denoiser_preset", "tiny", "--denoiser_channels", "None", "--ddpm_channels", "[8,8]",
        "--ae_batch_size", "4", "--diffusion_batch_size", "4", "--noise_levels", "[100,200]", "--prob_thresholds",
        "[0.5]", "--ddpm_noise_levels", "[50]", "--k_values", "[1,3]", "--tune_steps", "2", "--ddpm_steps", "2",
        "--timing_slices", "2", "--eval_batch_size", "8",
    ),
    bench_ladder=(0.0002, 0.0005, 0.001),
    bench_fallback=0.0002,
    bench_train_s=5.0,
    bench_max_train_s=10.0,
    bench_efficiency=0.6,
    brats_preset="tiny",
    prepare_args=("--spatial_size", "32"),
    stage_train_s=1.0,
    brats_reserve_s=0.0,
    stage_efficiency=0.5,
    epoch_overhead_s=0.0,
    max_epochs_cap=1,
    fallback_epochs=1,
)


class StepError(RuntimeError):
    """A step that its part needs did not finish (failed or stopped at its time limit)."""


class _Stopped(BaseException):
    """The report itself was told to stop (SIGTERM, e.g. an outer ``timeout``)."""


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tail(path: Path, chars: int = 2500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group, SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _Part:
    """The steps of one part: each subprocess gets the part's remaining time and is recorded."""

    def __init__(self, name: str, deadline: float, log_dir: Path, record: dict[str, Any]) -> None:
        self.name, self.deadline, self.log_dir, self.record = name, deadline, log_dir, record
        self.steps: list[dict[str, Any]] = record.setdefault("steps", [])
        self.results: dict[str, Any] = record.setdefault("results", {})

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, step: str, cmd: Sequence[str], cwd: str | None = None, limit_s: float | None = None,
            required: bool = True) -> dict[str, Any]:
        """
        Run ``cmd`` with its output in ``<log_dir>/<step>.log``, for at most ``limit_s`` and the part's remaining time.

        Raises:
            StepError: when ``required`` and the step did not succeed.
        """
        limit = self.remaining() if limit_s is None else min(limit_s, self.remaining())
        log = self.log_dir / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        rec: dict[str, Any] = {"step": step, "cmd": shlex.join(cmd), "cwd": cwd, "limit_s": round(limit, 1),
                               "log": f"logs/{self.name}/{step}.log"}
        self.steps.append(rec)
        if limit < 2:
            rec.update(status="skipped", seconds=0.0, error="no time left in the part")
        else:
            start = time.monotonic()
            with open(log, "w") as f:
                f.write(f"$ {rec['cmd']}\n")
                f.flush()
                proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
                try:
                    rc = proc.wait(timeout=limit)
                    rec.update(status="ok" if rc == 0 else "failed", rc=rc)
                except subprocess.TimeoutExpired:
                    _stop_group(proc)
                    rec.update(status="timeout", rc=proc.returncode)
                except BaseException:
                    _stop_group(proc)
                    rec.update(status="stopped", rc=proc.returncode)
                    raise
                finally:
                    rec["seconds"] = round(time.monotonic() - start, 2)
            print(f"[gpu_report] {self.name}/{step}: {rec['status']} in {rec['seconds']:.1f} s", flush=True)
            if rec["status"] != "ok":
                rec["log_tail"] = _tail(log)
        if required and rec["status"] != "ok":
            raise StepError(f"step {step} {rec['status']}" + (f" (rc {rec.get('rc')})" if rec.get("rc") else ""))
        return rec


# ----------------------------------------------------------------------------------------------------- data


def write_synthetic_brats(root: str | os.PathLike, names: Sequence[str], shape: Sequence[int] = (24, 24, 100),
                          seed: int = 0) -> list[str]:
    """
    Tiny BraTS-layout subjects for the dry run: ``root/<name>/<name>_{t1,t1ce,t2,flair,seg}.nii.gz``, a noisy head
    box at 2 mm and a cubic tumour (label 2) over the middle third of the slices.

    Args:
        root: output folder.
        names: subject names.
        shape: volume shape (x, y, z).
        seed: random seed.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    x, y, z = (int(s) for s in shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name in names:
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for m in MODALITIES:
            vol = np.zeros((x, y, z), np.int16)
            vol[3:-3, 3:-3, :] = rng.integers(200, 400, (x - 6, y - 6, z), dtype=np.int16)
            vol[x // 2 - 3 : x // 2 + 3, y // 2 - 3 : y // 2 + 3, z // 3 : 2 * z // 3] += 300
            nib.save(nib.Nifti1Image(vol, affine), str(folder / f"{name}_{m}.nii.gz"))
        seg = np.zeros((x, y, z), np.uint8)
        seg[x // 2 - 3 : x // 2 + 3, y // 2 - 3 : y // 2 + 3, z // 3 : 2 * z // 3] = 2
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{name}_seg.nii.gz"))
    return list(names)


def write_synthetic_slices(root: str | os.PathLike, num_train: int = 12, num_val: int = 8,
                           size: Sequence[int] = (40, 36), seed: int = 0) -> None:
    """
    Tiny IXI-like folders for the dry run: ``root/train`` and ``root/val`` of 8-bit PNG heads (a bright ellipse with
    a darker inner ellipse and noise).

    Args:
        root: output folder.
        num_train, num_val: images per folder.
        size: image size (H, W).
        seed: random seed.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = (int(s) for s in size)
    yy, xx = np.mgrid[0:h, 0:w]
    for split, n in (("train", num_train), ("val", num_val)):
        (Path(root) / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            r = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2
            img = np.where(r < 1, 150.0, 0.0) + np.where(r < 0.3, -60.0, 0.0)
            img = np.clip(img + rng.normal(0, 10, (h, w)) * (r < 1), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(Path(root) / split / f"img_{split}_{i:03d}.png")


def _brats_size_volume(src_case: Path, dst_case: Path, shape: tuple[int, int, int]) -> None:
    import nibabel as nib
    from scipy import ndimage

    name = src_case.name
    dst_case.mkdir(parents=True, exist_ok=True)
    for m in MODALITIES:
        img = nib.load(str(src_case / f"{name}_{m}.nii.gz"))
        vol = np.asarray(img.dataobj, dtype=np.float32)
        zoom = (shape[0] / vol.shape[0], shape[1] / vol.shape[1], 1.0)
        vol = ndimage.zoom(vol, zoom, order=1)[: shape[0], : shape[1]]
        lo = max(0, (shape[2] - vol.shape[2]) // 2)
        out = np.zeros(shape, np.int16)
        depth = min(vol.shape[2], shape[2])
        out[: vol.shape[0], : vol.shape[1], lo : lo + depth] = np.rint(vol[..., :depth]).astype(np.int16)
        affine = img.affine.copy()
        affine[:3, 0] /= zoom[0]
        affine[:3, 1] /= zoom[1]
        affine[:3, 3] -= lo * affine[:3, 2]
        nib.save(nib.Nifti1Image(out, affine), str(dst_case / f"{dst_case.name}_{m}.nii.gz"))


def make_brats_size_volumes(src: str | os.PathLike, out: str | os.PathLike, num_volumes: int,
                            shape: Sequence[int] = (240, 240, 155), workers: int = 8) -> list[str]:
    """
    BraTS-size inference volumes from the subjects of ``src`` (BraTS layout): each modality resampled in-plane
    (linear) to ``shape[:2]`` and padded (or cut) along z to ``shape[2]``, the affine updated; subjects are reused
    in turn when ``num_volumes`` exceeds them. Writes ``out/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz``.

    Args:
        src: BraTS-layout folder.
        out: output folder.
        num_volumes: volumes to write.
        shape: output shape (x, y, z).
        workers: writer threads.

    Returns:
        the case names.

    Raises:
        ValueError: when ``src`` holds no complete subject.
    """
    cases = sorted(p for p in Path(src).iterdir()
                   if p.is_dir() and all((p / f"{p.name}_{m}.nii.gz").exists() for m in MODALITIES))
    if not cases:
        raise ValueError(f"no BraTS-layout subject (<case>/<case>_<modality>.nii.gz) in {src}.")
    shape3 = tuple(int(s) for s in shape)
    jobs = [(cases[i % len(cases)], Path(out) / f"vol{i:03d}") for i in range(int(num_volumes))]
    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        list(pool.map(lambda job: _brats_size_volume(job[0], job[1], shape3), jobs))
    return [dst.name for _, dst in jobs]


# --------------------------------------------------------------------------------------------------- sizing


def _speed_rates(speed: Mapping[str, Any] | None) -> dict[str, float]:
    """``{stage: fast samples/s}`` of one ``train_speed`` JSON (empty without it)."""
    rates: dict[str, float] = {}
    for row in (speed or {}).get("rows", []):
        v = row.get("fast")
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            rates[str(row.get("stage"))] = float(v)
    return rates


def _flops_per_sample(preset: str, size: int, channels: int = 1) -> dict[str, float]:
    """Training FLOPs (forward + backward) per sample of the autoencoder and the denoiser of ``preset``."""
    import torch
    import torch.nn.functional as F

    from berdiff.losses import AutoencoderLoss
    from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
    from berdiff.training import training_flops

    ae = autoencoder_from_preset(preset, in_channels=channels)
    x = torch.rand(1, channels, size, size)
    ae_flops = training_flops(lambda: AutoencoderLoss()(ae(x), x).mean())
    with torch.no_grad():
        z = ae.eval().encode_stage_2_inputs(x)
    unet = denoiser_from_preset(preset, latent_channels=ae.latent_channels)
    zt, t = (z > 0.5).float(), torch.tensor([10])
    unet_flops = training_flops(lambda: F.binary_cross_entropy_with_logits(unet(zt, t), zt))
    return {"autoencoder": float(ae_flops), "diffusion": float(unet_flops)}


def pick_budget(rates: Mapping[str, float], flops: Mapping[str, float], ladder: Sequence[float], train_s: float,
                efficiency: float, ae_share: float = 0.5) -> tuple[float | None, float | None]:
    """
    The largest budget of ``ladder`` (training TFLOP per method) whose predicted training time fits ``train_s``:
    the autoencoder and the Bernoulli denoiser share one budget (``ae_share``), the Gaussian DDPM gets a whole one
    and is assumed to reach the denoiser's FLOP rate.

    Args:
        rates: fast-path samples/s per stage (``autoencoder``, ``diffusion``).
        flops: training FLOPs per sample per stage.
        ladder: candidate budgets, TFLOP.
        train_s: seconds all three trainings together may take.
        efficiency: share of the measured rate expected in the benchmark.
        ae_share: the autoencoder's share of the Bernoulli budget.

    Returns:
        (budget or None when no rate is known or none fits, predicted seconds of that budget).
    """
    if not all(rates.get(k, 0) > 0 and flops.get(k, 0) > 0 for k in ("autoencoder", "diffusion")):
        return None, None
    ae_rate = rates["autoencoder"] * flops["autoencoder"] * efficiency
    un_rate = rates["diffusion"] * flops["diffusion"] * efficiency
    best: tuple[float | None, float | None] = (None, None)
    for b in sorted(ladder):
        seconds = b * 1e12 * (ae_share / ae_rate + (1 - ae_share) / un_rate + 1 / un_rate)
        if seconds <= train_s:
            best = (b, seconds)
    return best


def pick_epochs(rate: float | None, num_slices: int, train_s: float, efficiency: float, cap: int,
                fallback: int, epoch_overhead_s: float = 0.0) -> int:
    """
    Epochs of ``num_slices`` slices that ``train_s`` seconds buy at ``efficiency`` x ``rate`` samples/s plus
    ``epoch_overhead_s`` per epoch (validation, checkpoints), in [1, ``cap``]; ``fallback`` (capped) without a rate
    or slices.
    """
    if not rate or rate <= 0 or num_slices <= 0:
        return max(1, min(int(fallback), int(cap)))
    per_epoch = num_slices / (rate * efficiency) + max(0.0, epoch_overhead_s)
    return max(1, min(int(cap), int(train_s // per_epoch)))


# --------------------------------------------------------------------------------------------------- parts


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _copy(src: Path, dst: Path) -> None:
    if src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _berdiff(py: str, command: str, *args: str) -> list[str]:
    return [py, "-m", "berdiff", command, *args]


def _part_train_speed(p: _Part, plan: ReportPlan, py: str, out: Path, ctx: dict[str, Any]) -> None:
    runs = []
    for i, run in enumerate(plan.speed_runs):
        roles = str(run["role"]).split(",")
        role = roles[0]
        json_path = out / "train_speed" / f"{role}.json"
        flags = [f"--{k}={v}" for k, v in run.items() if k != "role"]
        cmd = _berdiff(py, "train_speed", "--device", plan.device, *flags, f"--threads={plan.threads}",
                       f"--out={json_path}")
        # each run gets its share of the part, the last one what is left
        share = p.remaining() / (len(plan.speed_runs) - i)
        rec = p.run(f"train_speed_{role}", cmd, limit_s=share, required=False)
        if rec["status"] == "ok" and json_path.exists():
            result = _read_json(json_path)
        else:  # stopped or failed: the rows it printed (one JSON line per stage and preset) before that
            rows = _printed_rows(p.log_dir / f"{rec['step']}.log")
            result = {**{k: v for k, v in run.items() if k != "role"}, "rows": rows, "partial": True}
        if result.get("rows"):
            ctx.update({f"speed_{r}": result for r in roles})
        runs.append({"role": run["role"], "status": rec["status"],
                     **{k: result.get(k) for k in ("device", "batch_size", "size", "channels", "iterations", "repeats",
                                                   "torch", "partial")},
                     "rows": [{k: v for k, v in r.items() if k != "runs"} for r in result.get("rows", [])]})
    p.results["runs"] = runs
    failed = [r["role"] for r in runs if r["status"] != "ok"]
    if failed:
        raise StepError(f"train_speed runs {failed} did not finish (rows printed before the stop are kept)")


def _printed_rows(log: Path) -> list[dict[str, Any]]:
    """The result rows ``train_speed`` printed to ``log`` (one JSON object per line)."""
    rows = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return rows
    for line in lines:
        if line.startswith('{"stage"'):
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _part_inference(p: _Part, plan: ReportPlan, py: str, out: Path, ctx: dict[str, Any]) -> None:
    work = ctx["work"] / "inference"
    vol_dir, maps = work / "volumes", work / "maps"
    start = time.monotonic()
    cases = make_brats_size_volumes(ctx["brats_src"], vol_dir, plan.volumes, plan.volume_shape, plan.volume_workers)
    p.results.update(volumes=len(cases), shape=list(plan.volume_shape), preset=plan.inference_preset,
                     data_seconds=round(time.monotonic() - start, 1))
    cmd = [py, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
           "--dataset_dir", str(vol_dir), "--output_dir", str(maps), "--preset", plan.inference_preset,
           "--device", plan.device, "--allow_random_weights", "True", "--ckpt_path", str(work / "none.pt"),
           "--num_workers", str(plan.inference_workers), *plan.inference_args]
    rec = p.run("bundle_inference", cmd, cwd=str(ctx["bundle"]), required=plan.inference_workers == 0)
    if rec["status"] == "failed":  # e.g. too little shared memory for loader workers: once more without them
        shutil.rmtree(maps, ignore_errors=True)
        cmd[cmd.index("--num_workers") + 1] = "0"
        rec = p.run("bundle_inference_no_workers", cmd, cwd=str(ctx["bundle"]))
        p.results["num_workers"] = 0
    elif rec["status"] != "ok":
        raise StepError(f"step bundle_inference {rec['status']}")
    summary = _read_json(maps / "run_summary.json")
    _copy(maps / "run_summary.json", out / "inference" / "run_summary.json")
    keep = ("status", "wall_time_s", "num_cases", "num_slices", "slices_per_s", "cases_per_s", "time_split_s",
            "device_name", "peak_memory_mb", "memory_kind")
    p.results.update({k: summary.get(k) for k in keep})
    p.results["settings"] = summary.get("settings")
    per_case = [c.get("wall_time_s") for c in summary.get("cases", []) if c.get("wall_time_s") is not None]
    if per_case:
        p.results["median_case_wall_s"] = float(np.median(per_case))
    p.results["command_seconds"] = rec["seconds"]
    p.results["volumes_per_s_with_startup"] = len(cases) / rec["seconds"] if rec["seconds"] else None


def _part_benchmark(p: _Part, plan: ReportPlan, py: str, out: Path, ctx: dict[str, Any]) -> None:
    work = ctx["work"] / "benchmark"
    ixi = ctx["ixi_src"]
    for split in ("train", "val"):
        if not (ixi / split).is_dir():
            raise StepError(f"missing {ixi / split}")
    small = dict(next((r for r in plan.speed_runs if "small" in str(r["role"]).split(",")), {}))
    rates = _speed_rates(ctx.get("speed_small"))
    budget, predicted = None, None
    if rates and int(small.get("size", -1)) == plan.bench_size:
        flops = _flops_per_sample(str(small["presets"]), plan.bench_size, int(small.get("channels", 1)))
        budget, predicted = pick_budget(rates, flops, plan.bench_ladder, plan.bench_train_s, plan.bench_efficiency)
        p.results["flops_per_sample"] = flops
        p.results["rates_samples_per_s"] = rates
    chosen = budget if budget is not None else (min(plan.bench_ladder) if rates else plan.bench_fallback)
    if budget is not None:
        rule = "largest of the ladder predicted to fit"
    else:
        rule = "smallest of the ladder (none predicted to fit)" if rates else "fallback: no train_speed rates"
    p.results.update(budget_tflop=chosen, budget_rule=rule,
                     predicted_train_s=predicted, ladder=list(plan.bench_ladder), size=plan.bench_size,
                     max_train_seconds=plan.bench_max_train_s)
    p.run("make_lesions", _berdiff(py, "make_lesions", str(ixi / "val"), str(work / "lesions"), "--seed", "0"))
    bench_out = work / "bench"
    cmd = _berdiff(py, "benchmark", "--device", plan.device, "--train_dir", str(ixi / "train"),
                   "--test_dir", str(work / "lesions"), "--out", str(bench_out), "--size", str(plan.bench_size),
                   "--budget_tflop", repr(float(chosen)), "--max_train_seconds", repr(float(plan.bench_max_train_s)),
                   "--threads", str(plan.threads), *plan.bench_args)
    p.run("benchmark", cmd)
    for name in ("results.json", "benchmarks.md"):
        _copy(bench_out / name, out / "benchmark" / name)
    results = _read_json(bench_out / "results.json")
    methods = {}
    for name, r in results.get("methods", {}).items():
        t = r.get("test", {})
        methods[name] = {
            "settings": r.get("settings_text"), "train_seconds": r.get("train_seconds"),
            "train_tflop": r.get("train_tflop"),
            **{k: t.get(k) for k in ("dice_fixed", "dice_tuned", "dice_oracle", "auroc", "auprc",
                                     "auroc_brain_pooled", "auprc_brain_pooled", "slice_auroc")},
            "seconds_per_slice": r.get("timing", {}).get("seconds_per_slice"),
        }
    p.results["methods"] = methods
    p.results["vs_masked"] = {m: r["vs_masked"] for m, r in results.get("methods", {}).items() if "vs_masked" in r}
    p.results["training"] = results.get("training")


#: training overrides of the brats part: the short-run recipe of the small preset (learning rates and EMA for minutes
#: of training, berdiff.training.TRAINING_RECIPES) at GPU batch sizes (learning rate scaled by the configs' sqrt rule)
#: with the reference networks; the reference recipe's learning rates are for runs of days
SHORT_RUN_RECIPE: dict[str, list[str]] = {
    "autoencoder": ["--base_learning_rate", "2e-3", "--base_batch_size", "8", "--batch_size", "32",
                    "--ema_momentum", "0.02"],
    "diffusion": ["--base_learning_rate", "1e-3", "--base_batch_size", "32", "--batch_size", "64",
                  "--ema_momentum", "0.02", "--train_max_timestep", "200"],
}


def _part_brats(p: _Part, plan: ReportPlan, py: str, out: Path, ctx: dict[str, Any]) -> None:
    work = ctx["work"] / "brats"
    src, bundle = ctx["brats_src"], str(ctx["bundle"])
    prepared, models = work / "prepared", work / "models"
    val_list = "[" + ",".join(repr(s) for s in BRATS_VAL_SUBJECTS) + "]"
    p.run("prepare_brats", _berdiff(py, "prepare_brats", "--src", str(src), "--out", str(prepared), "--preset",
                                    plan.brats_preset, "--slice_start", "0", "--slice_stop", "100",
                                    f"--val_subjects={val_list}", *plan.prepare_args))
    counts = _read_json(prepared / "datalist.json").get("counts", {})
    p.results["counts"] = counts
    n_train = int(counts.get("training", {}).get("healthy_slices", 0))
    rates = _speed_rates(ctx.get("speed_reference"))
    # seconds per stage: the plan's, less when the part has less time left than the steps after training need
    stage_s = max(1.0, min(plan.stage_train_s, (p.remaining() - plan.brats_reserve_s) / 2))
    epochs = {stage: pick_epochs(rates.get(stage), n_train, stage_s, plan.stage_efficiency, plan.max_epochs_cap,
                                 plan.fallback_epochs, plan.epoch_overhead_s) for stage in ("autoencoder", "diffusion")}
    p.results.update(epochs=epochs, stage_train_s=stage_s, rates_samples_per_s=rates, preset=plan.brats_preset,
                     epoch_rule="from train_speed reference rates" if rates else "fallback: no train_speed rates")
    common = ["--dataset_dir", str(prepared), "--models_dir", str(models), "--preset", plan.brats_preset,
              "--device", plan.device]
    configs = {"autoencoder": "configs/train_autoencoder.yaml",
               "diffusion": "['configs/train_autoencoder.yaml','configs/train_diffusion.yaml']"}
    p.results["train_seconds"] = {}
    for stage, config in configs.items():
        rec = p.run(f"train_{stage}", [py, "-m", "monai.bundle", "run", "training", "--config_file", config, *common,
                                       "--output_dir", str(work / f"tb_{stage}"), "--max_epochs", str(epochs[stage]),
                                       *SHORT_RUN_RECIPE[stage]],
                    cwd=bundle)
        p.results["train_seconds"][stage] = rec["seconds"]
    val_dir = work / "val_volumes"
    for s in BRATS_VAL_SUBJECTS:
        shutil.copytree(src / s, val_dir / s, dirs_exist_ok=True)
    maps = work / "maps"
    p.run("inference", [py, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
                        "--dataset_dir", str(val_dir), "--output_dir", str(maps), "--ckpt_path",
                        str(models / "model.pt"), "--preset", plan.brats_preset, "--device", plan.device,
                        "--save_autoencoder_map", "True"], cwd=bundle)
    _copy(maps / "run_summary.json", out / "brats" / "run_summary.json")
    _copy(models / "model.json", out / "brats" / "model.json")
    summary = _read_json(maps / "run_summary.json")
    p.results["inference"] = {k: summary.get(k) for k in ("wall_time_s", "num_cases", "cases_per_s", "peak_memory_mb")}
    eval_dir = work / "evaluation"
    # scored like the CPU recipe: the paper's axial range (slices 40-88 of the sample), the input channels and the
    # autoencoder-only map as references
    p.run("evaluate", _berdiff(py, "evaluate", "--pred", str(maps), "--label", str(val_dir), "--image", str(val_dir),
                               "--out", str(eval_dir), "--figure", "False", "--slice_start", "40",
                               "--slice_stop", "89"))
    for name in ("metrics.json", "per_case.csv"):
        _copy(eval_dir / name, out / "brats" / name)
    metrics = _read_json(eval_dir / "metrics.json")
    p.results["maps"] = _map_scores(metrics.get("maps", {}))


def _score(v: Any) -> float | None:
    if isinstance(v, Mapping):
        v = v.get("mean")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _map_scores(maps: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Dice / AUROC / AUPRC of protocols A and B per map of an ``evaluate`` result (whatever maps it holds)."""
    scores: dict[str, dict[str, float | None]] = {}
    for name, m in maps.items():
        if not isinstance(m, Mapping):
            continue
        scores[name] = {f"{proto[-1].upper()}_{k}": _score(m.get(proto, {}).get(k))
                        for proto in ("protocol_a", "protocol_b") if isinstance(m.get(proto), Mapping)
                        for k in ("dice", "best_dice_upper_bound", "auroc", "auprc")
                        if k in m.get(proto, {})}
    return scores


_PART_FUNCS: dict[str, Callable[[_Part, ReportPlan, str, Path, dict[str, Any]], None]] = {
    "train_speed": _part_train_speed,
    "inference": _part_inference,
    "benchmark": _part_benchmark,
    "brats": _part_brats,
}


# ------------------------------------------------------------------------------------------------- markdown


def _f(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, (int, float)):
        return "-" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: the parts' status, then one section per part."""
    lines = [f"# GPU report ({report.get('mode')})", "",
             f"Started {report.get('started_utc')}, {report.get('machine', {}).get('gpu') or 'no GPU'}, "
             f"torch {report.get('machine', {}).get('torch')}, commit {report.get('commit')}.", "",
             "| part | status | seconds | limit s | error |", "|---|---|---|---|---|"]
    parts = report.get("parts", {})
    for name in PARTS:
        r = parts.get(name, {})
        lines.append(f"| {name} | {r.get('status', 'not run')} | {_f(r.get('seconds'), 1)} | {_f(r.get('limit_s'), 0)} "
                     f"| {str(r.get('error') or '').replace('|', '/')[:200]} |")
    res = parts.get("train_speed", {}).get("results", {})
    if res.get("runs"):
        lines += ["", "## Training throughput (`train_speed`, samples/s, median of the repeats)", "",
                  "| stage | preset | size | channels | batch | legacy | fast | fast / legacy |",
                  "|---|---|---|---|---|---|---|---|"]
        for run in res["runs"]:
            for r in run["rows"]:
                lines.append(f"| {r.get('stage')} | {r.get('preset')} | {run.get('size')} | {run.get('channels')} "
                             f"| {run.get('batch_size')} | {_f(r.get('legacy'), 1)} | {_f(r.get('fast'), 1)} "
                             f"| {_f(r.get('ratio'), 2)} |")
    res = parts.get("inference", {}).get("results", {})
    if res.get("cases_per_s") is not None:
        split = res.get("time_split_s") or {}
        n = res.get("num_cases") or 1
        lines += ["", "## Bundle inference throughput (brain bundle, random weights)", "",
                  f"{res.get('volumes')} volumes of {res.get('shape')}, preset {res.get('preset')}, "
                  f"{res.get('device_name')}; volumes/s over the run (`cases_per_s`), per-volume time split summed "
                  f"over the volumes / volumes.", "",
                  "| volumes/s | s / volume (median) | load | preprocess | network | postprocess | write | peak MiB "
                  "| command s (with start-up) |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {_f(res.get('cases_per_s'))} | {_f(res.get('median_case_wall_s'), 2)} | "
                  + " | ".join(_f((split.get(k) or 0) / n, 2)
                               for k in ("load", "preprocess", "network", "postprocess", "write"))
                  + f" | {_f(res.get('peak_memory_mb'), 0)} | {_f(res.get('command_seconds'), 1)} |"]
    res = parts.get("benchmark", {}).get("results", {})
    if res.get("budget_tflop") is not None:
        lines += ["", f"## Equal compute at {res.get('size')} px: {_f(res.get('budget_tflop'), 4)} TFLOP per method",
                  "", f"Budget: {res.get('budget_rule')} (predicted training {_f(res.get('predicted_train_s'), 1)} s, "
                  f"cap {_f(res.get('max_train_seconds'), 0)} s per model). Held-out split; the full report is "
                  "`benchmark/benchmarks.md`.", ""]
        if res.get("methods"):
            lines += ["| method | settings | Dice@0.5 | Dice@t* | AUROC | AUPRC | brain AUPRC | slice AUROC | TFLOP "
                      "| train s | s / slice |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for name, m in res["methods"].items():
                lines.append(f"| {name} | {m.get('settings')} | {_f(m.get('dice_fixed'))} | {_f(m.get('dice_tuned'))} "
                             f"| {_f(m.get('auroc'))} | {_f(m.get('auprc'))} | {_f(m.get('auprc_brain_pooled'))} "
                             f"| {_f(m.get('slice_auroc'))} | {_f(m.get('train_tflop'), 4)} "
                             f"| {_f(m.get('train_seconds'), 1)} | {_f(m.get('seconds_per_slice'), 4)} |")
    res = parts.get("brats", {}).get("results", {})
    if res.get("counts"):
        c = res["counts"]
        lines += ["", f"## BraTS sample, preset {res.get('preset')}", "",
                  f"Slices: {c.get('training', {}).get('healthy_slices')} healthy training, "
                  f"{c.get('validation', {}).get('healthy_slices')} healthy / "
                  f"{c.get('validation', {}).get('diseased_slices')} diseased validation; epochs "
                  f"{res.get('epochs')} ({res.get('epoch_rule')}); training seconds (whole command) "
                  f"{res.get('train_seconds')}; inference {res.get('inference')}.", ""]
        if res.get("maps"):
            keys = sorted({k for m in res["maps"].values() for k in m})
            lines += ["| map | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for name, m in res["maps"].items():
                lines.append(f"| {name} | " + " | ".join(_f(m.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        info["torch_error"] = repr(e)
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            info["gpu"] = q.stdout.strip() or None
        except (OSError, subprocess.SubprocessError) as e:
            info["gpu_error"] = repr(e)
    return info


def _commit(root: Path) -> str | None:
    try:
        q = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                           timeout=10)
        return q.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_report(
    out: str | None = None,
    dry_run: bool = False,
    data_dir: str = ".data",
    synthetic: bool | None = None,
    work: str | None = None,
    parts: Sequence[str] | str = PARTS,
    total_s: float | None = None,
) -> None:
    """
    Run the parts (see the module docstring) and write ``out/gpu_report.json`` and ``out/gpu_report.md``.

    Args:
        out: output folder (default ``$OUT``, else ``outputs/gpu_report``).
        dry_run: the CPU check with tiny sizes and synthetic data (:data:`DRY_PLAN`) instead of :data:`REAL_PLAN`.
        data_dir: folder with ``ixi_t1_midaxial/{train,val}`` and ``brats18_sample/<case>/`` (not read with
            ``synthetic``).
        synthetic: make tiny synthetic data in ``work`` instead of reading ``data_dir`` (default: with ``dry_run``);
            ``dry_run=True, synthetic=False`` checks the real data's steps on the CPU.
        work: scratch folder for data, checkpoints and maps (default: a new temporary folder, removed at the end).
        parts: the parts to run (default all, in the order of :data:`PARTS`); the others are recorded as skipped.
        total_s: the whole report's limit in seconds (default the plan's).

    Prints the markdown at the end; nothing is returned (``gpu_report.json`` holds the report).
    """
    plan = DRY_PLAN if dry_run else REAL_PLAN
    root = Path(__file__).resolve().parents[3]
    out_dir = Path(out or os.environ.get("OUT") or "outputs/gpu_report").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    own_work = work is None
    work_dir = Path(tempfile.mkdtemp(prefix="berdiff_gpu_report_") if own_work else work).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    wanted = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else [str(p) for p in parts]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {list(PARTS)}.")
    total = float(total_s if total_s is not None else plan.total_s)
    start = time.monotonic()
    synthetic = dry_run if synthetic is None else bool(synthetic)
    report: dict[str, Any] = {
        "mode": ("dry run (CPU, tiny sizes, " + ("synthetic data)" if synthetic else f"data of {data_dir})")
                 if dry_run else "GPU run" + (" on synthetic data" if synthetic else "")),
        "started_utc": _utc(), "commit": _commit(root), "plan": dataclasses.asdict(plan), "total_limit_s": total,
        "parts": {},
    }

    def write() -> None:
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        atomic_write_json(report, out_dir / "gpu_report.json", indent=1)
        md = render_markdown(report)
        atomic_write(out_dir / "gpu_report.md", lambda tmp: Path(tmp).write_text(md))

    def on_term(signum: int, frame: Any) -> None:
        raise _Stopped(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    ctx: dict[str, Any] = {"work": work_dir, "bundle": (root / _BUNDLE).resolve()}
    try:
        report["machine"] = _machine()
        if synthetic:
            data = work_dir / "data"
            write_synthetic_slices(data / "ixi_t1_midaxial")
            train_subjects = ["Brats18_CBICA_AME_1", "Brats18_TCIA01_201_1"]
            write_synthetic_brats(data / "brats18_sample", [*BRATS_VAL_SUBJECTS, *train_subjects])
        else:
            data = Path(data_dir).resolve()
        ctx.update(ixi_src=data / "ixi_t1_midaxial", brats_src=data / "brats18_sample")
        write()
        for name in PARTS:
            rec: dict[str, Any] = {"status": "skipped"}
            report["parts"][name] = rec
            if name not in wanted:
                rec["error"] = "not in --parts"
                continue
            left = total - (time.monotonic() - start)
            limit = min(plan.part_s[name], left)
            rec.update(limit_s=round(limit, 1), started_utc=_utc())
            if limit < 5:
                rec.update(error="no time left")
                write()
                continue
            print(f"[gpu_report] part {name}: limit {limit:.0f} s", flush=True)
            part = _Part(name, time.monotonic() + limit, out_dir / "logs" / name, rec)
            t0 = time.monotonic()
            try:
                _PART_FUNCS[name](part, plan, sys.executable, out_dir, ctx)
                rec["status"] = "ok"
            except StepError as e:
                timed_out = any(s.get("status") == "timeout" for s in rec.get("steps", []))
                rec.update(status="timeout" if timed_out else "failed", error=str(e))
            except _Stopped as e:
                rec.update(status="stopped", error=f"the report was stopped ({e})")
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a part is recorded and the next part runs
                rec.update(status="failed", error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc()[-3000:])
            finally:
                rec["seconds"] = round(time.monotonic() - t0, 1)
                write()
            print(f"[gpu_report] part {name}: {rec['status']} in {rec['seconds']:.0f} s", flush=True)
    except _Stopped:
        pass
    finally:
        signal.signal(signal.SIGTERM, old_term)
        report["finished_utc"] = _utc()
        write()
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(render_markdown(report), flush=True)
