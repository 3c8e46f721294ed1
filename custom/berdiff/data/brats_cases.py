# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The cases of a BraTS-layout folder (``<src>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]``) or of a Decathlon-style
datalist JSON, as lists of files in channel order (:func:`find_brats_cases`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from monai.data import load_decathlon_datalist

from berdiff.utils import MODALITIES, case_name, is_nifti, strip_nifti

__all__ = ["SEGMENTATION_SUFFIX", "find_brats_cases"]

#: suffix of the segmentation file in the BraTS layout
SEGMENTATION_SUFFIX = "seg"


def _case_from_folder(folder: str, require_label: bool) -> dict[str, Any]:
    files: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem = strip_nifti(name)
        if stem is None or name.startswith("."):
            continue
        suffix = stem.rsplit("_", 1)[-1].lower() if "_" in stem else ""
        path = os.path.join(folder, name)
        if suffix not in (*MODALITIES, SEGMENTATION_SUFFIX):
            raise ValueError(
                f"unexpected file {path}: modality {suffix!r} is not one of "
                f"{', '.join(MODALITIES + (SEGMENTATION_SUFFIX,))} (expected <case>_<modality>.nii[.gz])."
            )
        if suffix in files:
            raise ValueError(f"two files for modality {suffix!r} in {folder}: {files[suffix]} and {path}.")
        files[suffix] = path
    if not files:
        raise ValueError(f"no NIfTI files in case folder {folder}.")
    missing = [m for m in MODALITIES if m not in files]
    if require_label and SEGMENTATION_SUFFIX not in files:
        missing.append(SEGMENTATION_SUFFIX)
    if missing:
        raise ValueError(
            f"case folder {folder} lacks modality file(s) {', '.join(missing)} "
            f"(expected {os.path.basename(folder)}_<modality>.nii[.gz])."
        )
    case = {"subject": os.path.basename(os.path.normpath(folder)), "image": [files[m] for m in MODALITIES]}
    if SEGMENTATION_SUFFIX in files:
        case["label"] = files[SEGMENTATION_SUFFIX]
    return case


def _has_nifti(folder: str) -> bool:
    return any(is_nifti(n) and not n.startswith(".") for n in os.listdir(folder))


def _subject_from_path(path: str) -> str:
    name = os.path.basename(path)
    return case_name(strip_nifti(name) or os.path.splitext(name)[0])


def find_brats_cases(src: str, require_label: bool = True, datalist_key: str = "training") -> list[dict[str, Any]]:
    """
    Discover the cases of a BraTS-layout folder (``<src>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]``) or of a
    Decathlon-style datalist JSON (``{"training": [{"image": [t1, t1ce, t2, flair] or one 4-channel file,
    "label": seg}, ...]}``, paths relative to the JSON file's folder).

    Args:
        src: the root folder or the datalist file.
        require_label: every case must have a segmentation.
        datalist_key: list to read from a datalist JSON.

    Returns:
        one dict per case, sorted by subject: ``subject``, ``image`` (list of files in the order t1, t1ce, t2, flair,
        or a single 4-channel file) and ``label``.

    Raises:
        ValueError: missing source, missing, duplicated or unexpected modality files, duplicated subject ids.
    """
    src = os.fspath(src)
    if os.path.isfile(src):
        try:
            items = load_decathlon_datalist(src, is_segmentation=True, data_list_key=datalist_key)
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read datalist {src}: {e}") from e
        cases = []
        for i, item in enumerate(items):
            if "image" not in item:
                raise ValueError(f"datalist {src}: entry {i} of {datalist_key!r} has no 'image'.")
            if require_label and "label" not in item:
                raise ValueError(f"datalist {src}: entry {i} of {datalist_key!r} ({item['image']}) has no 'label'.")
            image = item["image"]
            first = image if isinstance(image, str) else image[0]
            case = {"subject": str(item.get("subject", _subject_from_path(first))), "image": image}
            if "label" in item:
                case["label"] = item["label"]
            cases.append(case)
    elif os.path.isdir(src):
        folders = [os.path.join(src, d) for d in sorted(os.listdir(src)) if not d.startswith(".")]
        # sub-folders without any NIfTI file (e.g. an output folder) are not cases
        cases = [_case_from_folder(f, require_label) for f in folders if os.path.isdir(f) and _has_nifti(f)]
    else:
        raise ValueError(f"source not found: {src} (expected a BraTS-layout folder or a datalist JSON file).")
    if not cases:
        raise ValueError(f"no cases found in {src}.")
    seen: dict[str, Any] = {}
    for case in cases:
        if case["subject"] in seen:
            raise ValueError(f"duplicated subject id {case['subject']!r} in {src}.")
        seen[case["subject"]] = case
    return sorted(cases, key=lambda c: c["subject"])
