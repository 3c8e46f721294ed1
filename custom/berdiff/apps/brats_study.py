# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
``python -m berdiff brats_study``: the real-BraTS ablation of trained brain-bundle models on the validation subjects
of a ``prepare_brats`` folder.

For every model folder (a bundle root holding ``models/model.pt``, as training writes it) the validation subjects'
prepared slices (the slice range of the study, e.g. the paper's axial range) are run through the masked Bernoulli
diffusion pipeline once per (L, P, K) setting; the anomaly-map variants are then formed from the same reconstructions
(so they differ only in the map rule) and every map is scored with the protocols of ``docs/evaluation.md``
(protocol A per slice, protocol B per volume inside the eroded brain mask, slice detection), with paired bootstrap
95 % intervals of the difference between each map and the raw FLAIR intensity. Writes ``study.json`` and
``study.md`` into ``out``.

The map variants (``residual`` is :func:`berdiff.residual.residual_map`; ``cc`` the latent map ``confident_change``):

* ``default``: the bundle's inference defaults (``configs/inference.yaml``: residual sign, channels, intensity prior
  with its power and floor, latent weighting); ``default_without_floor``: the same with floor 0;
* ``paper``: the paper's map, ``sum_c (x_hat_c - x_c)^2`` over all channels, no weighting, no prior;
* ``learned``: the default map without the intensity prior (nothing but what the networks compute);
* ``residual`` variants: sign ``both``/``positive`` x channels ``all``/``flair``/``t2+flair``, unweighted, and
  weighted by ``0.02 + cc``, with and without the FLAIR prior;
* ``autoencoder_*``: the same rules on the autoencoder's reconstruction of the input code (no diffusion model);
* ``latent_confident_change``, ``latent_code_change``: the latent maps alone;
* ``input_<modality>``: the input intensity (no learning).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from berdiff.utils import MODALITIES, atomic_write_files, to_json_safe

__all__ = ["GRID_MAPS", "MapRule", "brats_study", "default_map_rules", "load_subject_volumes"]

#: the rule of one map: residual sign, channels (None: all), intensity prior channel name, latent weighting
MapRule = dict
#: the maps scored at every (L, P, K) of the grid (every map is scored at the first setting of each model)
GRID_MAPS = ["default", "learned", "paper", "residual_positive_flair", "autoencoder_default", "autoencoder_learned"]


def default_map_rules(inference_config: Mapping[str, Any]) -> dict[str, MapRule]:
    """
    The map variants of the study, named, from the bundle's inference defaults (see the module docstring).

    Args:
        inference_config: the bundle's ``configs/inference.yaml`` as a dict (``residual_sign``,
            ``residual_channels``, ``intensity_prior``, ``latent_weighting``, ``latent_weight_floor``).
    """
    weighting = inference_config.get("latent_weighting")
    weighting = None if weighting in (None, "none") else str(weighting)
    default = {
        "sign": str(inference_config.get("residual_sign", "both")),
        "channels": inference_config.get("residual_channels", "all"),
        "prior": inference_config.get("intensity_prior"),
        "power": float(inference_config.get("intensity_prior_power", 1.0)),
        "floor": float(inference_config.get("intensity_prior_floor", 0.0)),
        "weighting": weighting,
    }
    rules: dict[str, MapRule] = {
        "default": default,
        "default_without_floor": {**default, "floor": 0.0},
        "learned": {**default, "prior": None},
        "paper": {"sign": "both", "channels": "all", "prior": None, "weighting": None},
    }
    for sign in ("both", "positive"):
        for channels, tag in (("all", "all"), (["flair"], "flair"), (["t2", "flair"], "t2flair")):
            for weighting in (None, "confident_change"):
                for prior in (None, "flair"):
                    name = f"residual_{sign}_{tag}" + ("_x_cc" if weighting else "") + ("_x_flair" if prior else "")
                    rules[name] = {"sign": sign, "channels": channels, "prior": prior, "weighting": weighting}
    for name in ("default", "learned", "paper", "residual_positive_flair", "residual_both_all"):
        rules[f"autoencoder_{name}"] = {**rules[name], "weighting": None, "source": "autoencoder"}
    return rules


