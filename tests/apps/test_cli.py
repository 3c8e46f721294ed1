# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import unittest

from berdiff.apps.cli import COMMANDS, main


class TestCli(unittest.TestCase):
    def test_usage_lists_commands(self):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            main([])
        for name in COMMANDS:
            self.assertIn(name, buf.getvalue())

    def test_unknown_command(self):
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as ctx:
            main(["no_such_command"])
        self.assertEqual(ctx.exception.code, 2)

    def test_bad_input_is_one_line_error(self):
        with tempfile.TemporaryDirectory() as tmp:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as ctx:
                main(["prepare_brats", "--src", os.path.join(tmp, "missing"), "--out", os.path.join(tmp, "out")])
            self.assertEqual(ctx.exception.code, 1)
            self.assertTrue(err.getvalue().startswith("error: "), err.getvalue())
            self.assertNotIn("Traceback", err.getvalue())
            self.assertFalse(os.path.exists(os.path.join(tmp, "out")))

    def test_every_command_resolves(self):
        import importlib

        for name, target in COMMANDS.items():
            module, func = target.split(":")
            self.assertTrue(callable(getattr(importlib.import_module(module), func)), name)


if __name__ == "__main__":
    unittest.main()
