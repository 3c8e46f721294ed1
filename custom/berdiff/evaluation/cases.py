# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The files ``python -m berdiff evaluate`` reads: :func:`find_cases` matches anomaly maps with labels (and optional
images) and checks their shapes from the headers; :func:`load_case` reads one matched case into arrays. NIfTI file
names and case names follow :mod:`berdiff.utils.names`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from berdiff.evaluation.scoring import EXTRA_MAPS, squeeze_to_3d
from berdiff.transforms import MAX_VOXELS
from berdiff.utils import MODALITIES, case_name, strip_nifti

__all__ = ["MATCH_TOKENS", "find_cases", "load_case", "match_key"]

#: trailing name tokens ignored when matching case names (modalities, segmentation, generic image/label names)
MATCH_TOKENS: tuple[str, ...] = MODALITIES + ("seg", "image", "img", "label", "mask")


def match_key(name: str) -> str:
    """
    The key cases are matched by: trailing modality / segmentation / image tokens removed, case-insensitively
    (``BraTS_001_flair`` and ``BraTS_001_seg`` -> ``BraTS_001``), with :func:`berdiff.utils.case_name`.

    Args:
        name: a file name without its NIfTI suffix.
    """
    while (shorter := case_name(name, MATCH_TOKENS)) != name:
        name = shorter
    return name


def _index_by_suffix(folder: Path, suffix: str, what: str) -> dict[str, Path]:
    """Recursively find ``*<suffix>.nii[.gz]`` files; returns {case name: path}; duplicate case names are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        stem = strip_nifti(path.name)
        if stem is None or not path.is_file() or not stem.endswith(suffix) or len(stem) == len(suffix):
            continue
        case = stem[: -len(suffix)] if suffix else stem
        if case in found:
            raise ValueError(f"two {what} files for case {case!r}: {found[case]} and {path}")
        found[case] = path
    return found


def _labels_from_datalist(path: Path, label_suffix: str) -> dict[str, Path]:
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"label datalist {path} is not valid JSON: {e}") from e
    items: list = []
    if isinstance(content, list):
        items = content
    elif isinstance(content, dict):
        for value in content.values():
            if isinstance(value, list):
                items += [v for v in value if isinstance(v, dict) and "label" in v]
    found: dict[str, Path] = {}
    for item in items:
        if not isinstance(item, dict) or "label" not in item:
            continue
        lab = Path(str(item["label"]))
        lab = lab if lab.is_absolute() else path.parent / lab
        stem = strip_nifti(lab.name) or lab.name
        case = stem[: -len(label_suffix)] if label_suffix and stem.endswith(label_suffix) else stem
        found[case] = lab
    if not found:
        raise ValueError(f'label datalist {path} has no entries with a "label" file.')
    return found


def _image_files(folder: Path) -> dict[str, list[Path]]:
    """{case key: modality files ordered t1, t1ce, t2, flair (others after, by name)}; segmentations are skipped."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        stem = strip_nifti(path.name)
        if stem is None or not path.is_file() or stem.lower().endswith("_seg"):
            continue
        groups.setdefault(match_key(stem), []).append(path)

    def order(p: Path) -> tuple[int, str]:
        token = (strip_nifti(p.name) or "").split("_")[-1].lower()
        return (MODALITIES.index(token) if token in MODALITIES else len(MODALITIES), p.name)

    return {k: sorted(v, key=order) for k, v in groups.items()}


def _header_shape(path: Path, what: str) -> tuple[int, ...]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:  # nibabel raises several types for unreadable files
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    if len(shape) > 0 and int(np.prod(np.asarray(shape, dtype=np.float64))) > MAX_VOXELS:  # before reading the data
        raise ValueError(
            f"{what} file {path}: the header claims {shape} voxels, more than {MAX_VOXELS:,}; refusing to read it."
        )
    return shape


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape[:3] if len(shape) >= 3 else shape


