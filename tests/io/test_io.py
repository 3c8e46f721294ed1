# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import json
import os
import tempfile
import unittest
from unittest import mock

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SaveImage
from parameterized import parameterized

from berdiff.io import AtomicNibabelWriter, case_name_formatter, check_checkpoint, inference_datalist, load_datalist
from berdiff.utils import MODALITIES, case_name
from tests.utils import TempDirMixin

MODS = MODALITIES


def _touch_case(root: str, case: str, mods=MODS, seg: bool = False) -> None:
    os.makedirs(os.path.join(root, case), exist_ok=True)
    for m in list(mods) + (["seg"] if seg else []):
        path = os.path.join(root, case, f"{case}_{m}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)


class TestAtomicWriter(TempDirMixin, unittest.TestCase):
    def _save(self, data: torch.Tensor, affine: np.ndarray, postfix: str = "map") -> str:
        img = MetaTensor(data, affine=torch.as_tensor(affine), meta={"filename_or_obj": "/x/BraTS_7_t1.nii.gz"})
        saver = SaveImage(
            output_dir=self.tmp, output_postfix=postfix, separate_folder=False, resample=False, print_log=False,
            writer=AtomicNibabelWriter, output_name_formatter=case_name_formatter,
        )
        saver(img)
        return os.path.join(self.tmp, f"BraTS_7_{postfix}.nii.gz")

    def test_writes_with_geometry_and_no_temp_file(self):
        affine = np.array([[0, 0, -2.0, 5], [1.5, 0, 0, -3], [0, 0.8, 0, 1], [0, 0, 0, 1]])  # permuted axes
        data = torch.rand(1, 5, 4, 3)
        path = self._save(data, affine)
        img = nib.load(path)
        self.assertEqual(img.shape, (5, 4, 3))
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
        np.testing.assert_allclose(img.get_fdata(), data[0].numpy(), atol=1e-6)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["BraTS_7_map.nii.gz"])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o666 & ~_umask())

    def test_failure_leaves_no_file(self):
        def broken_save(obj, filename):
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")

        with mock.patch("nibabel.save", side_effect=broken_save):
            with self.assertRaises(Exception):
                self._save(torch.rand(1, 3, 3, 3), np.eye(4))
        self.assertEqual(os.listdir(self.tmp), [])

    def test_failure_keeps_previous_file(self):
        path = self._save(torch.ones(1, 3, 3, 3), np.eye(4))
        with mock.patch("nibabel.save", side_effect=OSError("disk full")):
            with self.assertRaises(Exception):
                self._save(torch.zeros(1, 3, 3, 3), np.eye(4))
        self.assertEqual(float(nib.load(path).get_fdata().min()), 1.0)
        self.assertEqual(os.listdir(self.tmp), [os.path.basename(path)])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class TestCaseNames(unittest.TestCase):
    @parameterized.expand(
        [
            ("/d/BraTS2021_00000/BraTS2021_00000_t1.nii.gz", "BraTS2021_00000"),
            ("/d/BraTS2021_00000_t1ce.nii", "BraTS2021_00000"),
            ("case7.nii.gz", "case7"),
            (["/d/a_flair.nii.gz", "/d/a_t1.nii.gz"], "a"),
            ("/d/t1.nii.gz", "t1"),
        ]
    )
    def test_case_name(self, filename, expected):
        self.assertEqual(case_name(filename), expected)

    def test_formatter(self):
        self.assertEqual(case_name_formatter({"filename_or_obj": "/d/x_t2.nii.gz"}), {"subject": "x", "idx": None})


class TestDatalists(TempDirMixin, unittest.TestCase):
    def test_brats_folder(self):
        _touch_case(self.tmp, "B_2", seg=True)
        _touch_case(self.tmp, "B_1")
        os.makedirs(os.path.join(self.tmp, "not_a_case"))
        cases = inference_datalist(dataset_dir=self.tmp)
        self.assertEqual([c["case"] for c in cases], ["B_1", "B_2"])
        self.assertEqual([os.path.basename(f) for f in cases[0]["image"]], [f"B_1_{m}.nii.gz" for m in MODS])
        self.assertNotIn("label", cases[0])
        self.assertTrue(cases[1]["label"].endswith("B_2_seg.nii.gz"))

    def test_brats_folder_errors(self):
        with self.assertRaisesRegex(ValueError, "source not found"):
            inference_datalist(dataset_dir=os.path.join(self.tmp, "nope"))
        with self.assertRaisesRegex(ValueError, "no cases found"):
            inference_datalist(dataset_dir=self.tmp)
        _touch_case(self.tmp, "B_3", mods=("t1", "t2"))
        with self.assertRaisesRegex(ValueError, r"lacks modality.*t1ce"):
            inference_datalist(dataset_dir=self.tmp)

    def test_datalist_json(self):
        path = os.path.join(self.tmp, "list.json")
        with open(path, "w") as f:
            items = [{"image": ["a_t1.nii.gz", "/abs/a_t2.nii.gz"], "label": "a_seg.nii.gz"}, "b.nii.gz"]
            json.dump({"validation": items}, f)
        items = load_datalist(path)
        self.assertEqual(items[0]["image"], [os.path.join(self.tmp, "a_t1.nii.gz"), "/abs/a_t2.nii.gz"])
        self.assertEqual(items[0]["label"], os.path.join(self.tmp, "a_seg.nii.gz"))
        self.assertEqual(items[1], {"image": os.path.join(self.tmp, "b.nii.gz")})
        self.assertEqual([i["case"] for i in inference_datalist(datalist=path)], ["a", "b"])
        with self.assertRaisesRegex(ValueError, "no list under 'testing'"):
            load_datalist(path, key="testing")
        with self.assertRaisesRegex(ValueError, "datalist file not found"):
            load_datalist(os.path.join(self.tmp, "missing.json"))

    def test_prepare_brats_datalist_gives_volumes(self):
        path = os.path.join(self.tmp, "datalist.json")
        vol = {"subject": "a", "image": ["/x/a_t1.nii.gz"], "label": "/x/a_seg.nii.gz"}
        with open(path, "w") as f:
            json.dump({"validation": [{"image": "slices/a_z1_image.npy"}], "volumes": {"validation": [vol]}}, f)
        self.assertEqual(load_datalist(path), [vol])

    def test_inference_datalist_priority(self):
        _touch_case(self.tmp, "B_1")
        self.assertEqual(
            inference_datalist(image="x/c_t1.nii.gz", dataset_dir=self.tmp), [{"image": "x/c_t1.nii.gz", "case": "c"}]
        )
        self.assertEqual(inference_datalist(dataset_dir=self.tmp)[0]["case"], "B_1")
        with self.assertRaisesRegex(ValueError, "no input given"):
            inference_datalist()


class TestCheckpoint(unittest.TestCase):
    def test_check(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt")
            with self.assertRaisesRegex(FileNotFoundError, "model weights not found"):
                check_checkpoint(path)
            self.assertFalse(check_checkpoint(path, allow_random_weights=True))
            torch.save({}, path)
            self.assertTrue(check_checkpoint(path))


if __name__ == "__main__":
    unittest.main()
