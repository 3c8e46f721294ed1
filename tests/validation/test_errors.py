# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.validation.errors: the root cause behind MONAI's wrappers and the one-line command-line error."""

from __future__ import annotations

import io
import os
import unittest
from contextlib import redirect_stderr
from unittest import mock

import numpy as np
from monai.transforms import Compose, Lambda

from berdiff.validation import DEBUG_ENV, KnobError, debug_enabled, error_line, exit_on_error, root_cause


def _fail(_):
    raise FileNotFoundError("image file not found: /data/x.nii.gz")


class TestRootCause(unittest.TestCase):
    def test_unwraps_compose(self):
        with self.assertRaises(RuntimeError) as ctx:
            Compose([Lambda(_fail)])(np.zeros(1))
        cause = root_cause(ctx.exception)
        self.assertIsInstance(cause, FileNotFoundError)
        self.assertIn("image file not found", str(cause))

    def test_leaves_other_errors(self):
        error = RuntimeError("something else")
        error.__cause__ = ValueError("inner")
        self.assertIs(root_cause(error), error)
        plain = ValueError("plain")
        self.assertIs(root_cause(plain), plain)


class TestErrorLine(unittest.TestCase):
    def test_knob_error_line(self):
        error = KnobError("noise_level", 0, "an integer in [1, 1000]")
        self.assertIsInstance(error, ValueError)
        self.assertEqual(error_line(error), "error: noise_level = 0: an integer in [1, 1000]")

    def test_wrapped_error_line(self):
        with self.assertRaises(RuntimeError) as ctx:
            Compose([Lambda(_fail)])(np.zeros(1))
        self.assertEqual(error_line(ctx.exception), "error: image file not found: /data/x.nii.gz")

    def test_empty_message_names_the_type(self):
        self.assertEqual(error_line(KeyError()), "error: KeyError")

    def test_exit_on_error(self):
        stderr = io.StringIO()
        with mock.patch.dict(os.environ, {DEBUG_ENV: "0"}), redirect_stderr(stderr):
            with self.assertRaises(SystemExit) as ctx:
                exit_on_error(ValueError("bad input"))
        self.assertEqual(ctx.exception.code, 1)
        self.assertEqual(stderr.getvalue().strip(), "error: bad input")

    def test_debug_raises_the_cause(self):
        with mock.patch.dict(os.environ, {DEBUG_ENV: "1"}):
            self.assertTrue(debug_enabled())
            with self.assertRaises(ValueError):
                exit_on_error(ValueError("bad input"))


if __name__ == "__main__":
    unittest.main()
