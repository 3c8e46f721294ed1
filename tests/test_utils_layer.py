# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import json
import os
import unittest

import numpy as np
import torch

from berdiff.utils import (
    atomic_save_torch,
    atomic_write,
    atomic_write_files,
    atomic_write_json,
    case_name,
    image_stem,
    is_nifti,
    strip_nifti,
    to_json_safe,
)
from tests.utils import TempDirMixin


class TestAtomicWriting(TempDirMixin, unittest.TestCase):
    def test_failed_write_leaves_old_file_and_no_temp(self):
        path = os.path.join(self.tmp, "a.json")
        atomic_write_json({"x": 1}, path)

        def fail(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write("partial")
            raise OSError("disk full")

        with self.assertRaises(OSError):
            atomic_write(path, fail)
        self.assertEqual(os.listdir(self.tmp), ["a.json"])
        with open(path) as f:
            self.assertEqual(json.load(f), {"x": 1})

    def test_group_write_is_all_or_nothing(self):
        good = os.path.join(self.tmp, "good.csv")
        bad = os.path.join(self.tmp, "missing_dir_is_a_file", "x.txt")
        open(os.path.join(self.tmp, "missing_dir_is_a_file"), "w").close()
        with self.assertRaises(OSError):
            atomic_write_files({good: b"1", bad: b"2"})
        self.assertEqual(sorted(os.listdir(self.tmp)), ["missing_dir_is_a_file"])
        written = atomic_write_files({good: b"1"})
        self.assertEqual(written, [good])

    def test_strict_json_and_permissions(self):
        path = os.path.join(self.tmp, "sub", "m.json")
        atomic_write_json({"nan": float("nan"), "v": np.float32(0.25), "t": torch.tensor(2)}, path)
        with open(path) as f:
            text = f.read()
        self.assertTrue(text.endswith("\n"))
        self.assertEqual(json.loads(text), {"nan": None, "v": 0.25, "t": 2})
        self.assertNotEqual(os.stat(path).st_mode & 0o044, 0)  # not the 0600 of mkstemp

    def test_torch_save_roundtrip(self):
        path = os.path.join(self.tmp, "model.pt")
        atomic_save_torch({"w": torch.ones(2)}, path)
        self.assertTrue(torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2)))


class TestJsonSafe(unittest.TestCase):
    def test_values(self):
        out = to_json_safe({1: (np.int64(3), np.bool_(True)), "a": np.arange(2.0), "inf": float("inf")})
        self.assertEqual(out, {"1": [3, True], "a": [0.0, 1.0], "inf": None})
        json.dumps(out, allow_nan=False)


class TestNames(unittest.TestCase):
    def test_one_case_rule(self):
        self.assertEqual(case_name("/d/BraTS2021_00000_t1.nii.gz"), "BraTS2021_00000")
        self.assertEqual(case_name(["x/Case_FLAIR.NII.GZ", "x/Case_t1.nii.gz"]), "Case")
        self.assertEqual(case_name("scan.nrrd"), "scan")
        self.assertEqual(case_name("_t1.nii.gz"), "_t1")  # nothing left to name the case: kept whole
        with self.assertRaises(ValueError):
            case_name([])

    def test_nifti_names(self):
        self.assertEqual(strip_nifti("a.b.NII.gz"), "a.b")
        self.assertIsNone(strip_nifti(".nii.gz"))
        self.assertFalse(is_nifti("a.png"))
        self.assertEqual(image_stem("dicom_dir/"), "dicom_dir")


if __name__ == "__main__":
    unittest.main()
