# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The OCT bundle: both training stages (stage 2 layered on stage 1) on tiny synthetic B-scans, its inference config
on the exported weights (maps on each scan's grid, scores.csv), the validation table and the tuning sweep on those
outputs, and every config without data (it builds, and the run names the missing data without writing anything)."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import tempfile
import unittest
from pathlib import Path

import numpy as np
from monai.bundle import ConfigWorkflow

from berdiff.model_description import read_model_description
from tests.oct_fixtures import write_oct_folder
from tests.utils import ROOT, TempDirClassMixin

OCT_BUNDLE = os.path.join(ROOT, "bundles", "oct_bernoulli_anomaly")
OCT_CONFIGS = os.path.join(OCT_BUNDLE, "configs")
AE_CONFIG = os.path.join(OCT_CONFIGS, "train_autoencoder.yaml")
DIFF_CONFIG = [AE_CONFIG, os.path.join(OCT_CONFIGS, "train_diffusion.yaml")]
INFER_CONFIG = os.path.join(OCT_CONFIGS, "inference.yaml")
#: the grid of the tiny tests (a multiple of the tiny preset's factor 4)
GRID = [16, 32]


def _chain(error: BaseException | None) -> str:
    """The messages of an exception and of its causes and contexts (configs wrap the run's errors)."""
    messages = []
    while error is not None and len(messages) < 20:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(messages)


class TestOctConfigsWithoutData(unittest.TestCase):
    def test_configs_build_and_runs_name_the_missing_data(self):
        for files, kind in (([AE_CONFIG], "train"), (DIFF_CONFIG, "train"), ([INFER_CONFIG], "infer")):
            with self.subTest(files[-1]), tempfile.TemporaryDirectory() as tmp:
                wf = ConfigWorkflow(config_file=files, workflow_type=kind, bundle_root=tmp,
                                    dataset_dir=os.path.join(tmp, "no_data"), on_error="raise")
                wf.initialize()
                self.assertEqual(wf.check_properties(), [])
                before = sorted(p for p in Path(tmp).rglob("*") if p.is_file())  # e.g. TensorBoard's event file
                with self.assertRaises(Exception) as ctx:
                    wf.run()
                self.assertRegex(_chain(ctx.exception), "not found|does not exist")
                self.assertEqual(sorted(p for p in Path(tmp).rglob("*") if p.is_file()), before)

    def test_configs_have_no_path_to_another_bundle(self):
        for path in glob.glob(os.path.join(OCT_BUNDLE, "**", "*"), recursive=True):
            self.assertFalse(os.path.islink(path), path)
            if path.endswith((".yaml", ".json", ".conf", ".md")):
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                self.assertNotIn("brats_mri_bernoulli_anomaly/", text, path)
                self.assertNotIn("/work/", text, path)


class TestOctRelease(unittest.TestCase):
    def test_locally_trained_weights_are_not_released(self):
        import shutil

        from berdiff.apps.release import build_bundle

        with tempfile.TemporaryDirectory() as tmp:
            repo = os.path.join(tmp, "repo")
            shutil.copytree(OCT_BUNDLE, os.path.join(repo, "bundles", "oct_bernoulli_anomaly"))
            models = os.path.join(repo, "bundles", "oct_bernoulli_anomaly", "models")
            os.makedirs(models, exist_ok=True)
            Path(models, "model.pt").write_bytes(b"weights trained on unlicensed scans")
            path = build_bundle("oct_bernoulli_anomaly", out=os.path.join(tmp, "dist"), repo_root=repo, make_zip=False)
            self.assertFalse(os.path.exists(os.path.join(path, "models")))
            self.assertTrue(os.path.isfile(os.path.join(path, "configs", "inference.yaml")))
            self.assertTrue(os.path.isfile(os.path.join(path, "docs", "README.md")))


class TestOctTrainingAndInference(TempDirClassMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        data = os.path.join(cls.tmp, "data")
        write_oct_folder(os.path.join(data, "train"), num_normal=6)
        write_oct_folder(os.path.join(data, "val"), num_normal=2, num_abnormal=2)
        # stray files in the class folders are not scans
        Path(data, "val", "NORMAL", "notes.txt").write_text("not a scan")

    def _train(self, config) -> ConfigWorkflow:
        wf = ConfigWorkflow(
            config_file=config, workflow_type="train", bundle_root=OCT_BUNDLE, dataset_dir=os.path.join(self.tmp, "data"),
            models_dir=os.path.join(self.tmp, "models"), output_dir=os.path.join(self.tmp, "logs"), preset="tiny",
            spatial_size=GRID, batch_size=4, max_epochs=1, log_interval=1, train_max_timestep=4, val_interval=1,
        )
        wf.initialize()
        self.assertEqual(wf.check_properties(), [])
        with contextlib.redirect_stdout(io.StringIO()):
            wf.run()
        wf.finalize()
        return wf

    def test_two_stages_inference_validation_and_sweep(self):
        wf = self._train(AE_CONFIG)
        self.assertEqual(wf.parser.get_parsed_content("train#trainer").state.iteration, 2)  # 6 normal scans, batch 4
        self.assertEqual(len(wf.parser.get_parsed_content("validate#datalist")), 2)  # val/NORMAL only
        self._train(DIFF_CONFIG)
        model = os.path.join(self.tmp, "models", "model.pt")
        description = read_model_description(model, required=True)
        self.assertEqual((description["preset"], description["in_channels"], description["spatial_size"]),
                         ("tiny", 1, GRID))

        val = os.path.join(self.tmp, "data", "val")
        out = os.path.join(self.tmp, "out")
        wf = ConfigWorkflow(
            config_file=INFER_CONFIG, workflow_type="infer", bundle_root=OCT_BUNDLE, ckpt_path=model,
            dataset_dir=val, output_dir=out, noise_level=4, num_inference_steps=2, device="cpu",
        )
        wf.initialize()
        self.assertEqual(wf.check_properties(), [])
        wf.run()
        wf.finalize()
        with open(os.path.join(out, "scores.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual([r["image"] for r in rows],
                         ["AMD/AMD_0.png", "AMD/AMD_1.png", "NORMAL/normal_0.png", "NORMAL/normal_1.png"])
        self.assertEqual(list(rows[0])[:3], ["image", "score", "score_anomaly"])  # score: relative to the autoencoder's
        self.assertTrue(all(np.isfinite(float(r["score"])) for r in rows))
        amap = np.load(os.path.join(out, "AMD", "AMD_0_anomaly.npy"))
        self.assertEqual(amap.shape, (48, 80))  # the input's own pixel grid
        self.assertTrue(np.isfinite(amap).all() and amap.min() >= 0)
        self.assertTrue(os.path.isfile(os.path.join(out, "AMD", "AMD_0_anomaly.png")))

        from berdiff.apps.oct_sweep import oct_sweep
        from berdiff.apps.oct_validation import oct_validation

        with contextlib.redirect_stdout(io.StringIO()):
            result = oct_validation(os.path.join(out, "scores.csv"), val, out=os.path.join(self.tmp, "val.json"),
                                    spatial_size=GRID, n_resamples=20,
                                    figure=os.path.join(self.tmp, "overview.png"))
        table = result["splits"]["all"]
        self.assertEqual(table["score"]["n"], 4)
        self.assertIn("ref_raw_mean", table)
        self.assertTrue(os.path.isfile(os.path.join(self.tmp, "overview.png")))
        self.assertTrue(0.0 <= table["score"]["auroc"] <= 1.0)
        bundle = os.path.join(self.tmp, "bundle")
        os.makedirs(bundle)
        os.symlink(os.path.join(self.tmp, "models"), os.path.join(bundle, "models"))
        with contextlib.redirect_stdout(io.StringIO()):
            sweep = oct_sweep(bundle, val, noise_levels=[4], prob_thresholds=[0.5], num_inference_steps=2, sigmas=[0.0])
        self.assertEqual(len(sweep["best"]), 10)  # every map, and the anomaly map's score relative to the autoencoder's
        self.assertEqual(sweep["settings"]["n_tuning"], 2)

        # cross-fitting: the held-out training scans of a fold file join the tuning split as normal scans
        from berdiff.apps.oct_folds import oct_folds

        with contextlib.redirect_stdout(io.StringIO()):
            folds = oct_folds(os.path.join(self.tmp, "data", "train", "NORMAL"), os.path.join(self.tmp, "folds"))
            sweep = oct_sweep(bundle, val, noise_levels=[4], prob_thresholds=[0.5], num_inference_steps=2,
                              sigmas=[0.0], extra_normals=folds[0], out=os.path.join(self.tmp, "sweep.json"))
        self.assertEqual((sweep["settings"]["n_tuning"], sweep["settings"]["n_extra_normals"]), (5, 3))
        row = sweep["best"]["anomaly_relative"]
        self.assertTrue(0.0 <= row["tuning_auroc"] <= 1.0 and 0.0 <= row["validation_tuning_auroc"] <= 1.0)


if __name__ == "__main__":
    unittest.main()
