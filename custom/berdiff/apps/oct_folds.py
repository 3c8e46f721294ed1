# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Cross-fitting folds of the OCT training scans: ``python -m berdiff oct_folds --train_dir OCT_DIR/train/NORMAL --out
FOLDS``.

The validation set's tuning split holds few normal scans (20 in the measured set), and the normal scans that score
high are what an image-level AUROC near 1 is lost to. Cross-fitting uses the training scans as more normal tuning
scans without scoring a model on its own training data: ``FOLDS/fold<f>.json`` is a datalist whose ``training``
section holds every training scan but those of fold ``f`` (the scans at positions ``k`` with ``k % num_folds == f`` in
file-name order), and whose ``held_out`` section holds fold ``f``. A model trained on ``fold<f>.json`` (``--train_dir
FOLDS/fold<f>.json``) is then swept on the tuning split plus its held-out scans (``python -m berdiff oct_sweep
--extra_normals FOLDS/fold<f>.json``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from berdiff.data.images2d import list_images
from berdiff.utils import atomic_write_json

__all__ = ["HELD_OUT_KEY", "training_folds", "oct_folds"]

#: the datalist section of a fold file with the scans its model does not train on
HELD_OUT_KEY = "held_out"


def training_folds(train_dir: str | os.PathLike, num_folds: int = 2) -> list[dict[str, list[dict[str, Any]]]]:
    """
    The cross-fitting folds of the image files directly inside ``train_dir`` (module docstring).

    Args:
        train_dir: the folder of normal training scans (e.g. ``OCT_DIR/train/NORMAL``).
        num_folds: the number of folds, >= 2.

    Returns:
        One ``{"training": [...], "held_out": [...]}`` datalist per fold (``{"image": absolute path}`` items); the
        held-out sections are disjoint and together hold every scan.

    Raises:
        ValueError: ``num_folds`` is not an integer >= 2, or the folder holds fewer scans than folds.
        FileNotFoundError: the folder is missing or holds no image file.
    """
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}.")
    files = [str(Path(p).resolve()) for p in list_images(train_dir)]
    if len(files) < num_folds:
        raise ValueError(f"{os.fspath(train_dir)!r} holds {len(files)} scans, fewer than num_folds={num_folds}.")
    folds = []
    for f in range(num_folds):
        folds.append({
            "training": [{"image": p} for k, p in enumerate(files) if k % num_folds != f],
            HELD_OUT_KEY: [{"image": p} for k, p in enumerate(files) if k % num_folds == f],
        })
    return folds


def oct_folds(train_dir: str, out: str, num_folds: int = 2) -> list[str]:
    """
    Writes ``out/fold<f>.json`` for every fold of :func:`training_folds` (module docstring).

    Args:
        train_dir: the folder of normal training scans.
        out: the output folder (created).
        num_folds: the number of folds, >= 2.

    Returns:
        The written files.
    """
    folds = training_folds(train_dir, num_folds)
    os.makedirs(out, exist_ok=True)
    written = []
    for f, fold in enumerate(folds):
        path = os.path.join(out, f"fold{f}.json")
        atomic_write_json(fold, path)
        written.append(path)
        print(f"{path}: {len(fold['training'])} training, {len(fold[HELD_OUT_KEY])} held-out scans")
    return written
