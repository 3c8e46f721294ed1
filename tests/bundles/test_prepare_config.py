# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""configs/prepare.yaml: data preparation from a raw BraTS-layout folder as a bundle step."""

from __future__ import annotations

import contextlib
import io
import json
import os
import unittest

from monai.bundle import ConfigWorkflow

from tests.utils import BUNDLE, TempDirMixin, write_brats_subjects

CONFIG = os.path.join(BUNDLE, "configs", "prepare.yaml")


class TestPrepareConfig(TempDirMixin, unittest.TestCase):
    def test_raw_folder_to_datalist(self):
        tmp = self.tmp
        write_brats_subjects(os.path.join(tmp, "src"))
        out = os.path.join(tmp, "prepared")
        wf = ConfigWorkflow(config_file=CONFIG, workflow_type="train", run_id="prepare",
                            dataset_dir=os.path.join(tmp, "src"), prepared_dir=out, spatial_size=32,
                            val_fraction=0.25)
        wf.initialize()
        with contextlib.redirect_stdout(io.StringIO()):
            wf.run()
        with open(os.path.join(out, "datalist.json")) as f:
            datalist = json.load(f)
        self.assertGreater(len(datalist["training"]), 0)
        self.assertGreater(len(datalist["validation"]), 0)
        first = os.path.join(out, datalist["training"][0]["image"])
        self.assertTrue(os.path.isfile(first), first)
        train_subjects = {d["subject"] for d in datalist["training"]}
        self.assertFalse(train_subjects & {d["subject"] for d in datalist["validation"]})


if __name__ == "__main__":
    unittest.main()