def load_subject_volumes(
    prepared: str | os.PathLike, split: str = "validation", slice_start: int | None = None, slice_stop: int | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """
    The prepared slices of a split's subjects stacked into volumes: ``{subject: {"image": (Z, C, H, W) float32,
    "label": (Z, H, W) bool, "slices": (Z,) slice indices}}``, healthy and diseased slices in slice order.

    Args:
        prepared: a ``prepare_brats`` output folder.
        split: ``training`` or ``validation``.
        slice_start, slice_stop: keep the slices with ``slice_start <= index < slice_stop`` (None: no bound).

    Raises:
        FileNotFoundError: no datalist.
        ValueError: no slice of the split in the range.
    """
    path = Path(prepared) / "datalist.json"
    if not path.is_file():
        raise FileNotFoundError(f"no datalist.json in {prepared}; run python -m berdiff prepare_brats first.")
    datalist = json.loads(path.read_text())
    lo = -np.inf if slice_start is None else slice_start
    hi = np.inf if slice_stop is None else slice_stop
    entries = [e for e in datalist.get(split, []) + datalist.get(f"{split}_diseased", []) if lo <= e["slice"] < hi]
    if not entries:
        raise ValueError(f"{path}: no {split} slice in [{slice_start}, {slice_stop}).")
    out: dict[str, dict[str, np.ndarray]] = {}
    for subject in sorted({e["subject"] for e in entries}):
        items = sorted((e for e in entries if e["subject"] == subject), key=lambda e: e["slice"])
        image = np.stack([np.load(Path(prepared) / e["image"]).astype(np.float32) for e in items])
        label = np.zeros((len(items), *image.shape[2:]), bool)
        for i, e in enumerate(items):
            if "label" in e:
                label[i] = np.load(Path(prepared) / e["label"])[0] > 0
        out[subject] = {"image": image, "label": label, "slices": np.array([e["slice"] for e in items])}
    return out


def _load_pipeline(model_dir: Path, noise_level: int, prob_threshold: float, steps: int, device: torch.device) -> Any:
    from berdiff.io.checkpoints import load_pipeline_weights
    from berdiff.model_description import read_model_description
    from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
    from berdiff.schedulers import BernoulliScheduler

    model_path = model_dir / "models" / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"no trained model at {model_path}; train both stages of the bundle first.")
    desc = read_model_description(model_path, required=True)
    ae = autoencoder_from_preset(desc["preset"], in_channels=desc["in_channels"])
    unet = denoiser_from_preset(desc["preset"], latent_channels=ae.latent_channels)
    scheduler = BernoulliScheduler(
        num_train_timesteps=desc["num_train_timesteps"], schedule=desc.get("schedule", "linear_beta"),
        prediction_type=desc.get("prediction_type", "sample"),
    )
    pipe = AnomalyPipeline(
        ae, unet, scheduler, noise_level=noise_level, prob_threshold=prob_threshold, num_inference_steps=steps,
        output_keys=("reconstruction", "latent_confident_change", "latent_code_change"), seed=0,
    )
    load_pipeline_weights(pipe, model_path, map_location="cpu", preset=desc["preset"], in_channels=desc["in_channels"])
    return pipe.to(device).eval(), desc


def _autoencoder_reconstruction(ae: Any, x: torch.Tensor) -> torch.Tensor:
    """``D(E(x))`` clamped to [0, 1]; constant (empty) slices are returned as they are, as the pipeline does."""
    rec = ae.decode_stage_2_outputs(ae.encode_stage_2_inputs(x).float()).float().clamp(0.0, 1.0)
    flat = x.reshape(len(x), -1)
    return torch.where((flat.amax(1) <= flat.amin(1)).view(-1, *([1] * (x.ndim - 1))), x, rec)


def _run_networks(pipe: Any, image: np.ndarray, batch: int, device: torch.device) -> dict[str, np.ndarray]:
    """Reconstruction, autoencoder reconstruction and the two latent maps of every slice (Z, ...)."""
    parts: dict[str, list[torch.Tensor]] = {"reconstruction": [], "autoencoder": [], "cc": [], "code_change": []}
    with torch.inference_mode():
        for i in range(0, len(image), batch):
            x = torch.from_numpy(image[i : i + batch]).to(device)
            o = pipe.run(x)
            parts["reconstruction"].append(o["reconstruction"].cpu())
            parts["cc"].append(o["latent_confident_change"][:, 0].cpu())
            parts["code_change"].append(o["latent_code_change"][:, 0].cpu())
            parts["autoencoder"].append(_autoencoder_reconstruction(pipe.autoencoder, x).cpu())
    return {k: torch.cat(v).numpy() for k, v in parts.items()}


