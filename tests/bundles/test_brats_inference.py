# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The brain MRI bundle's configs/inference.yaml, run through monai.bundle with a tiny random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest

import nibabel as nib
import numpy as np
import torch
from parameterized import parameterized

from berdiff.handlers import CASE_FIELDS, RUN_SUMMARY_FIELDS
from tests.utils import (
    BUNDLE,
    CASE_SHAPE,
    HEAD,
    INFERENCE_CONFIG,
    NON_RAS_AFFINE,
    TempDirClassMixin,
    TempDirMixin,
    assert_raises_cause,
    make_case,
    make_model,
    nifti_outputs,
    overrides,
    run_workflow,
)

CONFIG = INFERENCE_CONFIG
SHAPE = CASE_SHAPE


def _default_latent_postfixes() -> list[str]:
    import yaml

    with open(CONFIG) as f:
        value = yaml.safe_load(f)["latent_maps"] or []
    return [f"latent_{v}" for v in ([value] if isinstance(value, str) else value)]


#: file postfixes of the latent maps the bundle writes by default
LATENT = _default_latent_postfixes()


class TestBratsInference(TempDirClassMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        make_model(cls.tmp)
        cls.data = os.path.join(cls.tmp, "data")
        make_case(cls.data, "BraTS_001", np.eye(4), seed=1)
        make_case(cls.data, "BraTS_002", NON_RAS_AFFINE, seed=2)
        cls.wf, cls.missing = run_workflow(cls.tmp, dataset_dir=cls.data)
        cls.out = os.path.join(cls.tmp, "out")

    def test_properties_and_ids(self):
        self.assertFalse(self.missing, f"missing infer properties: {self.missing}")
        for key in ("network_def", "preprocessing", "inferer", "postprocessing", "device", "bundle_root",
                    "dataset_dir", "dataset", "evaluator", "displayable_configs", "inference", "run"):
            self.assertIn(key, self.wf.parser.config, key)
        targets = [t["_target_"] for t in self.wf.parser.config["postprocessing"]["transforms"]]
        self.assertIn("Invertd", targets)
        self.assertLess(targets.index("Invertd"), targets.index("SaveImaged"))

    def test_three_maps_per_case_named_by_case(self):
        self.assertEqual(
            nifti_outputs(self.out),
            sorted(f"BraTS_00{i}_{p}.nii.gz" for i in (1, 2) for p in ("anomaly", "anomaly_mask", *LATENT)),
        )
        self.assertEqual([f for f in os.listdir(self.out) if f.startswith(".")], [], "temporary files left")

    @parameterized.expand([("BraTS_001", np.eye(4)), ("BraTS_002", NON_RAS_AFFINE)])
    def test_geometry_and_dtypes(self, case, affine):
        ref = nib.load(os.path.join(self.data, case, f"{case}_t1.nii.gz"))
        for postfix, dtype in (("anomaly", np.float32), ("anomaly_mask", np.uint8), *((p, np.float32) for p in LATENT)):
            img = nib.load(os.path.join(self.out, f"{case}_{postfix}.nii.gz"))
            self.assertEqual(img.shape, SHAPE)
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
            np.testing.assert_allclose(img.affine, affine, atol=1e-5)
            self.assertEqual(img.get_data_dtype(), dtype)
        mask = np.asarray(nib.load(os.path.join(self.out, f"{case}_anomaly_mask.nii.gz")).dataobj)
        self.assertTrue(set(np.unique(mask)) <= {0, 1})
        # the axial (RAS z) axis is the last voxel axis for the identity affine and axis 1 for NON_RAS_AFFINE:
        # the pipeline skips constant axial slices, so the map is zero exactly there -> checks orientation handling
        amap = nib.load(os.path.join(self.out, f"{case}_anomaly.nii.gz")).get_fdata()
        axial = 2 if case == "BraTS_001" else 1
        per_slice = np.moveaxis(amap, axial, 0).reshape(SHAPE[axial], -1).max(axis=1)
        head = np.zeros(SHAPE[axial], bool)
        head[HEAD[axial]] = True
        self.assertTrue(np.all(per_slice[~head] == 0))
        self.assertTrue(np.all(per_slice[head] > 0))
        head_voxels = np.broadcast_to(np.expand_dims(head, [a for a in range(3) if a != axial]), SHAPE)
        self.assertTrue(np.all(mask[~head_voxels] == 0))

    def test_run_summary(self):
        with open(os.path.join(self.out, "run_summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(tuple(summary), RUN_SUMMARY_FIELDS)
        self.assertEqual(summary["status"], "completed")
        self.assertEqual(summary["num_cases"], 2)
        self.assertEqual(summary["num_slices"], SHAPE[2] + SHAPE[1])  # axial: voxel axis 2 (identity), axis 1 (non-RAS)
        self.assertEqual(summary["device"], "cpu")
        self.assertEqual(summary["memory_kind"], "process_max_rss")
        self.assertGreater(summary["peak_memory_mb"], 10)
        self.assertEqual(summary["settings"]["threshold"]["mode"], "protocol_a")
        self.assertEqual(summary["settings"]["noise_level"], 4)
        self.assertEqual(summary["settings"]["num_inference_steps"], 2)
        for case in summary["cases"]:
            self.assertEqual(tuple(case), CASE_FIELDS)
            self.assertGreater(case["wall_time_s"], 0)
            rate = case["num_slices"] / case["wall_time_s"]
            self.assertAlmostEqual(case["slices_per_s"], rate, delta=0.01 * rate + 1e-3)
            for name in case["outputs"]:
                self.assertTrue(os.path.isfile(os.path.join(self.out, name)), name)
        self.assertEqual([c["num_head_slices"] for c in summary["cases"]], [4, 20])

    def test_pred_is_binary_mask_for_monai_label(self):
        pred = self.wf.evaluator.state.output[0]["pred"]
        mask = self.wf.evaluator.state.output[0]["anomaly_mask"]
        self.assertEqual(pred.shape[0], 1)
        self.assertEqual(pred.dtype, torch.uint8)
        torch.testing.assert_close(torch.as_tensor(pred), torch.as_tensor(mask))


class TestBratsInferenceOptions(TempDirMixin, unittest.TestCase):
    def setUp(self):
        super().setUp()
        make_model(self.tmp)
        self.out = os.path.join(self.tmp, "out")

    def test_single_four_channel_nifti_calibrated_threshold_and_reconstruction(self):
        rng = np.random.default_rng(3)
        vol = np.zeros((*SHAPE, 4), np.float32)
        vol[HEAD] = rng.random(vol[HEAD].shape) + 1
        path = os.path.join(self.tmp, "case7.nii.gz")
        nib.save(nib.Nifti1Image(vol, NON_RAS_AFFINE), path)
        threshold_file = os.path.join(self.tmp, "calibration.json")
        with open(threshold_file, "w") as f:
            json.dump({"threshold": 1e-6, "rule": "anomaly_map > threshold (raw map)"}, f)
        wf, _ = run_workflow(
            self.tmp, image=path, threshold_file=threshold_file, save_reconstruction=True,
            displayable_configs={"binarize_output": False},
        )
        self.assertEqual(
            nifti_outputs(self.out),
            sorted(f"case7_{p}.nii.gz" for p in ("anomaly", "anomaly_mask", *LATENT, "reconstruction")),
        )
        amap = nib.load(os.path.join(self.out, "case7_anomaly.nii.gz")).get_fdata(dtype=np.float32)
        mask = np.asarray(nib.load(os.path.join(self.out, "case7_anomaly_mask.nii.gz")).dataobj)
        np.testing.assert_array_equal(mask, (amap > 1e-6).astype(np.uint8))
        self.assertGreater(mask.sum(), 0)
        self.assertLess(mask.sum(), mask.size)
        recon = nib.load(os.path.join(self.out, "case7_reconstruction.nii.gz"))
        self.assertEqual(recon.shape, (*SHAPE, 4))
        np.testing.assert_allclose(recon.affine, NON_RAS_AFFINE, atol=1e-5)
        # continuous pred when binarize_output is off
        self.assertTrue(torch.is_floating_point(torch.as_tensor(wf.evaluator.state.output[0]["pred"])))
        with open(os.path.join(self.out, "run_summary.json")) as f:
            threshold = json.load(f)["settings"]["threshold"]
        self.assertEqual((threshold["mode"], threshold["value"]), ("calibrated", 1e-6))

    def test_all_zero_volume_gives_zero_maps(self):
        files = make_case(os.path.join(self.tmp, "data"), "empty", value=0.0)
        run_workflow(self.tmp, image=files)
        for p in ("anomaly", "anomaly_mask", *LATENT):
            img = nib.load(os.path.join(self.out, f"empty_{p}.nii.gz"))
            self.assertEqual(img.shape, SHAPE)
            self.assertEqual(float(np.abs(img.get_fdata()).max()), 0.0)

    @parameterized.expand([("nan",), ("three_channels",), ("missing_file",)])
    def test_bad_input_clear_error_and_no_output(self, kind):
        files = make_case(os.path.join(self.tmp, "data"), "bad", seed=4)
        if kind == "nan":
            img = nib.load(files[2])
            data = img.get_fdata(dtype=np.float32)
            data[10, 10, 2] = np.nan
            nib.save(nib.Nifti1Image(data, img.affine), files[2])
            expected = "NaN"
        elif kind == "three_channels":
            files = files[:3]
            expected = "expected 4 channels"
        else:
            files[1] = files[1].replace("t1ce", "t1c")
            expected = "image file not found"
        assert_raises_cause(self, ValueError, expected, run_workflow, self.tmp, image=files)
        self.assertEqual(nifti_outputs(self.out), [])
        with open(os.path.join(self.out, "run_summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["status"], "failed")
        self.assertIn(expected, summary["error"])

    def test_missing_weights(self):
        files = make_case(os.path.join(self.tmp, "data"), "c", seed=5)
        missing = os.path.join(self.tmp, "nothing", "model.pt")
        assert_raises_cause(
            self, FileNotFoundError, "model weights not found", run_workflow, self.tmp, image=files, ckpt_path=missing
        )
        self.assertFalse(os.path.exists(self.out) and nifti_outputs(self.out))
        run_workflow(self.tmp, image=files, ckpt_path=missing, allow_random_weights=True)
        self.assertEqual(len(nifti_outputs(self.out)), 2 + len(LATENT))

    def test_latent_maps_and_autoencoder_map_options(self):
        files = make_case(os.path.join(self.tmp, "data"), "opt", NON_RAS_AFFINE, seed=7)
        run_workflow(self.tmp, image=files, latent_maps=["flip_probability", "mask_fraction"], save_autoencoder_map=True)
        names = ("anomaly", "anomaly_mask", "autoencoder", "latent_flip_probability", "latent_mask_fraction")
        self.assertEqual(nifti_outputs(self.out), sorted(f"opt_{p}.nii.gz" for p in names))
        for p in names:
            img = nib.load(os.path.join(self.out, f"opt_{p}.nii.gz"))
            self.assertEqual(img.shape, SHAPE)
            np.testing.assert_allclose(img.affine, NON_RAS_AFFINE, atol=1e-5)
        for p in ("latent_flip_probability", "latent_mask_fraction"):
            data = nib.load(os.path.join(self.out, f"opt_{p}.nii.gz")).get_fdata()
            self.assertTrue(((data >= 0) & (data <= 1 + 1e-6)).all(), p)
        with open(os.path.join(self.out, "run_summary.json")) as f:
            self.assertEqual(json.load(f)["settings"]["latent_maps"], ["flip_probability", "mask_fraction"])
        out2 = os.path.join(self.tmp, "out2")
        run_workflow(self.tmp, image=files, latent_maps=[], output_dir=out2)
        self.assertEqual(nifti_outputs(out2), ["opt_anomaly.nii.gz", "opt_anomaly_mask.nii.gz"])
        assert_raises_cause(self, ValueError, "unknown latent map", run_workflow, self.tmp, image=files,
                            latent_maps=["latent_flip"])

    def test_model_json_sets_preset_size_and_trained_range(self):
        """models/model.json (written by training) wins over the config's preset / spatial_size / T."""
        from berdiff.model_description import make_model_description, write_model_description

        files = make_case(os.path.join(self.tmp, "data"), "mj", seed=8)
        ckpt = os.path.join(self.tmp, "models", "model.pt")
        write_model_description(ckpt, make_model_description(
            preset="tiny", in_channels=4, spatial_size=[32, 32], latent_channels=4, num_train_timesteps=1000,
            train_max_timestep=4, pixdim=2.0))
        run_workflow(self.tmp, image=files, preset="reference", spatial_size=[64, 64], num_train_timesteps=10)
        with open(os.path.join(self.out, "run_summary.json")) as f:
            settings = json.load(f)["settings"]
        self.assertEqual((settings["preset"], settings["spatial_size"]), ("tiny", [32, 32]))
        # the model's grid: resampled in-plane to 2 mm for the network, written back on the input's grid
        self.assertEqual(settings["pixdim"], 2.0)
        source = nib.load(files[0])
        for path in nifti_outputs(self.out):
            written = nib.load(os.path.join(self.out, path))
            self.assertEqual(written.shape[:3], source.shape[:3], path)
            self.assertTrue(np.allclose(written.affine, source.affine, atol=1e-4), path)
        self.assertEqual(settings["model_description"], os.path.join(self.tmp, "models", "model.json"))
        # anomaly map, mask and the default latent map
        self.assertEqual(len(nifti_outputs(self.out)), 3)
        self.assertTrue(any(p.endswith("_latent_confident_change.nii.gz") for p in nifti_outputs(self.out)))
        # L above the trained range: one clear error, no output
        out = os.path.join(self.tmp, "out_l")
        with self.assertRaises(Exception) as ctx:
            run_workflow(self.tmp, image=files, noise_level=5, output_dir=out)
        err = ctx.exception
        while err.__cause__ is not None:  # monai.bundle's "Failed to evaluate" wrappers
            err = err.__cause__
        self.assertIsInstance(err, ValueError)
        self.assertRegex(str(err), r"L = 5 is outside the trained range \[1, 4\]")
        self.assertFalse(os.path.exists(out) and nifti_outputs(out))

    def test_weights_of_another_preset_clear_error(self):
        files = make_case(os.path.join(self.tmp, "data"), "wp", seed=8)
        assert_raises_cause(
            self, ValueError, "model.pt holds a 'tiny' network with 4 image channel.*the configuration builds a "
            "'small' network with 4 image channel", run_workflow, self.tmp, image=files, preset="small",
        )
        self.assertEqual(nifti_outputs(self.out), [])

    def test_monai_label_style_pipeline(self):
        """Like MONAI Label's BundleInferTask: preprocessing, inferer, postprocessing without SaveImaged."""
        from monai.bundle import ConfigParser

        files = make_case(os.path.join(self.tmp, "data"), "ml", NON_RAS_AFFINE, seed=9)
        parser = ConfigParser()
        parser.read_config(CONFIG)
        parser.update(overrides(self.tmp))
        network = parser.get_parsed_content("network_def")
        network.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), weights_only=True))
        post = parser.get_parsed_content("postprocessing")
        data = parser.get_parsed_content("preprocessing")({"image": files})
        with torch.no_grad():
            data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network.eval())[0]
        for t in post.transforms:
            if type(t).__name__ != "SaveImaged":
                data = t(data)
        pred = data["pred"]
        self.assertEqual(tuple(pred.shape), (1, *SHAPE))
        self.assertEqual(pred.dtype, torch.uint8)
        np.testing.assert_allclose(pred.affine.numpy(), NON_RAS_AFFINE, atol=1e-5)
        self.assertFalse(os.path.exists(self.out))

    def test_cli_prints_root_cause_without_traceback(self):
        files = make_case(os.path.join(self.tmp, "data"), "cli", seed=6)
        cmd = [
            sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", CONFIG,
            "--image", repr(files[:3]), "--output_dir", self.out,
            "--ckpt_path", os.path.join(self.tmp, "models", "model.pt"),
            "--preset", "tiny", "--spatial_size", "[32, 32]", "--noise_level", "2", "--progress", "False",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=BUNDLE, timeout=120)
        self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
        self.assertIn("error: expected 4 channels under 'image', got 3", proc.stderr)
        self.assertNotIn("Traceback", proc.stdout + proc.stderr)
        self.assertEqual(nifti_outputs(self.out), [])
        # a bad input folder fails before the workflow is built, with one line too
        cmd[cmd.index("--image") : cmd.index("--image") + 2] = ["--dataset_dir", os.path.join(self.tmp, "nowhere")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=BUNDLE, timeout=120)
        self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
        self.assertIn("error: source not found", proc.stderr)
        self.assertNotIn("Traceback", proc.stdout + proc.stderr)


if __name__ == "__main__":
    unittest.main()
