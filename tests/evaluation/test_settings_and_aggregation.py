# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""ProtocolSettings, the one protocol-A aggregation, mean_std, the case-name rule and load_threshold."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import unittest

import numpy as np

from berdiff.evaluation import (
    ProtocolSettings,
    ThresholdMap,
    evaluate_arrays,
    load_threshold,
    mean_std,
    per_slice_protocol,
    read_calibration,
    score_slices,
    summarise_slices,
)
from berdiff.evaluation.cases import match_key


def _case(seed: int, shape=(24, 24, 6)) -> dict:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[8:14, 9:15, 2:5] = 1
    return {"name": f"c{seed}", "score": rng.random(shape) + 2.0 * label, "label": label}


class TestProtocolSettings(unittest.TestCase):
    def test_frozen_checked_and_normalised(self):
        s = ProtocolSettings(threshold=1, threshold_on="raw")
        self.assertEqual((s.threshold, s.threshold_on), (1.0, ThresholdMap.RAW))
        self.assertIsInstance(s.threshold, float)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            s.axis = 0  # type: ignore[misc]
        with self.assertRaisesRegex(ValueError, "finite"):
            ProtocolSettings(threshold=float("nan"))
        with self.assertRaisesRegex(ValueError, "processed"):
            ProtocolSettings(threshold_on="rwa")

    def test_settings_object_and_keywords_agree(self):
        cases = [_case(0), _case(1)]
        settings = ProtocolSettings(threshold=1.5, brain_mask=False, median_size_2d=1, median_size_3d=1)
        a = evaluate_arrays(cases, settings)
        b = evaluate_arrays(cases, threshold=1.5, brain_mask=False, median_size_2d=1, median_size_3d=1)
        self.assertEqual(repr(a["per_case"]), repr(b["per_case"]))  # NaN (no PSNR) compares by its repr
        self.assertEqual(a["settings"]["protocol_b"]["threshold"], 1.5)
        with self.assertRaises(TypeError):
            evaluate_arrays(cases, median_size=3)


class TestAggregation(unittest.TestCase):
    def test_mean_std_leaves_out_undefined_values(self):
        self.assertEqual(mean_std([1.0, 3.0, float("nan"), float("inf")]), {"mean": 2.0, "std": 1.0, "n": 2})
        empty = mean_std([float("nan")])
        self.assertTrue(math.isnan(empty["mean"]) and empty["n"] == 0)

    def test_one_protocol_a_aggregation(self):
        cases = [_case(2), _case(3)]
        per_volume = [per_slice_protocol(c["score"], c["label"]) for c in cases]
        # pooling the slices of both volumes and aggregating once = what evaluate reports
        slices = [np.take(c["score"], z, axis=-1) for c in cases for z in range(2, 5)]
        labels = [np.take(c["label"], z, axis=-1) for c in cases for z in range(2, 5)]
        pooled = summarise_slices(score_slices(slices, labels))
        res = evaluate_arrays(cases, brain_mask=False)["maps"]["anomaly"]["protocol_a"]
        self.assertEqual(res, pooled)
        self.assertEqual(pooled["n_slices"], sum(p["n_slices"] for p in per_volume))
        self.assertAlmostEqual(
            pooled["dice"]["mean"], float(np.mean([d for p in per_volume for d in p["dice_per_slice"]]))
        )
        grid = score_slices(slices[:2], labels[:2], oracle=True, grid=(0.5, 0.9))
        self.assertEqual([row[0] for row in grid["dice_grid"]], grid["dice"])  # the grid's 0.5 is the fixed Dice
        self.assertTrue(all(o >= d - 1e-12 for o, d in zip(grid["best_dice"], grid["dice"])))


class TestNamesAndThreshold(unittest.TestCase):
    def test_match_key(self):
        self.assertEqual(match_key("BraTS_001_flair"), "BraTS_001")
        self.assertEqual(match_key("BraTS_001_FLAIR"), "BraTS_001")
        self.assertEqual(match_key("case7_t1ce_seg"), "case7")
        self.assertEqual(match_key("seg"), "seg")

    def test_load_threshold_is_one_float(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "c.json")
            with open(path, "w") as f:
                json.dump({"threshold": "1e-2", "rule": "raw"}, f)
            value = load_threshold(path)
            self.assertIs(type(value), float)
            self.assertEqual((value, read_calibration(path)), (0.01, {"threshold": 0.01, "rule": "raw"}))
            with open(path, "w") as f:
                f.write('{"threshold": Infinity}')
            with self.assertRaisesRegex(ValueError, "finite"):
                load_threshold(path)


if __name__ == "__main__":
    unittest.main()
