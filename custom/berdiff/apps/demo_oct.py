# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The OCT bundle end to end on one folder of scans, in one command:
``python -m berdiff demo_oct --dataset_dir OCT_DIR --out OUT``.

It runs the bundle README's commands with the bundle's defaults (the CPU recipe): stage 1 and stage 2 of training
on ``OCT_DIR/train/NORMAL/`` (``python -m monai.bundle run training``, weights in ``OUT/models/``), inference on
``OCT_DIR/val/`` (``OUT/val/``: maps and ``scores.csv``) and, when ``val/`` holds ``NORMAL/`` and another class,
``python -m berdiff oct_validation`` (``OUT/validation.json``, ``OUT/overview.png``). Every step's log is in
``OUT/logs/``; ``OUT/demo_summary.json`` records the settings and each step's wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from berdiff.utils import atomic_write_json

__all__ = ["bundle_dir", "demo_oct"]


def bundle_dir() -> Path:
    """The OCT bundle folder of this repository (or of a built bundle that vendors this package).

    Raises:
        FileNotFoundError: neither is found.
    """
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "bundles" / "oct_bernoulli_anomaly", here.parents[2]):
        if (candidate / "configs" / "inference.yaml").is_file() and "oct" in candidate.name:
            return candidate
    raise FileNotFoundError("the OCT bundle (bundles/oct_bernoulli_anomaly) was not found next to the package.")


def _overrides(settings: Mapping[str, Any]) -> list[str]:
    out = []
    for key, value in settings.items():
        out += [f"--{key}", str(list(value) if isinstance(value, (tuple, list)) else value)]
    return out


def _run(name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str]) -> float:
    """Runs one step, its output in ``log_dir/<name>.log``; returns its wall time in seconds.

    Raises:
        RuntimeError: the step failed (the message names its log).
    """
    log = log_dir / f"{name}.log"
    start = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(list(argv), stdout=f, stderr=subprocess.STDOUT, env=dict(env))
    if proc.returncode != 0:
        raise RuntimeError(f"step {name!r} failed (exit status {proc.returncode}); see {log}.")
    seconds = time.time() - start
    print(f"{name}: {seconds:.0f} s", flush=True)
    return seconds


def demo_oct(
    dataset_dir: str,
    out: str = "outputs/demo_oct",
    threads: int | None = None,
    n_resamples: int = 2000,
    **settings: Any,
) -> dict[str, Any]:
    """
    Trains the OCT bundle on ``dataset_dir/train/NORMAL/``, runs it on ``dataset_dir/val/`` and validates it
    (module docstring).

    Args:
        dataset_dir: ``OCT_DIR``: ``train/NORMAL/`` and optionally ``val/<CLASS>/``.
        out: the output folder.
        threads: torch / OpenMP threads of every step (None: the environment's default).
        n_resamples: bootstrap resamples of the validation intervals.
        settings: overrides of the bundle's configs for every step (e.g. ``max_epochs=2``, ``preset="tiny"``,
            ``spatial_size=[16, 32]``, ``noise_level=4``); keys a config does not use are ignored by it.

    Returns:
        the summary written to ``OUT/demo_summary.json``.

    Raises:
        FileNotFoundError: no ``train/NORMAL/`` folder.
    """
    data = Path(dataset_dir).resolve()
    if not (data / "train" / "NORMAL").is_dir():
        raise FileNotFoundError(f"{str(data)!r} has no train/NORMAL/ folder of normal scans to train on.")
    out_dir = Path(out).resolve()
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bundle = bundle_dir()
    configs = bundle / "configs"
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(int(threads)), MKL_NUM_THREADS=str(int(threads)))
    bundle_run = [sys.executable, "-m", "monai.bundle", "run"]
    common = ["--bundle_root", str(out_dir), "--logging_file", str(configs / "logging.conf")]
    stage1 = str(configs / "train_autoencoder.yaml")
    stage2 = str([stage1, str(configs / "train_diffusion.yaml")])
    times = {
        "stage1": _run("stage1", bundle_run + ["training", "--config_file", stage1, "--dataset_dir", str(data)]
                       + common + _overrides(settings), logs, env),
        "stage2": _run("stage2", bundle_run + ["training", "--config_file", stage2, "--dataset_dir", str(data)]
                       + common + _overrides(settings), logs, env),
    }
    summary: dict[str, Any] = {"dataset_dir": str(data), "bundle": str(bundle), "settings": dict(settings),
                               "threads": threads, "seconds": times}
    val = data / "val"
    if val.is_dir():
        infer_keys = {k: v for k, v in settings.items() if k not in ("preset", "spatial_size", "max_epochs")}
        times["inference"] = _run(
            "inference",
            bundle_run + ["inference", "--config_file", str(configs / "inference.yaml"), "--dataset_dir", str(val),
                          "--output_dir", str(out_dir / "val")] + common + _overrides(infer_keys),
            logs, env,
        )
        classes = {p.name for p in val.iterdir() if p.is_dir()}
        if "NORMAL" in classes and len(classes) > 1:
            from berdiff.apps.oct_validation import oct_validation
            from berdiff.data.oct import DEFAULT_ALIGNMENT, DEFAULT_BAND_RATIO, DEFAULT_GRID, DEFAULT_RPE_POSITION

            start = time.time()
            result = oct_validation(
                str(out_dir / "val" / "scores.csv"), str(val), out=str(out_dir / "validation.json"),
                spatial_size=settings.get("spatial_size", DEFAULT_GRID),
                band_ratio=settings.get("band_ratio", DEFAULT_BAND_RATIO),
                band_alignment=settings.get("band_alignment", DEFAULT_ALIGNMENT),
                rpe_position=settings.get("rpe_position", DEFAULT_RPE_POSITION), n_resamples=n_resamples,
                figure=str(out_dir / "overview.png"),
            )
            times["validation"] = time.time() - start
            summary["untouched"] = {k: {"auroc": v["auroc"], "auprc": v["auprc"]}
                                    for k, v in result["splits"]["untouched"].items()}
    summary["seconds"]["total"] = sum(times.values())
    atomic_write_json(summary, out_dir / "demo_summary.json")
    print(f"outputs in {out_dir}: models/, val/ (maps, scores.csv), validation.json, overview.png, logs/")
    return summary