def _apply_rule(rule: MapRule, image: np.ndarray, nets: Mapping[str, np.ndarray], floor: float) -> np.ndarray:
    from berdiff.residual import channel_index, channel_weights_for, residual_map

    x = torch.from_numpy(image)
    rec = torch.from_numpy(nets[rule.get("source", "reconstruction")])
    prior = channel_index(MODALITIES, rule["prior"])
    m = residual_map(
        rec, x, rule["sign"], channel_weights_for(MODALITIES, rule["channels"]),
        None if prior is None else x[:, prior : prior + 1], rule.get("power", 1.0), rule.get("floor", 0.0),
    )[:, 0].numpy()
    if rule["weighting"] == "confident_change":
        m = m * (floor + nets["cc"])
    elif rule["weighting"] is not None:
        raise ValueError(f"the study weights by confident_change only, got {rule['weighting']!r}.")
    return m


def _score(maps: Mapping[str, Mapping[str, np.ndarray]], volumes: Mapping[str, Mapping[str, np.ndarray]],
           comparisons_against: Sequence[str], n_resamples: int) -> dict[str, Any]:
    """Score every map of every subject (protocols A, B, detection) and the paired bootstraps against references."""
    from berdiff.evaluation.comparisons import compare_maps
    from berdiff.evaluation.scoring import ProtocolSettings, score_case, summarise_map

    # volumes laid out as evaluate reads NIfTI files, (H, W, Z) with the slices last: the same brain-mask erosion
    settings = ProtocolSettings(axis=-1, compute_psnr=False)
    scored = []
    for subject, vol in volumes.items():
        image = np.moveaxis(vol["image"], 0, -1)  # (C, H, W, Z)
        label = np.moveaxis(vol["label"], 0, -1)
        case_maps: dict[str, dict] = {}
        for name, per_subject in maps.items():
            one = score_case({"name": subject, "score": np.moveaxis(per_subject[subject], 0, -1), "label": label,
                              "image": image}, 0, settings)
            case_maps[name] = one["maps"]["anomaly"]
            row = one["row"]
        scored.append({"row": row, "maps": case_maps})
    summary = {name: summarise_map(scored, name) for name in maps}
    comparisons = {}
    for method in maps:
        refs = [r for r in comparisons_against if r != method and r in maps]
        comparisons[method] = compare_maps(scored, method=method, references=refs, n_resamples=n_resamples)
    return {"maps": summary, "comparisons": comparisons}


def _autoencoder_run(path: str, preset: str, rules: Mapping[str, MapRule], volumes: Mapping[str, Any], floor: float,
                     batch: int, device: torch.device, inputs: Mapping[str, Any], n_resamples: int) -> dict[str, Any]:
    """The autoencoder-only maps of one stage-1 weight file, scored like the models' maps."""
    from berdiff.evaluation.autoencoder_check import _load_autoencoder

    ae = _load_autoencoder(path, preset, len(MODALITIES)).to(device)
    nets: dict[str, dict[str, np.ndarray]] = {}
    with torch.inference_mode():
        for s, v in volumes.items():
            parts = []
            for i in range(0, len(v["image"]), batch):
                x = torch.from_numpy(v["image"][i : i + batch]).to(device)
                parts.append(_autoencoder_reconstruction(ae, x).cpu())
            nets[s] = {"autoencoder": torch.cat(parts).numpy()}
    names = [n for n, r in rules.items() if r.get("source") == "autoencoder"]
    maps = {n: {s: _apply_rule(rules[n], volumes[s]["image"], nets[s], floor) for s in volumes} for n in names}
    maps.update(inputs)
    return {"weights": path, **_score(maps, volumes, list(inputs), n_resamples)}


def _row(name: str, s: Mapping[str, Any], comp: Mapping[str, Any] | None) -> str:
    a, b, det = s["protocol_a"], s["protocol_b"], s["slice_detection"]

    def ci(metric: str) -> str:
        if not comp:
            return ""
        c = comp.get(metric, {})
        if not c or c.get("n", 0) == 0:
            return ""
        return f" ({c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}])"

    return (
        f"| {name} | {a['dice']['mean']:.3f}{ci('slice_dice')} | {b['best_dice_upper_bound']['mean']:.3f}"
        f"{ci('volume_best_dice')} | {b['auroc']['mean']:.3f} | {b['auprc']['mean']:.3f}{ci('volume_auprc')} | "
        f"{det['auroc']:.3f} |"
    )


