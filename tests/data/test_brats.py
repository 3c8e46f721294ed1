# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

from berdiff.data.brats import (
    DATALIST_NAME,
    VALIDATION_VOLUMES_NAME,
    axial_slice_range,
    prepare_brats,
    split_subjects,
)
from berdiff.data.brats_cases import find_brats_cases
from tests.utils import MODALITIES, TUMOUR_SLICES, TUMOUR_SUBJECTS, write_brats_subjects


class TestSliceRange(unittest.TestCase):
    def test_reference_rule_and_scaling(self):
        self.assertEqual(axial_slice_range(155), range(80, 129))  # exclude the lowest 80 and the uppermost 26
        self.assertEqual(axial_slice_range(16), range(8, 13))  # round(80*16/155)=8, 16-round(26*16/155)=13
        self.assertEqual(axial_slice_range(16, 2, -2), range(2, 14))
        with self.assertRaisesRegex(ValueError, "empty slice range"):
            axial_slice_range(16, 10, 5)

    def test_split_is_by_subject_and_seeded(self):
        ids = [f"s{i}" for i in range(10)]
        train, val = split_subjects(ids, 0.2, seed=3)
        self.assertEqual(len(val), 2)
        self.assertEqual(sorted(train + val), ids)
        self.assertEqual((train, val), split_subjects(ids, 0.2, seed=3))
        self.assertTrue(any(split_subjects(ids, 0.2, seed=s)[1] != val for s in range(4, 10)))
        self.assertEqual(split_subjects(ids, 0.0), (ids, []))
        with self.assertRaisesRegex(ValueError, "val_fraction"):
            split_subjects(ids, 1.0)


