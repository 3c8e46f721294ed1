# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import unittest
from contextlib import redirect_stdout
from pathlib import Path

import nibabel as nib
import numpy as np

from berdiff.evaluation import evaluate, evaluate_arrays, find_cases, load_threshold

SHAPE = (32, 32, 8)


def _gt(i: int) -> np.ndarray:
    """Case 0 is healthy; cases 1.. have a 10x10x4 box (label values 1, 2, 4 all count as tumour)."""
    gt = np.zeros(SHAPE, np.uint8)
    if i > 0:
        gt[8 + i : 18 + i, 10:20, 2:6] = (1, 2, 4)[i % 3]
    return gt


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _strict_json(path: Path) -> dict:
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=reject)


class TestEvaluateFiles(unittest.TestCase):
    def setUp(self):
        self.root = Path(tempfile.mkdtemp())
        self.pred, self.lab, self.img = self.root / "pred", self.root / "lab", self.root / "img"
        rng = np.random.default_rng(0)
        for i in range(3):
            case = f"BraTS_{i:03d}"
            gt = _gt(i)
            head = np.zeros(SHAPE, np.float32)
            head[3:29, 3:29, :] = 1.0
            score = (gt > 0).astype(np.float32) + 0.2 * rng.random(SHAPE).astype(np.float32)
            _save(score, self.pred / f"{case}_anomaly.nii.gz")
            _save(rng.random((*SHAPE, 4)).astype(np.float32), self.pred / f"{case}_reconstruction.nii.gz")
            _save(0.5 * (gt > 0).astype(np.float32), self.pred / f"{case}_latent_flip.nii.gz")
            _save(gt, self.lab / case / f"{case}_seg.nii.gz")
            for m in ("t1", "t1ce", "t2", "flair"):
                _save(head * (1 + gt), self.img / case / f"{case}_{m}.nii.gz")

    def tearDown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, **kwargs) -> dict:
        with redirect_stdout(io.StringIO()) as buf:
            res = evaluate(str(self.pred), str(self.lab), **kwargs)
        self.stdout = buf.getvalue()
        return res

    def test_end_to_end_writes_outputs(self):
        res = self._run(image=str(self.img), threshold=0.6, median_size_2d=1, median_size_3d=1, erode=False)
        out = self.pred / "evaluation"
        self.assertEqual(sorted(os.listdir(out)), ["figure.png", "metrics.json", "per_case.csv"])
        self.assertEqual((out / "figure.png").read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
        metrics = _strict_json(out / "metrics.json")
        self.assertEqual(metrics["n_cases"], 3)
        self.assertEqual(metrics["n_diseased_cases"], 2)
        a = metrics["maps"]["anomaly"]["protocol_a"]
        b = metrics["maps"]["anomaly"]["protocol_b"]
        # the map separates tumour (>= 1) from background (< 0.2) perfectly
        self.assertEqual(a["n_slices"], 8)
        for key in ("dice", "auroc", "auprc"):
            self.assertAlmostEqual(a[key]["mean"], 1.0, msg=key)
            self.assertAlmostEqual(b[key]["mean"], 1.0, msg=key)
        self.assertEqual(b["dice"]["n"], 2)  # the healthy volume has no defined Dice
        self.assertAlmostEqual(b["best_dice_upper_bound"]["mean"], 1.0)
        self.assertEqual(metrics["maps"]["anomaly"]["slice_detection"]["auroc"], 1.0)
        self.assertIn("latent_flip", metrics["maps"])
        self.assertIsNone(metrics["maps"]["latent_flip"]["protocol_b"]["dice"]["mean"])  # no threshold for it
        settings = metrics["settings"]
        self.assertEqual(settings["protocol_b"]["threshold"], 0.6)
        self.assertTrue(settings["protocol_b"]["brain_mask"].startswith("yes"))
        self.assertIn("average_precision_score", settings["auprc_implementation"])
        with open(out / "per_case.csv") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual([r["case"] for r in rows], ["BraTS_000", "BraTS_001", "BraTS_002"])
        self.assertEqual(float(rows[1]["anomaly_b_dice"]), 1.0)
        self.assertEqual(rows[0]["anomaly_b_dice"], "nan")
        self.assertEqual(res["maps"]["anomaly"]["protocol_a"]["dice"]["mean"], a["dice"]["mean"])
        self.assertIn("A per-slice", self.stdout)
        self.assertFalse([p for p in out.iterdir() if p.name.endswith(".tmp")])

    def test_threshold_file_and_default_filters(self):
        tfile = self.root / "calibration.json"
        tfile.write_text(json.dumps({"threshold": 0.6, "fpr": 0.01}))
        out = self.root / "out"
        res = self._run(threshold_file=str(tfile), out=str(out), figure=False)
        self.assertEqual(sorted(os.listdir(out)), ["metrics.json", "per_case.csv"])
        b = res["settings"]["protocol_b"]
        self.assertEqual(b["threshold"], 0.6)
        self.assertIn("calibration.json", b["threshold_source"])
        self.assertEqual(res["settings"]["threshold_file_content"]["fpr"], 0.01)
        self.assertEqual(b["brain_mask"], "no")
        # default 5x5 / 5^3 medians on a 4-slice-thick box: still a good, imperfect score
        self.assertGreater(res["maps"]["anomaly"]["protocol_a"]["auroc"]["mean"], 0.9)
        # a threshold calibrated on the raw map (the calibrate command's rule) is applied to the raw map
        tfile.write_text(json.dumps({"threshold": 0.6, "rule": "anomaly_map > threshold (raw map)"}))
        res_raw = self._run(threshold_file=str(tfile), out=str(out), figure=False)
        self.assertTrue(res_raw["settings"]["protocol_b"]["threshold_applies_to"].startswith("raw"))
        self.assertTrue(b["threshold_applies_to"].startswith("anomaly map after masking"))
        with self.assertRaisesRegex(ValueError, "either"):
            self._run(threshold=0.5, threshold_file=str(tfile))
        tfile.write_text(json.dumps({"fpr": 0.01}))
        with self.assertRaisesRegex(ValueError, "threshold"):
            load_threshold(tfile)

    def test_shape_mismatch_names_both_files_and_writes_nothing(self):
        _save(np.zeros((32, 32, 9), np.uint8), self.lab / "BraTS_001" / "BraTS_001_seg.nii.gz")
        with self.assertRaises(ValueError) as ctx:
            self._run()
        msg = str(ctx.exception)
        self.assertIn("BraTS_001_anomaly.nii.gz", msg)
        self.assertIn("BraTS_001_seg.nii.gz", msg)
        self.assertFalse((self.pred / "evaluation").exists())

    def test_missing_label_is_an_error_unless_allowed(self):
        os.remove(self.lab / "BraTS_002" / "BraTS_002_seg.nii.gz")
        with self.assertRaisesRegex(FileNotFoundError, "BraTS_002"):
            self._run()
        self.assertFalse((self.pred / "evaluation").exists())
        with self.assertWarnsRegex(UserWarning, "BraTS_002"):
            res = self._run(allow_missing_labels=True, figure=False)
        self.assertEqual(res["cases"], ["BraTS_000", "BraTS_001"])

    def test_nan_map_is_an_error_and_writes_nothing(self):
        bad = np.zeros(SHAPE, np.float32)
        bad[0, 0, 0] = np.nan
        _save(bad, self.pred / "BraTS_001_anomaly.nii.gz")
        with self.assertRaisesRegex(ValueError, "NaN"):
            self._run()
        self.assertFalse((self.pred / "evaluation").exists())

    def test_matching_modality_names_and_datalist(self):
        for p in self.pred.glob("*_anomaly.nii.gz"):  # MONAI SaveImage names maps after the first input file
            p.rename(p.with_name(p.name.replace("_anomaly", "_flair_anomaly")))
        cases = find_cases(self.pred, self.lab, recon_suffix="", flip_suffix="")
        self.assertEqual([c["name"] for c in cases], ["BraTS_000_flair", "BraTS_001_flair", "BraTS_002_flair"])
        self.assertEqual(cases[1]["label"].name, "BraTS_001_seg.nii.gz")
        datalist = self.root / "datalist.json"
        items = [{"label": f"lab/BraTS_{i:03d}/BraTS_{i:03d}_seg.nii.gz"} for i in range(3)]
        datalist.write_text(json.dumps({"testing": items}))
        cases = find_cases(self.pred, datalist, image=self.img)
        self.assertEqual(len(cases), 3)
        modalities = [p.name.split("_")[-1] for p in cases[0]["image"]]
        self.assertEqual(modalities, ["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"])

    def test_cli(self):
        from berdiff.apps.cli import main

        out = self.root / "cli_out"
        with redirect_stdout(io.StringIO()) as buf:
            main(["evaluate", "--pred", str(self.pred), "--label", str(self.lab), "--out", str(out), "--nofigure"])
        self.assertIn("slice detection AUROC", buf.getvalue())
        self.assertNotIn("per_case", buf.getvalue())  # the returned dict is not dumped
        self.assertTrue((out / "metrics.json").is_file())


class TestEvaluateArrays(unittest.TestCase):
    def test_in_memory_cases_and_psnr(self):
        rng = np.random.default_rng(1)
        cases = []
        for i in range(3):
            gt = _gt(i)
            image = rng.random((4, *SHAPE)).astype(np.float32)
            recon = image + 0.1  # MSE 0.01
            score = (gt > 0) * 1.0
            cases.append({"name": f"c{i}", "score": score, "label": gt, "image": image, "recon": recon})
        res = evaluate_arrays(cases, threshold=0.5, brain_mask=False, median_size_3d=1, median_size_2d=1)
        self.assertEqual(res["n_cases"], 3)
        expected_psnr = [20 * math.log10(float(c["image"].max()) / 0.1) for c in cases]
        self.assertAlmostEqual(res["psnr"]["mean"], float(np.mean(expected_psnr)), places=3)
        self.assertEqual(res["maps"]["anomaly"]["protocol_b"]["dice"]["mean"], 1.0)
        self.assertNotIn("latent_flip", res["maps"])
        # an inverted map ranks every voxel the wrong way round
        inv = [dict(c, score=1.0 - c["score"]) for c in cases]
        res_inv = evaluate_arrays(inv, brain_mask=False, median_size_3d=1, median_size_2d=1)
        self.assertEqual(res_inv["maps"]["anomaly"]["protocol_b"]["auroc"]["mean"], 0.0)
        with tempfile.TemporaryDirectory() as d:
            evaluate_arrays(cases[:2], out=d)
            self.assertEqual(sorted(os.listdir(d)), ["figure.png", "metrics.json", "per_case.csv"])

    def test_bad_inputs(self):
        gt = _gt(1)
        with self.assertRaisesRegex(ValueError, "shape"):
            evaluate_arrays([{"score": np.zeros((32, 32, 7)), "label": gt}])
        with self.assertRaisesRegex(ValueError, "no cases"):
            evaluate_arrays([])
        with self.assertRaisesRegex(ValueError, "duplicate"):
            evaluate_arrays([{"name": "a", "score": gt * 1.0, "label": gt}] * 2)
        with self.assertRaisesRegex(ValueError, "brain mask"):
            evaluate_arrays([{"score": gt * 1.0, "label": gt}], brain_mask=True)


if __name__ == "__main__":
    unittest.main()


class TestReferenceMaps(unittest.TestCase):
    """The input-intensity reference maps, the comparisons with the anomaly map and the slice range."""

    def setUp(self):
        self.root = Path(tempfile.mkdtemp())
        self.pred, self.lab, self.img = self.root / "pred", self.root / "lab", self.root / "img"
        rng = np.random.default_rng(1)
        for i in range(1, 4):
            case = f"BraTS_{i:03d}"
            gt = _gt(i)
            head = np.zeros(SHAPE, np.float32)
            head[3:29, 3:29, :] = 1.0
            # the anomaly map is perfect; flair is bright in the tumour but noisy; t1 is unrelated noise
            _save((gt > 0).astype(np.float32) + 0.1 * rng.random(SHAPE).astype(np.float32), self.pred / f"{case}_anomaly.nii.gz")
            _save(gt, self.lab / case / f"{case}_seg.nii.gz")
            flair = head * (1 + 0.5 * (gt > 0) + 0.6 * rng.random(SHAPE).astype(np.float32))
            channels = {"t1": head * (1 + rng.random(SHAPE).astype(np.float32)), "t1ce": head, "t2": head, "flair": flair}
            for m, vol in channels.items():
                _save(vol.astype(np.float32), self.img / case / f"{case}_{m}.nii.gz")

    def tearDown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, **kwargs) -> dict:
        with redirect_stdout(io.StringIO()) as buf:
            res = evaluate(str(self.pred), str(self.lab), image=str(self.img), median_size_2d=1, median_size_3d=1,
                           erode=False, figure=False, **kwargs)
        self.stdout = buf.getvalue()
        return res

    def test_input_channels_are_scored_and_compared(self):
        res = self._run()
        for name in ("input_t1", "input_t1ce", "input_t2", "input_flair"):
            self.assertIn(name, res["maps"])
        flair = res["maps"]["input_flair"]["protocol_b"]["auroc"]["mean"]
        t1 = res["maps"]["input_t1"]["protocol_b"]["auroc"]["mean"]
        self.assertGreater(flair, 0.8)  # bright tumour
        self.assertLess(t1, 0.65)  # unrelated noise
        comp = res["comparisons"]["input_flair"]
        self.assertEqual(set(comp), {"volume_best_dice", "volume_auroc", "volume_auprc", "slice_dice", "slice_auroc",
                                     "slice_auprc"})
        self.assertEqual(comp["volume_auprc"]["n"], 3)  # one pair per volume
        self.assertEqual(comp["slice_dice"]["n"], res["maps"]["anomaly"]["protocol_a"]["n_slices"])
        # the perfect map beats flair: the interval of the difference lies above 0
        self.assertGreater(comp["volume_auprc"]["low"], 0.0)
        self.assertGreater(comp["slice_dice"]["low"], 0.0)
        self.assertIn("vs input_flair", self.stdout)
        rows = list(csv.DictReader(open(self.pred / "evaluation" / "per_case.csv")))
        self.assertIn("input_flair_b_auprc", rows[0])

    def test_references_off(self):
        res = self._run(references=False)
        self.assertEqual(list(res["maps"]), ["anomaly"])
        self.assertEqual(res["comparisons"], {})

    def test_slice_range(self):
        # the tumour boxes occupy slices 2..5: slices 0..2 hold one diseased slice per case
        res = self._run(slice_start=0, slice_stop=3)
        self.assertEqual(res["maps"]["anomaly"]["protocol_a"]["n_slices"], 3)
        self.assertEqual(res["settings"]["slice_range"], [0, 3])
        with self.assertRaisesRegex(ValueError, "empty"):
            self._run(slice_start=9, slice_stop=20)
