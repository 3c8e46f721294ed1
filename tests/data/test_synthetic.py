# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
from parameterized import parameterized
from scipy import ndimage

from berdiff.apps.cli import main as cli_main
from berdiff.data.synthetic import subjects, tumour
from berdiff.data.synthetic import LABELS, load_template, make_demo_data
from berdiff.utils import MODALITIES

# 3 mm keeps every volume small (64x72x64) while tumours of 15-21 mm radius still hold all three labels
SMALL = {"spacing": 3.0, "tumour_radius_mm": (15.0, 21.0)}


def _load(root: Path, case: str) -> tuple[dict[str, np.ndarray], list[nib.Nifti1Image]]:
    arrays, images = {}, []
    for key in (*MODALITIES, "seg"):
        img = nib.load(str(root / case / f"{case}_{key}.nii.gz"))
        images.append(img)
        arrays[key] = np.asanyarray(img.dataobj)
    return arrays, images


class TestMakeDemoData(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.root = Path(cls._tmp.name) / "demo"
        make_demo_data(cls.root, num_subjects=3, tumour_fraction=2 / 3, seed=7, **SMALL)
        cls.manifest = json.loads((cls.root / "manifest.json").read_text())
        cls.data = {s["case"]: _load(cls.root, s["case"])[0] for s in cls.manifest["subjects"]}

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_layout_and_manifest(self):
        cases = [s["case"] for s in self.manifest["subjects"]]
        self.assertEqual(cases, ["Demo_000", "Demo_001", "Demo_002"])
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), sorted(cases + ["manifest.json"]))
        for case in cases:
            names = sorted(p.name for p in (self.root / case).iterdir())
            self.assertEqual(names, sorted(f"{case}_{k}.nii.gz" for k in (*MODALITIES, "seg")))
        self.assertEqual(sum(s["has_tumour"] for s in self.manifest["subjects"]), 2)
        self.assertEqual(self.manifest["labels"], {"background": 0, "necrotic_core": 1, "oedema": 2, "enhancing": 4})

    def test_deterministic_for_seed(self):
        with tempfile.TemporaryDirectory() as tmp:
            make_demo_data(Path(tmp) / "same", num_subjects=3, tumour_fraction=2 / 3, seed=7, **SMALL)
            make_demo_data(Path(tmp) / "other", num_subjects=1, tumour_fraction=0.0, seed=8, **SMALL)
            same = json.loads((Path(tmp) / "same" / "manifest.json").read_text())
            self.assertEqual(same, self.manifest)
            for case, arrays in self.data.items():
                again, _ = _load(Path(tmp) / "same", case)
                for key, arr in arrays.items():
                    self.assertEqual(arr.tobytes(), again[key].tobytes(), f"{case} {key} differs for the same seed")
            other, _ = _load(Path(tmp) / "other", "Demo_000")
            first = self.data["Demo_000"]
            for modality in MODALITIES:
                self.assertFalse(np.array_equal(first[modality], other[modality]), f"{modality} same for other seed")
            self.assertFalse(np.array_equal(first["t1"] > 0, other["t1"] > 0), "brain mask not deformed per seed")

    def test_dtypes_values_and_background(self):
        for case, arrays in self.data.items():
            seg = arrays["seg"]
            self.assertEqual(seg.dtype, np.uint8)
            self.assertTrue(set(np.unique(seg).tolist()) <= {0, 1, 2, 4}, case)
            brain = arrays["t1"] > 0
            self.assertGreater(brain.mean(), 0.1)
            self.assertLess(brain.mean(), 0.6)
            for modality in MODALITIES:
                img = arrays[modality]
                self.assertEqual(img.dtype, np.float32)
                self.assertTrue(np.isfinite(img).all())
                self.assertGreaterEqual(float(img.min()), 0.0)
                # background exactly zero in the same voxels in every modality
                np.testing.assert_array_equal(img > 0, brain, err_msg=f"{case} {modality}")
            # labels only inside the brain
            self.assertFalse((seg[~brain] > 0).any(), case)

    def test_modalities_aligned(self):
        spacing = SMALL["spacing"]
        expected_affine = np.asarray(self.manifest["affine"])
        np.testing.assert_allclose(np.diag(expected_affine), [spacing, spacing, spacing, 1.0])
        for case in self.data:
            _, images = _load(self.root, case)
            for img in images:
                self.assertEqual(img.shape, tuple(self.manifest["shape"]))
                np.testing.assert_allclose(img.affine, expected_affine, atol=1e-5)
                self.assertEqual(nib.aff2axcodes(img.affine), ("R", "A", "S"))
                np.testing.assert_allclose(img.header.get_zooms(), (spacing,) * 3)

    def test_healthy_empty_tumour_all_labels(self):
        for subject in self.manifest["subjects"]:
            seg = self.data[subject["case"]]["seg"]
            if not subject["has_tumour"]:
                self.assertEqual(subject["tumours"], [])
                self.assertFalse(seg.any(), subject["case"])
                continue
            (tumour,) = subject["tumours"]
            self.assertEqual(set(np.unique(seg).tolist()), {0, 1, 2, 4}, subject["case"])
            for name, count in tumour["voxels"].items():
                self.assertEqual(int((seg == LABELS[name]).sum()), count)
            # the centre lies inside the brain and inside the tumour core
            centre = tuple(tumour["centre_voxel"])
            self.assertGreater(self.data[subject["case"]]["t1"][centre], 0)
            self.assertIn(int(seg[centre]), (1, 4))

    def test_tumour_appearance(self):
        for subject in self.manifest["subjects"]:
            if not subject["has_tumour"]:
                continue
            d = self.data[subject["case"]]
            seg = d["seg"]
            normal = (d["t1"] > 0) & (seg == 0)
            oedema, rim, necrosis, core = seg == 2, seg == 4, seg == 1, (seg == 1) | (seg == 4)
            case = subject["case"]
            self.assertGreater(d["flair"][oedema].mean(), d["flair"][normal].mean() * 1.2, case)
            self.assertGreater(d["t2"][oedema].mean(), d["t2"][normal].mean(), case)
            self.assertGreater(d["t1ce"][rim].mean(), d["t1ce"][normal].mean() * 1.2, case)
            self.assertLess(d["t1ce"][necrosis].mean(), d["t1ce"][normal].mean(), case)
            self.assertLess(d["t1"][core].mean(), d["t1"][normal].mean(), case)

    def test_healthy_tissue_contrast(self):
        """t1: WM > GM > CSF; t2: CSF > GM > WM; flair: GM > WM > CSF (template tissue cores, eroded)."""
        template = load_template(SMALL["spacing"], None)
        healthy = next(s["case"] for s in self.manifest["subjects"] if not s["has_tumour"])
        d = self.data[healthy]
        pure = [template.tissues[i] > 0.9 for i in range(3)]  # gm, wm, csf
        gm, wm, csf = (p & (d["t1"] > 0) for p in pure)
        for region in (gm, wm, csf):
            self.assertGreater(region.sum(), 20)
        means = {m: [float(d[m][r].mean()) for r in (gm, wm, csf)] for m in MODALITIES}
        g, w, c = means["t1"]
        self.assertTrue(w > g > c, means["t1"])
        g, w, c = means["t2"]
        self.assertTrue(c > g > w, means["t2"])
        g, w, c = means["flair"]
        self.assertTrue(g > w > c, means["flair"])

    def test_refuses_non_empty_folder(self):
        before = sorted(p.relative_to(self.root) for p in self.root.rglob("*"))
        with self.assertRaisesRegex(FileExistsError, "not empty"):
            make_demo_data(self.root, num_subjects=1, **SMALL)
        self.assertEqual(sorted(p.relative_to(self.root) for p in self.root.rglob("*")), before)


