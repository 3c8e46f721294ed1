# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Self-contained release bundles: ``python -m berdiff build_bundle --bundle NAME --out dist/`` (``make bundles``).

A built bundle ``dist/<bundle>/`` (and ``dist/<bundle>.zip``, whose top folder is ``<bundle>/``) holds the bundle's
configs, docs and LICENSE, the committed weights (``models/model.pt`` + ``models/model.json``), and a copy of this
package as ``<bundle>/berdiff/``. MONAI puts the bundle root on ``sys.path`` (``monai.bundle run`` from the bundle
root, the model zoo's CI, MONAI Label), so the configs' ``berdiff.*`` names resolve to that copy and the bundle runs
in an environment that has only MONAI and its dependencies. ``configs/metadata.json`` is rewritten the way the model
zoo's pre-commit wants it (indent 4, final newline) and without ``berdiff`` in ``required_packages_version``. Weights
that are not committed are described by ``large_files.yml`` (path, URL, sha256), the zoo's convention.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import berdiff
from berdiff.utils import atomic_write

__all__ = [
    "BUNDLES", "NO_WEIGHT_BUNDLES", "PACKAGE_NAME", "repository_root", "sha256sum", "build_bundle", "build_bundles"
]

#: the bundles of this repository (folder names under ``bundles/``)
BUNDLES: tuple[str, ...] = ("brats_mri_bernoulli_anomaly", "ixi_t1_bernoulli_anomaly", "oct_bernoulli_anomaly")
#: the package vendored at the root of every built bundle
PACKAGE_NAME = "berdiff"
#: bundles whose locally trained weights are never released (trained on data whose licence allows no redistribution):
#: their ``models/`` folder is left out unless ``weights`` is passed explicitly
NO_WEIGHT_BUNDLES: frozenset[str] = frozenset({"oct_bernoulli_anomaly"})
#: files and folders of a bundle folder that are never released (run outputs, stage checkpoints, caches)
_SKIP_NAMES = {"eval", "runs", "__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
#: the files of ``models/`` that are released (stage checkpoints and resume states are not)
_MODEL_FILES = {"model.pt", "model.json", "model.ts"}


def repository_root() -> Path:
    """The repository holding this package (``<root>/custom/berdiff``); it must contain ``bundles/``."""
    root = Path(berdiff.__file__).resolve().parents[2]
    if not (root / "bundles").is_dir():
        raise FileNotFoundError(
            f"no bundles/ folder next to the package ({root}): build bundles from a clone of the berdiff repository "
            "or pass --repo_root."
        )
    return root


def sha256sum(path: str | os.PathLike) -> str:
    """
    Hex sha256 of a file.

    Args:
        path: the file.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ignore(src: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in _SKIP_NAMES or n.endswith((".pyc", ".pyo")) or n.startswith(".")}
    if Path(src).name == "models":
        skip |= {n for n in names if n not in _MODEL_FILES}
    return skip


def _write_metadata(path: Path) -> None:
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.get("required_packages_version", {}).pop(PACKAGE_NAME, None)
    path.write_text(json.dumps(meta, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_large_files(bundle_dir: Path, weights_url: str) -> None:
    model = bundle_dir / "models" / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"weights_url given but there are no weights to describe: {model} does not exist.")
    text = (
        "# weights not stored in the bundle: the model zoo's CI and monai.bundle download them from here\n"
        "large_files:\n"
        '  - path: "models/model.pt"\n'
        f'    url: "{weights_url}"\n'
        f'    hash_val: "{sha256sum(model)}"\n'
        '    hash_type: "sha256"\n'
    )
    (bundle_dir / "large_files.yml").write_text(text, encoding="utf-8")
    model.unlink()


def _zip_folder(folder: Path, zip_path: Path) -> None:
    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    zf.write(p, Path(folder.name) / p.relative_to(folder))

    atomic_write(zip_path, write)


def build_bundle(
    bundle: str,
    out: str | os.PathLike = "dist",
    repo_root: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    weights_url: str | None = None,
    make_zip: bool = True,
) -> str:
    """
    Build one self-contained bundle ``<out>/<bundle>/`` (replaced if it exists) and ``<out>/<bundle>.zip``.

    Args:
        bundle: a bundle folder name (one of :data:`BUNDLES`).
        out: output folder.
        repo_root: the repository (default: the one holding this package).
        weights: a ``model.pt`` to release instead of the bundle's committed ``models/model.pt`` (its ``.json``
            description beside it is copied too and is required).
        weights_url: where the released weights will be downloadable: the weights are then left out of the bundle
            and described by ``large_files.yml`` (URL and sha256).
        make_zip: also write ``<out>/<bundle>.zip``.

    Returns:
        the path of the built bundle folder.
    """
    if bundle not in BUNDLES:
        raise ValueError(f"unknown bundle {bundle!r}; choose one of {list(BUNDLES)}.")
    root = Path(repo_root).resolve() if repo_root is not None else repository_root()
    src = root / "bundles" / bundle
    if not (src / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{src} is not a bundle folder (no configs/metadata.json).")
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        weights = Path(weights)
        desc = weights.with_suffix(".json")
        if not weights.is_file() or not desc.is_file():
            raise FileNotFoundError(f"weights {weights} and their description {desc} must both exist.")

    staging = Path(tempfile.mkdtemp(prefix=f".{bundle}.", dir=out_dir))
    try:
        target = staging / bundle
        # symbolic links (configs shared with another bundle) are copied as the files they point to
        shutil.copytree(src, target, ignore=_ignore, symlinks=False)
        package_dir = Path(berdiff.__file__).resolve().parent
        shutil.copytree(package_dir, target / PACKAGE_NAME, ignore=_ignore)
        if bundle in NO_WEIGHT_BUNDLES:
            shutil.rmtree(target / "models", ignore_errors=True)
        if not (target / "LICENSE").is_file():
            shutil.copy2(root / "LICENSE", target / "LICENSE")
        _write_metadata(target / "configs" / "metadata.json")
        if weights is not None:
            (target / "models").mkdir(exist_ok=True)
            shutil.copy2(weights, target / "models" / "model.pt")
            shutil.copy2(weights.with_suffix(".json"), target / "models" / "model.json")
        if weights_url:
            _write_large_files(target, weights_url)

        final = out_dir / bundle
        old = staging / ".old"
        if final.exists():
            os.replace(final, old)
        os.replace(target, final)
        if make_zip:
            _zip_folder(final, out_dir / f"{bundle}.zip")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(final)


def build_bundles(out: str | os.PathLike = "dist", bundles: Sequence[str] = BUNDLES, make_zip: bool = True) -> list[str]:
    """
    Build several bundles (default: all of :data:`BUNDLES`) with :func:`build_bundle`.

    Args:
        out: output folder.
        bundles: bundle names.
        make_zip: also write the zip files.
    """
    return [build_bundle(b, out=out, make_zip=make_zip) for b in ([bundles] if isinstance(bundles, str) else bundles)]
