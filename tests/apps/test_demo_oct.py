# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""python -m berdiff demo_oct: the command lines it runs (the bundle README's commands), with the steps recorded
instead of run (the steps themselves are tested in tests/bundles/test_oct_bundle.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import unittest
from unittest import mock

from berdiff.apps import demo_oct as demo_module
from berdiff.apps.demo_oct import bundle_dir, demo_oct
from tests.oct_fixtures import write_oct_folder
from tests.utils import TempDirMixin


class TestDemoOct(TempDirMixin, unittest.TestCase):
    def test_commands(self):
        data = os.path.join(self.tmp, "oct")
        write_oct_folder(os.path.join(data, "train"), num_normal=2)
        write_oct_folder(os.path.join(data, "val"), num_normal=1)  # one class: no validation table
        out = os.path.join(self.tmp, "out")
        calls = []

        def record(name, argv, log_dir, env):
            calls.append((name, list(argv), env.get("OMP_NUM_THREADS")))
            return 1.0

        with mock.patch.object(demo_module, "_run", side_effect=record), contextlib.redirect_stdout(io.StringIO()):
            summary = demo_oct(data, out, threads=1, max_epochs=2, spatial_size=[16, 32])
        self.assertEqual([c[0] for c in calls], ["stage1", "stage2", "inference"])
        self.assertEqual({c[2] for c in calls}, {"1"})
        stage1, stage2, infer = (c[1] for c in calls)
        self.assertEqual(stage1[1:5], ["-m", "monai.bundle", "run", "training"])
        self.assertTrue(stage1[stage1.index("--config_file") + 1].endswith("train_autoencoder.yaml"))
        self.assertIn("train_diffusion.yaml", stage2[stage2.index("--config_file") + 1])
        self.assertEqual(stage2[stage2.index("--max_epochs") + 1], "2")
        self.assertEqual(stage1[stage1.index("--spatial_size") + 1], "[16, 32]")
        self.assertEqual(infer[4], "inference")
        self.assertNotIn("--spatial_size", infer)  # inference takes the grid from models/model.json
        self.assertEqual(infer[infer.index("--output_dir") + 1], os.path.join(os.path.realpath(out), "val"))
        self.assertEqual(summary["seconds"]["total"], 3.0)
        with open(os.path.join(out, "demo_summary.json")) as f:
            self.assertEqual(json.load(f)["threads"], 1)
        self.assertTrue(bundle_dir().name.startswith("oct"))

    def test_missing_training_folder(self):
        with self.assertRaisesRegex(FileNotFoundError, "train/NORMAL"):
            demo_oct(self.tmp, os.path.join(self.tmp, "out"))


if __name__ == "__main__":
    unittest.main()
