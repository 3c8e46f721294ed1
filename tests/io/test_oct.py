# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.io.oct: image scores, the per-scan map files, scores.csv, the scan list and the checks before a run."""

from __future__ import annotations

import csv
import os
import unittest

import numpy as np
import torch
from PIL import Image

from berdiff.io.oct import (
    RELATIVE_SCORE_FLOOR,
    ImageScore,
    OCTOutputWriter,
    image_score,
    oct_preflight,
    output_stem,
    relative_image_score,
    scan_item,
    scan_items,
    write_scan_maps,
    write_scores_csv,
)
from tests.oct_fixtures import synthetic_bscan, write_bscan
from tests.utils import TempDirMixin


class TestImageScore(unittest.TestCase):
    def test_statistics_against_numpy(self):
        rng = np.random.default_rng(0)
        m = rng.random((20, 30))
        self.assertAlmostEqual(image_score(m, "mean", 0), float(m.mean()))
        self.assertAlmostEqual(image_score(m, "p99", 0), float(np.percentile(m, 99)))
        self.assertAlmostEqual(image_score(m, "p95", 0), float(np.percentile(m, 95)))
        self.assertAlmostEqual(image_score(m, "max", 0), float(m.max()))
        self.assertAlmostEqual(image_score(m, "top1", 0), float(np.sort(m.ravel())[-6:].mean()))
        self.assertEqual(sorted(m.value for m in ImageScore), ["max", "mean", "p95", "p99", "top1"])

    def test_smoothing_favours_a_blob_over_scattered_pixels(self):
        rng = np.random.default_rng(1)
        scattered = np.zeros((40, 40))
        scattered[rng.integers(0, 40, 25), rng.integers(0, 40, 25)] = 1.0
        blob = np.zeros((40, 40))
        blob[18:23, 18:23] = 1.0
        self.assertGreater(image_score(blob, "max", 2.0), image_score(scattered, "max", 2.0))

    def test_p95_ranks_an_extended_change_above_a_focal_spot(self):
        focal, extended = np.zeros((40, 50)), np.zeros((40, 50))
        focal[10:16, 10:20] = 1.0  # 3 % of the pixels, strong (a foveal reflex, a vessel shadow)
        extended[30:34, :] = 0.5  # 10 % of the pixels, weaker (a row of drusen)
        self.assertGreater(image_score(focal, "p99", 0), image_score(extended, "p99", 0))
        self.assertEqual(image_score(focal, "p95", 0), 0.0)
        self.assertAlmostEqual(image_score(extended, "p95", 0), 0.5)

    def test_bad_options(self):
        with self.assertRaisesRegex(ValueError, "image score must be one of .*'median'"):
            image_score(np.zeros((4, 4)), "median")
        with self.assertRaisesRegex(ValueError, "sigma"):
            image_score(np.zeros((4, 4)), "mean", -1)
        for rows in ([0.5], [0.8, 0.2], [0.0, 1.5]):
            with self.assertRaisesRegex(ValueError, "score rows"):
                image_score(np.zeros((4, 4)), "mean", 0, rows)
        for cols in ([0.5], [0.8, 0.2], [-0.1, 0.5], "ab"):
            with self.assertRaisesRegex(ValueError, "score columns"):
                image_score(np.zeros((4, 4)), "mean", 0, None, cols)

    def test_rows_select_the_scored_layers(self):
        m = np.zeros((20, 10))
        m[2:4] = 1.0  # a change far above the RPE band
        m[12, 3] = 0.5
        self.assertAlmostEqual(image_score(m, "max", 0, [0.5, 0.8]), 0.5)  # rows 10..15 only
        self.assertAlmostEqual(image_score(m, "mean", 0, [0.5, 0.8]), float(m[10:16].mean()))
        self.assertAlmostEqual(image_score(m, "max", 0, None), 1.0)
        self.assertAlmostEqual(image_score(m, "mean", 0, [0.0, 1.0]), float(m.mean()))

    def test_cols_leave_out_the_lateral_borders(self):
        m = np.zeros((20, 40))
        m[12, 0:2] = 1.0  # a change at the scan's left border
        m[12, 38:40] = 0.75  # and at its right border
        m[12, 20] = 0.5
        self.assertAlmostEqual(image_score(m, "max", 0, [0.5, 0.8], [0.05, 0.95]), 0.5)  # columns 2..37 only
        self.assertAlmostEqual(image_score(m, "max", 0, [0.5, 0.8], [0.0, 0.97]), 1.0)
        self.assertAlmostEqual(image_score(m, "max", 0, [0.5, 0.8], [0.05, 1.0]), 0.75)
        self.assertAlmostEqual(image_score(m, "mean", 0, None, [0.25, 0.75]), float(m[:, 10:30].mean()))
        self.assertAlmostEqual(image_score(m, "mean", 0, [0.5, 0.8], [0.25, 0.75]), float(m[10:16, 10:30].mean()))


    def test_column_mask_leaves_out_columns(self):
        m = np.zeros((20, 40))
        m[10, 30] = 1.0  # a hot spot in a column the mask leaves out
        m[12, 5] = 0.5
        mask = np.ones(40, dtype=bool)
        mask[28:33] = False
        self.assertAlmostEqual(image_score(m, "max", 0, None, None, mask), 0.5)
        self.assertAlmostEqual(image_score(m, "max", 0, None, None, torch.as_tensor(mask)), 0.5)
        self.assertAlmostEqual(image_score(m, "mean", 0, [0.5, 0.8], [0.05, 0.95], mask),
                               float(m[10:16][:, [c for c in range(2, 38) if mask[c]]].mean()))
        self.assertAlmostEqual(image_score(m, "max", 0, None, [0.0, 0.5], mask), 0.5)
        # a mask that leaves no column of cols: the columns of cols are scored
        self.assertAlmostEqual(image_score(m, "max", 0, None, [0.7, 0.8], mask), 1.0)
        self.assertAlmostEqual(image_score(m, "max", 0, None, None, np.zeros(40, dtype=bool)), 1.0)
        with self.assertRaisesRegex(ValueError, "one entry per column"):
            image_score(m, "max", 0, None, None, np.ones(39, dtype=bool))


    def test_relative_score_divides_by_the_reference_mean(self):
        rng = np.random.default_rng(0)
        m, ref = rng.random((20, 40)), 0.5 + rng.random((20, 40))
        mask = np.ones(40, dtype=bool)
        mask[30:] = False
        expected = float(np.percentile(m[10:16, 2:30], 99)) / (float(ref[10:16, 2:30].mean()) + RELATIVE_SCORE_FLOOR)
        self.assertAlmostEqual(relative_image_score(m, ref, "p99", 0, [0.5, 0.8], [0.05, 0.95], mask), expected)
        # a noisier scan (the same change, twice the reference) scores half as high
        self.assertAlmostEqual(relative_image_score(m, 2 * ref, "p99", 0), relative_image_score(m, ref, "p99", 0) / 2,
                               places=4)
        self.assertTrue(np.isfinite(relative_image_score(m, np.zeros_like(ref), "max", 0)))  # a zero reference
        with self.assertRaisesRegex(ValueError, "same shape"):
            relative_image_score(m, ref[:, :-1])


