# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import unittest

import torch
import torch.nn as nn
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator

from berdiff.handlers import (
    CASE_FIELDS,
    RUN_SUMMARY_FIELDS,
    RunSummaryHandler,
    inference_mode,
    peak_memory_mb,
    preflight,
    run_evaluator,
)
from tests.utils import TempDirMixin


class _Net(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail
        self.seen_inference_mode = False

    def forward(self, x):
        if self.fail:
            raise ValueError("broken network input")
        self.seen_inference_mode = torch.is_inference_mode_enabled()
        return x[:, :1] * 2


def _volume(name: str, depth: int, head: slice) -> dict:
    img = torch.zeros(2, 4, 4, depth)
    img[:, 1:3, 1:3, head] = 1.0
    return {"image": MetaTensor(img, meta={"filename_or_obj": f"/data/{name}/{name}_t1.nii.gz"})}


class TestRunSummaryHandler(TempDirMixin, unittest.TestCase):
    def _evaluator(self, net: nn.Module, settings=None) -> SupervisedEvaluator:
        data = [_volume("A_1", 5, slice(1, 3)), _volume("A_2", 7, slice(0, 7))]
        handler = RunSummaryHandler(self.tmp, settings=settings, progress=True, output_postfixes=("anomaly",))
        return SupervisedEvaluator(
            device=torch.device("cpu"),
            val_data_loader=DataLoader(data, batch_size=1),
            network=net,
            val_handlers=[handler],
        )

    def _summary(self) -> dict:
        with open(os.path.join(self.tmp, "run_summary.json")) as f:
            return json.load(f)

    def test_summary_fields(self):
        net = _Net()
        settings = {"noise_level": 3, "device": torch.device("cpu")}
        run_evaluator(self._evaluator(net, settings=settings), on_error="raise")
        self.assertTrue(net.seen_inference_mode)
        summary = self._summary()
        self.assertEqual(tuple(summary), RUN_SUMMARY_FIELDS)
        self.assertEqual(summary["status"], "completed")
        self.assertIsNone(summary["error"])
        self.assertEqual(summary["num_cases"], 2)
        self.assertEqual(summary["num_slices"], 12)
        self.assertEqual(summary["settings"], {"noise_level": 3, "device": "cpu"})
        self.assertEqual(summary["device"], "cpu")
        self.assertEqual(summary["memory_kind"], "process_max_rss")
        self.assertGreater(summary["peak_memory_mb"], 1.0)
        self.assertEqual([c["case"] for c in summary["cases"]], ["A_1", "A_2"])
        self.assertEqual([c["num_head_slices"] for c in summary["cases"]], [2, 7])
        self.assertEqual(summary["cases"][0]["outputs"], ["A_1_anomaly.nii.gz"])
        for case in summary["cases"]:
            self.assertEqual(tuple(case), CASE_FIELDS)
            self.assertAlmostEqual(case["wall_time_s"], case["wait_time_s"] + case["inference_time_s"], delta=2e-4)
            self.assertEqual((case["status"], case["error"]), ("done", None))
        self.assertEqual((summary["done"], summary["skipped"], summary["failed"]), (["A_1", "A_2"], [], []))
        self.assertEqual((summary["num_done"], summary["num_skipped"], summary["num_failed"]), (2, 0, 0))
        self.assertGreater(summary["cases_per_s"], 0)
        self.assertEqual(os.listdir(self.tmp), ["run_summary.json"])

    def test_failure_is_recorded_and_reraised(self):
        with self.assertRaisesRegex(ValueError, "broken network input"):
            run_evaluator(self._evaluator(_Net(fail=True)), on_error="raise")
        summary = self._summary()
        self.assertEqual(summary["status"], "failed")
        self.assertEqual(summary["error"], "ValueError: broken network input")
        self.assertEqual(summary["cases"], [])

    def test_exit_mode(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as ctx:
            run_evaluator(self._evaluator(_Net(fail=True)), on_error="exit")
        self.assertEqual(ctx.exception.code, 1)
        self.assertTrue(err.getvalue().endswith("\nerror: broken network input\n"), err.getvalue())  # after the bar

    def test_bad_on_error(self):
        with self.assertRaisesRegex(ValueError, "on_error must be one of"):
            run_evaluator(self._evaluator(_Net()), on_error="ignore")

    def test_missing_checkpoint(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as ctx:
            run_evaluator(self._evaluator(_Net()), ckpt_path=os.path.join(self.tmp, "none.pt"))
        self.assertEqual(ctx.exception.code, 1)
        self.assertIn("error: model weights not found", err.getvalue())
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "run_summary.json")))


class TestPreflight(unittest.TestCase):
    def test_inputs_and_weights(self):
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(ValueError, "no input given"):
                preflight(on_error="raise")
            err = io.StringIO()
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as ctx:
                preflight(datalist=os.path.join(tmp, "missing.json"))
            self.assertEqual(ctx.exception.code, 1)
            self.assertEqual(err.getvalue(), f"error: datalist file not found: {tmp}/missing.json\n")
            with self.assertRaisesRegex(FileNotFoundError, "model weights not found"):
                preflight(image="a.nii.gz", ckpt_path=os.path.join(tmp, "m.pt"), on_error="raise")
            n = preflight(image="a.nii.gz", ckpt_path=os.path.join(tmp, "m.pt"), allow_random_weights=True)
            self.assertEqual(n, 1)


class TestUtilities(unittest.TestCase):
    def test_peak_memory_cpu(self):
        kind, mb = peak_memory_mb("cpu")
        self.assertEqual(kind, "process_max_rss")
        self.assertGreater(mb, 10.0)

    def test_inference_mode_restores_training(self):
        net = nn.Linear(2, 2).train()
        with inference_mode(net):
            self.assertFalse(net.training)
            y = net(torch.ones(1, 2))
        self.assertTrue(y.is_inference())
        self.assertTrue(net.training)


if __name__ == "__main__":
    unittest.main()
