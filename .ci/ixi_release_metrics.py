# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Metrics of the IXI bundle's released weights on a synthetic-lesion set (``python -m berdiff make_lesions``), from the
anomaly maps that the bundle's ``configs/inference.yaml`` wrote for its ``images/`` and ``healthy/`` folders::

    python .ci/ixi_release_metrics.py --lesions LESIONS --maps OUT/lesion_maps --healthy_maps OUT/healthy_maps \
        --out OUT/metrics.json

Pooled pixel AUROC / AUPRC over all lesion images (whole image and inside the brain mask of
``berdiff.data.images2d.brain_mask``), the pooled best-possible Dice (one threshold for all images, an upper bound),
and image-level detection AUROC (99th percentile of the map inside the brain: lesion vs. the same image without it).
"""

from __future__ import annotations

import argparse
import json
import os

import nibabel as nib
import numpy as np
from sklearn.metrics import roc_auc_score

from berdiff.data.images2d import brain_mask, list_images, stem
from berdiff.evaluation.metrics import best_dice, pixel_auprc, pixel_auroc


def _map(folder: str, name: str) -> np.ndarray:
    return np.squeeze(np.asarray(nib.load(os.path.join(folder, f"{name}_anomaly.nii.gz")).dataobj, np.float32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--lesions", required=True)
    p.add_argument("--maps", required=True)
    p.add_argument("--healthy_maps", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    scores, labels, masks, det_scores, det_labels = [], [], [], [], []
    for path in list_images(os.path.join(args.lesions, "images")):
        name = stem(path)
        label = np.squeeze(np.asarray(nib.load(os.path.join(args.lesions, "labels", f"{name}.nii.gz")).dataobj)) > 0
        healthy = np.squeeze(np.asarray(nib.load(os.path.join(args.lesions, "healthy", f"{name}.nii.gz")).dataobj))
        mask = brain_mask(healthy) | label
        score, score_h = _map(args.maps, name), _map(args.healthy_maps, name)
        if score.shape != label.shape:
            raise ValueError(f"{name}: map shape {score.shape} != label shape {label.shape}")
        scores.append(score.ravel())
        labels.append(label.ravel())
        masks.append(mask.ravel())
        det_scores += [float(np.percentile(score[mask], 99)), float(np.percentile(score_h[mask], 99))]
        det_labels += [1, 0]
    s, g, m = np.concatenate(scores), np.concatenate(labels), np.concatenate(masks)
    dice, thr = best_dice(s, g, m)
    metrics = {
        "num_lesion_images": len(scores),
        "pixel_auroc": round(pixel_auroc(s, g), 4),
        "pixel_auprc": round(pixel_auprc(s, g), 4),
        "brain_pixel_auroc": round(pixel_auroc(s, g, m), 4),
        "brain_pixel_auprc": round(pixel_auprc(s, g, m), 4),
        "best_dice_pooled": round(float(dice), 4),
        "best_dice_threshold": float(thr),
        "image_detection_auroc": round(float(roc_auc_score(det_labels, det_scores)), 4),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(json.dumps(metrics, indent=4) + "\n")
    print(json.dumps(metrics, indent=4))


if __name__ == "__main__":
    main()