class TestOutputs(TempDirMixin, unittest.TestCase):
    def test_scores_csv(self):
        path = write_scores_csv(
            os.path.join(self.tmp, "scores.csv"),
            [{"image": "NORMAL/a.png", "score": 0.5, "score_autoencoder": 0.25},
             {"image": "AMD/b.jpeg", "score": 1.0, "score_autoencoder": 0.75}],
        )
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        self.assertEqual(rows[0], ["image", "score", "score_autoencoder"])
        self.assertEqual(rows[1:], [["NORMAL/a.png", "0.5", "0.25"], ["AMD/b.jpeg", "1", "0.75"]])
        with self.assertRaisesRegex(ValueError, "needs 'image' and 'score'"):
            write_scores_csv(os.path.join(self.tmp, "bad.csv"), [{"image": "a"}])
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "bad.csv")))

    def test_map_files_keep_subfolders(self):
        self.assertEqual(output_stem("AMD/x/scan_1.nii.gz"), "AMD/x/scan_1")
        self.assertEqual(output_stem("scan.png"), "scan")
        m = np.linspace(0, 0.2, 12, dtype=np.float32).reshape(3, 4)
        files = write_scan_maps(self.tmp, "AMD/scan_1.jpeg", {"anomaly": m}, png_max=0.1)
        self.assertEqual(sorted(os.path.relpath(f, self.tmp) for f in files),
                         ["AMD/scan_1_anomaly.npy", "AMD/scan_1_anomaly.png"])
        np.testing.assert_array_equal(np.load(os.path.join(self.tmp, "AMD", "scan_1_anomaly.npy")), m)
        png = np.asarray(Image.open(os.path.join(self.tmp, "AMD", "scan_1_anomaly.png")))
        self.assertEqual(png.shape, (3, 4))
        self.assertEqual((int(png.min()), int(png.max())), (0, 255))

    def test_writer_with_a_fake_engine(self):
        import torch

        class Engine:
            class state:
                batch = {"name": ["NORMAL/a.png"], "geometry": {"height": torch.tensor([30]), "width": torch.tensor([40]),
                                                                  "top": torch.tensor([5]), "band": torch.tensor([14])}}
                output = {"pred": torch.rand(1, 2, 8, 16)}

        writer = OCTOutputWriter(self.tmp, ["anomaly", "autoencoder"], "mean", 0.0, write_maps=["anomaly"])
        writer.started()
        writer.iteration_completed(Engine)
        writer.completed()
        amap = np.load(os.path.join(self.tmp, "NORMAL", "a_anomaly.npy"))
        self.assertEqual(amap.shape, (30, 40))
        self.assertEqual(float(amap[:5].sum() + amap[19:].sum()), 0.0)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "NORMAL", "a_autoencoder.npy")))
        with open(os.path.join(self.tmp, "scores.csv"), newline="") as f:
            row = next(csv.DictReader(f))
        self.assertAlmostEqual(float(row["score"]), float(Engine.state.output["pred"][0, 0].mean()), places=5)
        self.assertIn("score_autoencoder", row)
        # with the item transform's score_columns, only those columns are scored
        columns = torch.ones(1, 16, dtype=torch.bool)
        columns[0, 8:] = False
        Engine.state.batch["score_columns"] = columns
        writer.started()
        writer.iteration_completed(Engine)
        self.assertAlmostEqual(writer.rows[0]["score"], float(Engine.state.output["pred"][0, 0, :, :8].mean()), places=5)
        # with score_normalization, score is relative to the other map's mean and score_anomaly is the plain score
        pred = Engine.state.output["pred"]
        relative = OCTOutputWriter(self.tmp, ["anomaly", "autoencoder"], "mean", 0.0, write_maps=[],
                                   score_normalization="autoencoder")
        relative.started()
        relative.iteration_completed(Engine)
        row = relative.rows[0]
        self.assertEqual(list(row)[:3], ["image", "score", "score_anomaly"])
        self.assertAlmostEqual(row["score_anomaly"], float(pred[0, 0, :, :8].mean()), places=5)
        self.assertAlmostEqual(row["score"], row["score_anomaly"] / (float(pred[0, 1, :, :8].mean()) + 1e-6), places=3)
        for bad in ("anomaly", "latent"):
            with self.assertRaisesRegex(ValueError, "score_normalization"):
                OCTOutputWriter(self.tmp, ["anomaly", "autoencoder"], score_normalization=bad)