class TestMakeDemoDataOptions(unittest.TestCase):
    def test_default_grid_pads_to_128(self):
        template = load_template(2.0, None)
        self.assertEqual(template.shape, (88, 104, 96))
        self.assertTrue(all(s <= 128 for s in template.shape[:2]))
        np.testing.assert_allclose(np.diag(template.affine), [2, 2, 2, 1])
        # the whole template brain fits into the default grid (no brain voxel on the border)
        mask = template.mask > 0
        for axis in range(3):
            self.assertFalse(np.take(mask, [0, -1], axis=axis).any())
        np.testing.assert_allclose(template.tissues.sum(0)[mask], 1.0, atol=1e-5)

    def test_cli_and_overwrite(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cli"
            args = ["make_demo_data", "--out", str(out), "--spacing", "3", "--tumour_radius_mm", "[15,21]"]
            cli_main([*args, "--num_subjects", "2", "--seed", "3"])
            manifest = json.loads((out / "manifest.json").read_text())
            self.assertEqual([s["case"] for s in manifest["subjects"]], ["Demo_000", "Demo_001"])
            self.assertEqual(sum(s["has_tumour"] for s in manifest["subjects"]), 1)
            self.assertEqual(manifest["seed"], 3)
            # the CLI turns the FileExistsError into one "error:" line and exit status 1
            with contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit) as ctx:
                cli_main([*args, "--num_subjects", "1"])
            self.assertEqual(ctx.exception.code, 1)
            self.assertIn("error:", err.getvalue())
            # overwrite replaces the set and removes cases of the previous manifest
            cli_main([*args, "--num_subjects", "1", "--tumour_fraction", "1", "--overwrite"])
            self.assertEqual(sorted(p.name for p in out.iterdir()), ["Demo_000", "manifest.json"])
            seg = np.asanyarray(nib.load(str(out / "Demo_000" / "Demo_000_seg.nii.gz")).dataobj)
            self.assertEqual(set(np.unique(seg).tolist()), {0, 1, 2, 4})
            self.assertEqual(list(out.rglob(".*")), [], "temporary files left behind")

    def test_int16_segmentation(self):
        with tempfile.TemporaryDirectory() as tmp:
            make_demo_data(tmp, num_subjects=1, tumour_fraction=1.0, seg_dtype="int16", **SMALL)
            seg = nib.load(str(Path(tmp) / "Demo_000" / "Demo_000_seg.nii.gz"))
            self.assertEqual(seg.get_data_dtype(), np.int16)

    @parameterized.expand(
        [
            ({"num_subjects": 0}, "num_subjects"),
            ({"num_subjects": 2.5}, "num_subjects"),
            ({"tumour_fraction": 1.5}, "tumour_fraction"),
            ({"tumour_fraction": float("nan")}, "tumour_fraction"),
            ({"seed": -1}, "seed"),
            ({"spacing": 0.0}, "spacing"),
            ({"shape": (64, 64)}, "shape"),
            ({"shape": (64, 64, 8)}, "shape"),
            ({"tumour_radius_mm": (20.0, 10.0)}, "tumour_radius_mm"),
            ({"seg_dtype": "float32"}, "seg_dtype"),
            ({"case_prefix": "Demo_x"}, "case_prefix"),
        ]
    )
    def test_bad_options(self, kwargs, name):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            with self.assertRaisesRegex(ValueError, name):
                make_demo_data(out, **kwargs)
            self.assertFalse(out.exists(), "no output must be written for bad options")

    def test_missing_nilearn_message(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            with mock.patch("berdiff.data.synthetic.template.importlib.util.find_spec", return_value=None):
                load_template.cache_clear()
                try:
                    with self.assertRaisesRegex(ImportError, r"pip install berdiff\[demo\]"):
                        make_demo_data(out, num_subjects=1, spacing=5.0)
                finally:
                    load_template.cache_clear()
            self.assertFalse(out.exists())

    def test_tumour_displaces_and_replaces_tissue(self):
        template = load_template(SMALL["spacing"], None)
        rng = np.random.default_rng(3)
        healthy = subjects._deform_healthy(template, rng, SMALL["spacing"])
        subject = {k: v.copy() for k, v in healthy.items()}
        result = tumour.add_tumour(subject, rng, SMALL["spacing"], SMALL["tumour_radius_mm"])
        self.assertIsNotNone(result)
        weights, labels, params = result
        brain = healthy["mask"]
        np.testing.assert_allclose(subject["tissues"].sum(0)[brain], 1.0, atol=1e-4)
        # mass effect: tissue next to (not inside) the tumour has moved
        dist = ndimage.distance_transform_edt(labels == 0)
        near = brain & (dist > 0) & (dist <= 2)
        moved = np.abs(subject["tissues"] - healthy["tissues"]).max(0)
        self.assertGreater(float(np.median(moved[near])), 0.02)
        # far away the anatomy is untouched
        far = brain & (dist > 4 * params["mass_effect_sigma_mm"] / SMALL["spacing"])
        self.assertTrue(far.any())
        self.assertLess(float(moved[far].max()), 1e-3)
        # the core replaces the tissue completely, oedema partly
        core = labels == 4
        self.assertGreater(float((weights["necrosis"] + weights["enhancing"])[core].mean()), 0.6)
        self.assertFalse((weights["oedema"][~brain] > 0).any())

    def test_tumour_too_large_for_grid_raises(self):
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(RuntimeError, "could not place a tumour"):
                make_demo_data(tmp, num_subjects=1, tumour_fraction=1.0, spacing=3.0, tumour_radius_mm=(200, 200))


if __name__ == "__main__":
    unittest.main()
