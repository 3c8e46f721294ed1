# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import unittest

from pathlib import Path

from berdiff.apps.demo import _headline, default_bundle_dir, demo


class TestDemo(unittest.TestCase):
    def test_miniature_demo_writes_every_output(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "demo")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                summary = demo(
                    out=out, num_subjects=4, val_fraction=0.5, spacing=4.0, preset="tiny", spatial_size=64,
                    slice_start=10, slice_stop=30, ae_epochs=1, ae_batch_size=16, diffusion_epochs=1,
                    noise_level=4, num_inference_steps=2, sw_batch_size=32,
                )
            # visible progress: every step with its time, the training epochs and the inference cases as they come
            lines = printed.getvalue().splitlines()
            for i in range(1, 7):
                self.assertTrue(any(line.startswith(f"step {i}/6: ") for line in lines), i)
                self.assertTrue(any(re.match(rf"step {i}/6 done in [\d.]+ s$", line) for line in lines), i)
            for stage in ("train_autoencoder", "train_diffusion"):
                self.assertTrue(any(re.match(rf"    {stage}: epoch 1/1, loss [\d.]+, elapsed", line) for line in lines), stage)
            self.assertTrue(any(line.startswith("    inference: case 1/") for line in lines), lines)
            for name in ("metrics.json", "per_case.csv", "overview.png", "demo_summary.json", "test_datalist.json"):
                self.assertTrue(os.path.isfile(os.path.join(out, name)), name)
            cases = [c.replace("_seg.nii.gz", "") for c in summary["test_cases"]]
            self.assertTrue(cases)
            for case in cases:
                for suffix in ("anomaly", "anomaly_mask", "autoencoder", "latent_code_change", "latent_mask_fraction",
                               "latent_changed_bits", "latent_flip_probability", "reconstruction"):
                    self.assertTrue(os.path.isfile(os.path.join(out, "maps", f"{case}_{suffix}.nii.gz")), suffix)
            self.assertTrue(os.path.isfile(os.path.join(out, "model", "models", "model.pt")))
            with open(os.path.join(out, "metrics.json")) as f:
                metrics = json.load(f)
            self.assertEqual(metrics["n_cases"], len(cases))
            self.assertIn("protocol_b", metrics["maps"]["anomaly"])
            # the autoencoder-only map and every latent map are scored beside the anomaly map
            for name in ("autoencoder", "latent_code_change", "latent_flip_probability"):
                self.assertIn("auroc", metrics["maps"][name]["protocol_b"], name)
            self.assertLessEqual({"train_autoencoder", "train_diffusion", "inference"}, set(summary["timings_s"]))
            self.assertGreater(summary["autoencoder_check"]["residual_contrast"], 0)
            self.assertTrue(any(line.startswith("autoencoder check (held-out tumour slices") for line in lines))

    def test_refuses_to_replace_without_overwrite(self):
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "keep.txt"), "w") as f:
                f.write("x")
            with self.assertRaises(FileExistsError):
                demo(out=tmp, overwrite=False)
            self.assertTrue(os.path.isfile(os.path.join(tmp, "keep.txt")))

    def test_bad_option_fails_before_training(self):
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(ValueError, "step_posterior|exact"):
                demo(out=os.path.join(tmp, "d"), step_posterior="exact")
            self.assertFalse(os.path.exists(os.path.join(tmp, "d")))

    def test_headline_shows_method_beside_autoencoder_only(self):
        def b(auroc, auprc):
            return {"protocol_b": {"auroc": {"mean": auroc}, "auprc": {"mean": auprc}}}

        maps = {"anomaly": b(0.91, 0.32), "autoencoder": b(0.88, 0.25), "latent_code_change": b(0.7, 0.05),
                "latent_flip_probability": b(0.3, 0.01)}
        text = _headline({"maps": maps}, Path("out"), {"total": 60.0}, ["code_change"], {"residual_contrast": 3.5})
        self.assertIn("squared residual 3.50x higher in the tumour", text)
        self.assertIn("pixel AUROC: 0.910 vs 0.880", text)
        self.assertIn("pixel AUPRC: 0.320 vs 0.250", text)
        self.assertIn("latent_code_change *: AUROC 0.700", text)
        self.assertIn("latent_flip_probability: AUROC 0.300", text)

    def test_bundle_found(self):
        self.assertTrue((default_bundle_dir() / "configs" / "inference.yaml").is_file())


if __name__ == "__main__":
    unittest.main()
