# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

import numpy as np

from berdiff.evaluation.statistics import paired_bootstrap_ci


class TestPairedBootstrap(unittest.TestCase):
    def test_interval_covers_the_true_difference_and_shrinks_with_n(self):
        rng = np.random.default_rng(0)
        base = rng.normal(size=400)
        a, b = base + 0.3 + rng.normal(scale=0.5, size=400), base
        r = paired_bootstrap_ci(a, b, n_resamples=2000)
        self.assertLess(r["low"], 0.3)
        self.assertGreater(r["high"], 0.3)
        self.assertGreater(r["low"], 0.0)  # clearly better: the interval excludes 0
        self.assertLess(r["p_not_better"], 0.01)
        small = paired_bootstrap_ci(a[:25], b[:25], n_resamples=2000)
        self.assertGreater(small["high"] - small["low"], r["high"] - r["low"])

    def test_pairing_removes_the_shared_item_variance(self):
        rng = np.random.default_rng(1)
        base = rng.normal(scale=10.0, size=50)  # items differ a lot; the methods differ by 0.1 on every item
        r = paired_bootstrap_ci(base + 0.1, base, n_resamples=500)
        self.assertAlmostEqual(r["low"], 0.1)
        self.assertAlmostEqual(r["high"], 0.1)

    def test_nan_pairs_dropped_and_errors(self):
        r = paired_bootstrap_ci([1.0, np.nan, 3.0], [0.0, 1.0, np.nan], n_resamples=10)
        self.assertEqual(r["n"], 1)
        self.assertEqual(r["diff"], 1.0)
        self.assertEqual(paired_bootstrap_ci([np.nan], [1.0])["n"], 0)
        with self.assertRaises(ValueError):
            paired_bootstrap_ci([1.0], [1.0, 2.0])
        with self.assertRaises(ValueError):
            paired_bootstrap_ci([1.0], [1.0], confidence=1.0)


if __name__ == "__main__":
    unittest.main()
