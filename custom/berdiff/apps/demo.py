# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The end-to-end demo behind ``make demo``: synthetic BraTS-like volumes -> data preparation -> both training stages of
the brain MRI bundle ("small" preset) -> bundle inference on held-out subjects with tumours -> evaluation, written to
one folder. Every step runs the same commands a user runs on real data (printed as they run).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from berdiff.utils import atomic_write_json

__all__ = ["BUNDLE_NAME", "DemoSummary", "default_bundle_dir", "demo"]

BUNDLE_NAME = "brats_mri_bernoulli_anomaly"


def default_bundle_dir() -> Path:
    """The brain MRI bundle of this repository checkout (``<repo>/bundles/brats_mri_bernoulli_anomaly``)."""
    import berdiff

    return Path(berdiff.__file__).resolve().parents[2] / "bundles" / BUNDLE_NAME


def _run(cmd: list[str], log: Path, env: dict[str, str], echo: tuple[str, ...] = ()) -> float:
    """
    Run ``cmd`` with its output written to ``log``; the lines starting with one of ``echo`` (the training progress
    lines of :class:`berdiff.handlers.TrainingProgress`, the per-case lines of inference) are also printed as they
    come, the last lines of the log on failure. Returns the wall time.
    """
    print("  $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if echo and line.startswith(echo):
                print("    " + line.rstrip(), flush=True)
        returncode = proc.wait()
    if returncode != 0:
        tail = "".join(open(log).readlines()[-25:])
        raise RuntimeError(f"step failed (exit {returncode}); last lines of {log}:\n{tail}")
    return time.perf_counter() - start


class _Steps:
    """Prints ``step i/n: <what>`` when a step starts and ``step i/n done in <time>`` when it ends."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self._t = total, 0, 0.0

    def start(self, what: str) -> None:
        self.index += 1
        self._t = time.perf_counter()
        print(f"step {self.index}/{self.total}: {what}", flush=True)

    def done(self) -> float:
        elapsed = time.perf_counter() - self._t
        print(f"step {self.index}/{self.total} done in {elapsed:.1f} s", flush=True)
        return elapsed


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def demo(
    out: str = "outputs/demo",
    num_subjects: int = 12,
    tumour_fraction: float = 0.5,
    val_fraction: float = 0.34,
    seed: int = 0,
    spacing: float = 2.5,
    preset: str = "small",
    spatial_size: int = 96,
    slice_start: int = 14,
    slice_stop: int = 64,
    ae_epochs: int = 30,
    ae_batch_size: int = 8,
    ae_learning_rate: float = 2e-3,
    blob_augment_prob: float = 0.5,
    diffusion_epochs: int = 60,
    diffusion_batch_size: int = 32,
    diffusion_learning_rate: float = 1e-3,
    ema_momentum: float = 0.02,
    train_max_timestep: int | None = 150,
    prediction_type: str = "sample",
    noise_level: int = 50,
    prob_threshold: float = 0.8,
    num_inference_steps: int = 10,
    sw_batch_size: int = 16,
    anomaly_reference: str = "input",
    step_posterior: str = "marginal",
    latent_weighting: str | None = "confident_change",
    latent_weight_floor: float = 0.02,
    residual_sign: str = "both",
    residual_channels: str | Sequence[str] = "all",
    bundle: str | None = None,
    overwrite: bool = True,
) -> DemoSummary:
    """
    Run the whole job on built-in synthetic brain MRI and write ``out``: ``data/`` (generated BraTS-layout volumes),
    ``prepared/`` (slices and datalists), ``model/`` (stage checkpoints and ``models/model.pt``), ``maps/``
    (``<case>_anomaly.nii.gz``, ``<case>_anomaly_mask.nii.gz``, ``<case>_reconstruction.nii.gz``, the
    autoencoder-only map ``<case>_autoencoder.nii.gz`` and every latent map ``<case>_latent_<name>.nii.gz``,
    ``run_summary.json``), ``metrics.json`` (every map scored), ``per_case.csv``, ``overview.png`` and
    ``demo_summary.json`` (timings and settings). Prints where the files are and the headline metrics of the method's
    anomaly map beside the autoencoder-only map (what the diffusion model adds) and the bundle's default latent map.

    Args:
        out: output folder.
        num_subjects: synthetic subjects to generate.
        tumour_fraction: share of subjects with a tumour.
        val_fraction: share of subjects held out (validation during training, then the test subjects); the split is
            seeded and stratified by tumour, with at least two held-out and two training subjects.
        seed: seed of the data generator and of the subject split.
        spacing: voxel size (mm) of the synthetic volumes.
        preset: network sizes (see docs/networks.md).
        spatial_size: in-plane size of the slices.
        slice_start: first axial slice used for training (the demo volumes have 72 axial slices at 2.5 mm).
        slice_stop: one past the last axial slice used for training.
        ae_epochs: stage-1 epochs.
        ae_batch_size: stage-1 batch size.
        ae_learning_rate: stage-1 learning rate.
        blob_augment_prob: share of stage-1 training slices given random blobs of foreign intensities
            (``berdiff.training.BlobAugmentPrepareBatch``), so that the autoencoder keeps the tumours in the code.
        diffusion_epochs: stage-2 epochs.
        diffusion_batch_size: stage-2 batch size.
        diffusion_learning_rate: stage-2 learning rate.
        ema_momentum: EMA momentum of both stages (large, because the demo trains for few iterations).
        train_max_timestep: stage-2 training timesteps are drawn below this (must be >= noise_level); None: all.
        prediction_type: what the stage-2 denoiser predicts (``berdiff.schedulers.BernoulliPredictionType``).
        noise_level: L.
        prob_threshold: P.
        num_inference_steps: K (strided schedule from L - 1 to 0).
        sw_batch_size: slices per network call at inference.
        anomaly_reference: what the anomaly map compares the reconstruction with (``berdiff.inferers.AnomalyReference``).
        step_posterior: reverse step from the soft ``x0`` estimate (``berdiff.inferers.StepPosterior``).
        latent_weighting: latent map that weights the residual in the anomaly map (``berdiff.inferers.LatentMap``;
            None or "none": the residual alone, the paper's map).
        latent_weight_floor: weight of the residual where that latent map is 0.
        residual_sign, residual_channels: the residual rule of the maps (``berdiff.residual``). The demo keeps the
            paper's squared residual over all channels (its settings were tuned with it on the synthetic subjects);
            the bundle's default for real BraTS is the positive FLAIR residual (see its README).
        bundle: the brain MRI bundle folder (default: the one in this repository checkout).
        overwrite: replace the output of an earlier demo run in ``out`` (any other non-empty folder is refused).
    """
    from berdiff.validation import check_float, check_int, check_settings

    check_settings(
        {"preset": preset, "spatial_size": spatial_size, "noise_level": noise_level, "prob_threshold": prob_threshold,
         "num_inference_steps": num_inference_steps, "train_max_timestep": train_max_timestep, "seed": seed,
         "sw_batch_size": sw_batch_size, "ema_momentum": ema_momentum, "prediction_type": prediction_type,
         "latent_weighting": latent_weighting, "latent_weight_floor": latent_weight_floor}
    )
    for knob, value in (("num_subjects", num_subjects), ("ae_epochs", ae_epochs), ("ae_batch_size", ae_batch_size),
                        ("diffusion_epochs", diffusion_epochs), ("diffusion_batch_size", diffusion_batch_size)):
        check_int(knob, value, 1)
    for knob, value in (("ae_learning_rate", ae_learning_rate), ("diffusion_learning_rate", diffusion_learning_rate),
                        ("spacing", spacing)):
        check_float(knob, value, 0.0, low_open=True)
    for knob, value in (("tumour_fraction", tumour_fraction), ("val_fraction", val_fraction),
                        ("blob_augment_prob", blob_augment_prob)):
        check_float(knob, value, 0.0, 1.0)
    if train_max_timestep is not None and train_max_timestep < noise_level:
        raise ValueError(f"train_max_timestep ({train_max_timestep}) must be >= noise_level ({noise_level}).")

    from berdiff.data.brats import prepare_brats
    from berdiff.data.synthetic import make_demo_data
    from sklearn.model_selection import train_test_split

    from berdiff.evaluation.evaluate import evaluate
    from berdiff.inferers import LatentMap

    from monai.utils import look_up_option

    from berdiff.inferers import AnomalyReference, StepPosterior

    # checked before any training, so that a typo does not cost the training time
    anomaly_reference = look_up_option(anomaly_reference, AnomalyReference)
    step_posterior = look_up_option(step_posterior, StepPosterior)
    t_total = time.perf_counter()
    bundle_dir = Path(bundle) if bundle else default_bundle_dir()
    configs = bundle_dir / "configs"
    if not (configs / "train_autoencoder.yaml").is_file():
        raise FileNotFoundError(
            f"bundle configs not found under {configs}; run the demo from a checkout of the repository or pass --bundle."
        )
    out_dir = Path(out).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        earlier_demo = (out_dir / "demo_summary.json").is_file() or (out_dir / "data" / "manifest.json").is_file()
        if not (overwrite and earlier_demo):
            raise FileExistsError(
                f"{out_dir} is not empty" + ("" if earlier_demo else " and holds no earlier demo output")
                + "; choose an empty or new folder" + (" or pass --overwrite True." if earlier_demo else ".")
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    data_dir, prep_dir, model_dir = out_dir / "data", out_dir / "prepared", out_dir / "model"
    maps_dir, logs_dir = out_dir / "maps", out_dir / "logs"
    logs_dir.mkdir()
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    timings: dict[str, float] = {}
    bundle_cmd = [sys.executable, "-m", "monai.bundle", "run"]

    steps = _Steps(6)
    steps.start(f"generating {num_subjects} synthetic subjects -> {data_dir}")
    make_demo_data(
        str(data_dir), num_subjects=num_subjects, tumour_fraction=tumour_fraction, seed=seed, spacing=spacing
    )
    timings["make_demo_data"] = steps.done()

    # held-out subjects: a seeded split stratified by tumour, so that the test set has subjects with tumours
    with open(data_dir / "manifest.json") as f:
        manifest = json.load(f)
    cases = [s["case"] for s in manifest["subjects"]]
    has_tumour = [bool(s.get("has_tumour")) for s in manifest["subjects"]]
    n_val = min(max(2, round(val_fraction * len(cases))), len(cases) - 2)
    _, val_subjects = train_test_split(cases, test_size=n_val, random_state=seed, stratify=has_tumour)

    steps.start(f"preparing slices -> {prep_dir}")
    prepare_brats(
        str(data_dir),
        str(prep_dir),
        val_subjects=sorted(val_subjects),
        seed=seed,
        spatial_size=spatial_size,
        slice_start=slice_start,
        slice_stop=slice_stop,
        pixdim=None,  # the synthetic volumes' own 2.5 mm (96 px slices), for every preset
    )
    timings["prepare_brats"] = steps.done()

    common = [
        "--bundle_root", str(model_dir),
        "--dataset_dir", str(prep_dir),
        "--preset", preset,
        "--spatial_size", str(spatial_size),
        "--num_workers", "0",
        "--seed", str(seed),
        "--ema_momentum", str(ema_momentum),
    ]
    steps.start("stage 1: binarizing autoencoder (one line per epoch)")
    _run(
        bundle_cmd
        + ["training", "--config_file", str(configs / "train_autoencoder.yaml")]
        + common
        + ["--max_epochs", str(ae_epochs), "--batch_size", str(ae_batch_size),
           "--learning_rate", str(ae_learning_rate), "--output_dir", str(logs_dir / "train_autoencoder"),
           "--blob_augment_prob", str(blob_augment_prob)],
        logs_dir / "train_autoencoder.log",
        env,
        echo=("train_autoencoder:",),
    )
    timings["train_autoencoder"] = steps.done()
    steps.start("stage 2: Bernoulli diffusion denoiser (one line per epoch)")
    _run(
        bundle_cmd
        + ["training", "--config_file", repr([str(configs / f"train_{s}.yaml") for s in ("autoencoder", "diffusion")])]
        + common
        + ["--max_epochs", str(diffusion_epochs), "--batch_size", str(diffusion_batch_size),
           "--learning_rate", str(diffusion_learning_rate), "--output_dir", str(logs_dir / "train_diffusion"),
           "--train_max_timestep", "None" if train_max_timestep is None else str(train_max_timestep),
           "--prediction_type", str(prediction_type)],
        logs_dir / "train_diffusion.log",
        env,
        echo=("train_diffusion:",),
    )
    timings["train_diffusion"] = steps.done()

    # the held-out subjects with tumours are the test cases
    with open(prep_dir / "datalist.json") as f:
        datalist = json.load(f)
    with_tumour = {s["case"] for s in manifest["subjects"] if s.get("has_tumour")}
    test_volumes = [v for v in datalist["volumes"]["validation"] if v["subject"] in with_tumour]
    if not test_volumes:
        raise RuntimeError("no held-out subject has a tumour; raise num_subjects or val_fraction.")
    test_list = out_dir / "test_datalist.json"
    atomic_write_json({"testing": [{"image": v["image"], "label": v["label"]} for v in test_volumes]}, test_list)

    steps.start(f"inference on {len(test_volumes)} held-out subjects with tumours -> {maps_dir}")
    _run(
        bundle_cmd
        + ["inference", "--config_file", str(configs / "inference.yaml"),
           "--bundle_root", str(model_dir), "--datalist", str(test_list), "--output_dir", str(maps_dir),
           "--preset", preset, "--spatial_size", f"[{spatial_size}, {spatial_size}]",
           "--noise_level", str(noise_level), "--prob_threshold", str(prob_threshold),
           "--num_inference_steps", str(num_inference_steps), "--sw_batch_size", str(sw_batch_size),
           "--save_reconstruction", "True", "--progress", "False", "--seed", str(seed),
           "--anomaly_reference", str(anomaly_reference), "--step_posterior", str(step_posterior),
           "--latent_weighting", "none" if latent_weighting is None else str(latent_weighting),
           "--latent_weight_floor", str(latent_weight_floor),
           "--residual_sign", str(residual_sign),
           "--residual_channels", residual_channels if isinstance(residual_channels, str)
           else "[" + ",".join(residual_channels) + "]",
           # every latent map and the autoencoder-only map, to score them beside the anomaly map
           "--latent_maps", "[" + ",".join(m.value for m in LatentMap) + "]", "--save_autoencoder_map", "True"],
        logs_dir / "inference.log",
        env,
        echo=("inference:",),
    )
    timings["inference"] = steps.done()

    steps.start("evaluation")
    metrics = evaluate(str(maps_dir), str(test_list), out=str(out_dir), image=str(data_dir), quiet=True)
    # does the autoencoder already erase the tumours? (then the diffusion model has nothing to heal)
    from berdiff.evaluation.autoencoder_check import autoencoder_check

    ae_check = autoencoder_check(
        str(prep_dir), str(model_dir / "models" / "stages" / "autoencoder" / "autoencoder_best.pt"), preset=preset,
        split="validation", verbose=False,
    )
    figure = out_dir / "figure.png"
    if figure.is_file():
        os.replace(figure, out_dir / "overview.png")
    timings["evaluate"] = steps.done()
    timings["total"] = time.perf_counter() - t_total

    summary = {
        "out": str(out_dir),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "test_cases": [Path(v["label"]).name for v in test_volumes],
        "settings": {
            "num_subjects": num_subjects, "tumour_fraction": tumour_fraction, "val_fraction": val_fraction,
            "seed": seed, "spacing": spacing, "preset": preset, "spatial_size": spatial_size,
            "slice_range": [slice_start, slice_stop], "ae_epochs": ae_epochs, "diffusion_epochs": diffusion_epochs,
            "train_max_timestep": train_max_timestep, "prediction_type": str(prediction_type),
            "noise_level": noise_level, "prob_threshold": prob_threshold,
            "num_inference_steps": num_inference_steps, "anomaly_reference": str(anomaly_reference),
            "step_posterior": str(step_posterior), "latent_weighting": latent_weighting,
            "latent_weight_floor": latent_weight_floor, "blob_augment_prob": blob_augment_prob,
            "residual_sign": str(residual_sign), "residual_channels": residual_channels,
        },
        "metrics": metrics,
        "autoencoder_check": ae_check,
    }
    atomic_write_json(summary, out_dir / "demo_summary.json")
    print(_headline(metrics, out_dir, timings, _bundle_latent_maps(bundle_dir), ae_check), flush=True)
    return DemoSummary(summary)


class DemoSummary(dict):
    """The demo's summary (a dict); its string form is one line, so the command line does not print it all."""

    def __str__(self) -> str:
        return f"demo summary: {self.get('out', '')}/demo_summary.json"

    __repr__ = __str__


def _mean(section: dict, key: str) -> float | None:
    value = section.get(key)
    value = value.get("mean") if isinstance(value, dict) else value
    return None if value is None or value != value else float(value)


def _bundle_latent_maps(bundle_dir: Path) -> list[str]:
    """The latent maps the bundle writes by default (``latent_maps`` of its inference config)."""
    import yaml

    try:
        with open(bundle_dir / "configs" / "inference.yaml") as f:
            value = yaml.safe_load(f).get("latent_maps") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _headline(
    metrics: dict,
    out_dir: Path,
    timings: dict[str, float],
    default_latent: Sequence[str] = (),
    ae_check: dict | None = None,
) -> str:
    maps = metrics.get("maps", {})
    anomaly = maps.get("anomaly", {})
    vol, sl = anomaly.get("protocol_b", {}), anomaly.get("protocol_a", {})
    ae_vol = maps.get("autoencoder", {}).get("protocol_b", {})
    lines = [
        "",
        f"demo finished in {timings['total'] / 60:.1f} min; outputs in {out_dir}",
        f"  anomaly maps (NIfTI): {out_dir / 'maps'}",
        f"  metrics:              {out_dir / 'metrics.json'} (per case: {out_dir / 'per_case.csv'})",
        f"  overview figure:      {out_dir / 'overview.png'}",
        "headline metrics (anomaly map, held-out subjects with tumours):",
        f"  pixel AUROC per volume (inside the brain): {_fmt(_mean(vol, 'auroc'))}",
        f"  pixel AUPRC per volume (inside the brain): {_fmt(_mean(vol, 'auprc'))}",
        f"  best-possible Dice per volume:             {_fmt(_mean(vol, 'best_dice_upper_bound'))} (upper bound)",
        f"  Dice, reference per-slice protocol A:      {_fmt(_mean(sl, 'dice'))}",
        f"  pixel AUROC per slice, protocol A:         {_fmt(_mean(sl, 'auroc'))}",
        f"  slice detection AUROC:                     {_fmt(anomaly.get('slice_detection', {}).get('auroc'))}",
        "what the diffusion model adds (per volume, inside the brain): method's anomaly map vs autoencoder only",
        f"  pixel AUROC: {_fmt(_mean(vol, 'auroc'))} vs {_fmt(_mean(ae_vol, 'auroc'))}",
        f"  pixel AUPRC: {_fmt(_mean(vol, 'auprc'))} vs {_fmt(_mean(ae_vol, 'auprc'))}",
    ]
    if ae_check:
        lines.append(
            "autoencoder check (held-out tumour slices, `python -m berdiff autoencoder_check`): squared residual "
            f"{ae_check['residual_contrast']:.2f}x higher in the tumour than in the rest of the brain (1: the "
            "autoencoder reproduces the tumour and leaves finding it to the diffusion model; the higher, the more of "
            "it the autoencoder erases itself)"
        )
    latent = [m for m in maps if m.startswith("latent_")]
    if latent:
        lines.append("latent maps, per volume inside the brain (0.5 = chance; * = written by the bundle by default):")
    for name in latent:
        lat = maps[name].get("protocol_b", {})
        star = " *" if name[len("latent_"):] in default_latent else ""
        lines.append(f"  {name}{star}: AUROC {_fmt(_mean(lat, 'auroc'))}, AUPRC {_fmt(_mean(lat, 'auprc'))}")
    return "\n".join(lines)
