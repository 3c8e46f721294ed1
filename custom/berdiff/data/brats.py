# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
BraTS-style brain MRI preparation: the cases (:func:`berdiff.data.brats_cases.find_brats_cases`), a subject-level
split, axial slice extraction into a pre-sliced ``.npy`` cache and the datalist used by the training configs.

Output of :func:`prepare_brats` (``out`` folder)::

    datalist.json                                 # see below
    slices/<subject>/<subject>_z<k>_image.npy     # float16 (C, H, W) in [0, 1], every slice in the slice range
    slices/<subject>/<subject>_z<k>_label.npy     # uint8 (1, H, W) binary tumour mask, diseased slices only

``datalist.json`` holds Decathlon-style lists (``monai.data.load_decathlon_datalist(path, True, key)`` resolves the
relative paths): ``training`` / ``validation`` = healthy slices of the train / validation subjects (keys ``image``,
``subject``, ``slice``); ``training_diseased`` / ``validation_diseased`` = diseased slices (with ``label``);
``subjects`` = the subject ids per split; ``volumes`` = the source files per split (absolute ``image`` list and
``label``) for volume-level evaluation; ``counts`` and the preparation settings.

``validation_volumes.json`` lists the validation subjects' source volumes as ``{"testing": [{"image": [t1, t1ce, t2,
flair], "label": seg}, ...]}`` (absolute paths): the held-out cases for bundle inference (``--datalist``) and
``python -m berdiff evaluate`` (``--label``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from berdiff.data.brats_cases import find_brats_cases
from berdiff.transforms import CheckImageFilesd, volume_preprocessing
from berdiff.utils import MODALITIES, atomic_write_json
from berdiff.validation.errors import root_cause

__all__ = [
    "DATALIST_NAME",
    "VALIDATION_VOLUMES_NAME",
    "REFERENCE_DEPTH",
    "REFERENCE_EXCLUDE_LOWER",
    "REFERENCE_EXCLUDE_UPPER",
    "split_subjects",
    "axial_slice_range",
    "prepare_brats",
]

#: file name of the datalist written by :func:`prepare_brats`
DATALIST_NAME = "datalist.json"
#: file name of the validation subjects' volumes written by :func:`prepare_brats`: a datalist for bundle inference
#: (``--datalist``) and ``python -m berdiff evaluate`` (``--label``)
VALIDATION_VOLUMES_NAME = "validation_volumes.json"
#: the reference's slice rule: of the 155 axial slices of a BraTS volume, exclude the lowest 80 and the uppermost 26
REFERENCE_DEPTH = 155
REFERENCE_EXCLUDE_LOWER = 80
REFERENCE_EXCLUDE_UPPER = 26


def split_subjects(subjects: Sequence[str], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """
    Seeded subject-level split. The validation set has ``round(val_fraction * n)`` subjects, at least 1 when
    ``val_fraction > 0`` and at most ``n - 1``.

    Args:
        subjects: subject ids (unique).
        val_fraction: fraction of subjects for validation, in [0, 1).
        seed: random seed of the split.

    Returns:
        sorted train and validation subject lists.
    """
    subjects = sorted(subjects)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if val_fraction == 0:
        return subjects, []
    if len(subjects) < 2:
        raise ValueError(f"a validation split needs at least 2 subjects, got {len(subjects)}; use val_fraction=0.")
    n_val = min(max(1, round(val_fraction * len(subjects))), len(subjects) - 1)
    train, val = train_test_split(subjects, test_size=n_val, random_state=seed, shuffle=True)
    return sorted(train), sorted(val)


def axial_slice_range(depth: int, slice_start: int | None = None, slice_stop: int | None = None) -> range:
    """
    Axial slice indices (in RAS order, index 0 = most inferior) kept for training and evaluation.

    The default is the reference rule "exclude the lowest 80 and the uppermost 26 of the 155 axial slices", i.e.
    slices 80..128 of a 155-slice BraTS volume. For a volume of another depth the rule is scaled proportionally:
    ``start = round(80 * depth / 155)``, ``stop = depth - round(26 * depth / 155)``.

    Args:
        depth: number of axial slices.
        slice_start: first slice index (Python semantics, negative counts from the top); default from the rule.
        slice_stop: one past the last slice index (Python semantics); default from the rule.
    """
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}.")
    default_start = round(REFERENCE_EXCLUDE_LOWER * depth / REFERENCE_DEPTH)
    default_stop = depth - round(REFERENCE_EXCLUDE_UPPER * depth / REFERENCE_DEPTH)
    start, stop, _ = slice(
        default_start if slice_start is None else int(slice_start),
        default_stop if slice_stop is None else int(slice_stop),
    ).indices(depth)
    if stop <= start:
        raise ValueError(f"empty slice range [{slice_start}, {slice_stop}) for a volume with {depth} axial slices.")
    return range(start, stop)


def prepare_brats(
    src: str,
    out: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    spatial_size: int | Sequence[int] | str = "auto",
    slice_start: int | None = None,
    slice_stop: int | None = None,
    upper_percentile: float = 99.5,
    datalist_key: str = "training",
    val_subjects: Sequence[str] | None = None,
    pixdim: float | str | None = "auto",
    preset: str = "reference",
) -> None:
    """
    Prepare BraTS-style volumes for training: discover the cases, split them by subject (seeded), preprocess each
    volume with :func:`berdiff.transforms.volume_preprocessing` (the same as inference: RAS, per-volume head
    percentile scaling to [0, 1], optional in-plane resampling, in-plane pad/crop), write every axial slice of the
    slice range as a float16 ``.npy`` file (so training epochs never re-read NIfTI volumes), and write
    ``<out>/datalist.json`` (see the module docstring). A slice is healthy when its segmentation has no tumour voxel (label > 0). Prints the counts.

    All inputs are checked before anything is written; the output appears only when every case succeeded.

    Args:
        src: BraTS-layout root folder, or a Decathlon-style datalist JSON.
        out: output folder (created; an earlier ``slices/`` and ``datalist.json`` there are replaced).
        val_fraction: fraction of subjects held out for validation.
        seed: seed of the subject split.
        spatial_size: in-plane size after padding/cropping (an int for a square, or two ints); ``"auto"``: the
            ``preset``'s (:data:`berdiff.networks.PRESET_GRIDS`: 256 for reference, 128 for small).
        slice_start: first axial slice kept (default: the reference rule, see :func:`axial_slice_range`).
        slice_stop: one past the last axial slice kept (default: the reference rule).
        upper_percentile: head percentile mapped to 1 by the intensity scaling.
        datalist_key: list to read when ``src`` is a datalist JSON.
        val_subjects: explicit validation subjects (e.g. an official split); replaces the seeded
            ``val_fraction`` split when given.
        pixdim: in-plane voxel size (mm) the volumes are resampled to, None to keep theirs; ``"auto"``: the
            ``preset``'s (None for reference, 2.0 for small). Recorded in ``datalist.json`` with ``spatial_size``,
            and training records both in ``models/model.json``, so that inference uses the same grid.
        preset: the network preset that will be trained on the slices (only for the ``"auto"`` values).

    Raises:
        ValueError: with a message naming the offending folder or file.
    """
    from berdiff.networks.presets import preset_grid
    from berdiff.validation import check_pixdim, check_spatial_size

    grid = preset_grid(preset, spatial_size, pixdim)
    size = check_spatial_size(grid["spatial_size"])
    pixdim = check_pixdim(grid["pixdim"])
    cases = find_brats_cases(src, require_label=True, datalist_key=datalist_key)
    all_ids = [c["subject"] for c in cases]
    if val_subjects is not None:
        val_subjects = [val_subjects] if isinstance(val_subjects, str) else [str(v) for v in val_subjects]
        unknown = sorted(set(val_subjects) - set(all_ids))
        if unknown:
            raise ValueError(f"val_subjects not found in {src}: {unknown}.")
        val_ids = sorted(set(val_subjects))
        train_ids = sorted(set(all_ids) - set(val_ids))
    else:
        train_ids, val_ids = split_subjects(all_ids, val_fraction, seed)
    split_of = {**{s: "training" for s in train_ids}, **{s: "validation" for s in val_ids}}

    checker = CheckImageFilesd("image", num_channels=len(MODALITIES))
    label_checker = CheckImageFilesd("label", num_channels=1, reference_key="image")
    for case in cases:  # header-only checks of every file before any output is written
        label_checker(checker(case))

    preprocessing = volume_preprocessing(
        keys="image", label_key="label", num_channels=len(MODALITIES), spatial_size=size,
        upper_percentile=upper_percentile, pixdim=pixdim,
    )
    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".prepare_brats.", dir=out)
    lists: dict[str, list] = {"training": [], "validation": [], "training_diseased": [], "validation_diseased": []}
    volumes: dict[str, list] = {"training": [], "validation": []}
    slice_ranges: dict[str, list[int]] = {}
    from tqdm.auto import tqdm

    try:
        for case in tqdm(cases, desc="prepare_brats", unit="subject", dynamic_ncols=True, mininterval=1.0):
            subject, split = case["subject"], split_of[case["subject"]]
            try:
                data = preprocessing({"image": case["image"], "label": case["label"]})
            except Exception as e:  # MONAI wraps transform errors; show the original message
                cause = root_cause(e)
                raise ValueError(f"subject {subject}: {cause}") from cause
            image = torch.as_tensor(data["image"]).float().numpy()
            label = torch.as_tensor(data["label"]).numpy()
            depth = image.shape[-1]
            zs = axial_slice_range(depth, slice_start, slice_stop)
            slice_ranges[subject] = [zs.start, zs.stop]
            folder = os.path.join(staging, "slices", subject)
            os.makedirs(folder)
            for z in zs:
                rel = f"slices/{subject}/{subject}_z{z:03d}"
                np.save(os.path.join(staging, rel + "_image.npy"), image[..., z].astype(np.float16))
                mask = label[..., z] > 0
                entry: dict[str, Any] = {"image": rel + "_image.npy", "subject": subject, "slice": z}
                if mask.any():
                    np.save(os.path.join(staging, rel + "_label.npy"), mask.astype(np.uint8))
                    entry["label"] = rel + "_label.npy"
                    lists[f"{split}_diseased"].append(entry)
                else:
                    lists[split].append(entry)
            volumes[split].append(
                {"subject": subject, "image": [os.path.abspath(p) for p in np.atleast_1d(case["image"]).tolist()],
                 "label": os.path.abspath(case["label"])}
            )
        counts = {
            split: {
                "subjects": len(volumes[split]),
                "healthy_slices": len(lists[split]),
                "diseased_slices": len(lists[f"{split}_diseased"]),
            }
            for split in ("training", "validation")
        }
        datalist = {
            "description": "healthy (training/validation) and diseased axial slices, written by berdiff prepare_brats",
            "source": os.path.abspath(os.fspath(src)),
            "modalities": list(MODALITIES),
            "spatial_size": size,
            "pixdim": pixdim,
            "slice_start": slice_start,
            "slice_stop": slice_stop,
            "slice_ranges": slice_ranges,
            "upper_percentile": upper_percentile,
            "val_fraction": val_fraction,
            "seed": seed,
            "counts": counts,
            "subjects": {"training": train_ids, "validation": val_ids},
            "volumes": volumes,
            **lists,
        }
        atomic_write_json(datalist, os.path.join(staging, DATALIST_NAME), indent=1)
        testing = [{"image": v["image"], "label": v["label"]} for v in volumes["validation"]]
        atomic_write_json({"testing": testing}, os.path.join(staging, VALIDATION_VOLUMES_NAME), indent=1)
        # publish: replace an earlier output only now that everything succeeded
        final_slices = os.path.join(out, "slices")
        if os.path.isdir(final_slices):
            shutil.rmtree(final_slices)
        os.replace(os.path.join(staging, "slices"), final_slices)
        os.replace(os.path.join(staging, VALIDATION_VOLUMES_NAME), os.path.join(out, VALIDATION_VOLUMES_NAME))
        os.replace(os.path.join(staging, DATALIST_NAME), os.path.join(out, DATALIST_NAME))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    print(f"prepared {len(cases)} subjects from {src} -> {os.path.join(out, DATALIST_NAME)}")
    print(f"{'split':<12}{'subjects':>10}{'healthy':>10}{'diseased':>10}")
    for split, c in counts.items():
        print(f"{split:<12}{c['subjects']:>10}{c['healthy_slices']:>10}{c['diseased_slices']:>10}")
