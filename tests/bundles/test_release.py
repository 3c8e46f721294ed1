# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Self-contained release bundles (berdiff.apps.release): layout, metadata, zip, and inference where berdiff is NOT
importable except from the bundle's own copy."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
import unittest
import zipfile

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
from berdiff.training import export_pipeline
from berdiff.apps.release import BUNDLES, build_bundle, sha256sum
from tests.utils import TempDirMixin, make_case

#: runs `python -m monai.bundle <argv>` after removing every sys.path entry and editable-install finder that could
#: provide berdiff (the repository's package), so only the bundle root MONAI adds to sys.path can
DRIVER = textwrap.dedent(
    """
    import importlib.util, os, runpy, sys
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "berdiff"))]
    sys.meta_path = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "")
                     and "editable" not in (getattr(f, "__name__", "") or "")]
    if importlib.util.find_spec("berdiff") is not None:
        raise SystemExit("berdiff is importable outside the bundle")
    sys.argv = ["monai.bundle"] + sys.argv[1:]
    try:
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code:
            raise
    print("BERDIFF_FILE=" + sys.modules["berdiff"].__file__)
    """
)


def tiny_weights(folder: str, in_channels: int, size: int) -> str:
    """A tiny random AnomalyPipeline as <folder>/model.pt with its model.json description."""
    torch.manual_seed(0)
    ae = autoencoder_from_preset("tiny", in_channels=in_channels)
    path = os.path.join(folder, "model.pt")
    # the weights and their model.json, as the training export writes them
    export_pipeline(ae, denoiser_from_preset("tiny", latent_channels=ae.latent_channels), path, preset="tiny",
                    spatial_size=size)
    return path