def _table(result: Mapping[str, Any], names: Sequence[str], reference: str) -> list[str]:
    lines = [
        f"| map | protocol A Dice (vs {reference}) | per volume best Dice (vs {reference}) | per volume AUROC | "
        f"per volume AUPRC (vs {reference}) | slice detection AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        if name in result["maps"]:
            lines.append(_row(name, result["maps"][name], result["comparisons"].get(name, {}).get(reference)))
    return lines


def brats_study(
    prepared: str,
    models: str | Sequence[str],
    out: str,
    noise_levels: Sequence[int] | int = (50,),
    prob_thresholds: Sequence[float] | float = (0.8,),
    num_inference_steps: Sequence[int] | int = (10,),
    slice_start: int | None = 40,
    slice_stop: int | None = 89,
    split: str = "validation",
    bundle: str | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    threads: int | None = None,
    n_resamples: int = 10_000,
    autoencoders: str | Sequence[str] | None = None,
    autoencoder_preset: str = "small",
) -> dict[str, Any]:
    """
    Score trained brain-bundle models on the validation subjects of a ``prepare_brats`` folder: every map variant of
    :func:`default_map_rules` for each model and (L, P, K), with bootstrap intervals against the raw FLAIR intensity;
    writes ``out/study.json`` and ``out/study.md``.

    Args:
        prepared: the ``prepare_brats`` output folder the models were trained on.
        models: one or more bundle roots with ``models/model.pt`` (a list, or one comma-separated string), e.g. the
            same recipe with different stage-1 settings; the first is the main model.
        out: output folder.
        noise_levels, prob_thresholds, num_inference_steps: the (L, P, K) grid; every combination is run
            (K is capped at L).
        slice_start, slice_stop: the scored slice range of the prepared slices (default 40..88: the paper's
            axial range 80-128 for volumes cut to the BraTS slices 40-139, as the shipped sample is).
        split: ``validation`` (the held-out subjects) or ``training`` (to tune on the training subjects' tumours).
        bundle: the brain bundle whose ``configs/inference.yaml`` gives the default map (default: this checkout's).
        batch_size: slices per network call.
        device: torch device.
        threads: torch CPU threads (default: torch's).
        n_resamples: bootstrap resamples of each interval.
        autoencoders: stage-1 weight files (a list, or one comma-separated string; e.g. the same run's weights after
            more or fewer epochs) whose autoencoder-only maps are scored too, without a denoiser.
        autoencoder_preset: the preset of those weights.
    """
    import yaml

    from berdiff.apps.demo import default_bundle_dir

    if threads:
        torch.set_num_threads(int(threads))
    model_dirs = [Path(m) for m in (models.split(",") if isinstance(models, str) else models)]
    levels = [int(v) for v in np.atleast_1d(noise_levels)]
    probs = [float(v) for v in np.atleast_1d(prob_thresholds)]
    ks = [int(v) for v in np.atleast_1d(num_inference_steps)]
    for m in model_dirs:
        if not (m / "models" / "model.pt").is_file():
            raise FileNotFoundError(f"no trained model at {m / 'models' / 'model.pt'}.")
    bundle_dir = Path(bundle) if bundle else default_bundle_dir()
    config = yaml.safe_load((bundle_dir / "configs" / "inference.yaml").read_text())
    floor = float(config.get("latent_weight_floor", 0.02))
    rules = default_map_rules(config)
    volumes = load_subject_volumes(prepared, split, slice_start, slice_stop)
    dev = torch.device(device)
    inputs = {f"input_{m}": {s: v["image"][:, i] for s, v in volumes.items()} for i, m in enumerate(MODALITIES)}
    reference = "input_flair"
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for model_dir in model_dirs:
        for L in levels:
            for P in probs:
                for K in ks:
                    K = min(K, L)
                    pipe, desc = _load_pipeline(model_dir, L, P, K, dev)
                    start = time.perf_counter()
                    nets = {s: _run_networks(pipe, v["image"], batch_size, dev) for s, v in volumes.items()}
                    seconds = time.perf_counter() - start
                    # every map for the first setting of each model, the main ones for the rest of the grid
                    names = list(rules) if not runs or runs[-1]["model"] != str(model_dir) else GRID_MAPS
                    maps = {name: {s: _apply_rule(rules[name], volumes[s]["image"], nets[s], floor) for s in volumes}
                            for name in names}
                    maps["latent_confident_change"] = {s: nets[s]["cc"] for s in volumes}
                    if names is not GRID_MAPS:
                        maps["latent_code_change"] = {s: nets[s]["code_change"] for s in volumes}
                    maps.update(inputs if names is not GRID_MAPS else {reference: inputs[reference]})
                    scores = _score(maps, volumes, [reference, "autoencoder_default", "autoencoder_learned"],
                                    n_resamples)
                    runs.append({"model": str(model_dir), "noise_level": L, "prob_threshold": P,
                                 "num_inference_steps": K, "network_seconds": round(seconds, 1),
                                 "model_description": desc, **scores})
                    d = scores["maps"]["default"]
                    print(f"brats_study: {model_dir.name} L={L} P={P} K={K}: default map A Dice "
                          f"{d['protocol_a']['dice']['mean']:.3f}, best Dice "
                          f"{d['protocol_b']['best_dice_upper_bound']['mean']:.3f}, AUPRC "
                          f"{d['protocol_b']['auprc']['mean']:.3f} ({seconds:.0f} s)", flush=True)
    ae_runs: list[dict[str, Any]] = []
    ae_files = [] if not autoencoders else (autoencoders.split(",") if isinstance(autoencoders, str) else autoencoders)
    for path in ae_files:
        ae_runs.append(_autoencoder_run(str(path), autoencoder_preset, rules, volumes, floor, batch_size, dev,
                                        {reference: inputs[reference]}, n_resamples))
    result = {
        "prepared": str(Path(prepared).resolve()), "split": split, "subjects": list(volumes),
        "autoencoder_runs": ae_runs,
        "slice_range": [slice_start, slice_stop], "rules": rules, "reference": reference,
        "inference_defaults": {k: config.get(k) for k in ("residual_sign", "residual_channels", "intensity_prior",
                                                          "latent_weighting", "latent_weight_floor")},
        "runs": runs, "seconds": round(time.perf_counter() - t0, 1),
    }
    md = _markdown(result)
    out_dir = Path(out)
    atomic_write_files({out_dir / "study.json": json.dumps(to_json_safe(result), indent=1).encode(),
                        out_dir / "study.md": md.encode()})
    print(md)
    return result


def _markdown(result: Mapping[str, Any]) -> str:
    ref = result["reference"]
    lines = [
        f"Subjects ({result['split']}): {', '.join(result['subjects'])}; slices {result['slice_range']}. "
        f"Brackets: the difference to `{ref}` with its paired bootstrap 95 % interval (slices for protocol A, "
        "volumes for protocol B).",
        "",
    ]
    first = result["runs"][0]
    main = [n for n in first["maps"] if not n.startswith("residual_")]
    lines += [f"### {Path(first['model']).name}, L = {first['noise_level']}, P = {first['prob_threshold']}, "
              f"K = {first['num_inference_steps']}: every map", ""]
    lines += _table(first, main + [n for n in first["maps"] if n.startswith("residual_")], ref)
    if len(result["runs"]) > 1:
        lines += ["", "### every model and (L, P, K): the default, learned and autoencoder-only maps", "",
                  "| model | L | P | K | map | protocol A Dice | best Dice | AUROC | AUPRC | detection |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for run in result["runs"]:
            for name in ("default", "learned", "paper", "autoencoder_default"):
                s = run["maps"][name]
                lines.append(
                    f"| {Path(run['model']).name} | {run['noise_level']} | {run['prob_threshold']} | "
                    f"{run['num_inference_steps']} | {name} | {s['protocol_a']['dice']['mean']:.3f} | "
                    f"{s['protocol_b']['best_dice_upper_bound']['mean']:.3f} | {s['protocol_b']['auroc']['mean']:.3f} | "
                    f"{s['protocol_b']['auprc']['mean']:.3f} | {s['slice_detection']['auroc']:.3f} |"
                )
    for run in result.get("autoencoder_runs", []):
        lines += ["", f"### stage-1 weights `{Path(run['weights']).name}` alone (autoencoder-only maps)", ""]
        lines += _table(run, [n for n in run["maps"] if n.startswith("autoencoder_")] + [ref], ref)
    return "\n".join(lines) + "\n"
