# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The benchmark's data: the healthy training images, the test pairs (given, or generated from the IXI ``val/`` slices
with :func:`berdiff.data.lesions.make_lesions`) and the seeded tuning / test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from berdiff.apps.benchmark.settings import DataSettings
from berdiff.data.images2d import list_images, load_folder, read_image, resize_label, stem

__all__ = ["BenchmarkData", "load_data", "load_pairs", "split_pairs"]


class BenchmarkData(dict):
    """
    The data of one run: ``train_images`` (N, size, size), ``train_files``, ``train_path``, ``test_path`` and the
    ``tune`` and ``test`` splits of :func:`split_pairs`.
    """


def load_data(settings: DataSettings) -> BenchmarkData:
    """
    Read the training images and the test pairs and split the pairs (a lesion set is generated first when no test
    folder is given).

    Args:
        settings: the data settings.
    """
    train_path = Path(settings.train_dir) if settings.train_dir is not None else settings.folder("train")
    val_path = settings.folder("val") if settings.test_dir is None else None
    train_files = list_images(train_path)
    if settings.limit_train is not None:
        train_files = train_files[: int(settings.limit_train)]
    train_images, _ = load_folder(train_path, settings.size, names=[stem(p) for p in train_files])
    if val_path is not None:
        from berdiff.data.lesions import make_lesions

        test_path = Path(settings.out) / "lesion_set"
        make_lesions(str(val_path), str(test_path), seed=settings.lesion_seed)
    else:
        test_path = Path(settings.test_dir)
    tune, test = split_pairs(load_pairs(test_path, settings.size), settings.tune_fraction, settings.seed)
    return BenchmarkData(
        train_images=train_images, train_files=train_files, train_path=train_path, test_path=test_path,
        tune=tune, test=test,
    )


def load_pairs(test_dir: Path, size: int) -> dict[str, Any]:
    """
    The test pairs ``test_dir/images/<name>`` + ``test_dir/labels/<name>`` (label > 0 anomalous), the optional
    healthy images ``test_dir/healthy/<name>`` and the lesion family of every image (from ``lesions.json``). Images
    without an anomalous pixel count as healthy images.

    Args:
        test_dir: the test folder.
        size: image side after padding + resizing.

    Returns:
        dict with ``images``, ``labels``, ``names``, ``healthy``, ``healthy_names`` and ``families``.
    """
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


def split_pairs(pairs: dict[str, Any], tune_fraction: float, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    A seeded split of the lesion images into a tuning and a held-out test split; a healthy image goes with its
    lesion image's split, other healthy images are split with the same fraction.

    Args:
        pairs: the result of :func:`load_pairs`.
        tune_fraction: fraction of the lesion images used for tuning.
        seed: seed of the permutation.

    Returns:
        ``(tune, test)``, each with the keys of :func:`load_pairs`.
    """
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
