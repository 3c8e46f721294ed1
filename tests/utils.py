# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Shared test fixtures: a temporary-folder mixin, the repository's paths, tiny synthetic data (BraTS-layout cases and
subjects, 2D heads) and tiny random models, and the helpers that run the bundles' configs. Test files import these
from here and never from each other.
"""

from __future__ import annotations

import os
import re
import tempfile
import unittest
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
from berdiff.utils import MODALITIES

__all__ = [
    "BUNDLE",
    "BUNDLE_CONFIGS",
    "CASE_SHAPE",
    "HEAD",
    "INFERENCE_CONFIG",
    "IXI_BUNDLE",
    "MODALITIES",
    "NON_RAS_AFFINE",
    "ROOT",
    "TUMOUR_SLICES",
    "TUMOUR_SUBJECTS",
    "TempDirClassMixin",
    "TempDirMixin",
    "assert_raises_cause",
    "check_config_without_data",
    "make_case",
    "make_model",
    "nifti_outputs",
    "overrides",
    "run_workflow",
    "subprocess_env",
    "synthetic_head",
    "textured_head",
    "write_brats_subjects",
    "write_heads",
]

#: the repository root
ROOT = str(Path(__file__).resolve().parents[1])
#: the brain MRI (BraTS layout) bundle and its inference config
BUNDLE = os.path.join(ROOT, "bundles", "brats_mri_bernoulli_anomaly")
INFERENCE_CONFIG = os.path.join(BUNDLE, "configs", "inference.yaml")
#: the 2D IXI T1 bundle
IXI_BUNDLE = os.path.join(ROOT, "bundles", "ixi_t1_bernoulli_anomaly")

#: voxel shape of a synthetic BraTS-layout case (make_case)
CASE_SHAPE = (30, 28, 6)
#: permuted axes (L, I, A), anisotropic spacing, offset origin
NON_RAS_AFFINE = np.array([[-1.2, 0, 0, 10.0], [0, 0, 2.5, -5.0], [0, -0.9, 0, 3.0], [0, 0, 0, 1.0]])
#: head region of the synthetic cases (axis 1 is the axial axis of NON_RAS_AFFINE)
HEAD = (slice(5, 25), slice(4, 24), slice(1, 5))
#: subjects of write_brats_subjects with a tumour cube, and the axial slices (RAS index) it covers
TUMOUR_SUBJECTS = (0, 2)
TUMOUR_SLICES = (10, 11)


class TempDirMixin:
    """``setUp`` makes a temporary folder ``self.tmp`` (a str); ``tearDown`` removes it with everything in it.

    Put the mixin first: ``class TestX(TempDirMixin, unittest.TestCase)``; a subclass's ``setUp`` calls
    ``super().setUp()`` before using ``self.tmp``.
    """

    tmp: str

    def setUp(self) -> None:
        self._tmp_dir = tempfile.TemporaryDirectory()
        self.tmp = self._tmp_dir.name
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        self._tmp_dir.cleanup()


class TempDirClassMixin:
    """The class-level form of :class:`TempDirMixin`: one folder ``cls.tmp`` shared by the tests of a class, made in
    ``setUpClass`` and removed in ``tearDownClass`` (a subclass's ``setUpClass`` calls ``super().setUpClass()``)."""

    tmp: str

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp_dir = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp_dir.name
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        cls._tmp_dir.cleanup()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment with the repository's ``custom/`` first on ``PYTHONPATH``, plus ``extra``.

    Args:
        extra: variables to set in the returned copy.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "custom"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------------ 3D cases


def make_model(folder: str) -> str:
    """A tiny random (seeded) 4-channel AnomalyPipeline saved as ``<folder>/models/model.pt``; returns the path."""
    torch.manual_seed(0)
    pipe = AnomalyPipeline(autoencoder_from_preset("tiny", in_channels=4), denoiser_from_preset("tiny"))
    path = os.path.join(folder, "models", "model.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(pipe.state_dict(), path)
    return path


def make_case(
    folder: str, case: str, affine: np.ndarray = np.eye(4), seed: int = 0, value: float | None = None
) -> list[str]:
    """A BraTS-layout case ``<folder>/<case>/<case>_<modality>.nii.gz`` of shape :data:`CASE_SHAPE`.

    Args:
        folder: parent folder of the case folder.
        case: case name.
        affine: the files' affine.
        seed: random seed of the head voxels.
        value: if given, every voxel is this value (no head).

    Returns:
        the four modality files, in :data:`MODALITIES` order.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, case), exist_ok=True)
    files = []
    for m in MODALITIES:
        vol = np.zeros(CASE_SHAPE, np.float32)
        if value is None:
            vol[HEAD] = rng.random(vol[HEAD].shape) + 1.0
        else:
            vol[...] = value
        files.append(os.path.join(folder, case, f"{case}_{m}.nii.gz"))
        nib.save(nib.Nifti1Image(vol, affine), files[-1])
    return files


def write_brats_subjects(root: str, num_subjects: int = 4, shape=(32, 32, 16), seed: int = 0) -> list[str]:
    """Tiny synthetic subjects in the BraTS layout (4 modalities and ``_seg``): a noisy 'head' box, and a cubic tumour
    (label 2) over :data:`TUMOUR_SLICES` in the subjects :data:`TUMOUR_SUBJECTS`. Returns the subject names."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(num_subjects):
        name = f"BraTS_{i:03d}"
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for m in MODALITIES:
            vol = np.zeros(shape, np.float32)
            vol[4:-4, 4:-4, :] = rng.uniform(50, 100, (shape[0] - 8, shape[1] - 8, shape[2]))
            nib.save(nib.Nifti1Image(vol, np.eye(4)), os.path.join(folder, f"{name}_{m}.nii.gz"))
        seg = np.zeros(shape, np.uint8)
        if i in TUMOUR_SUBJECTS:
            seg[10:14, 10:14, TUMOUR_SLICES[0] : TUMOUR_SLICES[-1] + 1] = 2
        nib.save(nib.Nifti1Image(seg, np.eye(4)), os.path.join(folder, f"{name}_seg.nii.gz"))
        names.append(name)
    return names


def nifti_outputs(folder: str) -> list[str]:
    """The sorted names of the NIfTI files in ``folder``."""
    return sorted(p.name for p in Path(folder).glob("*.nii*"))


# ------------------------------------------------------------------------------------------------------ 2D heads


def synthetic_head(h: int = 60, w: int = 50, seed: int = 0) -> np.ndarray:
    """A bright scalp ring, a dark skull ring and a grey 'brain' ellipse with a dark 'ventricle' inside (H×W float32
    in [0, 1])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    r = np.sqrt(((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2)
    img = np.zeros((h, w), np.float32)
    img[r < 1.0] = 0.9  # scalp
    img[r < 0.9] = 0.05  # skull
    img[r < 0.8] = 0.7  # brain
    img[r < 0.2] = 0.1  # ventricle (a hole to fill)
    return np.clip(img + 0.02 * rng.random((h, w)), 0, 1).astype(np.float32)


def textured_head(h: int, w: int, i: int) -> np.ndarray:
    """A synthetic head with a subject-specific texture inside the brain (so that deformations and foreign patches
    change the image)."""
    img = synthetic_head(h, w, seed=i)
    inside = (img > 0.5) & (img < 0.8)
    texture = np.random.default_rng(100 + i).random((h, w)) > 0.5
    return np.where(inside, img - 0.15 * texture, img).astype(np.float32)


def write_heads(folder: str, n: int, h: int = 72, w: int = 64) -> None:
    """``n`` textured heads as 8-bit PNGs ``<folder>/subNN.png``."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = textured_head(h, w, i)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(os.path.join(folder, f"sub{i:02d}.png"))


# ------------------------------------------------------------------------------------------------------ bundle runs


def overrides(tmp: str, **kwargs: Any) -> dict[str, Any]:
    """The brain bundle's inference settings for a tiny random model in ``tmp`` (see :func:`make_model`) on the CPU,
    writing to ``<tmp>/out``; ``kwargs`` override or add settings."""
    out = {
        "bundle_root": BUNDLE,
        "ckpt_path": os.path.join(tmp, "models", "model.pt"),
        "output_dir": os.path.join(tmp, "out"),
        "preset": "tiny",
        "spatial_size": [32, 32],
        "noise_level": 4,
        "num_inference_steps": 2,
        "sw_batch_size": 4,
        "on_error": "raise",
        "progress": False,
        "device": "cpu",
    }
    out.update(kwargs)
    return out


def run_workflow(tmp: str, **kwargs: Any):
    """Runs the brain bundle's ``configs/inference.yaml`` with :func:`overrides`; returns the finalised workflow and
    the infer properties it misses."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=INFERENCE_CONFIG, workflow_type="infer", **overrides(tmp, **kwargs))
    wf.initialize()
    missing = wf.check_properties()
    wf.run()
    wf.finalize()
    return wf, missing


def assert_raises_cause(test: unittest.TestCase, exc_type: type, regex: str, func: Callable, *args, **kwargs) -> None:
    """``func`` fails with ``exc_type`` matching ``regex``, directly or as the cause of monai.bundle's
    ``RuntimeError("Failed to evaluate ...")`` wrapper of config expressions; the cause is not MONAI's
    ``RuntimeError("applying transform ...")``."""
    with test.assertRaises(Exception) as ctx:
        func(*args, **kwargs)
    err = ctx.exception
    if not isinstance(err, exc_type) and isinstance(err, RuntimeError) and "Failed to evaluate" in str(err):
        err = err.__cause__
    test.assertIsInstance(err, exc_type, repr(err))
    test.assertRegex(str(err), regex)


_BRATS_CONFIGS = Path(BUNDLE) / "configs"
_IXI_CONFIGS = Path(IXI_BUNDLE) / "configs"

#: every config of both bundles: the files layered in order, and the workflow type
BUNDLE_CONFIGS: dict[str, tuple[list[Path], str]] = {
    "inference": ([_BRATS_CONFIGS / "inference.yaml"], "infer"),
    "train_autoencoder": ([_BRATS_CONFIGS / "train_autoencoder.yaml"], "train"),
    "train_diffusion": ([_BRATS_CONFIGS / "train_autoencoder.yaml", _BRATS_CONFIGS / "train_diffusion.yaml"], "train"),
    "multi_gpu_train_autoencoder": (
        [_BRATS_CONFIGS / "train_autoencoder.yaml", _BRATS_CONFIGS / "multi_gpu_train.yaml"],
        "train",
    ),
    "multi_gpu_train_diffusion": (
        [_BRATS_CONFIGS / f"{name}.yaml" for name in ("train_autoencoder", "train_diffusion", "multi_gpu_train")],
        "train",
    ),
    "multi_gpu_inference": ([_BRATS_CONFIGS / "inference.yaml", _BRATS_CONFIGS / "multi_gpu_inference.yaml"], "infer"),
    "ixi_inference": ([_IXI_CONFIGS / "inference.yaml"], "infer"),
    "ixi_train_autoencoder": ([_IXI_CONFIGS / "train_autoencoder.yaml"], "train"),
    "ixi_train_diffusion": ([_IXI_CONFIGS / "train_autoencoder.yaml", _IXI_CONFIGS / "train_diffusion.yaml"], "train"),
}


def check_config_without_data(name: str) -> None:
    """
    In an empty folder (``bundle_root`` "." and the other defaults), the configs :data:`BUNDLE_CONFIGS` ``[name]``:
    ``initialize()`` and ``check_properties()`` pass; ``run()`` then fails at its first step naming the missing data,
    and writes nothing. Raises AssertionError otherwise.
    """
    from monai.bundle import ConfigWorkflow

    from berdiff.validation.errors import _unwrap

    files, kind = BUNDLE_CONFIGS[name]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            settings = {"dataset_dir": os.path.join(tmp, "no_data")}  # the default folder may exist on a dev box
            wf = ConfigWorkflow(config_file=[str(f) for f in files], workflow_type=kind, **settings)
            wf.initialize()
            missing = wf.check_properties()
            assert missing == [], f"{name}: missing properties {missing}"
            wf.parser["on_error"] = "raise"
            before = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())
            try:
                wf.run()
            except Exception as e:
                cause = _unwrap(e)
                assert isinstance(cause, (ValueError, FileNotFoundError)), f"{name}: {cause!r}"
                assert re.search("not found|does not exist", str(cause)), f"{name}: {cause}"
            else:
                raise AssertionError(f"{name}: the run did not report the missing data")
            after = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.is_file())
            assert before == after, f"{name}: the run wrote {sorted(set(after) - set(before))}"
        finally:
            os.chdir(cwd)
