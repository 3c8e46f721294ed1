# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import math
import unittest

import numpy as np
import torch
from parameterized import parameterized
from scipy import stats

from berdiff.evaluation import (
    best_dice,
    brain_mask_from_image,
    dice,
    per_slice_protocol,
    per_volume_protocol,
    pixel_auprc,
    pixel_auroc,
    psnr,
    reference_slice_postprocess,
    remove_small_components,
    slice_detection_auroc,
    slice_statistics,
    threshold_at_fpr,
    volume_postprocess,
)


def _blob_volume(shape=(32, 32, 8), centre=(16, 16), radius=5, z=range(2, 6)) -> np.ndarray:
    gt = np.zeros(shape, dtype=np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    for k in z:
        gt[..., k] = disk
    return gt


class TestBasicMetrics(unittest.TestCase):
    def test_perfect_and_inverted_maps(self):
        rng = np.random.default_rng(0)
        gt = rng.random((20, 20)) < 0.2
        score = gt.astype(float) + 0.1 * rng.random((20, 20))  # perfectly separable
        self.assertEqual(pixel_auroc(score, gt), 1.0)
        self.assertEqual(pixel_auprc(score, gt), 1.0)
        self.assertEqual(dice(score > 0.5, gt), 1.0)
        self.assertEqual(pixel_auroc(-score, gt), 0.0)
        self.assertAlmostEqual(pixel_auprc(-score, gt), gt.mean(), delta=0.1)
        # torch input works too
        self.assertEqual(pixel_auroc(torch.from_numpy(score), torch.from_numpy(gt)), 1.0)

    def test_dice_values_and_empty_convention(self):
        a = np.zeros((4, 4), bool)
        b = np.zeros((4, 4), bool)
        a[0, :2] = True  # 2 px
        b[0, 1:4] = True  # 3 px, overlap 1
        self.assertAlmostEqual(dice(a, b), 2 * 1 / 5)
        empty = np.zeros((4, 4))
        self.assertTrue(math.isnan(dice(empty, empty)))
        self.assertEqual(dice(empty, empty, empty_score=1.0), 1.0)
        self.assertEqual(dice(a, empty), 0.0)
        self.assertEqual(dice(empty, b), 0.0)
        with self.assertRaisesRegex(ValueError, "shape"):
            dice(a, np.zeros((4, 5)))

    def test_auroc_auprc_single_class_is_nan(self):
        s = np.arange(16.0)
        self.assertTrue(math.isnan(pixel_auroc(s, np.zeros(16))))
        self.assertTrue(math.isnan(pixel_auprc(s, np.ones(16))))
        with self.assertRaisesRegex(ValueError, "NaN"):
            pixel_auroc(np.full(16, np.nan), np.r_[np.zeros(8), np.ones(8)])

    def test_auroc_known_value(self):
        # 2 positives at ranks {4th, 2nd} among 4: pairs (pos > neg): 3 of 4 -> 0.75
        self.assertAlmostEqual(pixel_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), 0.75)

    def test_psnr(self):
        x = np.ones((4, 4))
        r = x.copy()
        r[0, 0] = 0.0  # mse = 1/16
        self.assertAlmostEqual(psnr(r, x), 20 * math.log10(1 / math.sqrt(1 / 16)))
        self.assertEqual(psnr(x, x), float("inf"))


class TestComponents(unittest.TestCase):
    def test_removes_10px_keeps_20px_2d(self):
        m = np.zeros((40, 40), bool)
        m[2:4, 2:7] = True  # 10 px
        m[20:24, 20:25] = True  # 20 px
        out = remove_small_components(m, max_size=15, connectivity=2)
        self.assertFalse(out[2:4, 2:7].any())
        self.assertTrue(out[20:24, 20:25].all())
        self.assertEqual(out.sum(), 20)

    def test_connectivity_and_boundary(self):
        m = np.zeros((10, 10), bool)
        m[np.arange(8), np.arange(8)] = True  # a diagonal line of 8 px
        self.assertEqual(remove_small_components(m, 7, connectivity=2).sum(), 8)  # one 8-px component, kept
        self.assertEqual(remove_small_components(m, 7, connectivity=1).sum(), 0)  # eight 1-px components
        self.assertEqual(remove_small_components(m, 8, connectivity=2).sum(), 0)  # "<=": exactly 8 is removed

    def test_filled_area_rule(self):
        ring = np.zeros((9, 9), bool)
        ring[2:7, 2:7] = True
        ring[3:6, 3:6] = False  # 16-px ring, 25 px filled
        self.assertEqual(remove_small_components(ring, 16, area_rule="area").sum(), 0)
        self.assertEqual(remove_small_components(ring, 16, area_rule="filled").sum(), 16)
        with self.assertRaises(ValueError):
            remove_small_components(ring, 16, area_rule="bogus")

    def test_3d(self):
        v = np.zeros((10, 10, 10), bool)
        v[1:3, 1:3, 1] = True  # 4 voxels
        v[5:7, 5:7, 5:7] = True  # 8 voxels
        out = remove_small_components(v, 7, connectivity=3)
        self.assertEqual(out.sum(), 8)
        self.assertTrue(out[5:7, 5:7, 5:7].all())
        with self.assertRaisesRegex(ValueError, "connectivity"):
            remove_small_components(v, 7, connectivity=4)