class TestPrepareBrats(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.src = os.path.join(self.tmp.name, "src")
        self.out = os.path.join(self.tmp.name, "out")
        self.names = write_brats_subjects(self.src)

    def tearDown(self):
        self.tmp.cleanup()

    def test_prepare_counts_split_and_cache(self):
        prepare_brats(self.src, self.out, val_fraction=0.25, seed=0, spatial_size=32)
        with open(os.path.join(self.out, DATALIST_NAME)) as f:
            dl = json.load(f)
        train, val = dl["subjects"]["training"], dl["subjects"]["validation"]
        self.assertEqual(len(val), 1)
        self.assertEqual(sorted(train + val), self.names)
        kept = axial_slice_range(16)  # 5 slices, 2 of them with tumour in tumour subjects
        for split, subjects in (("training", train), ("validation", val)):
            n_tumour = sum(self.names.index(s) in TUMOUR_SUBJECTS for s in subjects)
            expected_diseased = n_tumour * len(TUMOUR_SLICES)
            self.assertEqual(len(dl[f"{split}_diseased"]), expected_diseased)
            self.assertEqual(len(dl[split]), len(subjects) * len(kept) - expected_diseased)
            self.assertEqual(dl["counts"][split]["subjects"], len(subjects))
            self.assertEqual({e["subject"] for e in dl[split] + dl[f"{split}_diseased"]}, set(subjects))
        for e in dl["training"] + dl["validation"]:  # healthy: no tumour slice
            self.assertNotIn(e["slice"], TUMOUR_SLICES if self.names.index(e["subject"]) in TUMOUR_SUBJECTS else ())
            self.assertIn(e["slice"], kept)
        entry = dl["training_diseased"][0] if dl["training_diseased"] else dl["validation_diseased"][0]
        image = np.load(os.path.join(self.out, entry["image"]))
        label = np.load(os.path.join(self.out, entry["label"]))
        self.assertEqual((image.shape, image.dtype), ((4, 32, 32), np.float16))
        self.assertTrue(0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5)
        self.assertEqual(label.shape, (1, 32, 32))
        self.assertEqual(int(label.sum()), 16)  # the 4x4 tumour cross-section
        self.assertEqual(len(dl["volumes"]["validation"]), 1)
        self.assertEqual(len(dl["volumes"]["validation"][0]["image"]), 4)
        # same seed, same split; rerunning replaces the output
        prepare_brats(self.src, self.out, val_fraction=0.25, seed=0, spatial_size=32)
        with open(os.path.join(self.out, DATALIST_NAME)) as f:
            self.assertEqual(json.load(f)["subjects"], dl["subjects"])

    def test_resampled_grid_is_recorded(self):
        prepare_brats(self.src, self.out, val_fraction=0.25, seed=0, spatial_size=32, pixdim=2.0, preset="small")
        with open(os.path.join(self.out, DATALIST_NAME)) as f:
            dl = json.load(f)
        self.assertEqual((dl["spatial_size"], dl["pixdim"]), ([32, 32], 2.0))
        entry = dl["training_diseased"][0] if dl["training_diseased"] else dl["validation_diseased"][0]
        self.assertEqual(int(np.load(os.path.join(self.out, entry["label"])).sum()), 4)  # 4x4 mm at 2 mm: 2x2 voxels
        # "auto" takes the preset's grid: the small preset's is 128 px at 2 mm
        prepare_brats(self.src, self.out, val_fraction=0.25, seed=0, preset="small")
        with open(os.path.join(self.out, DATALIST_NAME)) as f:
            dl = json.load(f)
        self.assertEqual((dl["spatial_size"], dl["pixdim"]), ([128, 128], 2.0))
        with self.assertRaisesRegex(ValueError, "pixdim"):
            prepare_brats(self.src, self.out, spatial_size=32, pixdim=0)

    def test_explicit_validation_subjects(self):
        prepare_brats(self.src, self.out, val_subjects=[self.names[0], self.names[2]], spatial_size=32)
        with open(os.path.join(self.out, DATALIST_NAME)) as f:
            dl = json.load(f)
        self.assertEqual(dl["subjects"]["validation"], [self.names[0], self.names[2]])
        self.assertEqual(dl["subjects"]["training"], [self.names[1], self.names[3]])
        # the held-out volumes as an inference / evaluation datalist
        with open(os.path.join(self.out, VALIDATION_VOLUMES_NAME)) as f:
            testing = json.load(f)["testing"]
        self.assertEqual([os.path.basename(t["label"]) for t in testing],
                         [f"{self.names[0]}_seg.nii.gz", f"{self.names[2]}_seg.nii.gz"])
        self.assertEqual([len(t["image"]) for t in testing], [4, 4])
        self.assertTrue(all(os.path.isabs(p) and os.path.isfile(p) for t in testing for p in t["image"]))
        with self.assertRaisesRegex(ValueError, "val_subjects not found"):
            prepare_brats(self.src, self.out, val_subjects=["nobody"], spatial_size=32)

    def test_datalist_json_source(self):
        items = [
            {"image": [f"src/{n}/{n}_{m}.nii.gz" for m in MODALITIES], "label": f"src/{n}/{n}_seg.nii.gz"}
            for n in self.names
        ]
        path = os.path.join(self.tmp.name, "list.json")
        with open(path, "w") as f:
            json.dump({"training": items}, f)
        cases = find_brats_cases(path)
        self.assertEqual([c["subject"] for c in cases], self.names)
        self.assertTrue(os.path.isfile(cases[0]["label"]))

    def test_missing_and_extra_modality(self):
        folder = os.path.join(self.src, self.names[1])
        os.remove(os.path.join(folder, f"{self.names[1]}_flair.nii.gz"))
        with self.assertRaisesRegex(ValueError, f"{self.names[1]}.*lacks modality file\\(s\\) flair"):
            prepare_brats(self.src, self.out)
        self.assertFalse(os.path.exists(os.path.join(self.out, DATALIST_NAME)))
        prefix = os.path.join(folder, self.names[1])
        os.rename(f"{prefix}_t1.nii.gz", f"{prefix}_dwi.nii.gz")
        with self.assertRaisesRegex(ValueError, "unexpected file .*_dwi.nii.gz"):
            find_brats_cases(self.src)

    def test_unreadable_file_cli(self):
        bad = os.path.join(self.src, self.names[2], f"{self.names[2]}_t2.nii.gz")
        with open(bad, "wb") as f:
            f.write(b"not a nifti file")
        with self.assertRaisesRegex(ValueError, f"cannot read image file {bad}"):
            prepare_brats(self.src, self.out)
        proc = subprocess.run(
            [sys.executable, "-m", "berdiff", "prepare_brats", "--src", self.src, "--out", self.out],
            capture_output=True, text=True, timeout=120,
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(f"cannot read image file {bad}", proc.stderr.strip().splitlines()[-1])
        self.assertNotIn("Traceback", proc.stderr)  # one clear line, no stack trace
        self.assertFalse(os.path.exists(os.path.join(self.out, DATALIST_NAME)))


if __name__ == "__main__":
    unittest.main()
