# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The training slices' grid read from prepare_brats's datalist.json."""

from __future__ import annotations

import json
import os
import unittest

from berdiff.training import prepared_grid
from tests.utils import TempDirMixin


class TestPreparedGrid(TempDirMixin, unittest.TestCase):
    def write(self, **content) -> str:
        path = os.path.join(self.tmp, "datalist.json")
        with open(path, "w") as f:
            json.dump({"training": [], **content}, f)
        return path

    def test_recorded_grid_wins_over_the_preset(self):
        path = self.write(spatial_size=[96, 96], pixdim=2.5)
        self.assertEqual(prepared_grid(path, "small"), {"spatial_size": [96, 96], "pixdim": 2.5})
        self.assertEqual(prepared_grid(path, "small", 96), {"spatial_size": [96, 96], "pixdim": 2.5})
        self.assertEqual(prepared_grid(path, "small", [96, 96])["spatial_size"], [96, 96])

    def test_explicit_size_must_match_the_slices(self):
        path = self.write(spatial_size=[128, 128], pixdim=2.0)
        with self.assertRaisesRegex(ValueError, r"prepared at \[128, 128\]"):
            prepared_grid(path, "small", 256)

    def test_nothing_recorded(self):
        # a datalist written before the grid was recorded, a 2D image folder, a missing file: the preset's size,
        # or the explicit one; no resampling
        old = self.write()
        self.assertEqual(prepared_grid(old, "small"), {"spatial_size": [128, 128], "pixdim": None})
        self.assertEqual(prepared_grid(self.tmp, "reference", 64), {"spatial_size": [64, 64], "pixdim": None})
        missing = os.path.join(self.tmp, "missing.json")
        self.assertEqual(prepared_grid(missing, "reference"), {"spatial_size": [256, 256], "pixdim": None})


if __name__ == "__main__":
    unittest.main()
