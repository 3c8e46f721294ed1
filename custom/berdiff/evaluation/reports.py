# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The outputs of an evaluation: ``metrics.json`` (strict JSON, NaN as ``null``), ``per_case.csv``, ``figure.png`` (best,
median and worst case) and the printed summary; :func:`write_outputs` renders them in memory and writes them all
atomically with :func:`berdiff.utils.atomic_write_files`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from berdiff.utils import atomic_write_files, to_json_safe

__all__ = ["csv_bytes", "figure_png", "summary_text", "write_outputs"]


def write_outputs(result: dict, scored: Sequence[dict], out_dir: Path, figure: bool) -> None:
    """
    Render all outputs in memory, then write ``metrics.json``, ``per_case.csv`` and ``figure.png`` atomically.

    Args:
        result: the metrics dict of :func:`berdiff.evaluation.evaluate_arrays`.
        scored: the per-case results of :func:`berdiff.evaluation.scoring.score_case`.
        out_dir: the output folder.
        figure: also write ``figure.png``.
    """
    metrics = to_json_safe({k: v for k, v in result.items() if k != "per_case"})
    files = {
        out_dir / "metrics.json": json.dumps(metrics, indent=2, allow_nan=False).encode(),
        out_dir / "per_case.csv": csv_bytes(result["per_case"]),
    }
    if figure:
        files[out_dir / "figure.png"] = figure_png(scored, "anomaly_a_dice")
    atomic_write_files(files)


def csv_bytes(rows: Sequence[dict]) -> bytes:
    """
    The per-case rows as CSV (columns in order of first appearance, floats with 6 significant digits).

    Args:
        rows: one dict per case.
    """
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue().encode()


def figure_png(scored: Sequence[dict], rank_key: str) -> bytes:
    """
    The figure (PNG bytes): rows best, median and worst case by ``rank_key``; columns input, reconstruction, anomaly
    map, the autoencoder-only map when there is one, and ground truth, on the slice with the largest tumour area.

    Args:
        scored: the per-case results of :func:`berdiff.evaluation.scoring.score_case`.
        rank_key: the per-case row column cases are ranked by.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    ranked = [c for c in scored if np.isfinite(c["row"].get(rank_key, float("nan")))]
    if ranked:
        ranked.sort(key=lambda c: c["row"][rank_key], reverse=True)
        picks = [("best", ranked[0]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[-1])]
    else:
        picks = [("case", c) for c in scored[:3]]
    rows: list[tuple[str, dict]] = []
    for tag, c in picks:  # with fewer than 3 ranked cases one row carries several tags ("median, worst")
        same = [i for i, (_, other) in enumerate(rows) if other is c]
        if same:
            rows[same[0]] = (f"{rows[same[0]][0]}, {tag}", c)
        else:
            rows.append((tag, c))
    columns = [("input", "image", "gray"), ("reconstruction", "recon", "gray"), ("anomaly map", "score", "inferno")]
    if any(c["figure"].get("autoencoder") is not None for _, c in rows):
        columns.append(("autoencoder-only map", "autoencoder", "inferno"))
    columns.append(("ground truth", "label", "gray"))
    fig = Figure(figsize=(3.0 * len(columns), 3.0 * len(rows)))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (tag, c) in enumerate(rows):
        for k, (title, key, cmap) in enumerate(columns):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            arr = c["figure"].get(key)
            if arr is None:
                ax.text(0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(np.rot90(np.asarray(arr, dtype=np.float32)), cmap=cmap)
            if r == 0:
                ax.set_title(title)
            if k == 0:
                value = c["row"].get(rank_key, float("nan"))
                label = f"{tag}: {c['row']['case']}\nDice_A {value:.3f}, slice {c['figure']['slice']}"
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def summary_text(result: dict, out_dir: Path) -> str:
    """
    The printed summary: per map, the means of protocols A, B and slice detection.

    Args:
        result: the metrics dict.
        out_dir: the output folder, named in the first line.
    """

    def fmt(d: dict) -> str:
        if not d or d.get("n", 0) == 0:
            return "n/a"
        return f"{d['mean']:.4f} ± {d['std']:.4f} (n={d['n']})"

    lines = [f"evaluated {result['n_cases']} cases ({result['n_diseased_cases']} with tumour) -> {out_dir}"]
    for name, m in result["maps"].items():
        a, b = m["protocol_a"], m["protocol_b"]
        lines.append(f"[{name}]")
        lines.append(f"  A per-slice  Dice {fmt(a['dice'])}  AUROC {fmt(a['auroc'])}  AUPRC {fmt(a['auprc'])}")
        lines.append(
            f"  B per-volume Dice {fmt(b['dice'])}  best Dice (upper bound) {fmt(b['best_dice_upper_bound'])}  "
            f"AUROC {fmt(b['auroc'])}  AUPRC {fmt(b['auprc'])}"
        )
        lines.append(f"  slice detection AUROC {m['slice_detection']['auroc']:.4f}")
    lines.append(f"  threshold: {result['settings']['protocol_b']['threshold_source']}")
    return "\n".join(lines)