def find_cases(
    pred: str | os.PathLike,
    label: str | os.PathLike,
    image: str | os.PathLike | None = None,
    map_suffix: str = "_anomaly",
    recon_suffix: str = "_reconstruction",
    flip_suffix: str = "_latent_flip",
    label_suffix: str = "_seg",
    allow_missing_labels: bool = False,
) -> list[dict[str, Any]]:
    """
    Match prediction files with labels (and optional images) and check their shapes from the headers.

    Matching: a map ``<case><map_suffix>.nii[.gz]`` anywhere under ``pred`` is matched with the label
    ``<case><label_suffix>.nii[.gz]`` anywhere under ``label`` (a folder, or a JSON datalist whose entries hold a
    ``"label"`` path). When no exact name matches, names are compared with trailing modality tokens removed
    (``BraTS_001_flair`` matches ``BraTS_001``). Maps without a label are an error (a silently dropped case would bias
    the means) unless ``allow_missing_labels``, which warns and skips them; labels without a map only give a warning
    (the label folder may hold more cases than were predicted). Images: every NIfTI under ``image`` whose name
    (without its modality token) is the case key, e.g. BraTS ``<case>/<case>_flair.nii.gz``; several files are
    stacked as channels in the order t1, t1ce, t2, flair.

    Returns:
        list of dicts with ``name``, ``score`` (path), ``label`` (path), optional ``recon``, the other :data:`MAP_KEYS` and
        ``image`` (list of paths).

    Raises:
        FileNotFoundError: a folder is missing, no map is found, or a map has no label.
        ValueError: duplicate cases, unreadable files, or shapes that do not match (naming both files).
    """
    pred_dir, label_path = Path(pred), Path(label)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    if not label_path.exists():
        raise FileNotFoundError(f"label folder or datalist not found: {label_path}")
    maps = _index_by_suffix(pred_dir, map_suffix, "anomaly map")
    if not maps:
        raise FileNotFoundError(f"no anomaly maps '*{map_suffix}.nii.gz' found under {pred_dir}")
    recons = _index_by_suffix(pred_dir, recon_suffix, "reconstruction") if recon_suffix else {}
    extras = {k: _index_by_suffix(pred_dir, f"_{k}", f"{k} map") for k in EXTRA_MAPS if k != "latent_flip"}
    extras["latent_flip"] = _index_by_suffix(pred_dir, flip_suffix, "latent flip map") if flip_suffix else {}
    if label_path.is_dir():
        labels = _index_by_suffix(label_path, label_suffix, "label")
    else:
        labels = _labels_from_datalist(label_path, label_suffix)
    label_by_key: dict[str, list[str]] = {}
    for case in labels:
        label_by_key.setdefault(match_key(case), []).append(case)

    matched: dict[str, str] = {}
    missing: list[str] = []
    for case in maps:
        if case in labels:
            matched[case] = case
        elif len(label_by_key.get(match_key(case), [])) == 1:
            matched[case] = label_by_key[match_key(case)][0]
        else:
            missing.append(case)
    used = list(matched.values())
    if len(set(used)) != len(used):
        dup = sorted({u for u in used if used.count(u) > 1})
        raise ValueError(f"several anomaly maps match the same label: {dup}")
    if missing:
        msg = f"{len(missing)} anomaly map(s) have no label '*{label_suffix}.nii.gz' under {label_path}: {missing}"
        if not allow_missing_labels:
            raise FileNotFoundError(msg + " (pass allow_missing_labels=True to skip them)")
        warnings.warn(msg + "; they are skipped.", stacklevel=2)
    unused = sorted(set(labels) - set(used))
    if unused:
        warnings.warn(f"{len(unused)} label(s) have no anomaly map and are not evaluated: {unused[:20]}", stacklevel=2)
    if image is not None and not Path(image).is_dir():
        raise FileNotFoundError(f"image folder not found: {image}")
    images = _image_files(Path(image)) if image is not None else {}

    cases = []
    for case, lab in matched.items():
        shape = _spatial(_header_shape(maps[case], "anomaly map"))
        entry: dict[str, Any] = {"name": case, "score": maps[case], "label": labels[lab]}
        lab_shape = _spatial(_header_shape(labels[lab], "label"))
        if lab_shape != shape:
            raise ValueError(
                f"shape mismatch for case {case!r}: anomaly map {maps[case]} has shape {shape} but label "
                f"{labels[lab]} has shape {lab_shape}."
            )
        for key, index, what in (("recon", recons, "reconstruction"), *((k, extras[k], f"{k} map") for k in extras)):
            if case in index:
                other = _header_shape(index[case], what)
                if other[:3] != shape and other[1:4] != shape:
                    raise ValueError(
                        f"shape mismatch for case {case!r}: anomaly map {maps[case]} has shape {shape} but {what} "
                        f"{index[case]} has shape {other}."
                    )
                entry[key] = index[case]
        if image is not None:
            files = images.get(match_key(case)) or images.get(match_key(lab))
            if not files:
                raise FileNotFoundError(f"no image files for case {case!r} under {image}")
            for f in files:
                other = _spatial(_header_shape(f, "image"))
                if other != shape:
                    raise ValueError(
                        f"shape mismatch for case {case!r}: anomaly map {maps[case]} has shape {shape} but image "
                        f"{f} has shape {other}."
                    )
            entry["image"] = files
        cases.append(entry)
    return cases


def _load(path: Path, what: str) -> np.ndarray:
    try:
        data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as e:  # corrupt or truncated files raise several types
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    if not np.isfinite(data).all():
        raise ValueError(f"{what} file {path} contains NaN or infinite values.")
    return data


def _check_label_values(label: np.ndarray, path: Any) -> None:
    """A segmentation holds non-negative integer labels (0 background; any positive value is anomalous)."""
    values = np.unique(label)
    bad = values[(values < 0) | (values != np.round(values))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(
            f"label file {path} holds values that are not segmentation labels: {shown} (expected non-negative "
            "integers: 0 for background, positive labels such as BraTS 1, 2, 4 for the anomaly); a probability "
            "map or an intensity image was given as the label?"
        )


def load_case(entry: Mapping[str, Any]) -> dict[str, Any]:
    """
    Read one case matched by :func:`find_cases` into arrays (maps and labels as 3D float32; several image files
    stacked as channels); the label must hold segmentation labels.

    Args:
        entry: one entry of :func:`find_cases`.
    """
    case: dict[str, Any] = {
        "name": entry["name"],
        "score": squeeze_to_3d(_load(entry["score"], "anomaly map"), f"anomaly map {entry['score']}"),
        "label": squeeze_to_3d(_load(entry["label"], "label"), f"label {entry['label']}"),
    }
    _check_label_values(case["label"], entry["label"])
    for key in EXTRA_MAPS:
        if key in entry:
            case[key] = _load(entry[key], f"{key} map")
    if "recon" in entry:
        case["recon"] = _load(entry["recon"], "reconstruction")
    if "image" in entry:
        vols = [_load(p, "image") for p in entry["image"]]
        if len(vols) == 1:
            case["image"] = vols[0]
        else:
            case["image"] = np.stack([squeeze_to_3d(v, f"image {p}") for v, p in zip(vols, entry["image"])])
            # the modality token of each file (BraTS <case>_flair.nii.gz -> flair) names its reference map
            case["image_channels"] = [(strip_nifti(Path(p).name) or "").split("_")[-1].lower() for p in entry["image"]]
    return case
