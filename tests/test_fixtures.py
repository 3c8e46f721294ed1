# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The shared test fixtures of tests/utils.py: the temporary-folder mixins clean up after themselves."""

from __future__ import annotations

import os
import unittest

from tests.utils import TempDirClassMixin, TempDirMixin


class _UsesTmp(TempDirMixin, unittest.TestCase):
    __test__ = False  # run only by the tests below

    def runTest(self):
        with open(os.path.join(self.tmp, "a.txt"), "w") as f:
            f.write("x")
        os.makedirs(os.path.join(self.tmp, "sub", "deeper"))


class _UsesClassTmp(TempDirClassMixin, unittest.TestCase):
    __test__ = False

    def test_write(self):
        with open(os.path.join(self.tmp, "b.txt"), "w") as f:
            f.write("y")


class TestTempDirMixins(unittest.TestCase):
    def test_per_test_folder_is_made_and_removed(self):
        case = _UsesTmp()
        result = unittest.TestResult()
        folders = []
        original = case.runTest
        case.runTest = lambda: (folders.append(case.tmp), self.assertTrue(os.path.isdir(case.tmp)), original())
        case.run(result)
        self.assertTrue(result.wasSuccessful(), result.errors + result.failures)
        self.assertEqual(len(folders), 1)
        self.assertFalse(os.path.exists(folders[0]))

    def test_class_folder_is_shared_and_removed(self):
        suite = unittest.defaultTestLoader.loadTestsFromTestCase(_UsesClassTmp)
        result = unittest.TestResult()
        suite.run(result)
        self.assertTrue(result.wasSuccessful(), result.errors + result.failures)
        self.assertFalse(os.path.exists(_UsesClassTmp.tmp))


if __name__ == "__main__":
    unittest.main()
