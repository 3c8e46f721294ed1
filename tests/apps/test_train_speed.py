# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import json
import os
import tempfile
import unittest

from berdiff.apps.train_speed import measure, train_speed


class TestTrainSpeed(unittest.TestCase):
    def test_both_paths_both_stages_run_and_report(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "speed.json")
            res = train_speed(presets="tiny", batch_size=2, size=16, warmup=1, iterations=2, repeats=1,
                              num_workers=0, threads=1, out=out)
            with open(out) as f:
                self.assertEqual(json.load(f)["rows"], json.loads(json.dumps(res["rows"])))
        self.assertEqual([(r["stage"], r["preset"]) for r in res["rows"]], [("autoencoder", "tiny"), ("diffusion", "tiny")])
        for r in res["rows"]:
            self.assertGreater(r["legacy"], 0.0)
            self.assertGreater(r["fast"], 0.0)
            self.assertGreater(r["ratio"], 0.0)

    def test_bad_names(self):
        with self.assertRaises(ValueError):
            measure("stage3", "tiny", "fast")
        with self.assertRaises(ValueError):
            measure("diffusion", "tiny", "turbo")


if __name__ == "__main__":
    unittest.main()
