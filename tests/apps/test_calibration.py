# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import json
import os
import tempfile
import unittest

import nibabel as nib
import numpy as np
import torch
from parameterized import parameterized

from berdiff.apps.calibration import calibrate, healthy_scores, threshold_from_maps
from berdiff.evaluation import load_threshold
from tests.utils import BUNDLE, HEAD, make_case, make_model, run_workflow


class TestThresholdFromMaps(unittest.TestCase):
    @parameterized.expand([(0.01,), (0.05,), (0.2,)])
    def test_known_distribution(self, fpr):
        # healthy maps ~ Exponential(rate 4): the exact threshold is -ln(fpr) / 4
        rng = np.random.default_rng(0)
        maps = [rng.exponential(0.25, size=(64, 64, 8)).astype(np.float32) for _ in range(6)]
        t = threshold_from_maps(maps, fpr)
        self.assertAlmostEqual(t, -np.log(fpr) / 4.0, delta=0.05 * -np.log(fpr) / 4.0)
        calibration_fpr = np.mean(np.concatenate([m.ravel() for m in maps]) > t)
        self.assertLessEqual(calibration_fpr, fpr)
        self.assertGreater(calibration_fpr, 0.98 * fpr)
        fresh = rng.exponential(0.25, size=400_000)
        self.assertAlmostEqual(np.mean(fresh > t), fpr, delta=0.1 * fpr)

    def test_masks_select_voxels(self):
        amap = np.zeros((10, 10), np.float32)
        amap[:5] = np.linspace(0, 1, 50).reshape(5, 10)
        amap[5:] = 100.0  # outside the mask: must not count
        mask = np.zeros((10, 10), bool)
        mask[:5] = True
        self.assertLess(threshold_from_maps([amap], 0.1, masks=[mask]), 1.0)
        with self.assertRaisesRegex(ValueError, "mask 0 has shape"):
            threshold_from_maps([amap], 0.1, masks=[mask[:5]])
        with self.assertRaisesRegex(ValueError, "fpr"):
            threshold_from_maps([amap], 1.5)

    def test_healthy_scores(self):
        amap = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
        image = torch.zeros(4, 2, 3, 4)
        image[2, :, :, 1:] = 1.0  # head: slices 1..3
        label = torch.zeros(1, 2, 3, 4)
        label[0, 0, 0, 2] = 1  # slice 2 is diseased
        values = healthy_scores(amap, image, label)
        expected = amap[0][..., [1, 3]].flatten()
        np.testing.assert_array_equal(np.sort(values), np.sort(expected.numpy()))
        self.assertEqual(healthy_scores(amap).size, 24)

    def test_load_threshold(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "c.json")
            with self.assertRaisesRegex(ValueError, "threshold file not found"):
                load_threshold(path)
            with open(path, "w") as f:
                json.dump({"fpr": 0.01}, f)
            with self.assertRaisesRegex(ValueError, "must hold a JSON object"):
                load_threshold(path)
            with open(path, "w") as f:
                json.dump({"threshold": 0.25, "settings": {"noise_level": 100}}, f)
            with self.assertLogs("berdiff.evaluation.evaluate", "WARNING"):
                self.assertEqual(load_threshold(path, {"noise_level": 50}), 0.25)


