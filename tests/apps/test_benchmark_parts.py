# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The benchmark's settings objects, its one sweep loop and its data-folder rule (no training: fast)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import unittest
from unittest import mock

from berdiff.apps.benchmark.settings import (
    DATA_DIR_ENV,
    BenchmarkSettings,
    DataSettings,
    Method,
    SweepSettings,
    TrainingSettings,
)
from berdiff.apps.benchmark.sweep import better, sweep


class TestSettings(unittest.TestCase):
    def test_from_flags_routes_every_flag_to_its_group(self):
        s = BenchmarkSettings.from_flags(
            methods="masked,ae", size=32, ae_lr=0.1, noise_levels="10,20", prob_thresholds=0.5, device="cpu", threads=1
        )
        self.assertEqual(s.methods, (Method.MASKED, Method.AE))
        self.assertEqual((s.data.size, s.training.ae_lr), (32, 0.1))
        self.assertEqual((s.sweep.noise_levels, s.sweep.prob_thresholds), ((10, 20), (0.5,)))
        self.assertEqual((s.device, s.threads), ("cpu", 1))
        self.assertEqual(BenchmarkSettings.from_flags().methods, tuple(Method.__members__.values()))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            s.data.size = 64  # type: ignore[misc]
        with self.assertRaisesRegex(TypeError, "unknown benchmark setting 'sizes'"):
            BenchmarkSettings.from_flags(sizes=3)

    def test_every_flag_of_the_command_is_a_setting(self):
        import inspect

        from berdiff.apps.benchmark import benchmark

        fields = {f.name for c in (DataSettings, TrainingSettings, SweepSettings) for f in dataclasses.fields(c)}
        flags = set(inspect.signature(benchmark).parameters) - {"methods", "device", "threads"}
        self.assertEqual(flags, fields)

    def test_checks(self):
        with self.assertRaisesRegex(ValueError, "unknown method"):
            BenchmarkSettings(methods=("ae", "vae"))
        with self.assertRaisesRegex(ValueError, "tune_fraction"):
            DataSettings(tune_fraction=1.0)
        with self.assertRaisesRegex(ValueError, "budget_tflop"):
            TrainingSettings(budget_tflop=-1.0)
        with self.assertRaisesRegex(ValueError, "prob_thresholds"):
            SweepSettings(prob_thresholds=(1.5,))
        with self.assertRaisesRegex(ValueError, "noise_levels must be non-empty with values in \\[1, 100\\]"):
            BenchmarkSettings.from_flags(num_train_timesteps=100)  # the default L grid goes up to 300
        self.assertEqual(TrainingSettings(budget_tflop=2.0).budget_flops, 2e12)
        record = BenchmarkSettings.from_flags(out="x", train_dir="y").record()
        self.assertNotIn("out", record)
        self.assertEqual(record["methods"], ["ae", "unmasked", "masked", "ddpm"])

    def test_data_folder_is_explicit(self):
        with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop(DATA_DIR_ENV, None)
            with self.assertRaisesRegex(FileNotFoundError, f"--train_dir, or --data_dir \\(or set {DATA_DIR_ENV}\\)"):
                DataSettings().folder("train")
            with self.assertRaisesRegex(FileNotFoundError, "no val/ sub-folder"):
                DataSettings(data_dir=tmp).folder("val")
            os.makedirs(os.path.join(tmp, "train"))
            os.environ[DATA_DIR_ENV] = tmp
            self.assertEqual(str(DataSettings().folder("train")), os.path.join(tmp, "train"))


class TestSweep(unittest.TestCase):
    @staticmethod
    def _score(cand):
        # a known score surface: best Dice at L = 200; AUPRC breaks the tie between P values
        return {"dice_fixed": 1.0 - abs(cand["L"] - 200) / 1000, "auprc": cand.get("P", 0.0),
                "wall_seconds_per_slice": 0.01}

    def test_one_loop_keeps_rows_and_the_best(self):
        calls = []

        def score(c):
            calls.append(dict(c))
            return self._score(c)

        cands = [{"L": L, "P": P} for L in (100, 200, 300) for P in (0.2, 0.8)]
        with mock.patch("builtins.print"):
            rows, best = sweep("masked", cands, score)
        self.assertEqual(len(rows), 6)
        self.assertEqual((best["L"], best["P"]), (200, 0.8))
        self.assertEqual([{"L": r["L"], "P": r["P"]} for r in rows], cands)
        self.assertEqual(calls, cands)
        # a known row is reused, not scored again
        calls.clear()
        with mock.patch("builtins.print"):
            rows, _ = sweep("masked", [{"L": 200, "P": 0.8}, {"L": 100, "P": 0.8}], score, known=[best])
        self.assertEqual(calls, [{"L": 100, "P": 0.8}])
        self.assertIs(rows[0]["dice_fixed"], best["dice_fixed"])
        with self.assertRaisesRegex(ValueError, "nothing to tune"):
            sweep("ddpm", [], score)

    def test_better_ranks_dice_then_auprc_and_nan_last(self):
        nan = float("nan")
        self.assertTrue(better({"dice_fixed": 0.1, "auprc": 0.0}, None))
        self.assertTrue(better({"dice_fixed": 0.2, "auprc": 0.0}, {"dice_fixed": 0.1, "auprc": 0.9}))
        self.assertTrue(better({"dice_fixed": 0.1, "auprc": 0.5}, {"dice_fixed": 0.1, "auprc": 0.4}))
        self.assertFalse(better({"dice_fixed": nan, "auprc": 0.5}, {"dice_fixed": 0.0, "auprc": 0.0}))
        self.assertFalse(better({"dice_fixed": 0.1, "auprc": 0.4}, {"dice_fixed": 0.1, "auprc": 0.4}))


if __name__ == "__main__":
    unittest.main()
