# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import json
import os
import tempfile
import unittest

import nibabel as nib
import numpy as np

from berdiff.data.images2d import brain_mask
from berdiff.data.lesions import LesionFamily, add_lesion, make_lesions
from tests.utils import textured_head, write_heads

FAMILIES = list(LesionFamily.__members__.values())


def load(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


class TestAddLesion(unittest.TestCase):
    def test_every_family_changes_the_image_inside_the_mask(self):
        img = textured_head(80, 70, 0)
        other = np.random.default_rng(1).random((80, 70)).astype(np.float32)
        mask = brain_mask(img)
        for fam in FAMILIES:
            new, label, params = add_lesion(img, mask, fam, np.random.default_rng(3), other=other)
            self.assertEqual(params["family"], fam)
            self.assertTrue(label.any(), fam)
            self.assertFalse((label & ~mask).any(), f"{fam}: label outside the brain mask")
            self.assertGreater(np.abs(new - img)[label].mean(), 0.01, fam)
            self.assertTrue(0 <= new.min() and new.max() <= 1, fam)
        with self.assertRaisesRegex(ValueError, "other"):
            add_lesion(img, mask, "fpi", np.random.default_rng(0))
        with self.assertRaisesRegex(ValueError, "unknown lesion family"):
            add_lesion(img, mask, "tumour", np.random.default_rng(0))
        with self.assertRaisesRegex(ValueError, "empty"):
            add_lesion(img, np.zeros_like(mask), "hyper", np.random.default_rng(0))


class TestMakeLesions(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.src = os.path.join(cls.tmp.name, "src")
        write_heads(cls.src, 7)
        cls.out_a = os.path.join(cls.tmp.name, "a")
        cls.out_b = os.path.join(cls.tmp.name, "b")
        cls.rec_a = make_lesions(cls.src, cls.out_a, seed=5, max_lesions=2)
        cls.rec_b = make_lesions(cls.src, cls.out_b, seed=5, max_lesions=2)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_layout_and_determinism(self):
        names = sorted(os.listdir(os.path.join(self.out_a, "images")))
        self.assertEqual(names, [f"sub{i:02d}.nii.gz" for i in range(7)])
        for sub in ("labels", "healthy"):
            self.assertEqual(sorted(os.listdir(os.path.join(self.out_a, sub))), names)
        self.assertEqual(self.rec_a, self.rec_b)
        with open(os.path.join(self.out_a, "lesions.json")) as f:
            self.assertEqual(json.load(f), json.loads(json.dumps(self.rec_a)))
        for n in names:
            for sub in ("images", "labels"):
                np.testing.assert_array_equal(load(os.path.join(self.out_a, sub, n)), load(os.path.join(self.out_b, sub, n)))
        other = make_lesions(self.src, os.path.join(self.tmp.name, "c"), seed=6, max_lesions=2)
        self.assertNotEqual(other["images"], self.rec_a["images"])

    def test_labels_inside_mask_and_images_changed(self):
        for name, rec in self.rec_a["images"].items():
            img = load(os.path.join(self.out_a, "images", f"{name}.nii.gz"))
            lab = load(os.path.join(self.out_a, "labels", f"{name}.nii.gz")) > 0
            clean = load(os.path.join(self.out_a, "healthy", f"{name}.nii.gz"))
            self.assertEqual(img.shape, (72, 64))
            self.assertTrue(lab.any(), name)
            self.assertEqual(int(lab.sum()), rec["label_px"])
            self.assertFalse((lab & ~brain_mask(clean)).any(), f"{name}: label outside the brain mask")
            self.assertGreater(np.abs(img - clean)[lab].mean(), 0.005, name)
            self.assertTrue(1 <= len(rec["lesions"]) <= 2)

    def test_every_family_produced_and_params_recorded(self):
        fams = [les["family"] for rec in self.rec_a["images"].values() for les in rec["lesions"]]
        self.assertEqual(set(fams), set(FAMILIES))
        for rec in self.rec_a["images"].values():
            for les in rec["lesions"]:
                for key in ("center", "radii", "angle", "softness", "area_px"):
                    self.assertIn(key, les)
                if les["family"] == "fpi":
                    self.assertIn(les["other"], self.rec_a["images"])
                    self.assertIn("alpha", les)

    def test_resize_and_errors(self):
        out = os.path.join(self.tmp.name, "r")
        make_lesions(self.src, out, seed=0, size=32, limit=3)
        self.assertEqual(load(os.path.join(out, "images", "sub00.nii.gz")).shape, (32, 32))
        with self.assertRaisesRegex(ValueError, "unknown lesion family"):
            make_lesions(self.src, os.path.join(self.tmp.name, "x"), families=["hyper", "glioma"])
        with self.assertRaisesRegex(ValueError, "two source images"):
            make_lesions(self.src, os.path.join(self.tmp.name, "y"), limit=1)
        self.assertFalse(os.path.exists(os.path.join(self.tmp.name, "y")), "no partial output on bad input")
        with self.assertRaises(FileNotFoundError):
            make_lesions(os.path.join(self.tmp.name, "missing"), os.path.join(self.tmp.name, "z"))


if __name__ == "__main__":
    unittest.main()
