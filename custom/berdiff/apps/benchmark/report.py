# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The benchmark's outputs: :func:`render_markdown` (``benchmarks.md``) and :func:`write_results`, which writes it
with ``results.json`` (strict JSON, NaN as ``null``) atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from berdiff.apps.benchmark.settings import METHOD_LABELS, Method
from berdiff.utils import atomic_write_files, to_json_safe

__all__ = ["BenchmarkResults", "render_markdown", "write_results"]


class BenchmarkResults(dict):
    """The benchmark's results (a dict); its string form is one line, so the command line does not print it all."""

    def __str__(self) -> str:
        return "benchmark results: see results.json and benchmarks.md in the output folder"

    __repr__ = __str__


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


def _latent_table(results: dict[str, Any]) -> list[str]:
    """The latent maps of the Bernoulli methods next to their image-space map (held-out split, pooled in the brain)."""
    rows = {m: r["test"] for m, r in results["methods"].items() if r["test"].get("latent_maps")}
    if not rows:
        return []
    lines = ["", "## Latent maps of the Bernoulli methods (held-out lesion slices)", "",
             "Each latent map (`berdiff.inferers.LatentMap`, upsampled to the image) scored like the image-space map's "
             "*brain AUROC / AUPRC*: pooled over the lesion slices' pixels inside their brain masks; 0.5 AUROC is chance.",
             "", "| method | map | brain AUROC | brain AUPRC |", "|---|---|---|---|"]
    for m, t in rows.items():
        label = METHOD_LABELS.get(m, m)
        lines.append(f"| {label} | image-space anomaly map | {_fmt(t.get('auroc_brain_pooled'))} "
                     f"| {_fmt(t.get('auprc_brain_pooled'))} |")
        for name, v in t["latent_maps"].items():
            lines.append(f"| {label} | latent {name} | {_fmt(v['auroc_brain_pooled'])} | {_fmt(v['auprc_brain_pooled'])} |")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """
    The benchmark report (markdown).

    Args:
        results: the results of :func:`~berdiff.apps.benchmark.run.benchmark` (or the ``results.json`` content).
    """
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
        "Protocol A (docs/evaluation.md): no brain mask, 5x5 median filter, p1/p99 clip, per-slice min-max, "
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
    lines += _latent_table(results)
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
                  "of the input code, so that the AE's own reconstruction error drops out; *x confident_change*: the "
                  "residual weighted by the share of bits the denoiser is sure are not healthy (`latent_weighting`).", "",
                  "| reference | Dice@0.5 | oracle Dice | AUPRC |", "|---|---|---|---|"]
        for row in tuning["masked_reference"]:
            name = row["reference"] + (f" x {row['weighting']}" if row.get("weighting") else "")
            lines.append(f"| {name} | {_fmt(row['dice_fixed'])} | {_fmt(row['dice_oracle'])} | {_fmt(row['auprc'])} |")
    for key, title in (("unmasked_l", "unmasked Bernoulli"), ("ddpm_l", "Gaussian DDPM")):
        if tuning.get(key):
            lines += ["", f"## Sweep over L, {title}, tuning split", "", "| L | K | Dice@0.5 | oracle Dice | AUPRC | s / slice (batched) |", "|---|---|---|---|---|---|"]
            for row in tuning[key]:
                lines.append(
                    f"| {row['L']} | {row['K']} | {_fmt(row['dice_fixed'])} | {_fmt(row['dice_oracle'])} | {_fmt(row['auprc'])} "
                    f"| {_fmt(row['wall_seconds_per_slice'], 3)} |"
                )
    lines += ["", "## Settings", "", "```json", json.dumps(to_json_safe(s), indent=1), "```", ""]
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: Path) -> BenchmarkResults:
    """
    Write ``out_dir/results.json`` and ``out_dir/benchmarks.md`` together (atomically).

    Args:
        results: the results of one run.
        out_dir: the output folder.

    Returns:
        the results as written to ``results.json``.
    """
    safe = to_json_safe(results)
    atomic_write_files(
        {
            out_dir / "results.json": json.dumps(safe, indent=1, allow_nan=False).encode(),
            out_dir / "benchmarks.md": render_markdown(results).encode(),
        }
    )
    return BenchmarkResults(safe)
