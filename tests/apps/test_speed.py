# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.apps.speed: the side-by-side speed table (tiny sizes)."""

from __future__ import annotations

import json
import os
import tempfile
import unittest

from berdiff.apps.cli import COMMANDS
from berdiff.apps.speed import speed


class TestSpeed(unittest.TestCase):
    def test_rows_and_table(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "speed.json")
            res = speed(preset="tiny", device="cpu", spatial_size=16, num_slices=2, volume_slices=10, noise_level=3,
                        num_inference_steps=2, out=out)
            with open(out) as f:
                self.assertEqual(json.load(f)["rows"], res["rows"])
        methods = [r["method"] for r in res["rows"]]
        self.assertEqual(len(methods), 3)
        ours, ref, ddpm = res["rows"]
        self.assertEqual((ours["num_inference_steps"], ours["batch"], ours["slices_timed"]), (2, 2, 2))
        self.assertEqual((ref["num_inference_steps"], ref["batch"], ref["slices_timed"]), (3, 1, 1))
        self.assertEqual((ddpm["num_inference_steps"], ddpm["batch"]), (2, 2))
        for r in res["rows"]:
            self.assertGreater(r["s_per_slice"], 0)
            self.assertAlmostEqual(r["s_per_volume"], r["s_per_slice"] * 10, delta=0.01 + 1e-3 * r["s_per_volume"])
            self.assertGreater(r["peak_mib"], 0)
            self.assertGreater(r["params"], 0)
        table = str(res)
        self.assertEqual(table.count("\n| "), 4)  # header + 3 rows
        self.assertIn("reference algorithm (K = L, batch 1)", table)
        self.assertEqual(COMMANDS["speed"], "berdiff.apps.speed:speed")

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "unknown methods"):
            speed(preset="tiny", device="cpu", methods=["ours", "gan"])
        with self.assertRaisesRegex(ValueError, ">= 1"):
            speed(preset="tiny", device="cpu", num_slices=0)


if __name__ == "__main__":
    unittest.main()