class TestInputs(TempDirMixin, unittest.TestCase):
    def test_scan_items_and_item_transform(self):
        write_bscan(os.path.join(self.tmp, "in", "AMD", "x.png"), synthetic_bscan(30, 50, bump=True))
        write_bscan(os.path.join(self.tmp, "in", "y.tif"), synthetic_bscan(30, 50))
        items = scan_items(os.path.join(self.tmp, "in"))
        self.assertEqual([i["name"] for i in items], ["AMD/x.png", "y.tif"])
        item = scan_item(items[0], (16, 32), 0.35)
        self.assertEqual(tuple(item["image"].shape), (1, 16, 32))
        self.assertEqual(item["geometry"]["height"], 30)
        self.assertEqual((tuple(item["score_columns"].shape), item["score_columns"].dtype), ((32,), torch.bool))
        self.assertTrue(bool(scan_item(items[0], (16, 32), 0.35, score_rpe_columns=False)["score_columns"].all()))
        with self.assertRaisesRegex(TypeError, "score_rpe_columns must be true or false, got 'false'"):
            scan_item(items[0], (16, 32), 0.35, score_rpe_columns="false")
        self.assertEqual(oct_preflight(items, on_error="raise"), 2)
        one = scan_items(image=items[1]["image"])
        self.assertEqual(one[0]["name"], "y.tif")

    def test_datalist_input(self):
        import json

        folder = os.path.join(self.tmp, "lists")
        write_bscan(os.path.join(folder, "AMD", "x.png"), synthetic_bscan(30, 50, bump=True))
        write_bscan(os.path.join(folder, "y.tif"), synthetic_bscan(30, 50))
        outside = os.path.join(self.tmp, "elsewhere", "z.png")
        write_bscan(outside, synthetic_bscan(30, 50))
        plain = os.path.join(folder, "scans.json")
        with open(plain, "w") as f:
            json.dump(["AMD/x.png", {"image": "y.tif"}, outside], f)
        items = scan_items(datalist=plain)
        self.assertEqual([i["name"] for i in items], ["AMD/x.png", "y.tif", "z.png"])
        self.assertEqual(items[0]["image"], os.path.join(folder, "AMD", "x.png"))
        self.assertEqual(oct_preflight(items, on_error="raise"), 3)
        keyed = os.path.join(folder, "split.json")
        with open(keyed, "w") as f:
            json.dump({"training": ["y.tif"], "testing": [{"image": "AMD/x.png"}]}, f)
        self.assertEqual([i["name"] for i in scan_items(datalist=keyed)], ["AMD/x.png"])  # testing first
        self.assertEqual([i["name"] for i in scan_items(datalist=keyed, datalist_key="training")], ["y.tif"])
        # the first input set is used: image, then datalist, then dataset_dir
        self.assertEqual(len(scan_items(folder, datalist=keyed)), 1)
        self.assertEqual(scan_items(folder, image=outside, datalist=keyed)[0]["name"], "z.png")
        # two scans that would write the same files, a missing list, a bad key: reported by the preflight
        clash = os.path.join(folder, "clash.json")
        with open(clash, "w") as f:
            json.dump([outside, os.path.join(self.tmp, "in2", "z.png")], f)
        for path, key, message in ((clash, None, "same output files"), (plain + ".missing", None, "not found"),
                                   (keyed, "nope", "no list under 'nope'")):
            with self.subTest(message):
                with self.assertRaisesRegex(ValueError, message):
                    oct_preflight(scan_items(datalist=path, datalist_key=key), on_error="raise")

    def test_preflight_names_the_problem(self):
        with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
            oct_preflight(scan_items(os.path.join(self.tmp, "missing")), on_error="raise")
        folder = os.path.join(self.tmp, "bad")
        write_bscan(os.path.join(folder, "good.png"), synthetic_bscan(30, 50))
        write_bscan(os.path.join(folder, "blank.png"), np.full((30, 50), 7, np.uint8))
        data = open(os.path.join(folder, "good.png"), "rb").read()
        with open(os.path.join(folder, "cut.png"), "wb") as f:
            f.write(data[:100])
        with self.assertRaisesRegex(ValueError, r"2 bad scan\(s\), nothing written: .*blank.png.*empty.*cut.png"):
            oct_preflight(scan_items(folder), on_error="raise")
        items = [i for i in scan_items(folder) if i["name"] == "good.png"]
        with self.assertRaisesRegex(FileNotFoundError, "model weights .* not found"):
            oct_preflight(items, os.path.join(self.tmp, "model.pt"), on_error="raise")


if __name__ == "__main__":
    unittest.main()