class TestCalibrateCommand(unittest.TestCase):
    def test_calibrate_matches_inference_maps(self):
        with tempfile.TemporaryDirectory() as tmp:
            make_model(tmp)
            healthy = make_case(os.path.join(tmp, "data"), "H_1", seed=7)
            diseased = make_case(os.path.join(tmp, "data"), "D_1", seed=8)
            seg = np.zeros((30, 28, 6), np.uint8)
            seg[10:15, 10:15, 2] = 1  # axial slice 2 diseased
            seg_path = os.path.join(tmp, "data", "D_1", "D_1_seg.nii.gz")
            nib.save(nib.Nifti1Image(seg, np.eye(4)), seg_path)
            datalist = os.path.join(tmp, "healthy.json")
            with open(datalist, "w") as f:
                json.dump([{"image": healthy}, {"image": diseased, "label": seg_path}], f)
            out = os.path.join(tmp, "calibration.json")
            settings = {"preset": "tiny", "spatial_size": [32, 32], "noise_level": 4, "num_inference_steps": 2}
            calibrate(
                bundle_root=BUNDLE, datalist=datalist, fpr=0.05, out=out, device="cpu",
                ckpt_path=os.path.join(tmp, "models", "model.pt"), progress=False, **settings,
            )
            with open(out) as f:
                result = json.load(f)
            self.assertEqual(result["num_cases"], 2)
            self.assertEqual(result["num_values"], 20 * 20 * 4 + 20 * 20 * 3)  # head voxels, minus slice 2 of D_1
            self.assertLessEqual(result["achieved_fpr"], 0.05)
            self.assertEqual(result["settings"]["noise_level"], 4)
            self.assertIn("raw", result["rule"])
            # the same threshold from the maps that inference writes (same seed, same pipeline)
            run_workflow(tmp, datalist=datalist, threshold_file=out)
            values = []
            for case, files in (("H_1", healthy), ("D_1", diseased)):
                amap = nib.load(os.path.join(tmp, "out", f"{case}_anomaly.nii.gz")).get_fdata(dtype=np.float32)
                head = np.zeros(amap.shape, bool)
                head[HEAD] = True
                if case == "D_1":
                    head[..., 2] = False
                values.append(amap[head])
                mask = np.asarray(nib.load(os.path.join(tmp, "out", f"{case}_anomaly_mask.nii.gz")).dataobj)
                np.testing.assert_array_equal(mask, amap > result["threshold"])
            pooled = np.concatenate(values)
            self.assertAlmostEqual(float(np.mean(pooled > result["threshold"])), result["achieved_fpr"], places=6)
            self.assertAlmostEqual(threshold_from_maps([pooled], 0.05), result["threshold"], places=5)

    def test_calibrate_reads_model_json(self):
        """The preset and slice size come from models/model.json; weights of another preset: one clear error."""
        from berdiff.model_description import make_model_description, write_model_description

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_model(tmp)
            datalist = os.path.join(tmp, "healthy.json")
            with open(datalist, "w") as f:
                json.dump([{"image": make_case(os.path.join(tmp, "data"), "H_2", seed=3)}], f)
            out = os.path.join(tmp, "calibration.json")
            common = {"bundle_root": BUNDLE, "datalist": datalist, "out": out, "device": "cpu", "ckpt_path": ckpt,
                      "progress": False, "noise_level": 2, "preset": "small", "spatial_size": [64, 64]}
            with self.assertRaisesRegex(ValueError, "holds a 'tiny' network.*builds a 'small' network"):
                calibrate(**common)
            write_model_description(ckpt, make_model_description("tiny", 4, [32, 32], 4, train_max_timestep=3))
            with open(calibrate(**common)) as f:
                settings = json.load(f)["settings"]
            self.assertEqual((settings["preset"], settings["spatial_size"], settings["num_inference_steps"]),
                             ("tiny", [32, 32], 2))
            with self.assertRaisesRegex(ValueError, "outside the trained range"):
                calibrate(**{**common, "noise_level": 4})

    def test_calibrate_bad_input(self):
        with tempfile.TemporaryDirectory() as tmp:
            files = make_case(os.path.join(tmp, "data"), "N_1", seed=9)
            img = nib.load(files[0])
            data = img.get_fdata(dtype=np.float32)
            data[3, 3, 3] = np.nan
            nib.save(nib.Nifti1Image(data, img.affine), files[0])
            datalist = os.path.join(tmp, "healthy.json")
            with open(datalist, "w") as f:
                json.dump([{"image": files}], f)
            out = os.path.join(tmp, "calibration.json")
            with self.assertRaisesRegex(ValueError, "NaN"):
                calibrate(bundle_root=BUNDLE, datalist=datalist, out=out, preset="tiny", spatial_size=[32, 32],
                          noise_level=2, device="cpu", allow_random_weights=True, progress=False)
            self.assertFalse(os.path.exists(out))
            with self.assertRaisesRegex(ValueError, "needs --datalist"):
                calibrate(bundle_root=BUNDLE, out=out)


if __name__ == "__main__":
    unittest.main()
