# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

import numpy as np
import torch
from monai.data import MetaTensor

from berdiff.evaluation.postprocess import reference_slice_postprocess
from berdiff.postprocessing import AnomalyMaskd, SplitChannelsd, threshold_description


class TestSplitChannelsd(unittest.TestCase):
    def test_split_keeps_meta(self):
        pred = MetaTensor(torch.arange(6.0).reshape(6, 1, 1, 1).expand(6, 2, 2, 2), meta={"filename_or_obj": "x.nii"})
        out = SplitChannelsd("pred", names=("a", "b", "r"), sizes=(1, 1, 4), delete_original=True)({"pred": pred})
        self.assertNotIn("pred", out)
        self.assertEqual([out[k].shape[0] for k in ("a", "b", "r")], [1, 1, 4])
        self.assertEqual(float(out["b"].max()), 1.0)
        self.assertEqual(float(out["r"].min()), 2.0)
        self.assertEqual(out["r"].meta["filename_or_obj"], "x.nii")

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "expected 3"):
            SplitChannelsd("pred", names=("a", "b"), sizes=(1, 2))({"pred": torch.zeros(4, 2, 2)})
        with self.assertRaisesRegex(ValueError, "equal length"):
            SplitChannelsd("pred", names=("a",), sizes=(1, 2))


class TestAnomalyMaskd(unittest.TestCase):
    def _data(self, depth=4):
        rng = np.random.default_rng(0)
        image = torch.zeros(4, 40, 40, depth)
        image[:, 5:35, 5:35, 1:] = torch.as_tensor(rng.random((4, 30, 30, depth - 1)), dtype=torch.float32)
        recon = image.clone()
        recon[:, 15:25, 15:25, 1:] += 0.8  # a 10x10 anomaly per head slice
        recon[:, 30, 30, 1:] += 0.8  # an isolated pixel: removed by the component filter
        amap = ((recon - image) ** 2).sum(0, keepdim=True)
        return {"image": image, "reconstruction": recon, "anomaly": MetaTensor(amap, meta={"k": 1})}

    def test_protocol_a_per_slice(self):
        d = self._data()
        out = AnomalyMaskd("anomaly")(d)
        mask = out["anomaly_mask"]
        self.assertEqual(mask.dtype, torch.uint8)
        self.assertEqual(tuple(mask.shape), (1, 40, 40, 4))
        self.assertEqual(mask.meta["k"], 1)
        self.assertEqual(int(mask[..., 0].sum()), 0)  # constant slice
        for z in range(1, 4):
            residual = ((d["reconstruction"] - d["image"]) ** 2)[..., z].numpy()
            _, expected = reference_slice_postprocess(residual)
            np.testing.assert_array_equal(mask[0, ..., z].numpy(), expected.astype(np.uint8))
            self.assertEqual(int(mask[0, 30, 30, z]), 0)
            self.assertTrue(bool(mask[0, 20, 20, z]))

    def test_summed_map_without_reconstruction(self):
        d = self._data()
        out = AnomalyMaskd("anomaly", reconstruction_key=None)({"anomaly": d["anomaly"]})
        _, expected = reference_slice_postprocess(d["anomaly"][0, ..., 2].numpy())
        np.testing.assert_array_equal(out["anomaly_mask"][0, ..., 2].numpy(), expected.astype(np.uint8))

    def test_absolute_threshold(self):
        d = self._data()
        out = AnomalyMaskd("anomaly", threshold=1.0)(d)
        np.testing.assert_array_equal(out["anomaly_mask"].numpy(), (d["anomaly"] > 1.0).numpy().astype(np.uint8))
        self.assertEqual(threshold_description(1.0)["mode"], "calibrated")
        self.assertEqual(threshold_description(None)["mode"], "protocol_a")

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "one-channel"):
            AnomalyMaskd("anomaly")({"anomaly": torch.zeros(2, 4, 4, 4)})
        with self.assertRaisesRegex(ValueError, "finite"):
            AnomalyMaskd("anomaly", threshold=float("nan"))


if __name__ == "__main__":
    unittest.main()