class TestReferenceSlice(unittest.TestCase):
    def test_median_filter_removes_isolated_spike(self):
        r = np.zeros((20, 20))
        r[5, 5] = 100.0  # isolated spike: median 5x5 removes it
        r[10:16, 10:16] = 1.0  # 6x6 block: median keeps its 2x2 core, erodes the corners
        prob, binary = reference_slice_postprocess(r, min_component=0)
        self.assertEqual(prob[5, 5], 0.0)
        self.assertTrue(binary[12:14, 12:14].all())
        self.assertFalse(binary[10, 10])  # a corner pixel sees only 9 of 25 ones
        self.assertEqual(prob.max(), 1.0)
        self.assertEqual(prob.min(), 0.0)

    def test_per_channel_input_equals_sum_of_medians(self):
        rng = np.random.default_rng(1)
        r = rng.random((4, 24, 24)) ** 4
        prob4, _ = reference_slice_postprocess(r)
        from scipy import ndimage

        summed = sum(ndimage.median_filter(c, size=5) for c in r)
        lo, hi = np.percentile(summed, [1, 99])
        c = np.clip(summed, lo, hi)
        np.testing.assert_allclose(prob4, (c - c.min()) / (c.max() - c.min()))

    def test_component_filter_in_postprocess(self):
        r = np.zeros((40, 40))
        r[2:6, 2:5] = 1.0  # 12 px before median; small after it
        r[20:30, 20:30] = 1.0
        _, binary = reference_slice_postprocess(r, median_size=1)
        self.assertFalse(binary[2:6, 2:5].any())
        self.assertTrue(binary[20:30, 20:30].all())

    def test_constant_slice(self):
        prob, binary = reference_slice_postprocess(np.ones((8, 8)))
        self.assertFalse(prob.any() or binary.any())