def run_isolated(args: list[str], cwd: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    proc = subprocess.run(
        [sys.executable, "-s", "-c", DRIVER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


class TestBuildBundle(TempDirMixin, unittest.TestCase):
    def test_layout_metadata_and_zip(self):
        tmp = self.tmp
        for name in BUNDLES:
            path = build_bundle(name, out=tmp)
            self.assertEqual(path, os.path.join(os.path.realpath(tmp), name))
            self.assertTrue(os.path.isfile(os.path.join(path, "LICENSE")))
            self.assertTrue(os.path.isfile(os.path.join(path, "berdiff", "__init__.py")))
            self.assertTrue(os.path.isfile(os.path.join(path, "berdiff", "networks", "anomaly_pipeline.py")))
            self.assertTrue(os.path.isfile(os.path.join(path, "configs", "inference.yaml")))
            self.assertEqual(glob.glob(os.path.join(path, "**", "__pycache__"), recursive=True), [])
            self.assertEqual(glob.glob(os.path.join(path, "models", "stages")), [])
            # no links: configs shared with another bundle are real files in the release
            links = [p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.islink(p)]
            self.assertEqual(links, [])
            text = open(os.path.join(path, "configs", "metadata.json"), encoding="utf-8").read()
            meta = json.loads(text)
            self.assertNotIn("berdiff", meta["required_packages_version"])
            self.assertEqual(text, json.dumps(meta, indent=4, ensure_ascii=False) + "\n")  # zoo pre-commit
            with zipfile.ZipFile(os.path.join(tmp, f"{name}.zip")) as zf:
                names = set(zf.namelist())
            self.assertIn(f"{name}/configs/metadata.json", names)
            self.assertIn(f"{name}/berdiff/__init__.py", names)
            self.assertTrue(all(n.startswith(f"{name}/") for n in names))
        # the IXI bundle's training configs are its own
        ixi = os.path.join(tmp, "ixi_t1_bernoulli_anomaly", "configs")
        self.assertEqual(sorted(n for n in os.listdir(ixi) if n.startswith("train")),
                         ["train_autoencoder.yaml", "train_diffusion.yaml"])

    def test_large_files_and_rebuild(self):
        tmp = self.tmp
        weights = tiny_weights(os.path.join(tmp, "w"), 1, 32)
        out = os.path.join(tmp, "dist")
        path = build_bundle("ixi_t1_bernoulli_anomaly", out=out, weights=weights, weights_url="https://x/model.pt")
        self.assertFalse(os.path.exists(os.path.join(path, "models", "model.pt")))
        self.assertTrue(os.path.isfile(os.path.join(path, "models", "model.json")))
        import yaml

        large = yaml.safe_load(open(os.path.join(path, "large_files.yml")))["large_files"]
        self.assertEqual(large[0]["path"], "models/model.pt")
        self.assertEqual(large[0]["hash_val"], sha256sum(weights))
        self.assertEqual(large[0]["hash_type"], "sha256")
        # a rebuild replaces the folder (no stale large_files.yml) and leaves no staging folders
        build_bundle("ixi_t1_bernoulli_anomaly", out=out, weights=weights, make_zip=False)
        self.assertFalse(os.path.exists(os.path.join(path, "large_files.yml")))
        self.assertTrue(os.path.isfile(os.path.join(path, "models", "model.pt")))
        self.assertEqual(sorted(os.listdir(out)), ["ixi_t1_bernoulli_anomaly", "ixi_t1_bernoulli_anomaly.zip"])

    def test_bad_input(self):
        tmp = self.tmp
        with self.assertRaisesRegex(ValueError, "unknown bundle 'nope'"):
            build_bundle("nope", out=tmp)
        with self.assertRaisesRegex(FileNotFoundError, "must both exist"):
            build_bundle("ixi_t1_bernoulli_anomaly", out=tmp, weights=os.path.join(tmp, "missing.pt"))
        self.assertEqual(os.listdir(tmp), [])


class TestBuiltBundleRunsWithoutPackage(TempDirMixin, unittest.TestCase):
    """`python -m monai.bundle run inference` of a built bundle, with berdiff resolvable only inside the bundle."""

    def test_ixi_2d_inference(self):
        tmp = self.tmp
        weights = tiny_weights(os.path.join(tmp, "w"), 1, 32)
        bundle = build_bundle("ixi_t1_bernoulli_anomaly", out=os.path.join(tmp, "dist"), weights=weights)
        images = os.path.join(tmp, "images")
        os.makedirs(images)
        rng = np.random.default_rng(0)
        img = np.zeros((40, 30), np.uint8)
        img[8:32, 6:24] = rng.integers(60, 255, (24, 18))
        Image.fromarray(img).save(os.path.join(images, "slice.png"))
        out = os.path.join(tmp, "out")
        stdout = run_isolated(
            ["run", "inference", "--config_file", os.path.join(bundle, "configs", "inference.yaml"),
             "--bundle_root", bundle, "--dataset_dir", images, "--output_dir", out,
             "--noise_level", "4", "--num_inference_steps", "2", "--device", "cpu"],
            cwd=tmp,
        )
        self.assertIn(f"BERDIFF_FILE={os.path.join(bundle, 'berdiff', '__init__.py')}", stdout)
        maps = glob.glob(os.path.join(out, "*_anomaly.nii.gz"))
        self.assertEqual(len(maps), 1)
        arr = nib.load(maps[0]).get_fdata()
        self.assertEqual(arr.shape, (30, 40))  # MONAI's PIL convention: (W, H) of the input, not 32 x 32
        self.assertTrue(np.isfinite(arr).all() and arr.min() >= 0)

    def test_brats_volume_inference(self):
        tmp = self.tmp
        weights = tiny_weights(os.path.join(tmp, "w"), 4, 32)
        bundle = build_bundle("brats_mri_bernoulli_anomaly", out=os.path.join(tmp, "dist"), weights=weights)
        data = os.path.join(tmp, "data")
        make_case(data, "case0", affine=np.diag([1.2, 0.9, 2.5, 1.0]))
        out = os.path.join(tmp, "out")
        stdout = run_isolated(
            ["run", "inference", "--config_file", os.path.join(bundle, "configs", "inference.yaml"),
             "--bundle_root", bundle, "--dataset_dir", data, "--output_dir", out, "--preset", "tiny",
             "--spatial_size", "[32, 32]", "--noise_level", "4", "--num_inference_steps", "2",
             "--progress", "False", "--device", "cpu"],
            cwd=tmp,
        )
        self.assertIn(f"BERDIFF_FILE={os.path.join(bundle, 'berdiff', '__init__.py')}", stdout)
        ref = nib.load(os.path.join(data, "case0", "case0_t1.nii.gz"))
        for postfix in ("anomaly", "anomaly_mask"):
            out_img = nib.load(os.path.join(out, f"case0_{postfix}.nii.gz"))
            self.assertEqual(out_img.shape[:3], ref.shape)
            np.testing.assert_allclose(out_img.affine, ref.affine, atol=1e-5)


if __name__ == "__main__":
    unittest.main()
