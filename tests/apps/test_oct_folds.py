# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.apps.oct_folds (cross-fitting folds of the training scans) and oct_sweep's extra normal scans."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import unittest

from berdiff.apps.oct_folds import HELD_OUT_KEY, oct_folds, training_folds
from berdiff.apps.oct_sweep import oct_sweep
from berdiff.training import training_datalist
from tests.oct_fixtures import write_oct_folder


class TestOctFolds(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._tmp = tempfile.TemporaryDirectory()
        cls.tmp = cls._tmp.name
        write_oct_folder(os.path.join(cls.tmp, "train"), num_normal=7)
        write_oct_folder(os.path.join(cls.tmp, "val"), num_normal=2, num_abnormal=2)
        cls.normal = os.path.join(cls.tmp, "train", "NORMAL")

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()

    def test_folds_partition_the_scans(self):
        scans = sorted(os.path.realpath(os.path.join(self.normal, f)) for f in os.listdir(self.normal))
        for num_folds in (2, 3):
            folds = training_folds(self.normal, num_folds)
            self.assertEqual(len(folds), num_folds)
            held = [i["image"] for fold in folds for i in fold[HELD_OUT_KEY]]
            self.assertEqual(sorted(held), scans)  # disjoint, and every scan held out once
            for fold in folds:
                train = {i["image"] for i in fold["training"]}
                self.assertFalse(train & {i["image"] for i in fold[HELD_OUT_KEY]})
                self.assertEqual(len(train) + len(fold[HELD_OUT_KEY]), len(scans))
        self.assertEqual([len(f[HELD_OUT_KEY]) for f in training_folds(self.normal, 2)], [4, 3])  # positions k % 2

    def test_fold_files_are_training_datalists(self):
        out = os.path.join(self.tmp, "folds")
        with contextlib.redirect_stdout(io.StringIO()):
            files = oct_folds(self.normal, out, 2)
        self.assertEqual([os.path.basename(f) for f in files], ["fold0.json", "fold1.json"])
        with open(files[1]) as f:
            content = json.load(f)
        self.assertEqual(set(content), {"training", HELD_OUT_KEY})
        self.assertEqual(len(training_datalist(files[1])), 4)  # what --train_dir fold1.json trains on
        self.assertEqual(len(training_datalist(files[1], HELD_OUT_KEY)), 3)

    def test_errors(self):
        for bad in (1, 0, True, 2.0):
            with self.assertRaisesRegex(ValueError, "num_folds"):
                training_folds(self.normal, bad)
        with self.assertRaisesRegex(ValueError, "fewer than num_folds"):
            training_folds(self.normal, 8)
        with self.assertRaises(FileNotFoundError):
            training_folds(os.path.join(self.tmp, "missing"))

    def test_sweep_refuses_bad_extra_normals_before_loading_weights(self):
        val, no_bundle = os.path.join(self.tmp, "val"), os.path.join(self.tmp, "no_bundle")
        with self.assertRaisesRegex(FileNotFoundError, "extra_normals not found"):
            oct_sweep(no_bundle, val, extra_normals=os.path.join(self.tmp, "missing.json"))
        empty = os.path.join(self.tmp, "empty.json")
        with open(empty, "w") as f:
            json.dump({"training": []}, f)
        with self.assertRaisesRegex(ValueError, "lists no scans"):
            oct_sweep(no_bundle, val, extra_normals=empty)
        clash = os.path.join(self.tmp, "clash.json")
        val_scan = os.path.join(val, "NORMAL", sorted(os.listdir(os.path.join(val, "NORMAL")))[0])
        with open(clash, "w") as f:
            json.dump({HELD_OUT_KEY: [{"image": val_scan}]}, f)
        with self.assertRaisesRegex(ValueError, "also a validation scan"):
            oct_sweep(no_bundle, val, extra_normals=clash)


if __name__ == "__main__":
    unittest.main()