class TestProtocols(unittest.TestCase):
    def test_per_slice_perfect_map(self):
        gt = _blob_volume()
        res = per_slice_protocol(gt.astype(float), gt, median_size=1)
        self.assertEqual(res["n_slices"], 4)
        self.assertEqual(res["slice_index"], [2, 3, 4, 5])
        for key in ("dice", "auroc", "auprc"):
            self.assertAlmostEqual(res[key]["mean"], 1.0, msg=key)
            self.assertEqual(res[key]["n"], 4)
        # the 5x5 median rounds off the disk rim: its pixels drop to the background value
        res5 = per_slice_protocol(gt.astype(float), gt)
        self.assertLess(res5["dice"]["mean"], 1.0)
        self.assertGreater(res5["dice"]["mean"], 0.8)
        self.assertGreater(res5["auroc"]["mean"], 0.9)

    def test_per_slice_axis_and_channels(self):
        gt = _blob_volume()
        ch = np.stack([gt, gt], axis=0).astype(float) * 0.5
        res = per_slice_protocol(ch, gt, channel_axis=0, median_size=1)
        self.assertAlmostEqual(res["dice"]["mean"], 1.0)
        res0 = per_slice_protocol(np.moveaxis(gt, 2, 0).astype(float), np.moveaxis(gt, 2, 0), axis=0)
        self.assertEqual(res0["n_slices"], 4)
        with self.assertRaisesRegex(ValueError, "shape"):
            per_slice_protocol(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))

    def test_per_volume_perfect_and_threshold(self):
        gt = _blob_volume(z=range(1, 7))
        score = gt * 2.0 + 0.01
        res = per_volume_protocol(score, gt, threshold=1.0, median_size=1)
        self.assertEqual(res["dice"], 1.0)
        self.assertEqual(res["best_dice"], 1.0)
        self.assertEqual(res["auroc"], 1.0)
        self.assertEqual(res["auprc"], 1.0)
        s32 = score.astype(np.float32)  # the processed map is float32
        self.assertTrue(s32[gt > 0].min() > res["best_threshold"] >= s32[gt == 0].max())
        none = per_volume_protocol(score, gt, threshold=None, median_size=1)
        self.assertTrue(math.isnan(none["dice"]))
        high = per_volume_protocol(score, gt, threshold=5.0, median_size=1)
        self.assertEqual(high["dice"], 0.0)

    def test_threshold_on_raw_or_processed_map(self):
        gt = np.zeros((20, 20, 9), np.uint8)
        gt[5:15, 5:15, 4] = 1  # a one-voxel-thick plate: the 3D median removes it
        score = gt * 1.0
        processed = per_volume_protocol(score, gt, threshold=0.5)
        raw = per_volume_protocol(score, gt, threshold=0.5, threshold_on="raw")
        self.assertEqual(processed["dice"], 0.0)
        self.assertEqual(raw["dice"], 1.0)
        with self.assertRaises(ValueError):
            per_volume_protocol(score, gt, threshold=0.5, threshold_on="smoothed")

    def test_best_dice_matches_brute_force(self):
        rng = np.random.default_rng(3)
        gt = rng.random(300) < 0.2
        score = gt + rng.normal(0, 0.6, 300)
        score = np.round(score, 1)  # ties
        bd, thr = best_dice(score, gt)
        brute = max(dice(score > t, gt) for t in np.r_[np.unique(score), score.min() - 1])
        self.assertAlmostEqual(bd, brute)
        self.assertAlmostEqual(dice(score > thr, gt), bd)

    def test_brain_mask_and_postprocess(self):
        img = np.zeros((30, 30, 10))
        img[5:25, 5:25, 2:8] = 1.0
        img[10:12, 10:12, 4] = 0.0  # hole, filled
        img[0, 0, 0] = 1.0  # speck, not the largest component
        mask = brain_mask_from_image(img[None], channel_axis=0)
        self.assertEqual(mask.sum(), 20 * 20 * 6)
        score = np.ones_like(img)
        out, used = volume_postprocess(score, mask, median_size=3, erode=1)
        self.assertEqual(used.sum(), 18 * 18 * 4)
        self.assertTrue((out[~used] == 0).all())
        # border voxels of the eroded mask see zeros outside it, so the median is computed over a masked map
        self.assertEqual(out[15, 15, 5], 1.0)

    def test_volume_median_bounding_box_equals_full(self):
        rng = np.random.default_rng(2)
        score = rng.random((24, 24, 12)).astype(np.float32)
        mask = np.zeros(score.shape, bool)
        mask[6:18, 5:15, 3:9] = True
        from scipy import ndimage

        out, _ = volume_postprocess(score, mask, median_size=5, erode=False)
        full = ndimage.median_filter(np.where(mask, score, 0), size=5)
        np.testing.assert_array_equal(out[mask], full[mask])

    def test_slice_detection(self):
        gt = _blob_volume()
        score = gt * 1.0
        sc, lb = slice_statistics(score, gt, percentile=100)
        np.testing.assert_array_equal(lb, [0, 0, 1, 1, 1, 1, 0, 0])
        self.assertEqual(slice_detection_auroc([score], [gt]), 1.0)
        inverted = np.broadcast_to(1.0 - lb, gt.shape)  # healthy slices score high
        self.assertEqual(slice_detection_auroc([inverted], [gt]), 0.0)
        mask = np.zeros_like(gt, bool)
        mask[..., 1:7] = True
        sc, lb = slice_statistics(score, gt, mask=mask)
        self.assertEqual(len(sc), 6)


class TestThresholdAtFPR(unittest.TestCase):
    @parameterized.expand([(0.01,), (0.05,), (0.1,)])
    def test_exponential(self, fpr):
        x = np.random.default_rng(0).exponential(size=100_000)
        t = threshold_at_fpr(x, fpr)
        self.assertLessEqual((x > t).mean(), fpr)
        self.assertAlmostEqual((x > t).mean(), fpr, delta=1e-4)
        # closed form: P(X > t) = exp(-t)
        self.assertAlmostEqual(t, -math.log(fpr), delta=0.05 * -math.log(fpr))

    def test_uniform_and_torch_and_pooled(self):
        x = np.random.default_rng(1).random(100_000).astype(np.float32)
        t = threshold_at_fpr(torch.from_numpy(x), 0.05)
        self.assertAlmostEqual(t, stats.uniform.ppf(0.95), delta=0.005)
        self.assertEqual(threshold_at_fpr([x[:1000].reshape(10, 100), x[1000:]], 0.05), t)

    def test_ties_never_exceed_fpr(self):
        x = np.zeros(1000)
        x[:5] = 1.0
        t = threshold_at_fpr(x, 0.01)
        self.assertLessEqual((x > t).mean(), 0.01)
        self.assertEqual(t, 0.0)

    @parameterized.expand([(0.0,), (1.0,), (-0.1,), (float("nan"),)])
    def test_bad_fpr(self, fpr):
        with self.assertRaisesRegex(ValueError, "fpr"):
            threshold_at_fpr(np.arange(10.0), fpr)

    def test_bad_scores(self):
        with self.assertRaisesRegex(ValueError, "empty"):
            threshold_at_fpr(np.array([]), 0.1)
        with self.assertRaisesRegex(ValueError, "NaN"):
            threshold_at_fpr(np.array([1.0, np.nan]), 0.1)


if __name__ == "__main__":
    unittest.main()
