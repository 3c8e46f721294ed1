# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The autoencoder check: does stage 1 already erase the anomalies?"""

from __future__ import annotations

import os
import unittest

import torch

from berdiff.data.brats import prepare_brats
from berdiff.evaluation.autoencoder_check import autoencoder_check, residual_contrast
from berdiff.networks import autoencoder_from_preset
from tests.utils import TempDirMixin, write_brats_subjects


class TestResidualContrast(unittest.TestCase):
    def test_closed_form(self):
        residual = torch.ones(1, 1, 4, 4)
        residual[..., :2, :2] = 5.0
        label = torch.zeros_like(residual)
        label[..., :2, :2] = 1
        brain = torch.ones_like(residual)
        brain[..., 3, 3] = 0
        residual[..., 3, 3] = 100.0  # outside the brain: ignored
        self.assertAlmostEqual(residual_contrast(residual, label, brain), 5.0)
        self.assertAlmostEqual(residual_contrast(torch.ones_like(residual), label, brain), 1.0)

    def test_needs_both_classes_and_one_shape(self):
        x = torch.ones(1, 1, 4, 4)
        with self.assertRaisesRegex(ValueError, "anomalous and healthy"):
            residual_contrast(x, torch.zeros_like(x), x)
        with self.assertRaisesRegex(ValueError, "same shape"):
            residual_contrast(x, x[..., :2], x)


class TestAutoencoderCheck(TempDirMixin, unittest.TestCase):
    def test_stage_one_and_pipeline_weights_agree(self):
        write_brats_subjects(os.path.join(self.tmp, "src"))
        prepared = os.path.join(self.tmp, "prepared")
        prepare_brats(os.path.join(self.tmp, "src"), prepared, val_fraction=0.25, spatial_size=32)
        torch.manual_seed(0)
        autoencoder = autoencoder_from_preset("tiny", in_channels=4)
        stage_one = os.path.join(self.tmp, "autoencoder_best.pt")
        torch.save(autoencoder.state_dict(), stage_one)
        pipeline = os.path.join(self.tmp, "model.pt")
        torch.save({f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}, pipeline)
        out = os.path.join(self.tmp, "check.json")
        a = autoencoder_check(prepared, stage_one, preset="tiny", out=out)
        b = autoencoder_check(prepared, pipeline, preset="tiny")
        self.assertTrue(os.path.isfile(out))
        keys = ("autoencoder_only_auroc", "autoencoder_only_auprc", "residual_contrast", "healthy_psnr_db")
        self.assertEqual([a[k] for k in keys], [b[k] for k in keys])
        self.assertTrue(0.0 <= a["autoencoder_only_auroc"] <= 1.0 and a["residual_contrast"] > 0)
        # the brain bundle's residual rule: the FLAIR channel only, brighter than the reconstruction
        c = autoencoder_check(prepared, stage_one, preset="tiny", residual_sign="positive", residual_channels=["flair"],
                              verbose=False)
        self.assertEqual(c["residual"], {"sign": "positive", "channels": ["flair"]})
        self.assertNotEqual(c["autoencoder_only_auprc"], a["autoencoder_only_auprc"])
        with self.assertRaisesRegex(ValueError, "residual channels"):
            autoencoder_check(prepared, stage_one, preset="tiny", residual_channels=["dwi"], verbose=False)
        with self.assertRaisesRegex(ValueError, "does not hold a 'small' autoencoder"):
            autoencoder_check(prepared, stage_one, preset="small")
        with self.assertRaisesRegex(ValueError, "split"):
            autoencoder_check(prepared, stage_one, preset="tiny", split="test")
        with self.assertRaises(FileNotFoundError):
            autoencoder_check(prepared, os.path.join(self.tmp, "missing.pt"), preset="tiny")


if __name__ == "__main__":
    unittest.main()
