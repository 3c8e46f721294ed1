# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.validation.knobs: each check names the knob, its value and the allowed range."""

from __future__ import annotations

import unittest

from parameterized import parameterized

from berdiff.validation import (
    SETTING_CHECKS,
    KnobError,
    check_float,
    check_int,
    check_option,
    check_settings,
    spatial_multiple,
)


class TestSingleChecks(unittest.TestCase):
    def test_int(self):
        self.assertEqual(check_int("batch_size", 4, 1), 4)
        self.assertIsNone(check_int("seed", None, 0, allow_none=True))
        for bad in (0, 2.5, "4", True, None):
            with self.assertRaises(KnobError, msg=repr(bad)) as ctx:
                check_int("batch_size", bad, 1)
            self.assertTrue(str(ctx.exception).startswith(f"batch_size = {bad!r}: "), str(ctx.exception))

    def test_float(self):
        self.assertEqual(check_float("learning_rate", 1e-4, 0.0, low_open=True), 1e-4)
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with self.assertRaises(KnobError, msg=repr(bad)):
                check_float("learning_rate", bad, 0.0, low_open=True)

    def test_option_suggests_the_closest(self):
        self.assertEqual(check_option("on_error", "exit", ("raise", "exit", "continue")), "exit")
        with self.assertRaises(KnobError) as ctx:
            check_option("on_error", "exitt", ("raise", "exit", "continue"))
        self.assertIn("one of raise, exit, continue", str(ctx.exception))
        self.assertIn("did you mean", str(ctx.exception))


class TestCheckSettings(unittest.TestCase):
    def test_good_settings(self):
        out = check_settings({"preset": "tiny", "spatial_size": 64, "noise_level": 200, "num_inference_steps": 50,
                              "prediction_type": "sample"})
        self.assertEqual(out["preset"], "tiny")
        self.assertEqual(out["spatial_size"], [64, 64])

    def test_auto_grid_is_the_presets(self):
        out = check_settings({"preset": "small", "spatial_size": "auto", "pixdim": "auto"})
        self.assertEqual((out["spatial_size"], out["pixdim"]), ([128, 128], 2.0))
        out = check_settings({"preset": "reference", "spatial_size": "auto", "pixdim": None})
        self.assertEqual((out["spatial_size"], out["pixdim"]), ([256, 256], None))
        out = check_settings({"preset": "small", "spatial_size": "auto", "pixdim": "input"})
        self.assertEqual((out["spatial_size"], out["pixdim"]), ([128, 128], None))

    @parameterized.expand(
        [
            ("noise_level", {"noise_level": 0}),
            ("noise_level", {"noise_level": 1001}),
            ("num_inference_steps", {"noise_level": 10, "num_inference_steps": 0}),
            ("spatial_size", {"preset": "tiny", "spatial_size": 63}),
            ("spatial_size", {"spatial_size": "auto"}),
            ("pixdim", {"pixdim": 0}),
            ("pixdim", {"pixdim": "2mm"}),
            ("precision", {"precision": "fp8"}),
            ("lr_rule", {"lr_rule": "cubic"}),
            ("data_placement", {"data_placement": "disk"}),
            ("anomaly_reference", {"anomaly_reference": "healthy"}),
            ("prediction_type", {"prediction_type": "epsilon"}),
        ]
    )
    def test_bad_settings_name_the_knob(self, knob, settings):
        with self.assertRaises(KnobError) as ctx:
            check_settings(settings)
        self.assertTrue(str(ctx.exception).startswith(f"{knob} = "), str(ctx.exception))

    def test_unknown_name_is_a_programming_error(self):
        with self.assertRaises(ValueError) as ctx:
            check_settings({"not_a_knob": 1})
        self.assertNotIsInstance(ctx.exception, KnobError)

    def test_every_independent_check_accepts_its_default_kind(self):
        self.assertIn("device", SETTING_CHECKS)
        self.assertGreaterEqual(spatial_multiple("tiny"), 1)


if __name__ == "__main__":
    unittest.main()
